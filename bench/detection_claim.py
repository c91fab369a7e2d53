"""The paper's detection claim, measured on an analysed detect run.

    python -m experiments.detect --epochs 8 --experiment digit-scenes-claim
    python -m experiments.detect --dataset voc2007 --data-root /tmp/data/voc --image-size 160 --epochs 30
    action-scores analyze --run-id <id>
    python bench/detection_claim.py --run-id <id> --out bench/results/detection_claim

The paper: hardest localisation = images with many small objects; easiest = one large,
centred object. Prints, and writes to `--out` as `claim.md`:
- the run: model, images per split, epochs, wall time, the last val mAP@0.5;
- the Spearman rank correlation of `action_loc`, `action_pos`, `action_neg` and `action`
  with the number of objects and with the median object size per image (sqrt(box area) /
  sqrt(image area), from the annotations: the detection view's `num_objects`, `median_box_size`);
- among the 10 hardest and the 10 easiest per part: mean object count, median size, the
  share with a single object, and how far the largest object's centre lies from the image
  centre (0 = centred, 1 = in a corner), read from the annotations of the run's dataset;
- a 95% bootstrap interval (over images) for each correlation;
- the same correlations for each epoch's own loss, not summed, beside the val mAP@0.5 of that
  epoch (`rho_by_epoch.png`): a link already there in the first epoch comes from SSD's geometry
  (how boxes meet anchors), one that grows as the model learns comes from what it learned.
Everything is measured over the images with at least one object: an image without one (the
VOC copy in ../shared has 9 val images with no annotated object) has no matched anchor, so its loc and pos
losses are 0 by construction, not easy. The panels (`<part>-{hardest,easiest}.png`: the real
pictures with their boxes and class names) are drawn over the same images with the job's own
drawing code, and stored as palette PNGs.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import timedelta
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from experiments.detection_data import load_detection_split, split_view
from tracking import contract
from tracking.backends import MLflowTracker
from tracking.report.panels import ranked_panels
from tracking.report.plots import agg_figure
from tracking.report.views import SplitView
from tracking.scoring.rank import pick

OBJECTIVES = {"action_loc": "loc", "action_pos": "pos", "action_neg": "neg", "action": "loss"}  # column: panel dir
QUANTITIES = {"num_objects": "number of objects", "median_box_size": "median object size"}
BOOTSTRAP = 1000


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


def rank_correlation_interval(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of Spearman's rho over `BOOTSTRAP` resamples of the images."""
    generator = np.random.default_rng(seed)
    picks = generator.integers(0, len(x), size=(BOOTSTRAP, len(x)))
    rhos = [spearmanr(x[pick], y[pick]).statistic for pick in picks]
    low, high = np.nanpercentile(rhos, [2.5, 97.5])
    return float(low), float(high)


def epoch_loss_column(action: str) -> str:
    """The per-epoch table column an action sums: `loss_loc` for `action_loc`, `loss` for `action`."""
    part = OBJECTIVES[action]
    return contract.LOSS if part == contract.LOSS else contract.part_column(part)


def rho_by_epoch(tracker: MLflowTracker, split: str, scores: pd.DataFrame, work: Path) -> pd.DataFrame:
    """Per epoch, per action column: Spearman of that epoch's loss (not the sum) with each quantity."""
    files = {contract.parse_epoch_file_name(PurePosixPath(name).name): name
             for name in tracker.list_files(contract.losses_dir(split))}
    files.pop(None, None)
    quantities = scores[["sample_id", *QUANTITIES]]
    rows = []
    for epoch in tqdm(sorted(files), desc="epoch tables", unit="epoch"):
        columns = ["sample_id", *(epoch_loss_column(action) for action in OBJECTIVES)]
        table = pd.read_parquet(tracker.download(files[epoch], work), columns=columns).merge(quantities, on="sample_id")
        for action in OBJECTIVES:
            rows.append({"epoch": epoch + 1, "action": action, **{
                quantity: spearmanr(table[epoch_loss_column(action)], table[quantity]).statistic
                for quantity in QUANTITIES}})
    return pd.DataFrame(rows)


def plot_rho_by_epoch(by_epoch: pd.DataFrame, map_by_epoch: dict[int, float], split: str, path: Path,
                      title: str) -> Path:
    """One panel per quantity: rho of each part's per-epoch loss; a third with the val mAP@0.5 per epoch."""
    from matplotlib.ticker import MaxNLocator

    figure = agg_figure(15.0, 4.2)
    for index, (quantity, label) in enumerate(QUANTITIES.items(), start=1):
        axes = figure.add_subplot(1, 3, index)
        for action, rows in by_epoch.groupby("action", sort=False):
            axes.plot(rows["epoch"], rows[quantity], marker=".", label=f"{epoch_loss_column(action)} of the epoch")
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.set_ylim(-1.0, 1.0)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(f"Spearman rho with {label}")
        axes.legend(fontsize=8)
    axes = figure.add_subplot(1, 3, 3)
    axes.plot(list(map_by_epoch), list(map_by_epoch.values()), marker=".", color="black")
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylim(bottom=0.0)
    axes.set_ylabel(f"{split} mAP@0.5 after the epoch")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    return path


