"""The post-hoc maths: read and check recorded tables, fold them into scores, rank.

- `tables`: which files make a split; one checked epoch table.
- `accumulator`: the streaming per-sample state, one epoch at a time.
- `rank`: hardest and easiest by a score column.
- `engines`: `arrow` (every score) and `duckdb` (loss sums, for runs larger than memory).

No torch, no tracker: arrays in, arrays out.
"""
