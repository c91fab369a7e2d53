"""Which score finds which kind of hardness? H-CAT's kinds, injected into a fraction of a training split.

    python bench/hardness.py                                   # digits, every kind, 10% perturbed (minutes)
    python bench/hardness.py --datasets digits,cifar10 --cifar-train 2000 --cifar-epochs 5

The kinds of Seedat et al., "Dissecting sample hardness" (ICLR 2024; seedatnabeel/H-CAT), each
injected into `--fraction` of the training samples, drawn by `--seed`:
- mislabeling: `uniform` (any other class), `asymmetric` (each class to one fixed other class, a
  seeded derangement), `adjacent` (to the class one above or below), `instance` (instance-dependent:
  the samples a pixel-space logistic regression finds most confusable, each to its second-likeliest class);
- `near_ood`: covariate shift, Gaussian noise (sigma 0.3 of the pixel range) added to the image;
- `far_ood`: the image replaced by smoothed random noise (no class in it), the label kept;
- atypical: `zoom` (the centre half of the image enlarged to full size), `crop` (the content
  shifted by a quarter of the image, the gap filled with zeros).
Then the project's CNN trains on the perturbed split with the train split tracked by the
training pass, the post-hoc job scores it, and every registered score (each in its own direction)
and the fused score (`tracking.scoring.fused`) is measured at flagging the perturbed samples:
AUROC and AUPRC (average precision; chance = the fraction).

Writes to `--out`: hardness.csv, hardness.md (the tables and the command) and hardness.png (AUROC heatmap).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from label_noise import DIRECTIONS, Data, cifar_subset, digits, local_store, train_scores  # noqa: E402

MISLABELING = ("uniform", "asymmetric", "adjacent", "instance")
KINDS = (*MISLABELING, "near_ood", "far_ood", "zoom", "crop")


def _chosen(size: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A bool mask of round(fraction * size) samples, drawn uniformly."""
    mask = np.zeros(size, dtype=bool)
    mask[rng.choice(size, round(fraction * size), replace=False)] = True
    return mask


