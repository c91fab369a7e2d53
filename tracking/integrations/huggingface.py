"""Hugging Face `transformers`: record each eval sample's loss at every evaluation of the `Trainer`.

    from tracking.integrations.huggingface import ActionScoresTrainer, add_sample_ids
    trainer = ActionScoresTrainer(model=model, args=TrainingArguments(..., eval_strategy="epoch", report_to="mlflow"),
                                  train_dataset=train_set, eval_dataset={"test": add_sample_ids(test_set)},
                                  processing_class=tokenizer)
    trainer.train()

Two pieces, each small:
- `ActionScoresTrainer`, a `Trainer` that keeps the `sample_id` column through the removal of
  unused columns, takes it out of the batch before the model sees it, and hands each eval
  batch's ids, outputs and labels to its callback. The evaluation is the Trainer's own
  (no second pass): with `eval_strategy="epoch"`, one table per epoch.
- `ActionScoresCallback`, a `TrainerCallback` that writes the tables into the run of the
  Trainer's `report_to="mlflow"` or `"wandb"` integration (or a run it opens) and records
  each tracked split's texts once, so that the job draws text panels without the data.
  The Trainer adds one with default settings if `callbacks` holds none.

Sample ids are the positions in each eval dataset (`add_sample_ids`). The default loss is the
cross-entropy of the model's `logits` against `labels` (`LossRecorder.update_classification`);
`loss_fn(outputs, labels) -> unreduced losses` for any other (`tracking.integrations.session.LossFn`).

The callback's first argument names what is scored, as in the other frameworks' callbacks:
`ActionScoresCallback({"test": add_sample_ids(test_set)})` given to `ActionScoresTrainer(callbacks=[...])`
has the Trainer evaluate that dataset; without it, every eval dataset of the Trainer is tracked.

The training pass is recorded too with `ActionScoresCallback(train_split="train")` and
`train_dataset=add_sample_ids(train_set)`: at no cost in forward passes, since `compute_loss` already
has each training batch's outputs; its per-sample losses are taken from them (without a graph), and one
table is written at the end of each epoch. An epoch cut short (`max_steps` reached mid-epoch) has
samples it never saw, so its table is not written (a warning says so).

Under DDP (`torchrun`, `ddp_backend="gloo"` or `"nccl"`) every rank scores its share; with an MLflow run
every rank attaches to it and uploads its own part of each epoch (`epoch_EEEE/part-<rank>.parquet`), with
a W&B run rank 0 gathers the shares and writes each epoch's table, whole, once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tracking import contract
from tracking.backends import RunWriter
from tracking.errors import ActionScoresError
from tracking.integrations.session import (LossFn, RecordedRun, RecordingSession, check_media, check_sample_ids,
                                           deprecated, join_mlflow, join_wandb, open_run, writer_on_every_rank)
from tracking.record.recorder import LossRecorder

log = logging.getLogger(__name__)
SAMPLE_ID = contract.SAMPLE_ID
LABELS = "labels"
IGNORED_LABEL = -100  # labels the loss leaves out (padding, prompts), as in transformers
TOKENS, NLL_SUM = contract.TOKENS, contract.NLL_SUM  # the causal-LM columns beside `loss`


class _WithSampleIds(Dataset):
    """A dataset of dict items, each with its position added as `sample_id`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], SAMPLE_ID: index}


def add_sample_ids(dataset: Any) -> Any:
    """The dataset with a `sample_id` column (its positions): a `datasets.Dataset` gets a column,
    any other dataset of dict items a light wrapper."""
    if hasattr(dataset, "add_column"):
        return dataset.add_column(SAMPLE_ID, list(range(len(dataset))))
    return _WithSampleIds(dataset)


def split_of(metric_key_prefix: str) -> str:
    """The split an evaluation scores: `eval` for one eval dataset, `test` for `eval_dataset={"test": ...}`."""
    return metric_key_prefix.removeprefix("eval_") or "eval"


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor,
                    shift: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One loss per sequence from (B, T, V) logits and (B, T) labels: the mean token NLL over the labels
    that are not -100, and the columns `tokens` (how many) and `nll_sum` (their summed NLL), so that a
    loss per token can be had back. `shift`: a causal LM's logits at t predict the label at t + 1, as the
    model's own loss shifts them. A sequence with no label left has loss 0 and tokens 0."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORED_LABEL, reduction="none")
    tokens = (labels != IGNORED_LABEL).sum(dim=1)
    loss_sum = nll.sum(dim=1)
    return loss_sum / tokens.clamp_min(1), {TOKENS: tokens, NLL_SUM: loss_sum}


