"""action-scores: per-sample difficulty from training dynamics, logged to your tracker.

Record per-sample losses during training with `LossRecorder`, then score and draw
panels after the fact with `action-scores analyze` (or `tracking.analyze.analyze_run`).
"""

from tracking.errors import ActionScoresError
from tracking.recorder import LossRecorder
from tracking.trackers import TRACKERS, MLflowTracker, Tracker, make_tracker

__all__ = ["ActionScoresError", "LossRecorder", "MLflowTracker", "TRACKERS", "Tracker", "make_tracker"]
