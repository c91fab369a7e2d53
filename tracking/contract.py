"""The artifact contract: where per-sample tables and scores live in a run, and their columns.

Anyone may write these files from any framework and use the post-hoc job; docs/contract.md
documents the same contract. Everything that builds or parses an artifact path goes
through this module, so the layout is defined once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from tracking.errors import ActionScoresError

LOSSES_DIR = "per_sample_losses"
MEDIA_DIR = "per_sample_media"  # per_sample_media/<split>/media.parquet: what a panel shows of each sample
MEDIA_FILE = "media.parquet"
SCORES_DIR = "action_scores"
SCORES_FILE = "scores.parquet"
SCORES_PARTS_DIR = "scores"  # action_scores/<split>/scores/part-RRRRR.parquet: a large split's scores in parts
DATA_MAP_FILE = "data_map.png"  # action_scores/<split>/data_map.png: Cartography's map, where the split has its scores
STATUS_TAG = "action_scores.status"
STATUS_DONE = "done"
# Held by a running post-hoc job: "<host>:<pid>:<nonce> <UTC ISO time>"; removed when it ends.
LOCK_TAG = "action_scores.lock"

# Run params that let the post-hoc job rebuild the images of a split by sample_id,
# and pick the panel renderer ("classification" or "detection").
TASK_PARAM = "action_scores.task"
DATASET_PARAM = "action_scores.dataset"
DATA_ROOT_PARAM = "action_scores.data_root"
SCORED_BY_PREFIX = "action_scores.scored_by."  # + split: "train" (the training pass) or "eval" (an evaluation pass)

SAMPLE_ID = "sample_id"
LOSS = "loss"
PART_PREFIX = "loss_"
TARGET = "target"

# Per-sample columns a classification step records beside `loss`, all from the same
# logits (tracking.record.classification_columns): the training-dynamics scores need them.
CORRECT = "correct"  # bool: argmax of the logits equals the target
P_TRUE = "p_true"  # float32: softmax probability of the target class
MARGIN = "margin"  # float32: target logit minus the largest other logit
EL2N = "el2n"  # float32: L2 norm of softmax minus the one-hot target
RECORDED_COLUMNS = (CORRECT, P_TRUE, MARGIN, EL2N)  # the per-sample columns scores may read beside the losses
PREDICTION = "prediction"  # int64: argmax of the logits; `action-scores select` suggests the most frequent as label
# Columns of a loss per sequence (a language model's mean token NLL, tracking.integrations.huggingface): how many
# tokens the loss averages, and their summed NLL, so that a loss per token can be had back.
TOKENS = "tokens"
NLL_SUM = "nll_sum"

# Columns of per_sample_media/<split>/media.parquet (tracking.record.media), one row per sample.
LABEL_NAME = "label_name"  # string: the sample's label name, for captions and per-class panels (null: none given)
MEDIA_KIND = "kind"  # string: what the panel draws, one of MEDIA_KINDS
IMAGE_PNG = "image_png"  # binary: PNG of the picture (original pixels if small, else a thumbnail); null otherwise
TEXT = "text"  # string: the sample's text (truncated); null otherwise
URI = "uri"  # string: where the sample lives (a path or URL), whenever the recorder was given one; else null
MEDIA_KINDS = ("image", "text", "uri")
# Optional column, for detection: the ground-truth boxes of an image, in the pixels of its stored picture
# (`image_png`, the thumbnail when one was made), as a list of structs {x1, y1, x2, y2: float32, label_name:
# string (null: none given)}; x1 < x2 and y1 < y2, the origin at the top left. Null for a sample without
# boxes recorded; an empty list for an image with no objects. The job draws them and captions the image
# with its number of objects.
BOXES = "boxes"
BOX_CORNERS = ("x1", "y1", "x2", "y2")
BOX_LABEL = "label_name"

_EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.parquet$")
_EPOCH_PARTS_DIR = re.compile(r"^epoch_(\d{4,})$")
_PART_FILE = re.compile(r"^part-(\d{5,})\.parquet$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(kind: str, name: str) -> str:
    """Refuse split and part names that would not make a safe, single path component."""
    if not _NAME.match(name):
        raise ActionScoresError(
            f"{kind} name {name!r} is not allowed: use letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def epoch_file_name(epoch: int) -> str:
    """`epoch_0003.parquet` for the zero-based epoch 3."""
    if epoch < 0:
        raise ActionScoresError(f"epoch must be >= 0, got {epoch}")
    return f"epoch_{epoch:04d}.parquet"


def epoch_parts_dir(split: str, epoch: int) -> str:
    """Artifact folder of one sharded epoch: `per_sample_losses/<split>/epoch_0003`, holding one
    `part-RRRRR.parquet` per writing process (`part_file_name`)."""
    return f"{losses_dir(split)}/{epoch_file_name(epoch)[:-len('.parquet')]}"


def part_file_name(part: int) -> str:
    """`part-00001.parquet`: the table one writing process (rank 1) made of a sharded epoch."""
    if part < 0:
        raise ActionScoresError(f"part must be >= 0, got {part}")
    return f"part-{part:05d}.parquet"


def parse_epoch_file_name(name: str) -> int | None:
    """The epoch of an `epoch_EEEE.parquet` file name, or None for any other name."""
    match = _EPOCH_FILE.match(name)
    return int(match.group(1)) if match else None


def parse_part_file_name(name: str) -> int | None:
    """The part of a `part-RRRRR.parquet` file name, or None for any other name."""
    match = _PART_FILE.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class LossesFile:
    """Where one per-sample table of a run sits in the contract: its split and zero-based epoch, and its part
    (the writing process) for a sharded epoch, None for the single-file form."""

    path: str
    split: str
    epoch: int
    part: int | None = None


def parse_losses_file(path: str) -> LossesFile | None:
    """Split, epoch and part of a `per_sample_losses/<split>/epoch_EEEE.parquet` or
    `per_sample_losses/<split>/epoch_EEEE/part-RRRRR.parquet` artifact path; None for a file that is not
    parquet (a writer's marker such as `_SUCCESS`), which is no table.

    Refuses, since the job downloads what other people wrote: paths that are absolute or climb out of the
    run (`..`), any other depth, and parquet files or epoch folders not named by the contract.
    """
    parts = relative_artifact_path(path).parts
    if len(parts) not in (3, 4) or parts[0] != LOSSES_DIR:
        raise ActionScoresError(
            f"artifact path {path!r} is not of the form {LOSSES_DIR}/<split>/epoch_EEEE.parquet or "
            f"{LOSSES_DIR}/<split>/epoch_EEEE/part-RRRRR.parquet"
        )
    split, name = check_name("split", parts[1]), parts[-1]
    if len(parts) == 3:
        epoch = parse_epoch_file_name(name)
        if epoch is None and name.endswith(".parquet"):
            raise ActionScoresError(f"{path}: not named epoch_EEEE.parquet (zero-based epoch, 4 digits)")
        return None if epoch is None else LossesFile(path, split, epoch)
    folder = _EPOCH_PARTS_DIR.match(parts[2])
    if folder is None:
        raise ActionScoresError(f"{path}: the folder of a sharded epoch is named epoch_EEEE (zero-based epoch, "
                                f"4 digits), not {parts[2]!r}")
    part = parse_part_file_name(name)
    if part is None and name.endswith(".parquet"):
        raise ActionScoresError(f"{path}: a part of a sharded epoch is named part-RRRRR.parquet (zero-based part, "
                                "5 digits)")
    return None if part is None else LossesFile(path, split, int(folder.group(1)), part)


def losses_dir(split: str) -> str:
    """Artifact folder of one split's per-epoch tables."""
    return f"{LOSSES_DIR}/{check_name('split', split)}"


def media_dir(split: str) -> str:
    """Artifact folder of one split's media table (written once, not per epoch)."""
    return f"{MEDIA_DIR}/{check_name('split', split)}"


def scores_dir(split: str) -> str:
    """Artifact folder of one split's scores and panels."""
    return f"{SCORES_DIR}/{check_name('split', split)}"


def part_column(part: str) -> str:
    """Column of one loss part: `loss_loc` for part `loc`."""
    return PART_PREFIX + check_name("part", part)


def parts_of(columns: list[str]) -> list[str]:
    """Part names found in a table's columns (`loss_loc` -> `loc`), in column order."""
    return [c[len(PART_PREFIX):] for c in columns if c.startswith(PART_PREFIX)]


def loss_columns(columns: list[str]) -> list[str]:
    """`loss`, then the table's `loss_<part>` columns in column order (part names checked)."""
    return [LOSS] + [part_column(part) for part in parts_of(columns)]


def action_column(loss_column: str) -> str:
    """Score column of a loss column: `action` for `loss`, `action_loc` for `loss_loc`."""
    return "action" + loss_column[len(LOSS):]


def relative_artifact_path(path: str) -> PurePosixPath:
    """`path` as a run-relative posix path; refuses absolute paths (`/x`, `C:\\x`, `\\\\host`) and
    any `..`, so that a file from a run can never land outside the folder it is downloaded to."""
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", path):
        raise ActionScoresError(f"artifact path {path!r} escapes the run's artifact folder")
    return pure