def is_causal_lm(model: Any) -> bool:
    """Whether `model` is one of transformers' causal LMs (`AutoModelForCausalLM` classes), by class name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _skipped(eval_delay: float, interval: float) -> int:
    """How many scheduled evaluations `eval_delay` skips (the Trainer evaluates once `eval_delay <= epoch or step`)."""
    return max(0, math.ceil(eval_delay / interval) - 1) if eval_delay > 0 else 0


def evaluation_number(args: TrainingArguments, state: TrainerState) -> int:
    """Which evaluation of the training this one is, 0 first, from the Trainer's own state: its epoch
    (`state.epoch` counts the epochs done) with `eval_strategy="epoch"`, its interval of `eval_steps`
    with `"steps"`, less the evaluations `eval_delay` skipped. A resumed Trainer restores that state,
    so its tables go on from the last one; an evaluation at a step between two scheduled ones (the
    last step of training) takes the next number."""
    delay = float(args.eval_delay or 0)
    if args.eval_strategy == "steps":
        interval = state.eval_steps or args.eval_steps
        return math.ceil(state.global_step / interval) - 1 - _skipped(delay, interval)
    return math.ceil(round(state.epoch or 0, 6)) - 1 - _skipped(delay, 1)


class ActionScoresCallback(TrainerCallback):
    """Writes a table per tracked split at every evaluation during training, into the Trainer's run.

    `splits`: split name -> eval dataset (with `sample_id`: `add_sample_ids`), which the
    `ActionScoresTrainer` evaluates (None: every eval dataset of the Trainer). `loss_fn`: see
    the module docstring. Deprecated: `splits` as a list of names, `per_sample_loss=` (now
    `loss_fn=`). `media`: split -> keywords of `record_media`; by default each tracked
    split's texts (its `text_field`, else its `input_ids` decoded by the Trainer's
    tokenizer) with the label names of `model.config.id2label`. `tracker`: a configured
    `Tracker` (used whatever `report_to` says), or the backend name of the run to open when
    `report_to` has neither mlflow nor wandb, into `experiment`. `train_split`: the name under which the
    training pass is recorded, from the losses `compute_loss` already computes (None: not recorded).

    Each evaluation's table is numbered from the Trainer's state (`evaluation_number`), so a
    resumed Trainer goes on where it stopped instead of writing `epoch_0000` again.
    """

    def __init__(self, splits: Mapping[str, Any] | Sequence[str] | None = None, *, loss_fn: LossFn | None = None,
                 media: Mapping[str, Mapping[str, Any]] | None = None, text_field: str = "text",
                 tracker: str | RunWriter = "mlflow", experiment: str | None = None,
                 train_split: str | None = None, per_sample_loss: LossFn | None = None) -> None:
        if per_sample_loss is not None:
            deprecated("per_sample_loss=", "loss_fn= (the same (outputs, labels) signature)")
            loss_fn = per_sample_loss
        self.datasets: dict[str, Any] = {}  # split -> eval dataset, handed to the ActionScoresTrainer
        if splits is not None and not isinstance(splits, Mapping):
            deprecated("ActionScoresCallback(['test']) (split names)",
                       "ActionScoresCallback({'test': add_sample_ids(dataset)}), which the Trainer then evaluates")
            names: list[str] | None = list(splits)
        else:
            self.datasets = dict(splits or {})
            names = None if splits is None else list(self.datasets)
        self.splits = None if names is None else [contract.check_name("split", s) for s in names]
        if self.splits is not None and not self.splits and train_split is None:
            raise ActionScoresError("splits is empty: name at least one eval dataset, or pass None for all")
        self.train_split = contract.check_name("split", train_split) if train_split is not None else None
        if self.train_split is not None and self.train_split in (self.splits or []):
            raise ActionScoresError(f"split {self.train_split!r} is both an eval set and the training pass; rename one")
        self.loss_fn = loss_fn
        self.media = check_media(media, [*(self.splits if self.splits is not None else list(media or {})),
                                         *([self.train_split] if self.train_split else [])])
        self.text_field = text_field
        self.tracker = tracker
        self.experiment = experiment
        self.sizes: dict[str, int] = {}  # tracked split -> number of samples, from `track`
        self.scored_by: dict[str, str] = {}  # tracked split -> "eval" or "train" (the training pass)
        self.session: RecordingSession | None = None
        self.run: RecordedRun | None = None  # set on rank 0 when training starts: where the tables go
        self.active: tuple[str, LossRecorder] | None = None  # the split being evaluated during training
        self.causal = False  # whether the model predicts the next token (set by ActionScoresTrainer)

    # --- set up by ActionScoresTrainer ------------------------------------------------------------
    def eval_datasets(self, given: Any) -> Any:
        """The Trainer's `eval_dataset` with this callback's datasets added, so that the Trainer evaluates them."""
        if not self.datasets:
            return given
        if given is None:
            return dict(self.datasets)
        if not isinstance(given, Mapping):
            raise ActionScoresError("the Trainer has one unnamed eval_dataset and the callback named its splits: "
                                    "give eval_dataset={name: dataset}, or leave the eval datasets to the callback")
        clash = sorted(name for name in self.datasets if name in given and given[name] is not self.datasets[name])
        if clash:
            raise ActionScoresError(f"eval_dataset and the callback give different datasets for {clash}: give "
                                    "each split once, in the callback")
        return {**given, **self.datasets}

    def track(self, split: str, dataset: Any, tokenizer: Any, id2label: Mapping[int, str] | None,
              training: bool = False) -> None:
        """Check a tracked dataset's sample ids now (an eval dataset, or the training set with `training`), and
        prepare its default text media."""
        if not training and self.splits is not None and split not in self.splits:
            return
        if not training and split == self.train_split:
            raise ActionScoresError(f"split {split!r} is both an eval set and the training pass; rename one")
        contract.check_name("split", split)
        what, argument = ("the training set", "train_dataset") if training else (f"eval dataset {split!r}", "eval dataset")
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ActionScoresError(f"{what} must be a dataset with a length (map-style), got "
                                    f"{type(dataset).__name__}: its sample ids are checked before training")
        size = len(dataset)
        items = [dataset[index] for index in range(size)]
        if size == 0 or not isinstance(items[0], Mapping) or SAMPLE_ID not in items[0]:
            raise ActionScoresError(
                f"{what} has no {SAMPLE_ID!r} column: pass add_sample_ids(dataset) as the {argument}"
            )
        check_sample_ids(split, np.asarray([item[SAMPLE_ID] for item in items]), size)
        if LABELS not in items[0] and self.loss_fn is None and not self.causal:
            raise ActionScoresError(f"{what} has no {LABELS!r}: the per-sample loss needs them")
        self.sizes[split] = size
        self.scored_by[split] = "train" if training else "eval"
        if split not in self.media:
            texts = self._texts(split, items, tokenizer)
            if texts is not None:
                order = np.argsort([item[SAMPLE_ID] for item in items])
                names = ([str((id2label or {}).get(int(items[i][LABELS]), int(items[i][LABELS]))) for i in order]
                         if LABELS in items[0] and np.ndim(items[0][LABELS]) == 0 else None)  # a class, not tokens
                self.media[split] = {"texts": [texts[i] for i in order], "labels": names}

    def _texts(self, split: str, items: list[Mapping[str, Any]], tokenizer: Any) -> list[str] | None:
        if self.text_field in items[0]:
            return [str(item[self.text_field]) for item in items]
        if "input_ids" in items[0] and hasattr(tokenizer, "decode"):
            return [tokenizer.decode(item["input_ids"], skip_special_tokens=True) for item in items]
        log.warning("eval dataset %r: no %r field and no tokenizer to decode input_ids: no text panels",
                    split, self.text_field)
        return None

    def begin_evaluation(self, split: str) -> LossRecorder | None:
        """The recorder of `split` while the Trainer evaluates it during training; None when not tracked."""
        if self.session is None or self.scored_by.get(split) != "eval":
            return None
        recorder = self.session.recorder(split, self.sizes[split])
        self.active = (split, recorder)
        return recorder

    def training_recorder(self) -> LossRecorder | None:
        """The recorder of the training pass, while training; None when it is not recorded."""
        if self.session is None or self.train_split is None:
            return None
        return self.session.recorder(self.train_split, self.sizes[self.train_split])

    def update(self, recorder: LossRecorder, sample_ids: torch.Tensor, outputs: Any, labels: torch.Tensor) -> None:
        """Translate one eval batch: its ids, the model's outputs and the labels."""
        if self.loss_fn is not None:
            recorder.update(sample_ids, self.loss_fn(outputs, labels))
        elif outputs["logits"].dim() == 3:  # a loss per token: one per sequence, with its count and sum
            losses, columns = sequence_losses(outputs["logits"], labels, shift=self.causal)
            recorder.update(sample_ids, losses, **columns)
        else:
            recorder.update_classification(sample_ids, outputs["logits"], labels)

    # --- when -------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        evaluated = [split for split, how in self.scored_by.items() if how == "eval"]
        if evaluated and str(args.eval_strategy) in ("no", "IntervalStrategy.NO"):
            raise ActionScoresError("ActionScoresCallback records at each evaluation, and eval_strategy is 'no': "
                                    "set TrainingArguments(eval_strategy='epoch')")
        missing = sorted(set(self.splits or []) - set(self.sizes))
        if not evaluated and self.train_split is None or missing:
            raise ActionScoresError(f"no eval dataset for tracked splits {missing or '(any)'}: give the "
                                    "ActionScoresTrainer eval_dataset={name: add_sample_ids(dataset)}")
        check_media(self.media, self.sizes)  # media named for a split that has no eval dataset
        writer, finish_writer = writer_on_every_rank(lambda: self._writer(args), state.is_world_process_zero)
        self.session = RecordingSession(writer, self.scored_by, self.media, finish_writer)
        self.run = self.session.run
        for split, size in self.sizes.items():  # media checked and encoded now, before the first epoch
            self.session.recorder(split, size)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.session is None or self.active is None:
            return
        split, _ = self.active
        self.active = None
        self.session.end_epoch(split, evaluation_number(args, state))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        recorder = self.training_recorder()
        if recorder is None:
            return
        epochs_done = round(state.epoch or 0, 6)  # the Trainer's float count: whole at an epoch's natural end
        if epochs_done != int(epochs_done):
            recorder.reset()
            log.warning("training pass of split %r: epoch %d was cut short (max_steps) at %.3f epochs; its samples "
                        "were not all seen, so its table is not written", self.train_split, int(epochs_done),
                        epochs_done)
            return
        assert self.session is not None and self.train_split is not None
        self.session.end_epoch(self.train_split, int(epochs_done) - 1)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def _writer(self, args: TrainingArguments) -> tuple[RunWriter, bool]:
        """The run the Trainer's mlflow or wandb integration opened (it starts in its own on_train_begin,
        which runs before this one), else a new run."""
        if isinstance(self.tracker, RunWriter):
            return open_run(self.tracker, self.experiment)
        report_to = args.report_to or []
        if "mlflow" in report_to:
            import mlflow

            run = mlflow.active_run()
            if run is None:
                raise ActionScoresError("report_to has mlflow but no MLflow run is active: is "
                                        "DISABLE_MLFLOW_INTEGRATION set?")
            return join_mlflow(mlflow.get_tracking_uri(), run.info.run_id), True
        if "wandb" in report_to:
            import wandb

            if wandb.run is None:
                raise ActionScoresError("report_to has wandb but no W&B run is active")
            return join_wandb(wandb.run), True
        return open_run(self.tracker, self.experiment)


