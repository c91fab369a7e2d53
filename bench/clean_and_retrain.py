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
- (d) train on the clean labels: the oracle, once (its labels and seed are the same in every setting).
Reports test accuracy (the clean test split) of each, and the accuracy recovered, (b - a) / (d - a).
The noisy runs record the test split every epoch too; a retraining is scored on it once, after its
last epoch. Trainings run `--jobs` at a time (processes, one torch thread and one local store each);
each noisy run's selections start as soon as it ends.

Writes to `--out`: clean_and_retrain.csv, .md (tables, command, wall time) and .png (recovered per score).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from experiments.classify import classification_step, from_selections  # noqa: E402
from experiments.datasets import load_split, select_samples  # noqa: E402
from experiments.loop import evaluate, train_and_record  # noqa: E402
from experiments.models import KerasCifarCNN  # noqa: E402
from label_noise import Data, cifar_subset, digits, flip, local_store  # noqa: E402
from tracking.analyze import analyze_run  # noqa: E402
from tracking.backends import MLflowTracker  # noqa: E402
from tracking.record.indexed import IndexedDataset  # noqa: E402
from tracking.selection import select_run  # noqa: E402

RANDOM = "random"
EXPERIMENT = "clean-and-retrain"
PARTIAL = "clean_and_retrain.partial.csv"


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


@dataclass
class Arm:
    """One training of the bench: which labels, which samples left out or relabelled, and the tags that say so."""

    setting: tuple[str, float]
    arm: str
    score: str
    labels: np.ndarray
    record_train: bool = False
    exclude: list[int] = field(default_factory=list)
    new_labels: dict[int, int] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)  # the selection's precision, relabelled counts

    @property
    def name(self) -> str:
        kind, rate = self.setting
        return f"{kind}-{rate}-{self.arm.split(': ')[1]}" + (f"-{self.score}" if self.score else "")


_WORKER_DATA: dict[str, Data] = {}  # each worker process decodes the splits once


def load_splits(args: argparse.Namespace) -> None:
    """Worker initializer: one torch thread per process (the pool spreads the trainings over the cores)."""
    torch.set_num_threads(1)
    root = Path(args.cifar_root)
    _WORKER_DATA["train"] = digits() if args.dataset == "digits" else cifar_subset(root, args.cifar_train, args.seed)
    _WORKER_DATA["test"] = test_split(args.dataset, root, args.cifar_test)


def train(arm: Arm, epochs: int, seed: int, batch_size: int) -> tuple[str, str, float]:
    """Train from scratch (the same seed every time) into a store of its own (no two processes share a sqlite
    file); return (store uri, run id, clean test accuracy of the last epoch)."""
    train_data, test = _WORKER_DATA["train"], _WORKER_DATA["test"]
    torch.manual_seed(seed)
    model = KerasCifarCNN(train_data.inputs.shape[1], train_data.classes, train_data.inputs.shape[2])
    dataset = TensorDataset(train_data.inputs, torch.from_numpy(arm.labels))
    ids = {}
    if arm.exclude or arm.new_labels:
        dataset, ids["train"] = select_samples(dataset, train_data.classes, arm.exclude, arm.new_labels)
    test_set = TensorDataset(test.inputs, torch.from_numpy(test.labels))
    tracker = MLflowTracker(local_store(EXPERIMENT).uri)
    metrics = train_and_record(
        tracker=lambda: tracker, experiment=EXPERIMENT, run_name=arm.name,
        params={"action_scores.task": "classification"},
        model=model, step=classification_step, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        datasets={"train": dataset, "test": test_set},
        # the source run records both splits every epoch; a retraining only needs its last model's accuracy
        tracked_passes={"train": "train", "test": "eval"} if arm.record_train else {},
        epochs=epochs, batch_size=batch_size, seed=seed, device=torch.device("cpu"), sample_ids=ids, tags=arm.tags,
    )
    if not arm.record_train:
        loader = DataLoader(IndexedDataset(test_set), batch_size=256)
        metrics = evaluate(model, classification_step, loader, None, torch.device("cpu"), "test")
    return tracker.tracking_uri, tracker.run_id, metrics["test_correct"]


def selected_arms(source: Arm, uri: str, run_id: str, data: Data, flipped: np.ndarray,
                  args: argparse.Namespace) -> list[Arm]:
    """Score the source run, then one removal per score of `--scores` and one relabelling per `--relabel-scores`,
    each from the selection `action-scores select` logs to the source run (`experiments.classify`'s reading)."""
    analyze_run(MLflowTracker(uri), run_id, panels=False)
    fraction = args.flag_fraction or source.setting[1]
    reader = MLflowTracker(uri)
    arms = []
    for score in args.scores.split(","):
        if score == RANDOM:
            rng = np.random.default_rng(args.seed + 1)
            chosen = rng.choice(len(source.labels), round(fraction * len(source.labels)), replace=False).tolist()
            arms.append(Arm(source.setting, "b: remove", score, source.labels, exclude=chosen,
                            tags={"action_scores.selection.exclude.run": "random"}))
            continue
        select_run(MLflowTracker(uri), run_id, by=score, split="train", fraction=fraction)
        taken = from_selections(reader, "train", exclude=run_id)
        arms.append(Arm(source.setting, "b: remove", score, source.labels, exclude=taken.exclude, tags=taken.tags,
                        extra={"flagged_precision": flipped[taken.exclude].mean()}))
        if score in args.relabel_scores.split(","):
            taken = from_selections(reader, "train", relabel=run_id)
            corrected = (np.mean([data.labels[i] == y for i, y in taken.new_labels.items()]) if taken.new_labels
                         else np.nan)
            arms.append(Arm(source.setting, "c: relabel", score, source.labels, new_labels=taken.new_labels,
                            tags=taken.tags, extra={"relabelled": len(taken.new_labels), "relabel_correct": corrected}))
    return arms


