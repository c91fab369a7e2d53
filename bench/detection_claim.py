"""The paper's detection claim, measured on an analysed detect run.

    python -m experiments.detect --epochs 8 --experiment digit-scenes-claim
    action-scores analyze --run-id <id>
    python bench/detection_claim.py --run-id <id>

The paper: hardest localisation = images with many small objects; easiest = one
centred object. Prints the Spearman rank correlation of each part's action with the
number of objects and with the median object size per image (both columns of the run's
scores.parquet), and the mean object count and size among the 10 hardest and easiest.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from tracking.backends import MLflowTracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    tracker = MLflowTracker(args.tracking_uri)
    tracker.attach(args.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        scores = pd.read_parquet(tracker.download(f"action_scores/{args.split}/scores.parquet", Path(tmp)))
    print(f"run {args.run_id}, split {args.split}: {len(scores)} images, {scores['epochs'].iloc[0]} epochs")
    print("| action | rho(num_objects) | rho(median_box_size) | hardest 10: objects, size | easiest 10: objects, size |")
    print("| --- | --- | --- | --- | --- |")
    for column in [c for c in scores.columns if c.startswith("action")]:
        rho_count = spearmanr(scores[column], scores["num_objects"]).statistic
        rho_size = spearmanr(scores[column], scores["median_box_size"]).statistic
        top = scores.nlargest(10, column)
        bottom = scores.nsmallest(10, column)
        print(f"| {column} | {rho_count:+.3f} | {rho_size:+.3f} | {top['num_objects'].mean():.1f}, "
              f"{top['median_box_size'].mean():.3f} | {bottom['num_objects'].mean():.1f}, "
              f"{bottom['median_box_size'].mean():.3f} |")


if __name__ == "__main__":
    main()
