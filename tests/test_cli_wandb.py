"""`action-scores compare` and `upload` on W&B offline runs, through `tracking.cli.main` in this process:
what they print, what they write, and the errors that name what W&B lacks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from tests.test_analyze import _make_wandb_run, _random_epochs
from tracking.analyze import analyze_run
from tracking.backends import TRACKERS, WandbTracker
from tracking.backends.wandb_backend import OfflineRun
from tracking.cli import main

SAMPLES, EPOCHS, TOP_K = 40, 3, 5


@pytest.fixture()
def analysed(wandb_env: dict[str, str], tmp_path: Path) -> tuple[list[Path], np.ndarray]:
    """Two analysed W&B offline runs of the same 40 samples: (their first folders, actions[run, sample])."""
    folders, actions = [], []
    for seed in (1, 2):
        files, losses, _ = _random_epochs(seed=seed, n=SAMPLES, epochs=EPOCHS)
        folder = _make_wandb_run(tmp_path, files)
        assert analyze_run(WandbTracker(), str(folder), panels=False).status == "done"
        folders.append(folder)
        actions.append(losses.astype(np.float64).sum(axis=0))
    return folders, np.array(actions)


def test_compare_wandb_offline_runs_logs_the_comparison_beside_them(
        analysed: tuple[list[Path], np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folders, actions = analysed
    ids = [OfflineRun(folder).run_id for folder in folders]
    assert main(["compare", *map(str, folders), "--top-k", str(TOP_K)]) == 0
    out = capsys.readouterr().out
    new_id = re.search(r"^compared 2 runs on split 'test'; logged to run (\w+)$", out, re.MULTILINE).group(1)
    assert new_id not in ids
    (new_folder,) = (tmp_path / "wandb").glob(f"offline-run-*-{new_id}")  # beside the runs it compares
    heatmap = new_folder / "files" / "action_scores_compare" / "test" / "heatmap.png"
    assert f"  heatmap: {heatmap}" in out and heatmap.is_file()

    new_run = OfflineRun(new_folder)
    assert new_run.project == OfflineRun(folders[0]).project  # the compared runs' project
    assert new_run.summary["action_scores.compare.sources"] == ",".join(ids)
    assert new_run.config["split"] == "test" and new_run.config["top_k"] == TOP_K
    written = new_run.files("action_scores_compare/test")
    correlation = pd.read_csv(written["action_scores_compare/test/spearman.csv"], index_col=0)
    expected = spearmanr(actions[0], actions[1]).statistic
    assert correlation.loc[ids[0], ids[1]] == pytest.approx(expected, abs=1e-12)
    assert new_run.summary["spearman_mean"] == pytest.approx(expected, abs=1e-12)
    overlap = pd.read_csv(written["action_scores_compare/test/top_k_overlap.csv"], index_col=0)
    tops = [set(np.argsort(-a, kind="stable")[:TOP_K]) for a in actions]
    assert overlap.loc[ids[0], ids[1]] == pytest.approx(len(tops[0] & tops[1]) / TOP_K)

    # Bare run ids name the same runs under $WANDB_DIR/wandb.
    assert main(["compare", ids[0], ids[1], "--top-k", str(TOP_K), "--tracker", "wandb"]) == 0
    again = capsys.readouterr().out
    assert re.search(r"logged to run (\w+)", again).group(1) not in (*ids, new_id)
    assert re.search(rf"^{ids[0]}\s+1\.0+\s+{expected:.3f}\s*$", again, re.MULTILINE), again


def test_compare_names_a_wandb_run_it_cannot_find(analysed: tuple[list[Path], np.ndarray],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folders, _ = analysed
    assert main(["compare", str(folders[0]), "nosuchid"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("action-scores: error: W&B run 'nosuchid' not found: no such offline run folder, "
                          "nor a run of that id under ")
    assert err.rstrip().endswith("pass the run's offline folder (wandb/offline-run-<time>-<id>)")
    # A server path is asked of the server; with no API key W&B refuses before any network call.
    assert main(["compare", str(folders[0]), "entity/project/nosuchid"]) == 2
    assert capsys.readouterr().err.startswith(
        "action-scores: error: W&B run 'entity/project/nosuchid' not found: No API key configured")


def test_upload_of_a_wandb_run_says_nothing_is_spooled_and_names_wandb_sync(
        analysed: tuple[list[Path], np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = analysed[0][0]
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert main(["upload", "--spool", str(folder)]) == 2
    assert capsys.readouterr().err == (
        f"action-scores: error: {folder}: a W&B offline run writes straight to its run folder, so nothing is "
        f"spooled for `action-scores upload`; to send the run to a W&B server, use `wandb sync {folder}`\n")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before

    assert main(["upload", "--spool", str(tmp_path / "elsewhere"), "--tracker", "wandb"]) == 2
    assert "use `wandb sync <the run's folder wandb/offline-run-<time>-<id>>`" in capsys.readouterr().err


def test_every_command_takes_the_registered_backends(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["analyze", "--run-id", "x"], ["compare", "a", "b"], ["upload", "--spool", "s"]):
        with pytest.raises(SystemExit) as exit_code:
            main([*command, "--tracker", "nope"])
        assert exit_code.value.code == 2
        choices = ", ".join(repr(name) for name in sorted(TRACKERS))
        assert f"argument --tracker: invalid choice: 'nope' (choose from {choices})" in capsys.readouterr().err
