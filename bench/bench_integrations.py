"""What recording costs under Lightning, the Hugging Face Trainer and Keras, on the examples' models (target: <= 2%).

    python bench/bench_integrations.py                          # all three, 3 pairs of 5-epoch fits each
    python bench/bench_integrations.py --frameworks keras --repeats 5 --epochs 5

Two figures per framework:
- attribution: the time spent inside the recorder's calls on the training thread
  (`LossRecorder.update`, `update_classification`, and the session's `recorder` (which
  checks and encodes a split's media) and `end_epoch` (which checks the table and queues
  it, the params and the media); for Keras also the dynamics columns its callback computes
  beside `update`), summed over a fit and divided by the fit's time (the forward pass of an
  evaluation pass is the measurement, not counted). It is what recording adds, measured
  where it happens, so the noise of a shared machine hardly touches it. Printed beside it:
  the seconds the tracker's writer thread spends making and writing the tables (the columns
  of `update_classification`, the table, the parquet file), off the training thread;
- the paired ratio: the same fit with the callback against without it, alternating which
  goes first (median of the neighbouring pairs' ratios). With the callback, Lightning and
  Keras also run the evaluation pass (a forward pass over the tracked split, the paper's
  measurement); the Trainer evaluates every epoch in both fits, so its ratio is recording alone.
Also printed: the tracked split's media, bytes per sample and seconds per 10,000 samples (the
one-time check + encode + write, inside the session's `recorder`); the cost of other kinds of
media on their own: `bench/bench_media.py`.
Runs go to a throwaway sqlite MLflow store; uploads run in the background as in training.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


import pyarrow.parquet as pq  # noqa: E402

from tracking import contract  # noqa: E402
from tracking.backends.uploads import KEEP_LOCAL_ENV, SPOOL_ENV  # noqa: E402
from tracking.integrations import session as session_module  # noqa: E402
from tracking.record.recorder import LossRecorder  # noqa: E402


class Attribution:
    """Seconds spent inside the recorder's calls (outermost call only: update_classification calls update)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.by_call: dict[str, float] = {}  # outermost call name -> seconds
        self._depth = 0
        self.background_seconds = 0.0  # the tables' making and writing on the writer thread, off the training thread
        self.background_cpu = 0.0
        self._background_lock = threading.Lock()

    def timed(self, function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    elapsed = time.perf_counter() - start
                    self.seconds += elapsed
                    self.by_call[function.__name__] = self.by_call.get(function.__name__, 0.0) + elapsed
        return wrapper

    def timed_elsewhere(self, function: Callable) -> Callable:
        """Seconds of a call made on another thread (the tables' background writes), kept apart: wall time,
        which includes waiting for the GIL while training runs, and the thread's own CPU time."""
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                with self._background_lock:
                    self.background_seconds += time.perf_counter() - start
                    self.background_cpu += time.thread_time() - cpu
        return wrapper

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        from tracking.integrations import keras as keras_module  # its dynamics columns are computed beside `update`
        from tracking.backends.uploads import Uploader

        # The session's calls are the outermost: `recorder` checks and encodes a split's media when it is first
        # seen, `end_epoch` ends the recorder's epoch and queues the params and media.
        targets = [(LossRecorder, "update"), (LossRecorder, "update_classification"), (LossRecorder, "end_epoch"),
                   (session_module.RecordingSession, "recorder"), (session_module.RecordingSession, "end_epoch"),
                   (keras_module, "classification_columns")]
        # An epoch's columns, table and file: the `make` handed to `submit_after`, run on the writer thread.
        background = [(Uploader, "submit_after")]
        saved = [getattr(owner, name) for owner, name in targets + background]
        for owner, name in targets:
            setattr(owner, name, self.timed(getattr(owner, name)))
        submit_after = Uploader.submit_after

        def submit_timed(uploader: Uploader, make: Callable, kind: str, describe: str) -> None:
            submit_after(uploader, self.timed_elsewhere(make), kind, describe)

        Uploader.submit_after = submit_timed  # type: ignore[method-assign]
        try:
            yield
        finally:
            for (owner, name), original in zip(targets + background, saved):
                setattr(owner, name, original)


def example(name: str):
    """An example script as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def lightning_fit(epochs: int, recorded: bool) -> None:
    import lightning as pl  # the example's own package (`lightning`, not `pytorch_lightning`)
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader

    from tracking.integrations.lightning import ActionScoresCallback

    ex = example("lightning_example")
    pl.seed_everything(0, verbose=False)
    train, test, images, labels = ex.digits_splits()
    callbacks = [ActionScoresCallback({"test": test}, media={"test": {"images": images,
                                                                       "labels": [str(y) for y in labels]}})]
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=MLFlowLogger("bench"),
                         callbacks=callbacks if recorded else [], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ex.DigitsClassifier(), DataLoader(train, batch_size=64, shuffle=True))


def huggingface_fit(epochs: int, recorded: bool) -> None:
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from tracking.integrations.huggingface import ActionScoresTrainer, add_sample_ids

    ex = example("huggingface_example")
    tokenizer = ex.word_tokenizer()
    train = ex.encoded(tokenizer, *ex.sentences(800, seed=0, flip=0.05))
    test = ex.encoded(tokenizer, *ex.sentences(200, seed=1, flip=0.05))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir=output_dir, num_train_epochs=epochs, learning_rate=5e-3,
                                 per_device_train_batch_size=16, per_device_eval_batch_size=128,
                                 eval_strategy="epoch", save_strategy="no", report_to=["mlflow"], use_cpu=True,
                                 disable_tqdm=True, seed=0, logging_strategy="epoch")
        cls, eval_set = (ActionScoresTrainer, add_sample_ids(test)) if recorded else (Trainer, test)
        cls(model=BertForSequenceClassification(config), args=args, train_dataset=train,
            eval_dataset={"test": eval_set}, processing_class=tokenizer).train()


def keras_fit(epochs: int, recorded: bool) -> None:
    import keras
    import mlflow

    from tracking.integrations.keras import ActionScoresCallback

    ex = example("keras_example")
    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, y_test, images = ex.digits_splits()
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
                              keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    callbacks = [ActionScoresCallback({"test": (x_test, y_test)},
                                      media={"test": {"images": images, "labels": [str(y) for y in y_test]}})]
    with mlflow.start_run():
        model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0, callbacks=callbacks if recorded else [])


FITS = {"lightning": lightning_fit, "huggingface": huggingface_fit, "keras": keras_fit}


def overhead(name: str, epochs: int, repeats: int) -> None:
    fit = FITS[name]
    fit(1, True)  # warm-up: imports, allocator, kernels
    plain_s, recorded_s, attributed, calls, background, background_cpu = [], [], [], [], [], []
    for repeat in range(repeats):
        for recorded in ((False, True) if repeat % 2 == 0 else (True, False)):
            attribution = Attribution()
            with attribution.patched():
                start = time.perf_counter()
                fit(epochs, recorded)
                seconds = time.perf_counter() - start
            (recorded_s if recorded else plain_s).append(seconds)
            if recorded:
                attributed.append(attribution.seconds / seconds)
                calls.append(attribution.by_call)
                background.append(attribution.background_seconds)
                background_cpu.append(attribution.background_cpu)
    ratios = [r / p for p, r in zip(plain_s, recorded_s)]
    media = max(Path(os.environ[SPOOL_ENV]).glob(f"*/{contract.media_dir('test')}/{contract.MEDIA_FILE}"),
                key=lambda path: path.stat().st_mtime)  # the last recorded fit's
    rows = pq.read_metadata(media).num_rows
    encode_s = statistics.median(c.get("recorder", 0.0) for c in calls)  # the session's `recorder`: media check+encode
    print(f"{name}: {epochs}-epoch fit, plain median {statistics.median(plain_s):.2f}s, with the callback "
          f"{statistics.median(recorded_s):.2f}s\n"
          f"    attribution (inside the recorder / fit time): median {100 * statistics.median(attributed):.2f}% "
          f"(runs: {', '.join(f'{100 * a:.2f}%' for a in attributed)}); by call, seconds per fit: "
          f"{', '.join(f'{k} {statistics.median(c.get(k, 0.0) for c in calls):.3f}' for k in sorted(calls[0]))}\n"
          f"    off the training thread (the tables' columns and files, on the writer thread): median "
          f"{statistics.median(background):.3f}s wall, {statistics.median(background_cpu):.3f}s CPU per fit "
          f"({100 * statistics.median(c / r for c, r in zip(background_cpu, recorded_s)):.2f}% of the fit's time)\n"
          f"    media of the tracked split: {rows:,} samples, {media.stat().st_size / rows:.0f} bytes per sample, "
          f"{encode_s * 10_000 / rows:.2f}s per 10,000 samples (check + encode + write)\n"
          f"    paired ratio with/without: median {statistics.median(ratios):.3f} "
          f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frameworks", default="lightning,huggingface,keras")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of fits per framework")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # least noise on a shared machine
    with tempfile.TemporaryDirectory(prefix="bench-integrations-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ[SPOOL_ENV] = f"{tmp}/spool"
        os.environ[KEEP_LOCAL_ENV] = "1"  # the media file stays in the spool after its upload, to be measured
        os.chdir(tmp)  # the sqlite store's artifacts land here
        print(f"{args.epochs}-epoch fits, {args.repeats} pairs each, 1 torch thread", flush=True)
        for name in filter(None, args.frameworks.split(",")):
            overhead(name, args.epochs, args.repeats)


if __name__ == "__main__":
    main()
