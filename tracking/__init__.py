"""action-scores: per-sample difficulty from training dynamics, logged to your tracker.

Where things live:
- `tracking.record`: the training side, `LossRecorder` (needs torch);
- `tracking.backends`: MLflow and W&B, writer and reader halves, one registry;
- `tracking.scoring`: tables in, scores out, ranking;
- `tracking.report`: panels, plots, the W&B report;
- `tracking.analyze`, `tracking.compare`, `tracking.cli`: the post-hoc job and its commands.

Names below are imported on first use, so `import tracking` costs nothing (no torch, no mlflow).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ActionScoresError": "tracking.errors",
    "LossRecorder": "tracking.record",
    "IndexedDataset": "tracking.record",
    "classification_columns": "tracking.record",
    "record_media": "tracking.record",
    "MediaSummary": "tracking.record",
    "MLflowTracker": "tracking.backends",
    "WandbTracker": "tracking.backends",
    "TRACKERS": "tracking.backends",
    "Tracker": "tracking.backends",
    "make_tracker": "tracking.backends",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tracking' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