def run_bench(data: Data, args: argparse.Namespace) -> list[dict]:
    """Every arm of every setting, spread over `--jobs` processes: the noisy runs and the clean oracle (trained
    once: its labels and seed are the same in every setting) first, each noisy run's selections as it ends."""
    settings = [(kind, float(rate)) for kind, rate in (s.split(":") for s in args.settings.split(","))]
    flips = {setting: flip(data.labels, data.classes, setting[1], setting[0], args.seed) for setting in settings}
    oracle = Arm(settings[0], "d: clean oracle", "", data.labels)
    rows: list[dict] = []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=load_splits, initargs=(args,)) as pool, \
            tqdm(total=len(settings) * (1 + len(args.scores.split(","))) + 1, desc="trainings", unit="run") as bar:
        def submit(arm: Arm) -> Future:
            future = pool.submit(train, arm, args.epochs, args.seed, args.batch_size)
            running[future] = arm
            return future

        running: dict[Future, Arm] = {}
        for setting in settings:
            submit(Arm(setting, "a: noisy", "", flips[setting][0], record_train=True))
        submit(oracle)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                arm = running.pop(future)
                uri, run_id, accuracy = future.result()
                bar.update()
                rows.append({"setting": arm.setting, "arm": arm.arm, "score": arm.score, "accuracy": accuracy,
                             "samples": len(arm.labels) - len(arm.exclude), **arm.extra})
                partial = [{"noise": r["setting"][0], "rate": r["setting"][1],
                            **{k: v for k, v in r.items() if k != "setting"}} for r in rows]
                pd.DataFrame(partial).to_csv(Path(args.out) / PARTIAL, index=False)  # what a stopped run had
                if arm.arm == "a: noisy":
                    followers = selected_arms(arm, uri, run_id, data, flips[arm.setting][1], args)
                    bar.total += len(followers) - len(args.scores.split(","))  # relabellings come on top
                    for follower in followers:
                        submit(follower)
    return with_recovered(rows, settings, args)


def with_recovered(rows: list[dict], settings: list[tuple[str, float]], args: argparse.Namespace) -> list[dict]:
    """The oracle's row in every setting, the rows in the order of the tables, and (b - a) / (d - a)."""
    clean = next(row for row in rows if row["arm"] == "d: clean oracle")
    order = {"a: noisy": 0, "d: clean oracle": 1, "b: remove": 2, "c: relabel": 2}
    scores = args.scores.split(",")
    table = []
    for setting in settings:
        kind, rate = setting
        mine = [row for row in rows if row["setting"] == setting and row["arm"] != "d: clean oracle"] + [clean]
        mine.sort(key=lambda r: (order[r["arm"]], scores.index(r["score"]) if r["score"] else -1, r["arm"]))
        noisy = next(row["accuracy"] for row in mine if row["arm"] == "a: noisy")
        gap = clean["accuracy"] - noisy
        for row in mine:
            table.append({"dataset": data_name(args), "noise": kind, "rate": rate, "epochs": args.epochs,
                          "batch_size": args.batch_size, **{k: v for k, v in row.items() if k != "setting"},
                          "recovered": (row["accuracy"] - noisy) / gap if abs(gap) > 1e-9 else np.nan})
    return table


def data_name(args: argparse.Namespace) -> str:
    return "digits" if args.dataset == "digits" else f"cifar10-{args.cifar_train // 1000}k"


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
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once, one process and one torch thread "
                        "each (default 2: this machine's cores)")
    parser.add_argument("--report-partial", default="", metavar="MINUTES",
                        help="instead of training: the tables of a stopped run's partial CSV in --out (run with the "
                             "same arguments), whose wall time was MINUTES; the arms it did not reach are left out")
    args = parser.parse_args()
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])
    if args.report_partial:
        rows = pd.read_csv(out / PARTIAL).to_dict("records")
        for row in rows:
            row["setting"] = (row.pop("noise"), float(row.pop("rate")))
            row["score"] = "" if pd.isna(row["score"]) else row["score"]
        settings = list(dict.fromkeys(r["setting"] for r in rows if r["arm"] == "a: noisy"))
        table = pd.DataFrame(with_recovered(rows, settings, args))
        started -= float(args.report_partial) * 60
        command = command.split(" --report-partial")[0] + " (stopped before its end)"
    else:
        data = digits() if args.dataset == "digits" else cifar_subset(Path(args.cifar_root), args.cifar_train,
                                                                        args.seed)
        table = pd.DataFrame(run_bench(data, args))
        (out / PARTIAL).unlink()
    table.to_csv(out / "clean_and_retrain.csv", index=False)
    flag = f"{args.flag_fraction:.0%}" if args.flag_fraction else "the true noise rate"
    (out / "clean_and_retrain.md").write_text(markdown(table, command, time.monotonic() - started, flag))
    plot(table, out / "clean_and_retrain.png")
    print((out / "clean_and_retrain.md").read_text())


if __name__ == "__main__":
    main()
