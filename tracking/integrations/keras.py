"""Keras 3 (`KERAS_BACKEND=torch`): record each tracked sample's loss at every epoch end, as the paper's callback did.

    from tracking.integrations.keras import ActionScoresCallback
    model.fit(x_train, y_train, epochs=20, callbacks=[ActionScoresCallback({"test": (x_test, y_test)})])

At each epoch end the callback predicts every tracked `(x, y)` (sample ids: the row
positions), computes the model's compiled loss per sample (unreduced) and records it. For
integer class targets and one output per class it also records the target and the
dynamics columns, from the outputs taken as logits, or as probabilities when the loss says
`from_logits=False` (the default of Keras' cross-entropies). Keras has no tracking logger
of its own, so the callback writes into the run the script has active (`mlflow.start_run()`,
`wandb.init()`, `mlflow run`), or opens a run of `tracker` and ends it when training ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported; a backend already chosen stays

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tracking.backends import RunWriter
from tracking.errors import ActionScoresError
from tracking.integrations.session import LossFn, RecordedRun, RecordingSession, check_media, deprecated, open_run
from tracking.record.columns import classification_columns

PerSampleLoss = Callable[[Any, Any], Any]  # the deprecated (y_true, y_pred) -> unreduced losses


def _per_sample_loss(loss: Any) -> tuple[LossFn, bool]:
    """The compiled loss as a per-sample `loss_fn(outputs, targets)` (no reduction), and whether it takes logits."""
    if isinstance(loss, str) or callable(loss):
        resolved = keras.losses.get(loss) if isinstance(loss, str) else loss
        function = resolved.call if isinstance(resolved, keras.losses.Loss) else resolved
        from_logits = isinstance(resolved, keras.losses.Loss) and bool(resolved.get_config().get("from_logits"))
        return (lambda outputs, targets: function(targets, outputs)), from_logits
    raise ActionScoresError(f"the model's loss is {type(loss).__name__}; compile it with one loss "
                            "(a name, a keras.losses.Loss or a function), or pass loss_fn=")


class ActionScoresCallback(keras.callbacks.Callback):
    """Predicts each tracked `(x, y)` at every epoch end and records one loss per sample.

    `splits`: split -> `(x, y)` arrays of equal length. `loss_fn(outputs, targets)`: unreduced
    losses (`tracking.integrations.session.LossFn`; default: the compiled loss), given the
    predictions and targets as tensors. Deprecated: `tracked=` (now `splits`),
    `per_sample_loss(y_true, y_pred)` (now `loss_fn(outputs, targets)`). `from_logits`: whether the outputs are
    logits, for the dynamics columns (None: as the compiled loss says). `media`: split -> keywords of
    `record_media` (`images=`, `texts=` or `uris=`, `labels=`). `batch_size`: of `predict`.
    `tracker`: a backend name (the script's active run of that backend, else a new run) or a
    configured `Tracker` (`tracking.integrations.session.open_run` says who finishes it).
    """

    def __init__(self, splits: Mapping[str, tuple[Any, Any]] | None = None, *, loss_fn: LossFn | None = None,
                 from_logits: bool | None = None, batch_size: int = 256,
                 media: Mapping[str, Mapping[str, Any]] | None = None,
                 tracker: str | RunWriter = "mlflow", experiment: str | None = None,
                 tracked: Mapping[str, tuple[Any, Any]] | None = None,
                 per_sample_loss: PerSampleLoss | None = None) -> None:
        super().__init__()
        if tracked is not None:
            deprecated("ActionScoresCallback(tracked=...)", "ActionScoresCallback({'test': (x, y)}) (splits=)")
            splits = tracked
        if per_sample_loss is not None:
            deprecated("per_sample_loss(y_true, y_pred)", "loss_fn(outputs, targets)")
            loss_fn = lambda outputs, targets: per_sample_loss(targets, outputs)  # noqa: E731
        if not splits:
            raise ActionScoresError("nothing to record: give ActionScoresCallback({'test': (x_test, y_test)})")
        self.splits: dict[str, tuple[Any, np.ndarray]] = {}
        for split, pair in splits.items():
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ActionScoresError(f"splits[{split!r}] must be an (x, y) pair, got {type(pair).__name__}")
            x, y = pair
            if len(x) != len(y) or len(x) == 0:
                raise ActionScoresError(f"splits[{split!r}]: x has {len(x)} samples and y {len(y)}; "
                                        "give one target per sample, at least one sample")
            self.splits[split] = (x, np.asarray(y))
        if batch_size <= 0:
            raise ActionScoresError(f"batch_size must be positive, got {batch_size}")
        self.loss_fn = loss_fn
        self.from_logits = from_logits
        self.batch_size = batch_size
        self.media = check_media(media, self.splits)
        self.tracker = tracker
        self.experiment = experiment
        self.session: RecordingSession | None = None
        self.run: RecordedRun | None = None  # set when training starts: where the tables go

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._loss()  # fail before any run is opened
        writer, finish_writer = open_run(self.tracker, self.experiment)
        self.session = RecordingSession(writer, {s: "eval" for s in self.splits}, self.media, finish_writer)
        self.run = self.session.run
        for split, (x, _) in self.splits.items():  # media checked and encoded now, before the first epoch
            self.session.recorder(split, len(x))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.session is None:
            raise ActionScoresError("ActionScoresCallback used outside model.fit()")
        try:
            self._record(epoch)
        except BaseException:  # Keras has no exception hook: end a run we opened as failed, here
            self.session.close(failed=True)
            self.session = None
            raise

    def _record(self, epoch: int) -> None:
        """Predict every tracked split, and record and write its table of `epoch`."""
        assert self.session is not None
        loss, loss_takes_logits = self._loss()
        from_logits = loss_takes_logits if self.from_logits is None else self.from_logits
        for split, (x, y) in self.splits.items():
            outputs = self.model.predict(x, batch_size=self.batch_size, verbose=0)
            losses = torch.as_tensor(keras.ops.convert_to_numpy(loss(torch.as_tensor(outputs), torch.as_tensor(y))))
            columns: dict[str, torch.Tensor] = {}
            if np.issubdtype(y.dtype, np.integer) and y.ndim == 1 and np.ndim(outputs) == 2:
                targets = torch.as_tensor(y)
                logits = torch.as_tensor(np.asarray(outputs, dtype=np.float32))
                logits = logits if from_logits else logits.clamp_min(1e-7).log()  # log p: a softmax gives p back
                columns = {"target": targets, **classification_columns(logits, targets)}
            self.session.recorder(split, len(x)).update(np.arange(len(x)), losses, **columns)
            self.session.end_epoch(split, epoch)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def _loss(self) -> tuple[LossFn, bool]:
        if self.loss_fn is not None:
            return self.loss_fn, False
        if getattr(self.model, "loss", None) is None:
            raise ActionScoresError("the model has no compiled loss: compile it with loss=..., or pass loss_fn=")
        return _per_sample_loss(self.model.loss)
