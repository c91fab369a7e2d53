"""The post-hoc maths: read and check recorded tables, fold them into scores, rank.

- `tables`: which files make a split; one checked epoch table.
- `registry`: every score as one entry: columns, init/update/reduce, direction, paper.
- `accumulator`: drives the registry over a split's tables, one epoch at a time.
- `rank`: hardest and easiest by a score column, in its registered direction; `pick` ranks a panel's rows once.
- `engines`: `arrow` (every score) and `duckdb` (loss sums, for runs larger than memory).

No torch, no tracker: arrays in, arrays out.
"""
