"""Tracking backends: one small module per tracker, and the registry that names them.

    tracker = make_tracker("mlflow")          # or "wandb", or "both"
    tracker.start(experiment="cifar10")       # training writes (RunWriter) ...
    tracker.attach(run_id)                    # ... the post-hoc job reads (RunReader)

None of these modules imports mlflow or wandb until a run is started or attached.
"""

from __future__ import annotations

from typing import Any

from tracking.backends.base import RunReader, RunWriter, Tracker, patched_environ, redact
from tracking.backends.fanout import FanOutTracker
from tracking.backends.mlflow_backend import MLflowTracker
from tracking.backends.wandb_backend import OfflineRun, WandbTracker
from tracking.errors import ActionScoresError

TRACKERS: dict[str, type[Tracker]] = {
    MLflowTracker.name: MLflowTracker, WandbTracker.name: WandbTracker, FanOutTracker.name: FanOutTracker,
}


def make_tracker(name: str, **kwargs: Any) -> Tracker:
    """The tracker registered under `name`; an unknown name lists the valid ones."""
    try:
        cls = TRACKERS[name]
    except KeyError:
        raise ActionScoresError(f"unknown tracker {name!r}; choose one of {sorted(TRACKERS)}") from None
    return cls(**kwargs)


__all__ = ["FanOutTracker", "MLflowTracker", "OfflineRun", "RunReader", "RunWriter", "TRACKERS", "Tracker",
           "WandbTracker", "make_tracker", "patched_environ", "redact"]