def epoch_table(by_epoch: pd.DataFrame, map_by_epoch: dict[int, float], split: str) -> list[str]:
    """Markdown rows of `rho_by_epoch` at the first, second, middle and last epochs, with that epoch's mAP."""
    lines = [f"Spearman of each epoch's own loss (not the sum) with the number of objects and the median object "
             f"size, at the first, second, middle and last epochs, and {split} mAP@0.5 after that epoch:", "",
             "| epoch | mAP@0.5 | " + " | ".join(f"{epoch_loss_column(a)}: count, size" for a in OBJECTIVES) + " |",
             "| --- | --- |" + " --- |" * len(OBJECTIVES)]
    epochs = sorted(by_epoch["epoch"].unique())
    for epoch in sorted({epochs[0], epochs[min(1, len(epochs) - 1)], epochs[len(epochs) // 2], epochs[-1]}):
        rows = by_epoch[by_epoch["epoch"] == epoch].set_index("action")
        cells = " | ".join(f"{rows.at[a, 'num_objects']:+.2f}, {rows.at[a, 'median_box_size']:+.2f}"
                           for a in OBJECTIVES)
        map_cell = f"{map_by_epoch[epoch]:.3f}" if epoch in map_by_epoch else "-"
        lines.append(f"| {epoch} | {map_cell} | {cells} |")
    return lines


def claim_table(scores: pd.DataFrame, top_k: int) -> list[str]:
    """Markdown rows: per action column, Spearman with count and size, then the top and bottom k."""
    lines = ["| action | rho(number of objects) [95% CI] | rho(median object size) [95% CI] | hardest 10: objects, "
             "size, single, offset | easiest 10: objects, size, single, offset |", "| --- | --- | --- | --- | --- |"]

    def describe(rows: pd.DataFrame) -> str:
        return (f"{rows['num_objects'].mean():.1f}, {rows['median_box_size'].median():.2f}, "
                f"{(rows['num_objects'] == 1).mean():.0%}, {rows['largest_offset'].mean():.2f}")

    def rho(column: str, quantity: str) -> str:
        x, y = scores[column].to_numpy(), scores[quantity].to_numpy()
        low, high = rank_correlation_interval(x, y)
        return f"{spearmanr(x, y).statistic:+.2f} [{low:+.2f}, {high:+.2f}]"

    for column in OBJECTIVES:
        picked = pick(scores, column, top_k, higher_is_harder=True)  # the panels' images, ranked as the job ranks
        lines.append(f"| `{column}` | {rho(column, 'num_objects')} | {rho(column, 'median_box_size')} | "
                     f"{describe(picked.hardest)} | {describe(picked.easiest)} |")
    return lines


def draw_panels(scores: pd.DataFrame, view: SplitView, top_k: int, work: Path) -> dict[str, Path]:
    """`<part>-hardest.png` and `<part>-easiest.png` of `scores`' images, ranked and drawn by the job's own
    code (`pick`, `ranked_panels`: boxes and class names, captioned with the action and the object count)."""
    panels = {}
    for column, part in OBJECTIVES.items():
        written, _ = ranked_panels(pick(scores, column, top_k, higher_is_harder=True), work / part, view.picture,
                                   view.label)
        panels.update({f"{part}-{path.name}": path for path in written})
    return panels


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
        data_root = args.data_root or params[contract.DATA_ROOT_PARAM] or None
        split = load_detection_split(params[contract.DATASET_PARAM], args.split, data_root)
        view = split_view(params[contract.DATASET_PARAM], args.split, scores["sample_id"].to_numpy(), data_root)
        scores = view.frame(scores).merge(largest_object_geometry(split.dataset, scores["sample_id"]), on="sample_id")
        without_objects = int((scores["num_objects"] == 0).sum())
        scores = scores[scores["num_objects"] > 0].reset_index(drop=True)
        wall = timedelta(seconds=round((run.info.end_time - run.info.start_time) / 1000))
        map_50 = run.data.metrics.get(f"{args.split}_map_50")
        lines = [
            f"run `{args.run_id}`: {params.get('detector', params.get('model'))} at "
            f"{params.get('input_size', params.get('image_size'))} px on {params['dataset']}, "
            f"{scores['epochs'].iloc[0]} epochs, {len(scores) + without_objects} {args.split} images scored (limit "
            f"{params.get('limit')} per split), batch {params.get('batch_size')}, wall {wall}, last "
            f"{args.split} mAP@0.5 {map_50 if map_50 is None else f'{map_50:.3f}'}",
            "",
            f"Spearman over the {len(scores)} images with at least one object ({without_objects} without one "
            f"left out: their loc and pos losses are 0 by construction); then, among the {args.top_k} hardest and easiest: mean number "
            "of objects, median object size (sqrt of box over image area), share with a single object, and the "
            "largest object's centre offset (0 = centred, 1 = a corner)",
            "",
            *claim_table(scores, args.top_k),
        ]
        by_epoch = rho_by_epoch(tracker, args.split, scores, Path(tmp) / "epochs")
        map_by_epoch = {metric.step + 1: metric.value for metric in
                        sorted(tracker.native.get_metric_history(args.run_id, f"{args.split}_map_50"),
                               key=lambda metric: metric.step)}
        lines += ["", *epoch_table(by_epoch, map_by_epoch, args.split)]
        print("\n".join(lines))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "claim.md").write_text("\n".join(lines) + "\n")
            by_epoch.to_csv(out / "rho_by_epoch.csv", index=False, float_format="%.4f")
            plot_rho_by_epoch(by_epoch, map_by_epoch, args.split, out / "rho_by_epoch.png",
                              f"{params['dataset']}, {params.get('detector', params.get('model'))}: Spearman of "
                              f"each epoch's {args.split} loss with the annotations")
            panels = draw_panels(scores, view, args.top_k, Path(tmp))
            for name, path in panels.items():
                compact_copy(path, out / name)
            print(f"wrote {out / 'claim.md'}, rho_by_epoch.csv/png and {len(panels)} panels")


if __name__ == "__main__":
    main()
