"""Does fixing what the scores flag help? Train on noisy labels, select, retrain without them or relabelled.

    python bench/clean_and_retrain.py                                        # digits, three noise settings
    python bench/clean_and_retrain.py --dataset cifar10 --cifar-train 10000 --epochs 15   # the issue's setting

For each noise setting (`--settings`, default 40% symmetric, 20% and 40% asymmetric; `label_noise.flip`):
- (a) train the project's CNN on the noisy labels, the train split recorded by the training pass, into a
  local MLflow store, and run the post-hoc job;
- (b) for each score of `--scores` (any registered score, `fused`, and `random` as a control) select the
  hardest `--flag-fraction` of the split (default: the true noise rate) with `action-scores select`'s
  code on that run, and retrain from scratch without the selection (`experiments.classify --exclude`'s
  code: the new run's tags name the source run and selection file);
- (c) for each score of `--relabel-scores`: retrain with the selection's suggested labels instead;
- (d) train on the clean labels: the oracle.
Reports test accuracy (the clean test split) of each, and the accuracy recovered, (b - a) / (d - a).

Writes to `--out`: clean_and_retrain.csv, .md (tables, command, wall time) and .png (recovered per score).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from experiments.classify import classification_step, from_selections  # noqa: E402
from experiments.datasets import load_split, select_samples  # noqa: E402
from experiments.loop import train_and_record  # noqa: E402
from experiments.models import KerasCifarCNN  # noqa: E402
from label_noise import Data, cifar_subset, digits, flip, local_store  # noqa: E402
from tracking.analyze import analyze_run  # noqa: E402
from tracking.backends import MLflowTracker  # noqa: E402
from tracking.select import select_run  # noqa: E402

RANDOM = "random"
EXPERIMENT = "clean-and-retrain"


def test_split(dataset: str, root: Path, limit: int) -> Data:
    """The clean test split: digits' 360, or CIFAR-10's test images (the first `limit` of each class order)."""
    if dataset == "digits":
        split = load_split("digits", "test")
        return Data("digits-test", torch.stack([split.dataset[i][0] for i in range(len(split.labels))]),
                    split.labels, len(split.class_names))
    from PIL import Image
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root / "test"))
    chosen = np.arange(len(folder.targets)) if not limit else np.linspace(0, len(folder.targets) - 1, limit).astype(int)
    pictures = []
    for index in chosen:
        with Image.open(folder.samples[index][0]) as image:
            pictures.append(np.array(image.convert("RGB")))
    inputs = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255
    return Data("cifar10-test", inputs, np.asarray(folder.targets)[chosen], len(folder.classes))


def train(train_data: Data, labels: np.ndarray, test: Data, epochs: int, seed: int, uri: str, batch_size: int, *,
          record_train: bool, sample_ids: np.ndarray | None = None, new_labels: dict[int, int] | None = None,
          exclude: list[int] | None = None, tags: dict[str, str] | None = None, name: str = "") -> tuple[str, float]:
    """Train from scratch (the same seed every time), return (run id, clean test accuracy of the last epoch)."""
    torch.manual_seed(seed)
    model = KerasCifarCNN(train_data.inputs.shape[1], train_data.classes, train_data.inputs.shape[2])
    dataset = TensorDataset(train_data.inputs, torch.from_numpy(labels))
    ids = {}
    if exclude or new_labels:
        dataset, ids["train"] = select_samples(dataset, train_data.classes, exclude or [], new_labels)
    tracker = MLflowTracker(uri)
    metrics = train_and_record(
        tracker=lambda: tracker, experiment=EXPERIMENT, run_name=name, params={"action_scores.task": "classification"},
        model=model, step=classification_step, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        datasets={"train": dataset, "test": TensorDataset(test.inputs, torch.from_numpy(test.labels))},
        tracked_passes={"train": "train", "test": "eval"} if record_train else {"test": "eval"},
        epochs=epochs, batch_size=batch_size, seed=seed, device=torch.device("cpu"), sample_ids=ids, tags=tags,
    )
    return tracker.run_id, metrics["test_correct"]


def run_setting(data: Data, test: Data, kind: str, rate: float, args: argparse.Namespace, uri: str) -> list[dict]:
    """Every arm of one noise setting; rows of (arm, score, test accuracy, samples trained on)."""
    noisy, flipped = flip(data.labels, data.classes, rate, kind, args.seed)
    base = {"dataset": data.name, "noise": kind, "rate": rate, "epochs": args.epochs, "batch_size": args.batch_size}
    fraction = args.flag_fraction or rate
    rows = []
    started = time.monotonic()
    source, noisy_accuracy = train(data, noisy, test, args.epochs, args.seed, uri, args.batch_size, record_train=True,
                                   name=f"{kind}-{rate}-noisy")
    analyze_run(MLflowTracker(uri), source, panels=False)
    rows.append({**base, "arm": "a: noisy", "score": "", "accuracy": noisy_accuracy, "samples": len(noisy)})
    _, clean_accuracy = train(data, data.labels, test, args.epochs, args.seed, uri, args.batch_size, record_train=False,
                              name=f"{kind}-{rate}-clean")
    rows.append({**base, "arm": "d: clean oracle", "score": "", "accuracy": clean_accuracy, "samples": len(noisy)})
    reader = MLflowTracker(uri)
    for score in args.scores.split(","):
        if score == RANDOM:
            rng = np.random.default_rng(args.seed + 1)
            chosen = rng.choice(len(noisy), round(fraction * len(noisy)), replace=False)
            taken_exclude, tags, found = chosen.tolist(), {"action_scores.selection.exclude.run": "random"}, np.nan
        else:
            select_run(MLflowTracker(uri), source, by=score, split="train", fraction=fraction)
            taken = from_selections(reader, "train", exclude=source)
            taken_exclude, tags = taken.exclude, taken.tags
            found = flipped[taken_exclude].mean()
        _, accuracy = train(data, noisy, test, args.epochs, args.seed, uri, args.batch_size, record_train=False,
                            exclude=taken_exclude, tags=tags, name=f"{kind}-{rate}-without-{score}")
        rows.append({**base, "arm": "b: remove", "score": score, "accuracy": accuracy,
                     "samples": len(noisy) - len(taken_exclude), "flagged_precision": found})
        if score in args.relabel_scores.split(","):
            taken = from_selections(reader, "train", relabel=source)
            corrected = (np.mean([data.labels[i] == y for i, y in taken.new_labels.items()]) if taken.new_labels
                         else np.nan)
            _, accuracy = train(data, noisy, test, args.epochs, args.seed, uri, args.batch_size, record_train=False,
                                new_labels=taken.new_labels, tags=taken.tags, name=f"{kind}-{rate}-relabel-{score}")
            rows.append({**base, "arm": "c: relabel", "score": score, "accuracy": accuracy, "samples": len(noisy),
                         "relabelled": len(taken.new_labels), "relabel_correct": corrected})
    for row in rows:
        gap = clean_accuracy - noisy_accuracy
        row["recovered"] = (row["accuracy"] - noisy_accuracy) / gap if abs(gap) > 1e-9 else np.nan
    print(f"{data.name} {kind} {rate:.0%}: {len(rows)} trainings in {time.monotonic() - started:.0f}s; "
          f"noisy {noisy_accuracy:.3f}, clean {clean_accuracy:.3f}", flush=True)
    return rows


def markdown(table: pd.DataFrame, command: str, wall: float, flag: str) -> str:
    table = table.fillna({"score": ""})  # the arms without a score, as a CSV reads them back
    lines = [f"Command: `{command}` ({wall / 60:.1f} min wall time on this machine)", "",
             f"Test accuracy on the clean test split; flagged fraction: {flag}. recovered = (b - a) / (d - a): "
             "1 = as good as training on clean labels, 0 = no better than training on the noisy ones.", ""]
    for (dataset, noise, rate), frame in table.groupby(["dataset", "noise", "rate"], sort=False):
        lines += [f"**{dataset}, {rate:.0%} {noise}**", "",
                  "| arm | score | samples | test accuracy | recovered | precision of the flagged "
                  "| relabelled (correct) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in frame.itertuples():
            precision = "" if pd.isna(getattr(row, "flagged_precision", np.nan)) else f"{row.flagged_precision:.3f}"
            relabelled = "" if pd.isna(getattr(row, "relabelled", np.nan)) else \
                f"{row.relabelled:.0f} ({row.relabel_correct:.3f})"
            lines.append(f"| {row.arm} | {row.score} | {row.samples} | {row.accuracy:.4f} | {row.recovered:+.2f} | "
                         f"{precision} | {relabelled} |")
        lines.append("")
    return "\n".join(lines)


def plot(table: pd.DataFrame, path: Path) -> None:
    """Accuracy recovered by each score's removal (and relabelling), one group of bars per setting."""
    from tracking.report.plots import agg_figure

    arms = table[table["arm"].isin(["b: remove", "c: relabel"])]
    arms = arms.assign(label=arms["score"] + np.where(arms["arm"] == "c: relabel", " (relabel)", ""))
    settings = list(dict.fromkeys(arms["noise"] + " " + (arms["rate"] * 100).map("{:.0f}%".format)))
    labels = list(dict.fromkeys(arms["label"]))
    figure = agg_figure(max(8.0, 2 + 1.4 * len(settings) * len(labels) / 3), 4.5)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(labels)
    for offset, label in enumerate(labels):
        values = [arms[(arms["label"] == label) & (arms["noise"] + " " + (arms["rate"] * 100).map("{:.0f}%".format)
                                                   == s)]["recovered"].mean() for s in settings]
        axes.bar(np.arange(len(settings)) + offset * width, values, width, label=label)
    axes.axhline(0, color="gray", linewidth=0.8)
    axes.axhline(1, color="gray", linewidth=0.8, linestyle="--")
    axes.set_xticks(np.arange(len(settings)) + width * (len(labels) - 1) / 2, settings)
    axes.set_ylabel("accuracy recovered, (b - a) / (d - a)")
    axes.set_title(f"{table['dataset'].iloc[0]}: retraining after removing (or relabelling) the flagged samples")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--settings", default="symmetric:0.4,asymmetric:0.2,asymmetric:0.4")
    parser.add_argument("--scores", default="action,aum,confidence,fused,random")
    parser.add_argument("--relabel-scores", default="aum,fused")
    parser.add_argument("--flag-fraction", type=float, default=0.0, help="share of the split to remove "
                        "(default: the setting's true noise rate)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cifar-train", type=int, default=10000)
    parser.add_argument("--cifar-test", type=int, default=0, help="test images (default 0: all 10,000)")
    parser.add_argument("--cifar-root", default="/tmp/data/cifar10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/clean_and_retrain")
    args = parser.parse_args()
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])
    uri = local_store(EXPERIMENT).uri
    torch.set_num_threads(1)  # 2 cores shared with other jobs: one thread each trains faster than two fighting
    root = Path(args.cifar_root)
    data = digits() if args.dataset == "digits" else cifar_subset(root, args.cifar_train, args.seed)
    test = test_split(args.dataset, root, args.cifar_test)
    rows: list[dict] = []
    for setting in args.settings.split(","):
        kind, rate = setting.split(":")
        rows += run_setting(data, test, kind, float(rate), args, uri)
        pd.DataFrame(rows).to_csv(out / "clean_and_retrain.csv", index=False)
    table = pd.DataFrame(rows)
    flag = f"{args.flag_fraction:.0%}" if args.flag_fraction else "the true noise rate"
    (out / "clean_and_retrain.md").write_text(markdown(table, command, time.monotonic() - started, flag))
    plot(table, out / "clean_and_retrain.png")
    print((out / "clean_and_retrain.md").read_text())


if __name__ == "__main__":
    main()
