"""The score registry: every per-sample score as one entry, with its maths, its direction and its paper.

Each `Score` is functional, in torchmetrics' style: `init(size)` makes the state arrays,
`update(state, columns, epoch)` folds one epoch (or one cache-sized block of it) into them
in place, `reduce(state, epochs)` gives the score column. `ActionAccumulator` drives them;
ranking, panels, `compare` and the CLI read `higher_is_harder` from here. The registry's
order is the order of the score columns in the scores table of the contract.

Adding a score: one entry in `SCORES`, one test in tests/test_registry.py against numpy, and its Spark
aggregation in `tracking.scoring.spark_engine.AGGREGATIONS` (or `spark=False`: arrow-only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tracking import contract
from tracking.errors import ActionScoresError

if TYPE_CHECKING:
    import numpy as np

# numpy is imported inside the functions, not here: the CLI reads names and directions from this
# module, and `action-scores --help` must not pay numpy's import (~0.5 s here).
State = "dict[str, np.ndarray]"
BLOCK = 1 << 15  # samples per step of an update: a block's state fits in a CPU's L2 cache
SCRATCH = "scratch"  # state arrays named scratch* are one block long, reused by every block, never sliced


@dataclass(frozen=True)
class Score:
    """One score: what it reads, how it folds epochs in, and which way is hard.

    `columns`: the recorded columns it needs (`tracking.contract`); without one of them the
    score is left out. `update` gets the state and the columns of one block of samples (views)
    and the zero-based `epoch`; it must write into the state in place. `at_one_epoch`: the
    score reads its columns at one chosen epoch only (the accumulator's `el2n_epoch`).
    `per_loss_part`: the score applies to `loss` and to every `loss_<part>` column
    (`action`, `action_<part>`). `panels`: whether the job draws its hardest and easiest
    (False where the order is another score's). `shares`: a score with the same columns, init
    and update whose state this one reduces, so the accumulator keeps one state for both
    (mean_loss is action / epochs, confidence variability's running mean); the entry still
    works alone. `spark`: whether `--engine spark` computes it (an aggregation in
    `tracking.scoring.spark_engine.AGGREGATIONS`); False marks it arrow-only, and the Spark engine names it
    among the scores it leaves out.
    """

    name: str
    columns: tuple[str, ...]
    init: Callable[[int], State]
    update: Callable[[State, dict[str, np.ndarray], int], None]
    reduce: Callable[[State, int], np.ndarray]
    higher_is_harder: bool
    definition: str
    paper: str
    at_one_epoch: bool = False
    per_loss_part: bool = False
    panels: bool = True
    shares: str | None = None
    spark: bool = True

    @property
    def direction(self) -> str:
        """For titles and help: "higher = harder" or "lower = harder"."""
        return direction_text(self.higher_is_harder)


def _zeros(*names: str, dtype: str = "float64") -> Callable[[int], State]:
    """Init of state arrays `names`, zeros of `dtype`."""
    def init(size: int) -> State:
        import numpy as np

        return {name: np.zeros(size, dtype=dtype) for name in names}
    return init


def _add(column: str) -> Callable[[State, dict[str, np.ndarray], int], None]:
    """Update of a running sum of `column` (state `total`)."""
    def update(state: State, columns: dict[str, np.ndarray], epoch: int) -> None:
        state["total"] += columns[column]
    return update


def _total(state: State, epochs: int) -> np.ndarray:
    return state["total"]


def _mean(state: State, epochs: int) -> np.ndarray:
    return state["total"] / epochs


def _welford_init(size: int) -> State:
    import numpy as np

    scratch = min(size, BLOCK)
    return {"mean": np.zeros(size), "m2": np.zeros(size),
            f"{SCRATCH}_delta": np.empty(scratch), f"{SCRATCH}_step": np.empty(scratch)}


def _welford_update(state: State, columns: dict[str, np.ndarray], epoch: int) -> None:
    """Welford: delta = p - mean; mean += delta / n; m2 += delta * (p - mean). No cancellation."""
    import numpy as np

    p, mean = columns[contract.P_TRUE], state["mean"]
    delta, step = state[f"{SCRATCH}_delta"], state[f"{SCRATCH}_step"]
    np.subtract(p, mean, out=delta)
    np.divide(delta, epoch + 1, out=step)
    mean += step
    np.subtract(p, mean, out=step)
    step *= delta
    state["m2"] += step


def _std(state: State, epochs: int) -> np.ndarray:
    """Population standard deviation (ddof 0), as Cartography's `np.std`."""
    import numpy as np

    return np.sqrt(state["m2"] / epochs)


def _count_right(state: State, columns: dict[str, np.ndarray], epoch: int) -> None:
    state["right"] += columns[contract.CORRECT]


def _forgetting_init(size: int) -> State:
    import numpy as np

    return {"forgotten": np.zeros(size, np.int32),  # int32: 2x faster sums than int64
            "previous": np.zeros(size, bool), "ever_right": np.zeros(size, bool)}


def _forgetting_update(state: State, columns: dict[str, np.ndarray], epoch: int) -> None:
    correct, previous = columns[contract.CORRECT], state["previous"]
    state["forgotten"] += previous > correct  # right last epoch, wrong now
    state["ever_right"] |= correct
    previous[:] = correct


def _forgetting_reduce(state: State, epochs: int) -> np.ndarray:
    import numpy as np

    # Never learned: `epochs`, above any learned sample's count (at most epochs // 2).
    return np.where(state["ever_right"], state["forgotten"], epochs).astype(np.int64)


def _take_el2n(state: State, columns: dict[str, np.ndarray], epoch: int) -> None:
    state["value"][:] = columns[contract.EL2N]


ACTION_INIT, ACTION_UPDATE = _zeros("total"), _add(contract.LOSS)

SCORES: dict[str, Score] = {score.name: score for score in (
    Score("action", (contract.LOSS,), ACTION_INIT, ACTION_UPDATE, _total, higher_is_harder=True,
          definition="the sample's loss summed over epochs; per loss part too (action_<part>); "
                     "lowest = easy, often a dataset bias",
          paper="Arriaga & Valdenegro-Toro, Unsupervised Difficulty Estimation with Action Scores, 2020",
          per_loss_part=True),
    Score("mean_loss", (contract.LOSS,), ACTION_INIT, ACTION_UPDATE, _mean, higher_is_harder=True, shares="action",
          definition="the sample's loss averaged over epochs (action / epochs)",
          paper="Arriaga & Valdenegro-Toro, Unsupervised Difficulty Estimation with Action Scores, 2020",
          panels=False),  # the order of action
    Score("confidence", (contract.P_TRUE,), _welford_init, _welford_update, lambda state, epochs: state["mean"],
          higher_is_harder=False, shares="variability",
          definition="mean over epochs of the softmax probability of the target class; low = hard or mislabeled",
          paper="Swayamdipta et al., Dataset Cartography, EMNLP 2020"),
    Score("variability", (contract.P_TRUE,), _welford_init, _welford_update, _std, higher_is_harder=True,
          definition="standard deviation (ddof 0) over epochs of the target-class probability; high = the model "
                     "keeps changing its mind: Cartography's ambiguous region, so treated as higher = harder",
          paper="Swayamdipta et al., Dataset Cartography, EMNLP 2020"),
    Score("correctness", (contract.CORRECT,), _zeros("right", dtype="int32"), _count_right,
          lambda state, epochs: state["right"] / epochs, higher_is_harder=False,
          definition="fraction of epochs in which the argmax was the target; low = hard",
          paper="Swayamdipta et al., Dataset Cartography, EMNLP 2020"),
    Score("forgetting", (contract.CORRECT,), _forgetting_init, _forgetting_update, _forgetting_reduce,
          higher_is_harder=True,
          definition="right-to-wrong transitions between consecutive epochs; never learned = the number of epochs",
          paper="Toneva et al., An Empirical Study of Example Forgetting during Deep Neural Network Learning, "
                "ICLR 2019"),
    Score("aum", (contract.MARGIN,), _zeros("total"), _add(contract.MARGIN), _mean, higher_is_harder=False,
          definition="area under the margin: mean over epochs of target logit minus the largest other logit; "
                     "low (negative) = likely mislabeled",
          paper="Pleiss et al., Identifying Mislabeled Data using the Area Under the Margin Ranking, NeurIPS 2020"),
    Score("el2n", (contract.EL2N,), _zeros("value"), _take_el2n, lambda state, epochs: state["value"],
          higher_is_harder=True,
          definition="L2 norm of softmax minus the one-hot target, at one early epoch; high = hard",
          paper="Paul et al., Deep Learning on a Data Diet, NeurIPS 2021", at_one_epoch=True),
)}


def _check_shares() -> None:
    """A score may share only the state of a registered score that keeps it the same way."""
    for score in SCORES.values():
        if score.shares is None:
            continue
        other = SCORES.get(score.shares)
        if other is None or other.shares or (other.columns, other.init, other.update) != (score.columns, score.init,
                                                                                           score.update):
            raise ActionScoresError(f"score {score.name!r} shares the state of {score.shares!r}, "
                                    "which must be a registered score with the same columns, init and update")


_check_shares()


def arrow_only(scores: dict[str, Score] | None = None) -> list[str]:
    """Names of the scores (of the registry, or `scores`) only the arrow engine computes (`Score.spark` False)."""
    return [score.name for score in (SCORES if scores is None else scores).values() if not score.spark]


def get(name: str) -> Score:
    """The registered score `name`; an unknown name is an error listing the valid ones."""
    if name not in SCORES:
        raise ActionScoresError(f"unknown score {name!r}; valid scores: {', '.join(SCORES)}")
    return SCORES[name]


def score_of_column(column: str) -> Score | None:
    """The score a scores-table column holds (`action_loc` -> action), or None for other columns."""
    if column in SCORES:
        return SCORES[column]
    for score in SCORES.values():
        if score.per_loss_part and column.startswith(f"{score.name}_"):
            return score
    return None


def higher_is_harder(column: str, explicit: bool | None = None) -> bool:
    """The direction of a column: `explicit` when given, else its registered score's.

    A column that is no registered score (a user's own, a compare result) needs `explicit`.
    """
    if explicit is not None:
        return explicit
    score = score_of_column(column)
    if score is None:
        raise ActionScoresError(f"column {column!r} is not a registered score ({', '.join(SCORES)}): "
                                "pass higher_is_harder=True or False to say which way is hard")
    return score.higher_is_harder


def direction_text(higher_harder: bool) -> str:
    """"higher = harder" or "lower = harder", for titles."""
    return "higher = harder" if higher_harder else "lower = harder"
