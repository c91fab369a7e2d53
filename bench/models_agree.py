"""Does "hard" depend on the model? The paper's second proposal: test the action's variability along models.

    python bench/models_agree.py                                        # digits: 3 architectures x 3 seeds
    python bench/models_agree.py --datasets digits,cifar10 --cifar-root /tmp/data/cifar10   # + a CIFAR-10 subset

For each dataset, three architectures (the paper's CNN, a two-layer MLP, a linear model on the pixels)
each train from three seeds with the test split recorded every epoch (the paper's setting); the post-hoc
job scores each run, and `tracking.compare.compare_runs` compares the nine: the Spearman correlation of
the action over the test samples and the overlap of the 50 hardest, for every pair of runs. The pairs are
then grouped: two seeds of one architecture ("within") against two architectures ("across"). If the
within-pairs agree much more than the across-pairs, hardness is partly the model's; if alike, the data's.

Writes to `--out`: models_agree.csv (every pair), models_agree.md (the tables and the command) and
models_agree_<dataset>.png (the 9 x 9 Spearman and top-50 matrices, as `compare` draws them).
CIFAR-10 needs `../shared/data/cifar10-jpeg.tar.xz` extracted to `--cifar-root` (train/ and test/ folders).
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from label_noise import Data, cifar_subset, local_store  # noqa: E402

from experiments.classify import classification_step  # noqa: E402
from experiments.loop import train_and_record  # noqa: E402
from experiments.models import KerasCifarCNN  # noqa: E402
from tracking.analyze import analyze_run  # noqa: E402
from tracking.backends import MLflowTracker  # noqa: E402
from tracking.compare import compare_runs  # noqa: E402
from tracking.report.plots import matrices  # noqa: E402

ARCHITECTURES = ("cnn", "mlp", "linear")
TOP_K = 50


def model_of(architecture: str, data: Data) -> nn.Module:
    """One of the three architectures, for the data's input shape and classes."""
    channels, height, width = data.inputs.shape[1:]
    pixels = channels * height * width
    if architecture == "cnn":
        return KerasCifarCNN(channels, data.classes, height)
    if architecture == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(pixels, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                             nn.Linear(128, data.classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(pixels, data.classes))


def digits_splits() -> tuple[Data, Data]:
    from experiments.datasets import load_split

    def split(name: str) -> Data:
        loaded = load_split("digits", name)
        inputs = torch.stack([loaded.dataset[i][0] for i in range(len(loaded.labels))])
        return Data("digits", inputs, loaded.labels, len(loaded.class_names))

    return split("train"), split("test")


def cifar_splits(root: Path, train_size: int, test_size: int) -> tuple[Data, Data]:
    """Class-balanced subsets of CIFAR-10's train and test folders."""
    return cifar_subset(root, train_size, seed=0), cifar_subset(root, test_size, seed=0, split="test")


def trained_run(uri: str, experiment: str, architecture: str, seed: int, train: Data, test: Data, epochs: int,
                batch_size: int) -> str:
    """Train one architecture from one seed with the test split recorded each epoch, score it; its run id."""
    torch.manual_seed(seed)
    model = model_of(architecture, train)
    tracker = MLflowTracker(uri)
    train_and_record(
        tracker=lambda: tracker, experiment=experiment, run_name=f"{train.name}-{architecture}-{seed}",
        params={"action_scores.task": "classification", "architecture": architecture},
        model=model, step=classification_step, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        datasets={"train": TensorDataset(train.inputs, torch.from_numpy(train.labels)),
                  "test": TensorDataset(test.inputs, torch.from_numpy(test.labels))},
        tracked_passes={"test": "eval"}, epochs=epochs, batch_size=batch_size, seed=seed, device=torch.device("cpu"),
    )
    analyze_run(MLflowTracker(uri), tracker.run_id, panels=False, progress=False)
    return tracker.run_id


def pairs(runs: dict[tuple[str, int], str], spearman: pd.DataFrame, overlap: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Every pair of runs with its Spearman and top-k overlap, and whether it is within one architecture."""
    rows = []
    for (a, run_a), (b, run_b) in itertools.combinations(runs.items(), 2):
        rows.append({"dataset": dataset, "run_a": f"{a[0]}-{a[1]}", "run_b": f"{b[0]}-{b[1]}",
                     "pair": "within" if a[0] == b[0] else "across",
                     "architectures": "-".join(sorted({a[0], b[0]})) if a[0] != b[0] else a[0],
                     "spearman": spearman.loc[run_a, run_b], f"top{TOP_K}_overlap": overlap.loc[run_a, run_b]})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, command: str, seconds: float) -> str:
    """The grouped means as markdown tables: within against across, then by architecture pair."""
    overlap = f"top{TOP_K}_overlap"
    grouped = table.groupby(["dataset", "pair"])[["spearman", overlap]].agg(["mean", "min", "max", "count"])
    by_kind = table.groupby(["dataset", "architectures"])[["spearman", overlap]].mean()
    lines = ["# Models agree? The action across architectures and seeds", "",
             f"    {command}", "",
             f"Each dataset: {len(ARCHITECTURES)} architectures ({', '.join(ARCHITECTURES)}) x seeds, the test split "
             f"recorded every epoch; pairs of runs compared by the Spearman correlation of the action over the test "
             f"samples and the overlap of their {TOP_K} hardest. {seconds:.0f} s in all on this machine.",
             "", "## Within one architecture (seed pairs) against across architectures", "",
             "| dataset | pairs | n | Spearman mean (min-max) | top-50 overlap mean (min-max) |", "| --- | --- | --- | --- | --- |"]
    for (dataset, pair), row in grouped.iterrows():
        lines.append(f"| {dataset} | {pair} | {int(row[('spearman', 'count')])} | {row[('spearman', 'mean')]:.3f} "
                     f"({row[('spearman', 'min')]:.3f}-{row[('spearman', 'max')]:.3f}) | {row[(overlap, 'mean')]:.3f} "
                     f"({row[(overlap, 'min')]:.3f}-{row[(overlap, 'max')]:.3f}) |")
    lines += ["", "## By architecture pair (means)", "", "| dataset | architectures | Spearman | top-50 overlap |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {dataset} | {kind} | {row['spearman']:.3f} | {row[overlap]:.3f} |"
              for (dataset, kind), row in by_kind.iterrows()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15, help="digits epochs")
    parser.add_argument("--cifar-epochs", type=int, default=5)
    parser.add_argument("--cifar-train", type=int, default=5000)
    parser.add_argument("--cifar-test", type=int, default=1000)
    parser.add_argument("--cifar-root", default="/tmp/data/cifar10")
    parser.add_argument("--out", default="bench/results/models_agree")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    store = local_store("models-agree")
    tables = []
    for dataset in args.datasets.split(","):
        train, test = digits_splits() if dataset == "digits" else cifar_splits(
            Path(args.cifar_root), args.cifar_train, args.cifar_test)
        epochs = args.epochs if dataset == "digits" else args.cifar_epochs
        runs = {}
        for architecture, seed in tqdm(list(itertools.product(ARCHITECTURES, range(args.seeds))),
                                       desc=f"train {dataset}", unit="run"):
            runs[(architecture, seed)] = trained_run(store.uri, "models-agree", architecture, seed, train, test,
                                                     epochs, batch_size=32)
        comparison = compare_runs(MLflowTracker(store.uri), list(runs.values()), split="test", top_k=TOP_K)
        names = {run_id: f"{a}-{s}" for (a, s), run_id in runs.items()}
        matrices([("Spearman of the action", comparison.spearman.rename(index=names, columns=names)),
                  (f"top-{TOP_K} overlap", comparison.overlap.rename(index=names, columns=names))],
                 out / f"models_agree_{dataset}.png", f"{dataset}: {len(runs)} runs, the test split's action")
        tables.append(pairs(runs, comparison.spearman, comparison.overlap, dataset))
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(out / "models_agree.csv", index=False)
    command = "python bench/models_agree.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = markdown(table, command.strip(), time.perf_counter() - started)
    (out / "models_agree.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
