"""Label-noise benchmark: how well does each training-dynamics score find flipped training labels?

    python bench/label_noise.py                                     # digits and CIFAR-10 subset, 20% and 40%
    python bench/label_noise.py --datasets digits --epochs 20       # digits only (about a minute)

For every dataset x noise kind x noise rate: flip that fraction of the training labels
(`symmetric`: to a uniformly drawn other class; `asymmetric`: class c always to c+1 mod K),
train the project's CNN (`experiments.classify`'s step and loop) with the train split tracked by
the training pass into a local MLflow store, run the post-hoc job, and measure per score how
well it ranks the flipped samples first: AUROC, average precision, and precision at the true
noise rate (of the n_flipped most suspicious samples, the fraction really flipped).
The outside reference is cleanlab (`get_label_quality_scores` and `find_label_issues`) on
out-of-sample probabilities of the same CNN: `--cleanlab-folds` stratified folds (default 2, seeded),
the model trained on the other folds with the noisy labels (same epochs, optimiser, batch size and
seed as the tracked run, through `experiments.loop.fit`) and its softmax taken on the held-out fold.
A second, weaker reference is cleanlab on 5-fold LogisticRegression probabilities from the pixels.

CIFAR-10: a class-balanced subset of `--cifar-train` training images of the ImageFolder copy at
`--cifar-root` (train/<class>/*.jpg); skipped, saying so, when that folder is absent.

Writes to `--out`: label_noise.csv, label_noise.md (the table and the command) and label_noise.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.classify import classification_step  # noqa: E402
from experiments.loop import fit, train_and_record  # noqa: E402
from experiments.models import KerasCifarCNN  # noqa: E402
from tracking.analyze import analyze_run  # noqa: E402
from tracking.backends import MLflowTracker  # noqa: E402
from tracking.record import IndexedDataset  # noqa: E402

from tracking.scoring import fused  # noqa: E402
from tracking.scoring.registry import SCORES  # noqa: E402

# Score -> +1 if a higher value means "more likely flipped", -1 if lower does: each score's registered
# direction (mean_loss ranks as action does, so it is left out), and the fused score (higher = harder).
DIRECTIONS = {name: +1 if score.higher_is_harder else -1 for name, score in SCORES.items() if name != "mean_loss"}
DIRECTIONS[fused.NAME] = +1
CLEANLAB = "cleanlab (CNN K-fold)"  # the fair reference: the same CNN's out-of-sample probabilities
CLEANLAB_LOGREG = "cleanlab (LogReg 5-fold, pixels)"  # the cheap one this bench used before


@dataclass
class Data:
    """Training inputs in memory (float32 NxCxHxW), clean labels, and the number of classes."""

    name: str
    inputs: torch.Tensor
    labels: np.ndarray
    classes: int


def digits() -> Data:
    from experiments.datasets import load_split

    split = load_split("digits", "train")
    inputs = torch.stack([split.dataset[i][0] for i in range(len(split.labels))])
    return Data("digits", inputs, split.labels, len(split.class_names))


def cifar_subset(root: Path, size: int, seed: int, split: str = "train") -> Data:
    """`size` images of the `split` folder, the same number from every class, decoded once."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root / split))
    labels = np.asarray(folder.targets)
    rng = np.random.default_rng(seed)
    per_class = size // len(folder.classes)
    chosen = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                     for c in range(len(folder.classes))]))
    pictures = []
    for index in tqdm(chosen, desc="decode cifar10 subset", unit="image"):
        with Image.open(folder.samples[index][0]) as image:
            pictures.append(np.array(image.convert("RGB")))
    inputs = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255
    return Data(f"cifar10-{len(chosen) // 1000}k", inputs, labels[chosen], len(folder.classes))


