"""The data map of a real run, with flipped labels to see where they land (Dataset Cartography, Fig. 1).

    python bench/datamap_example.py                              # digits, 20% symmetric noise, 20 epochs (~7 min on 2 busy cores)
    python bench/datamap_example.py --rate 0 --out /tmp/clean    # the clean split

Flips `--rate` of the digits training labels (`bench/label_noise.py`'s `flip`, seed `--seed`), trains the
project's CNN with the train split tracked by the training pass into a temporary local MLflow store,
runs the post-hoc job (panels on, so it draws `action_scores/train/data_map.png`), and prints, per
region of `scores.parquet`, how many samples it holds and how many of them were flipped.

Writes to `--out`: data_map.png (the job's own PNG, as logged) and data_map.md (the table and the command).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_noise import digits, flip, local_store, train_scores  # noqa: E402

from tracking.analyze import analyze_run  # noqa: E402
from tracking.backends import MLflowTracker  # noqa: E402
from tracking.contract import DATA_MAP_FILE, scores_dir  # noqa: E402
from tracking.scoring.regions import REGION, REGIONS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.2, help="fraction of training labels flipped (0: none)")
    parser.add_argument("--kind", default="symmetric", choices=("symmetric", "asymmetric"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/datamap")
    args = parser.parse_args()
    started = time.perf_counter()
    data = digits()
    noisy, flipped = flip(data.labels, data.classes, args.rate, args.kind, args.seed)
    store = local_store("label-noise")  # the experiment train_scores logs to
    scores = train_scores(data, noisy, args.epochs, store.uri, args.seed)  # the job without panels: scores only
    run_id = scores.attrs["run_id"]
    analyze_run(MLflowTracker(store.uri), run_id, force=True, progress=False)  # again with panels: the data map
    tracker = MLflowTracker(store.uri)
    tracker.attach(run_id)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        (out / DATA_MAP_FILE).write_bytes(tracker.download(f"{scores_dir('train')}/{DATA_MAP_FILE}", folder).read_bytes())
    scores["flipped"] = flipped[scores["sample_id"].to_numpy()]
    counts = scores.groupby(REGION)["flipped"].agg(["count", "sum"]).reindex(REGIONS, fill_value=0)
    rows = [(name, int(n), int(bad)) for name, (n, bad) in counts.iterrows()] + [
        ("all", len(scores), int(flipped.sum()))]
    command = "python " + shlex.join(["bench/datamap_example.py", *sys.argv[1:]])
    took = time.perf_counter() - started
    lines = [f"# Data map: digits, {args.rate:.0%} {args.kind} label noise, {args.epochs} epochs, training pass", "",
             f"`{command}` ({took:.0f} s; run {run_id} in a temporary store)", "", f"![data map]({DATA_MAP_FILE})", "",
             "| region | samples | flipped | share flipped | share of all flipped |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {n} | {bad} | {bad / max(n, 1):.3f} | {bad / max(int(flipped.sum()), 1):.3f} |"
              for name, n, bad in rows]
    markdown = "\n".join(lines) + "\n"
    (out / "data_map.md").write_text(markdown)
    print(markdown)
    print(f"{out / DATA_MAP_FILE}, {out / 'data_map.md'}; {took:.0f} s")


if __name__ == "__main__":
    main()
