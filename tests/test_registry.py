"""Every registered score against a naive numpy reference on tiny hand-made data, and its direction.

Adding a score to `tracking.scoring.registry.SCORES` means adding its reference and direction to
`REFERENCES` here: `test_every_score_has_a_reference` fails until then.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tracking import contract
from tracking.errors import ActionScoresError
from tracking.scoring import registry
from tracking.scoring.registry import SCORES, SCRATCH

# 5 samples x 4 epochs, picked by hand: sample 0 learned and kept, 1 forgotten twice, 2 never learned,
# 3 learned at the last epoch, 4 forgotten once and relearned.
LOSS = np.array([[2.0, 0.5, 3.0, 2.5, 0.1],
                 [0.5, 2.0, 2.5, 2.0, 1.5],
                 [0.25, 0.4, 4.0, 1.5, 0.2],
                 [0.125, 2.5, 3.5, 0.3, 0.3]])
P_TRUE = np.exp(-LOSS)
CORRECT = np.array([[False, True, False, False, True],
                    [True, False, False, False, False],
                    [True, True, False, False, True],
                    [True, False, False, True, True]])
MARGIN = np.array([[-1.0, 2.0, -3.0, -0.5, 1.0],
                   [1.0, -1.0, -2.5, -0.25, -0.5],
                   [2.0, 1.5, -4.0, 0.5, 1.5],
                   [3.0, -2.0, -3.5, 1.0, 2.0]])
EL2N = np.array([[0.9, 0.3, 1.2, 1.0, 0.1],
                 [0.5, 0.8, 1.1, 0.9, 0.6],
                 [0.2, 0.4, 1.3, 0.7, 0.3],
                 [0.1, 0.9, 1.3, 0.2, 0.2]])
COLUMNS = {contract.LOSS: LOSS, contract.P_TRUE: P_TRUE, contract.CORRECT: CORRECT, contract.MARGIN: MARGIN,
           contract.EL2N: EL2N}
EPOCHS, SAMPLES = LOSS.shape
ONE_EPOCH = 2  # the epoch one-epoch scores (el2n) read


def _forgetting(correct: np.ndarray) -> np.ndarray:
    """Toneva et al.: right-to-wrong transitions; a never-learned sample counts the number of epochs."""
    counts = []
    for history in correct.T.tolist():
        events = sum(before and not after for before, after in zip(history, history[1:]))
        counts.append(events if any(history) else len(history))
    return np.array(counts)


# name -> (numpy reference over the epochs x samples columns, higher_is_harder)
REFERENCES: dict[str, tuple[Callable[[dict[str, np.ndarray]], np.ndarray], bool]] = {
    "action": (lambda c: c[contract.LOSS].sum(axis=0), True),
    "mean_loss": (lambda c: c[contract.LOSS].mean(axis=0), True),
    "confidence": (lambda c: c[contract.P_TRUE].mean(axis=0), False),
    "variability": (lambda c: c[contract.P_TRUE].std(axis=0), True),
    "correctness": (lambda c: c[contract.CORRECT].mean(axis=0), False),
    "forgetting": (lambda c: _forgetting(c[contract.CORRECT]), True),
    "aum": (lambda c: c[contract.MARGIN].mean(axis=0), False),
    "el2n": (lambda c: c[contract.EL2N][ONE_EPOCH], True),
}


def _run(score: registry.Score, blocks: list[slice]) -> np.ndarray:
    """Drive a score as the accumulator does: init, then each epoch's update block by block on views
    of the state (scratch arrays cut to the block), then reduce."""
    state = score.init(SAMPLES)
    for epoch in range(EPOCHS):
        if score.at_one_epoch and epoch != ONE_EPOCH:
            continue
        for block in blocks:
            size = len(range(SAMPLES)[block])
            views = {name: values[:size] if name.startswith(SCRATCH) else values[block] for name, values in state.items()}
            score.update(views, {column: COLUMNS[column][epoch][block] for column in score.columns}, epoch)
    return score.reduce(state, EPOCHS)


def test_every_score_has_a_reference() -> None:
    assert list(SCORES) == list(REFERENCES)  # the registry's order is the scores table's column order


@pytest.mark.parametrize("name", list(SCORES))
@pytest.mark.parametrize("blocks", [[slice(0, SAMPLES)], [slice(0, 2), slice(2, SAMPLES)]], ids=["one", "two"])
def test_score_equals_its_numpy_reference(name: str, blocks: list[slice]) -> None:
    reference, higher_is_harder = REFERENCES[name]
    score = registry.get(name)
    got = _run(score, blocks)
    expected = reference(COLUMNS)
    assert got.shape == (SAMPLES,)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert score.higher_is_harder is higher_is_harder
    assert registry.higher_is_harder(name) is higher_is_harder
    assert score.definition and score.paper and set(score.columns) <= set(COLUMNS)


def test_hand_made_data_tells_the_scores_apart() -> None:
    """The references are not trivially equal on this data: a swapped update would fail."""
    assert _forgetting(CORRECT).tolist() == [0, 2, 4, 0, 1]
    assert CORRECT.mean(axis=0).tolist() == [0.75, 0.5, 0.0, 0.25, 0.75]
    assert MARGIN.mean(axis=0).min() < 0 < MARGIN.mean(axis=0).max()


def test_integer_and_float_dtypes_of_the_counts() -> None:
    assert _run(registry.get("forgetting"), [slice(0, SAMPLES)]).dtype == np.int64
    assert _run(registry.get("correctness"), [slice(0, SAMPLES)]).dtype == np.float64


def test_action_covers_every_loss_part_in_its_direction() -> None:
    assert registry.score_of_column("action_loc") is SCORES["action"]
    assert registry.higher_is_harder("action_loc") is True
    assert registry.score_of_column("aum_extra") is None  # only per-loss-part scores have parts


def test_unknown_score_lists_the_valid_ones() -> None:
    with pytest.raises(ActionScoresError, match=r"unknown score 'aum2'; valid scores: action, mean_loss, confidence, "
                                                r"variability, correctness, forgetting, aum, el2n"):
        registry.get("aum2")
    with pytest.raises(ActionScoresError, match=r"column 'loss_sum' is not a registered score .*pass higher_is_harder"):
        registry.higher_is_harder("loss_sum")
    assert registry.higher_is_harder("loss_sum", explicit=False) is False


def test_direction_text() -> None:
    assert SCORES["aum"].direction == "lower = harder"
    assert SCORES["el2n"].direction == "higher = harder"