class ActionScoresTrainer(Trainer):
    """A `Trainer` whose batches keep `sample_id` and whose evaluations feed its `ActionScoresCallback`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = next((cb for cb in kwargs.get("callbacks") or [] if isinstance(cb, ActionScoresCallback)), None)
        if given is not None:  # before the Trainer checks that evaluations have a dataset
            kwargs["eval_dataset"] = given.eval_datasets(kwargs.get("eval_dataset"))
        super().__init__(*args, **kwargs)
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, ActionScoresCallback)]
        if not found:
            found = [ActionScoresCallback()]
            self.add_callback(found[0])
        self.action_scores: ActionScoresCallback = found[0]
        self.action_scores.causal = is_causal_lm(self.model)
        self._recording: LossRecorder | None = None
        datasets = self.eval_dataset if isinstance(self.eval_dataset, Mapping) else (
            {"eval": self.eval_dataset} if self.eval_dataset is not None else {})
        id2label = getattr(getattr(self.model, "config", None), "id2label", None)
        for name, dataset in datasets.items():  # ids checked now: nothing is trained or written before
            self.action_scores.track(split_of(f"eval_{name}"), dataset, self.processing_class, id2label)
        if self.action_scores.train_split is not None:
            self.action_scores.track(self.action_scores.train_split, self.train_dataset, self.processing_class,
                                     id2label, training=True)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep `sample_id` when unused columns are removed (it is taken out again in `compute_loss`)."""
        super()._set_signature_columns_if_needed()
        if SAMPLE_ID not in self._signature_columns:
            self._signature_columns.append(SAMPLE_ID)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        chosen = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(chosen, Mapping):  # the Trainer calls back once per dataset, prefix eval_<name>
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self._recording = self.action_scores.begin_evaluation(split_of(metric_key_prefix))
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._recording = None

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        sample_ids = inputs.pop(SAMPLE_ID, None)
        recorder = self.action_scores.training_recorder() if model.training else self._recording
        if recorder is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if sample_ids is None:
            which = "a training batch" if model.training else "an eval batch"
            raise ActionScoresError(f"{which} has no sample_id: pass add_sample_ids(dataset) as the "
                                    f"{'train_dataset' if model.training else 'eval dataset'}")
        labels = inputs.get(LABELS)  # before the Trainer's label smoother takes them out
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        with torch.no_grad():  # the losses the Trainer just computed, per sample, without a second graph
            self.action_scores.update(recorder, sample_ids, outputs, labels)
        return (loss, outputs) if return_outputs else loss