def flip(labels: np.ndarray, classes: int, rate: float, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy labels and the mask of flipped samples: exactly round(rate * n), drawn uniformly."""
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), round(rate * len(labels)), replace=False)] = True
    noisy = labels.copy()
    if kind == "symmetric":
        noisy[flipped] = (labels[flipped] + rng.integers(1, classes, flipped.sum())) % classes
    else:
        noisy[flipped] = (labels[flipped] + 1) % classes
    return noisy, flipped


def new_model(data: Data, seed: int) -> tuple[KerasCifarCNN, torch.optim.Optimizer]:
    """The bench's CNN and optimiser, initialised from `seed`: the tracked run and cleanlab's folds alike."""
    torch.manual_seed(seed)
    model = KerasCifarCNN(data.inputs.shape[1], data.classes, data.inputs.shape[2])
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train_scores(data: Data, noisy: np.ndarray, epochs: int, uri: str, seed: int, batch_size: int = 32) -> pd.DataFrame:
    """Train with the train split tracked by the training pass, run the job, return its scores table."""
    model, optimizer = new_model(data, seed)
    tracker = MLflowTracker(uri)
    train_and_record(
        tracker=lambda: tracker, experiment="label-noise", run_name=data.name, params={"action_scores.task": "classification"},
        model=model, step=classification_step, optimizer=optimizer,
        datasets={"train": TensorDataset(data.inputs, torch.from_numpy(noisy))}, tracked_passes={"train": "train"},
        epochs=epochs, batch_size=batch_size, seed=seed, device=torch.device("cpu"),
    )
    analyze_run(MLflowTracker(uri), tracker.run_id, panels=False)
    local = MLflowTracker(uri)
    local.attach(tracker.run_id)
    with tempfile.TemporaryDirectory() as folder:
        scores = pd.read_parquet(local.download("action_scores/train/scores.parquet", folder)).sort_values("sample_id")
    scores[fused.NAME] = fused.fused(scores)
    scores.attrs["run_id"] = tracker.run_id
    return scores.reset_index(drop=True)


def fold_indices(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The held-out ids of each of `folds` stratified folds, shuffled by `seed`: disjoint, covering every sample."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return [held_out for _, held_out in splitter.split(np.zeros(len(labels)), labels)]


def cnn_out_of_sample_probabilities(data: Data, noisy: np.ndarray, epochs: int, seed: int, folds: int,
                                    batch_size: int = 32) -> np.ndarray:
    """Softmax of the bench's CNN on each held-out fold, trained on the other folds' noisy labels as
    `train_scores` trains (same model, optimiser, epochs, batch size, seed): what cleanlab is built on."""
    probabilities = np.zeros((len(noisy), data.classes))
    for held_out in tqdm(fold_indices(noisy, folds, seed), desc=f"cleanlab {folds}-fold CNN", unit="fold"):
        trained_on = np.setdiff1d(np.arange(len(noisy)), held_out)
        model, optimizer = new_model(data, seed)
        part = TensorDataset(data.inputs[trained_on], torch.from_numpy(noisy[trained_on]))
        loader = torch.utils.data.DataLoader(IndexedDataset(part, trained_on), batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        fit(model, classification_step, optimizer, loader, {}, epochs, None, torch.device("cpu"))
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(batch) for batch in data.inputs[held_out].split(256)])
        probabilities[held_out] = logits.softmax(dim=1).double().numpy()
    return probabilities


def logreg_out_of_sample_probabilities(data: Data, noisy: np.ndarray, seed: int) -> np.ndarray:
    """5-fold LogisticRegression on the pixels: the cheap reference, weaker than the CNN on images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pixels = data.inputs.reshape(len(noisy), -1).numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
    return cross_val_predict(model, pixels, noisy, cv=StratifiedKFold(5, shuffle=True, random_state=seed),
                             method="predict_proba")


def cleanlab_scores(noisy: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1 - label quality, find_label_issues mask) from out-of-sample predicted probabilities."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    return 1 - get_label_quality_scores(noisy, probabilities), find_label_issues(noisy, probabilities)


def detection(suspicion: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """AUROC, average precision, and precision among the n_flipped most suspicious (ties by sample id)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    top = np.lexsort((np.arange(len(suspicion)), -suspicion))[: flipped.sum()]
    return {"auroc": roc_auc_score(flipped, suspicion), "ap": average_precision_score(flipped, suspicion),
            "p@noise": flipped[top].mean()}


def run_setting(data: Data, kind: str, rate: float, epochs: int, uri: str, seed: int, folds: int) -> list[dict]:
    """Every score's detection figures for one dataset, noise kind and rate."""
    noisy, flipped = flip(data.labels, data.classes, rate, kind, seed)
    started = time.monotonic()
    scores = train_scores(data, noisy, epochs, uri, seed)
    trained = time.monotonic() - started
    rows = []
    base = {"dataset": data.name, "samples": len(noisy), "noise": kind, "rate": rate, "epochs": epochs, "seed": seed}
    for score, direction in DIRECTIONS.items():
        rows.append({**base, "score": score, **detection(direction * scores[score].to_numpy(np.float64), flipped)})
    started = time.monotonic()
    references = {CLEANLAB: cnn_out_of_sample_probabilities(data, noisy, epochs, seed, folds)}
    cross_validated = time.monotonic() - started
    references[CLEANLAB_LOGREG] = logreg_out_of_sample_probabilities(data, noisy, seed)
    for name, probabilities in references.items():
        suspicion, issues = cleanlab_scores(noisy, probabilities)
        precision = flipped[issues].mean() if issues.any() else float("nan")
        rows.append({**base, "score": name, **detection(suspicion, flipped),
                     "issues_found": int(issues.sum()), "issues_precision": precision,
                     "issues_recall": (issues & flipped).sum() / flipped.sum(),
                     "cleanlab_folds": folds if name == CLEANLAB else 5})
    accuracy = scores["correctness"].mean()
    print(f"{data.name} {kind} {rate:.0%}: trained + scored in {trained:.0f}s, cleanlab's {folds} CNN folds in "
          f"{cross_validated:.0f}s, mean training accuracy on noisy labels {accuracy:.3f}")
    return rows


def plot(table: pd.DataFrame, path: Path) -> None:
    """AUROC of every score, one panel per dataset x noise kind, bars per rate."""
    from tracking.report.plots import agg_figure

    panels = table.groupby(["dataset", "noise"], sort=False)
    figure = agg_figure(5.5 * len(panels), 4.5)
    for index, ((dataset, noise), frame) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        scores = list(dict.fromkeys(frame["score"]))
        rates = sorted(frame["rate"].unique())
        width = 0.8 / len(rates)
        for offset, rate in enumerate(rates):
            values = frame[frame["rate"] == rate].set_index("score").loc[scores, "auroc"]
            axes.bar(np.arange(len(scores)) + offset * width, values, width, label=f"{rate:.0%} flipped")
        axes.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")
        axes.set_xticks(np.arange(len(scores)) + width * (len(rates) - 1) / 2, scores, rotation=40, ha="right",
                        fontsize=8)
        axes.set_ylim(0, 1)
        axes.set_ylabel("AUROC for finding flipped labels")
        axes.set_title(f"{dataset}, {noise}")
        axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def markdown(table: pd.DataFrame, command: str) -> str:
    """The table as markdown: one row per score, one column group per setting."""
    wide = table.assign(setting=table["dataset"] + " " + table["noise"] + " " + (table["rate"] * 100).map("{:.0f}%".format))
    lines = [f"Command: `{command}`", "",
             "AUROC / average precision / precision at the true noise rate, for finding the flipped training labels.",
             ""]
    settings = list(dict.fromkeys(wide["setting"]))
    lines.append("| score | " + " | ".join(settings) + " |")
    lines.append("| --- |" + " --- |" * len(settings))
    for score in dict.fromkeys(wide["score"]):
        cells = []
        for setting in settings:
            row = wide[(wide["setting"] == setting) & (wide["score"] == score)].iloc[0]
            cells.append(f"{row['auroc']:.3f} / {row['ap']:.3f} / {row['p@noise']:.3f}")
        lines.append(f"| {score} | " + " | ".join(cells) + " |")
    cleanlab_rows = wide[wide["score"].str.startswith("cleanlab")]
    for name, reference in cleanlab_rows.groupby("score", sort=False):
        lines += ["", f"{name} `find_label_issues` (flagged / precision / recall): " + "; ".join(
            f"{r.setting}: {r.issues_found:.0f} / {r.issues_precision:.3f} / {r.issues_recall:.3f}"
            for r in reference.itertuples())]
    fair = wide[wide["score"] == CLEANLAB]
    if len(fair):
        lines += ["", f"{CLEANLAB}: K = {int(fair['cleanlab_folds'].iloc[0])} stratified folds, the bench's CNN trained "
                  "on the other folds' noisy labels with the tracked run's epochs, optimiser, batch size and seed; "
                  "cleanlab ranks by `get_label_quality_scores` (1 - quality) of the held-out softmax."]
    lines += ["", "The fused score (`tracking.scoring.fused`; weights fitted on seed 1, this table is seed "
              f"{int(wide['seed'].iloc[0]) if 'seed' in wide else 0}) against the best single registered score"
              f"{' and ' + CLEANLAB if len(fair) else ''}, AUROC:", "",
              "| setting | best single score | fused | fused - best |" + (" cleanlab (CNN) |" if len(fair) else ""),
              "| --- | --- | --- | --- |" + (" --- |" if len(fair) else "")]
    singles = wide[~wide["score"].isin([fused.NAME]) & ~wide["score"].str.startswith("cleanlab")]
    for setting in settings:
        best = singles[singles["setting"] == setting].sort_values("auroc").iloc[-1]
        mine = wide[(wide["setting"] == setting) & (wide["score"] == fused.NAME)]["auroc"].iloc[0]
        theirs = fair[fair["setting"] == setting]["auroc"]
        lines.append(f"| {setting} | {best['score']} {best['auroc']:.4f} | {mine:.4f} | {mine - best['auroc']:+.4f}"
                     f"{'' if mine > best['auroc'] else ' (not above)'} |"
                     + (f" {theirs.iloc[0]:.4f} |" if len(fair) else ""))
    lines += ["", "`action` and `mean_loss` rank alike (mean_loss = action / epochs), so only `action` is listed. "
              "`variability` is scored as Cartography reads it (higher = more ambiguous); below 0.5 means that "
              "flipped samples have *low* variability (Cartography's hard-to-learn region)."]
    return "\n".join(lines) + "\n"


def fit_fused(seeds: list[int], kinds: list[str], rates: list[float], epochs: int, cache: Path, uri: str) -> None:
    """Fit the fused score's weights on digits with synthetic noise of every kind and rate, for each seed;
    prints the constants of `tracking.scoring.fused`. Scores tables are kept in `cache` and reused."""
    data = digits()
    tables = []
    for seed in seeds:
        for kind in kinds:
            for rate in rates:
                path = cache / f"scores_{kind}_{rate}_{seed}.parquet"
                if not path.exists():
                    noisy, flipped = flip(data.labels, data.classes, rate, kind, seed)
                    train_scores(data, noisy, epochs, uri, seed).assign(flipped=flipped).to_parquet(path)
                tables.append(pd.read_parquet(path).sort_values("sample_id"))
    weights, intercept = fused.fit(tables, [table["flipped"].to_numpy() for table in tables])
    print(f"fitted on {len(tables)} noisy copies of digits ({sum(len(t) for t in tables)} samples):")
    print(f"WEIGHTS = {weights}\nINTERCEPT = {intercept}")


@dataclass
class Store:
    """A throwaway sqlite MLflow store: the benches' runs are a means, not a result."""

    folder: Path
    uri: str


def local_store(name: str) -> Store:
    """A new store in a temporary folder with the experiment `name` (its artifacts beside it)."""
    import mlflow

    folder = Path(tempfile.mkdtemp(prefix=f"{name}-mlflow-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment(name, artifact_location=(folder / "artifacts").as_uri())
    return Store(folder, uri)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,cifar10")
    parser.add_argument("--kinds", default="symmetric,asymmetric")
    parser.add_argument("--rates", default="0.2,0.4")
    parser.add_argument("--epochs", type=int, default=20, help="digits epochs")
    parser.add_argument("--cifar-epochs", type=int, default=8)
    parser.add_argument("--cifar-train", type=int, default=5000, help="training images of the CIFAR-10 subset")
    parser.add_argument("--cifar-root", default="/tmp/data/cifar10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cleanlab-folds", type=int, default=2,
                        help="cleanlab's reference: folds of the CNN's out-of-sample probabilities (K trainings)")
    parser.add_argument("--out", default="bench/results/label_noise")
    parser.add_argument("--fit-fused", default="", metavar="SEEDS",
                        help="instead of the benchmark: fit the fused score's weights on digits noised with these "
                             "seeds (comma separated, e.g. 1,2: not the benchmark's seed) and print them")
    parser.add_argument("--scores-cache", default="", help="with --fit-fused: keep the scores tables here and reuse them")
    parser.add_argument("--report-only", action="store_true",
                        help="only redo the markdown and plot from the CSV already in --out (after an interruption)")
    args = parser.parse_args()
    if args.cleanlab_folds < 2:
        parser.error(f"--cleanlab-folds {args.cleanlab_folds}: cross-validation needs at least 2 folds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])
    if args.report_only:
        report(pd.read_csv(out / "label_noise.csv"), out, command)
        return
    store = local_store("label-noise")
    uri = store.uri
    torch.set_num_threads(1)  # 2 cores shared with other jobs: one thread each trains faster than two fighting
    if args.fit_fused:
        cache = Path(args.scores_cache or store.folder)
        cache.mkdir(parents=True, exist_ok=True)
        fit_fused([int(s) for s in args.fit_fused.split(",")], args.kinds.split(","),
                  [float(r) for r in args.rates.split(",")], args.epochs, cache, uri)
        return
    rows = []
    for name in args.datasets.split(","):
        if name == "digits":
            data, epochs = digits(), args.epochs
        elif name == "cifar10":
            if not (Path(args.cifar_root) / "train").is_dir():
                print(f"cifar10 skipped: no {Path(args.cifar_root) / 'train'} (extract the ImageFolder copy there: "
                      "mkdir -p /tmp/data/cifar10 && tar -xJf ../shared/data/cifar10-jpeg.tar.xz -C /tmp/data/cifar10)")
                continue
            data, epochs = cifar_subset(Path(args.cifar_root), args.cifar_train, args.seed), args.cifar_epochs
        else:
            raise SystemExit(f"unknown dataset {name!r}: digits or cifar10")
        for kind in args.kinds.split(","):
            for rate in map(float, args.rates.split(",")):
                rows += run_setting(data, kind, rate, epochs, uri, args.seed, args.cleanlab_folds)
                table = pd.DataFrame(rows)
                table.to_csv(out / "label_noise.csv", index=False)  # partial results survive an interruption
    report(table, out, command)


def report(table: pd.DataFrame, out: Path, command: str) -> None:
    """label_noise.md and label_noise.png from the results table."""
    (out / "label_noise.md").write_text(markdown(table, command))
    plot(table, out / "label_noise.png")
    print((out / "label_noise.md").read_text())


if __name__ == "__main__":
    main()
