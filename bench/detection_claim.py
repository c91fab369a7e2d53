"""The paper's detection claim, measured on an analysed detect run.

    python -m experiments.detect --epochs 8 --experiment digit-scenes-claim
    python -m experiments.detect --dataset voc2007 --data-root /tmp/data/voc --limit 160 --image-size 160 --epochs 6
    action-scores analyze --run-id <id>
    python bench/detection_claim.py --run-id <id> --out bench/results/detection_claim

The paper: hardest localisation = images with many small objects; easiest = one large,
centred object. Prints, and writes to `--out` as `claim.md`:
- the run: model, images per split, epochs, wall time, the last val mAP@0.5;
- the Spearman rank correlation of `action_loc`, `action_pos`, `action_neg` and `action`
  with the number of objects and with the median object size per image (sqrt(box area) /
  sqrt(image area), from the annotations: scores.parquet's `num_objects`, `median_box_size`);
- among the 10 hardest and the 10 easiest per part: mean object count, median size, the
  share with a single object, and how far the largest object's centre lies from the image
  centre (0 = centred, 1 = in a corner), read from the annotations of the run's dataset.
The job's own panels (`action_scores/<split>/<part>/{hardest,easiest}.png`: the real
pictures with their boxes and class names) are copied beside it as palette PNGs; nothing is redrawn.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from experiments.detection_data import load_detection_split
from tracking import contract
from tracking.backends import MLflowTracker

OBJECTIVES = {"action_loc": "loc", "action_pos": "pos", "action_neg": "neg", "action": "loss"}  # column: panel dir


def largest_object_geometry(dataset, sample_ids: pd.Series) -> pd.DataFrame:  # noqa: ANN001 - a DetectionDataset
    """Per image: the largest box's share of the image area and its centre's distance from the
    image centre, over the half-diagonal (0 = centred, 1 = a corner)."""
    rows = []
    for sample_id in tqdm(sample_ids, desc="annotations", unit="image"):
        image, boxes, _ = dataset.scene(int(sample_id))
        height, width = image.shape[:2]
        if not len(boxes):
            rows.append({"sample_id": int(sample_id), "largest_area": 0.0, "largest_offset": float("nan")})
            continue
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        x1, y1, x2, y2 = boxes[int(np.argmax(areas))]
        offset = np.hypot((x1 + x2) / 2 - width / 2, (y1 + y2) / 2 - height / 2) / np.hypot(width / 2, height / 2)
        rows.append({"sample_id": int(sample_id), "largest_area": float(areas.max() / (height * width)),
                     "largest_offset": float(offset)})
    return pd.DataFrame(rows)


def compact_copy(source: Path, target: Path, colours: int = 128) -> None:
    """The panel as a palette PNG (about a quarter of the bytes, for the repository), keeping its
    text chunks: `read_panel_rows` still names the shown images."""
    from PIL import Image, PngImagePlugin

    with Image.open(source) as panel:
        info = PngImagePlugin.PngInfo()
        for key, value in panel.text.items():
            info.add_text(key, value)
        panel.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT).save(target, optimize=True,
                                                                                        pnginfo=info)


def claim_table(scores: pd.DataFrame, top_k: int) -> list[str]:
    """Markdown rows: per action column, Spearman with count and size, then the top and bottom k."""
    lines = ["| action | rho(number of objects) | rho(median object size) | hardest 10: objects, size, single, "
             "offset | easiest 10: objects, size, single, offset |", "| --- | --- | --- | --- | --- |"]

    def describe(rows: pd.DataFrame) -> str:
        return (f"{rows['num_objects'].mean():.1f}, {rows['median_box_size'].median():.2f}, "
                f"{(rows['num_objects'] == 1).mean():.0%}, {rows['largest_offset'].mean():.2f}")

    for column in OBJECTIVES:
        rho_count = spearmanr(scores[column], scores["num_objects"]).statistic
        rho_size = spearmanr(scores[column], scores["median_box_size"]).statistic
        # Ties broken by lower sample id, as the job ranks: these are the panels' images.
        ranked = scores.sort_values([column, "sample_id"], ascending=[False, True])
        easiest = scores.sort_values([column, "sample_id"], ascending=[True, True])
        lines.append(f"| `{column}` | {rho_count:+.2f} | {rho_size:+.2f} | {describe(ranked.head(top_k))} | "
                     f"{describe(easiest.head(top_k))} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--data-root", default="", help="the data, if it moved since the run (default: the run's)")
    parser.add_argument("--out", default="", help="folder for claim.md and the job's panels (default: print only)")
    args = parser.parse_args()
    tracker = MLflowTracker(args.tracking_uri)
    tracker.attach(args.run_id)
    run = tracker.native.get_run(args.run_id)
    params = run.data.params
    with tempfile.TemporaryDirectory() as tmp:
        scores = pd.read_parquet(tracker.download(f"action_scores/{args.split}/scores.parquet", Path(tmp)))
        panels = {f"{part}-{end}.png": tracker.download(f"action_scores/{args.split}/{part}/{end}.png", Path(tmp) / part)
                  for part in OBJECTIVES.values() for end in ("hardest", "easiest")} if args.out else {}
        split = load_detection_split(params[contract.DATASET_PARAM], args.split,
                                     args.data_root or params[contract.DATA_ROOT_PARAM] or None)
        scores = scores.merge(largest_object_geometry(split.dataset, scores["sample_id"]), on="sample_id")
        wall = timedelta(seconds=round((run.info.end_time - run.info.start_time) / 1000))
        map_50 = run.data.metrics.get(f"{args.split}_map_50")
        lines = [
            f"run `{args.run_id}`: {params.get('detector', params.get('model'))} at "
            f"{params.get('input_size', params.get('image_size'))} px on {params['dataset']}, "
            f"{scores['epochs'].iloc[0]} epochs, {len(scores)} {args.split} images scored (limit "
            f"{params.get('limit')} per split), batch {params.get('batch_size')}, wall {wall}, last "
            f"{args.split} mAP@0.5 {map_50 if map_50 is None else f'{map_50:.3f}'}",
            "",
            f"Spearman over the {len(scores)} images; then, among the {args.top_k} hardest and easiest: mean number "
            "of objects, median object size (sqrt of box over image area), share with a single object, and the "
            "largest object's centre offset (0 = centred, 1 = a corner)",
            "",
            *claim_table(scores, args.top_k),
        ]
        print("\n".join(lines))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "claim.md").write_text("\n".join(lines) + "\n")
            for name, path in panels.items():
                compact_copy(path, out / name)
            print(f"wrote {out / 'claim.md'} and {len(panels)} panels")


if __name__ == "__main__":
    main()