def _instance_confusable(inputs: np.ndarray, labels: np.ndarray, count: int, seed: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The `count` samples whose label a pixel-space logistic regression finds least likely relative to its
    second-likeliest class, and that class: instance-dependent noise."""
    from sklearn.linear_model import LogisticRegression

    pixels = inputs.reshape(len(labels), -1)
    probabilities = LogisticRegression(max_iter=300, C=0.1, random_state=seed).fit(pixels, labels).predict_proba(pixels)
    own = probabilities[np.arange(len(labels)), labels]
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -1
    second = others.argmax(axis=1)
    margin = own - others.max(axis=1)
    mask = np.zeros(len(labels), dtype=bool)
    mask[np.lexsort((np.arange(len(labels)), margin))[:count]] = True
    return mask, second


def perturb(inputs: np.ndarray, labels: np.ndarray, classes: int, kind: str, fraction: float, seed: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, labels, perturbed mask) with `kind` injected into `fraction` of the samples.

    `inputs`: float N x C x H x W in [0, 1]; the arrays given are not changed. The same seed gives the same result.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind of hardness {kind!r}; choose one of {KINDS}")
    rng = np.random.default_rng(seed)
    inputs, labels = inputs.copy(), labels.copy()
    if kind == "instance":
        mask, second = _instance_confusable(inputs, labels, round(fraction * len(labels)), seed)
        labels[mask] = second[mask]
        return inputs, labels, mask
    mask = _chosen(len(labels), fraction, rng)
    count, (height, width) = int(mask.sum()), inputs.shape[2:]
    if kind == "uniform":
        labels[mask] = (labels[mask] + rng.integers(1, classes, count)) % classes
    elif kind == "asymmetric":
        target = (np.arange(classes) + rng.integers(1, classes)) % classes  # a fixed other class for each class
        labels[mask] = target[labels[mask]]
    elif kind == "adjacent":
        labels[mask] = (labels[mask] + rng.choice([-1, 1], count)) % classes
    elif kind == "near_ood":
        inputs[mask] = np.clip(inputs[mask] + rng.normal(0, 0.3, inputs[mask].shape), 0, 1)
    elif kind == "far_ood":
        from scipy.ndimage import gaussian_filter

        noise = rng.random((count, *inputs.shape[1:]))
        inputs[mask] = gaussian_filter(noise, sigma=(0, 0, max(height / 16, 0.5), max(width / 16, 0.5)))
        inputs[mask] = (inputs[mask] - inputs[mask].min()) / max(np.ptp(inputs[mask]), 1e-9)
    elif kind == "zoom":
        rows = (np.arange(height) // 2 + height // 4).clip(0, height - 1)  # the centre half, each pixel twice
        columns = (np.arange(width) // 2 + width // 4).clip(0, width - 1)
        inputs[mask] = inputs[mask][:, :, rows][:, :, :, columns]
    elif kind == "crop":
        shift_y, shift_x = height // 4, width // 4
        shifted = np.zeros_like(inputs[mask])
        signs = rng.choice([-1, 1], (count, 2))
        for index, (sign_y, sign_x) in enumerate(signs):
            shifted[index] = np.roll(inputs[mask][index], (sign_y * shift_y, sign_x * shift_x), axis=(1, 2))
            if sign_y > 0:
                shifted[index, :, :shift_y] = 0
            else:
                shifted[index, :, -shift_y:] = 0
            if sign_x > 0:
                shifted[index, :, :, :shift_x] = 0
            else:
                shifted[index, :, :, -shift_x:] = 0
        inputs[mask] = shifted
    return inputs, labels, mask


def flagging(scores: pd.DataFrame, mask: np.ndarray) -> list[dict]:
    """AUROC and AUPRC of each score (oriented: higher = more suspicious) at flagging the perturbed samples."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    rows = []
    for score, direction in DIRECTIONS.items():
        if score in scores.columns:
            suspicion = direction * scores[score].to_numpy(np.float64)
            rows.append({"score": score, "orientation": "higher = harder" if direction > 0 else "lower = harder",
                         "auroc": roc_auc_score(mask, suspicion), "auprc": average_precision_score(mask, suspicion)})
    return rows


def run_kind(data: Data, kind: str, fraction: float, epochs: int, uri: str, seed: int, batch_size: int) -> list[dict]:
    started = time.monotonic()
    inputs, labels, mask = perturb(data.inputs.numpy(), data.labels, data.classes, kind, fraction, seed)
    noisy = Data(data.name, torch.from_numpy(inputs.astype(np.float32)), labels, data.classes)
    scores = train_scores(noisy, labels, epochs, uri, seed, batch_size)
    rows = [{"dataset": data.name, "kind": kind, "fraction": fraction, "epochs": epochs, "batch_size": batch_size,
             "seed": seed, **row}
            for row in flagging(scores, mask)]
    best = max(rows, key=lambda row: row["auroc"])
    print(f"{data.name} {kind}: {time.monotonic() - started:.0f}s; best {best['score']} AUROC {best['auroc']:.3f}",
          flush=True)
    return rows


def markdown(table: pd.DataFrame, command: str) -> str:
    """Two tables (AUROC, AUPRC): one row per score with its orientation, one column per dataset and kind."""
    table = table.assign(setting=table["dataset"] + " " + table["kind"])
    settings = list(dict.fromkeys(table["setting"]))
    lines = [f"Command: `{command}`", "",
             f"{table['fraction'].iloc[0]:.0%} of the training samples perturbed per kind "
             f"(seed {table['seed'].iloc[0]}, "
             f"{table['epochs'].iloc[0]} epochs, batch {table['batch_size'].iloc[0]}); each score ranks in its own "
             "direction. Bold: the best score of a column.", ""]
    chance = f"AUPRC (chance {table['fraction'].iloc[0]:.2f})"
    for metric, title in (("auroc", "AUROC (chance 0.5)"), ("auprc", chance)):
        lines += [f"**{title}** at flagging the perturbed samples", "",
                  "| score | orientation | " + " | ".join(settings) + " |", "| --- | --- |" + " --- |" * len(settings)]
        best = table.groupby("setting")[metric].max()
        for score in dict.fromkeys(table["score"]):
            rows = table[table["score"] == score].set_index("setting")
            cells = [(f"**{rows.loc[s, metric]:.3f}**" if np.isclose(rows.loc[s, metric], best[s])
                      else f"{rows.loc[s, metric]:.3f}") if s in rows.index else "" for s in settings]
            lines.append(f"| {score} | {rows['orientation'].iloc[0]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def heatmap(table: pd.DataFrame, path: Path) -> None:
    """AUROC of each score (rows) at each kind (columns), per dataset."""
    from tracking.report.plots import agg_figure

    datasets = list(dict.fromkeys(table["dataset"]))
    figure = agg_figure(7.5 * len(datasets), 4.8)
    for index, dataset in enumerate(datasets, start=1):
        frame = table[table["dataset"] == dataset].pivot(index="score", columns="kind", values="auroc")
        frame = frame.reindex(index=list(dict.fromkeys(table["score"])), columns=[k for k in KINDS if k in frame])
        axes = figure.add_subplot(1, len(datasets), index)
        image = axes.imshow(frame.to_numpy(), vmin=0, vmax=1, cmap="RdYlGn")
        axes.set_xticks(range(frame.shape[1]), frame.columns, rotation=40, ha="right", fontsize=8)
        axes.set_yticks(range(frame.shape[0]), frame.index, fontsize=8)
        for (row, column), value in np.ndenumerate(frame.to_numpy()):
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
        axes.set_title(f"{dataset}: AUROC at flagging each kind of hardness", fontsize=9)
        figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=20, help="digits epochs")
    parser.add_argument("--cifar-epochs", type=int, default=8)
    parser.add_argument("--cifar-train", type=int, default=2000, help="training images of the CIFAR-10 subset")
    parser.add_argument("--cifar-root", default="/tmp/data/cifar10")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/hardness")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])
    uri = local_store("label-noise").uri  # the experiment train_scores writes to
    torch.set_num_threads(1)  # 2 cores shared with other jobs: one thread each trains faster than two fighting
    loaders: dict[str, Callable[[], tuple[Data, int]]] = {
        "digits": lambda: (digits(), args.epochs),
        "cifar10": lambda: (cifar_subset(Path(args.cifar_root), args.cifar_train, args.seed), args.cifar_epochs),
    }
    rows: list[dict] = []
    for name in args.datasets.split(","):
        if name == "cifar10" and not (Path(args.cifar_root) / "train").is_dir():
            print(f"cifar10 skipped: no {Path(args.cifar_root) / 'train'}")
            continue
        data, epochs = loaders[name]()
        for kind in args.kinds.split(","):
            rows += run_kind(data, kind, args.fraction, epochs, uri, args.seed, args.batch_size)
            pd.DataFrame(rows).to_csv(out / "hardness.csv", index=False)
    table = pd.DataFrame(rows)
    (out / "hardness.md").write_text(markdown(table, command))
    heatmap(table, out / "hardness.png")
    print((out / "hardness.md").read_text())


if __name__ == "__main__":
    main()
