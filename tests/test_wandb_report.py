"""`tracking.report.wandb_report` and `action-scores report`: the spec from what the job logged to W&B runs,
the `wandb_workspaces` report built from it without a network (its blocks and keys), and `--publish`
without a server ending in an error that names what it needs, with the spec kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import wandb_workspaces.reports.v2 as wr

from tracking.backends import WandbTracker
from tracking.cli import main
from tracking.errors import ActionScoresError
from tracking.report.wandb_report import build_report, build_spec, panel_keys

HARDEST, EASIEST = "action_scores/test/loss/hardest", "action_scores/test/loss/easiest"


def _summary(*keys: str) -> dict[str, object]:
    """A run summary as W&B keeps one after `log_samples`: `<key>/images` and `<key>/table` entries."""
    return {**{f"{key}/images": {"_type": "images/separated"} for key in keys},
            **{f"{key}/table": {"_type": "table-file"} for key in keys},
            "action_scores.status": "done", "epoch": 3}


def test_panel_keys_are_the_logged_prefixes_only() -> None:
    summary = _summary(HARDEST, EASIEST) | {"action_scores/test/scores": 1, "action_scores/test/loss/hardest.png": 2}
    assert panel_keys(summary) == [EASIEST, HARDEST]


def test_the_spec_has_a_section_per_split_and_objective_and_refuses_runs_without_panels() -> None:
    runs = [{"id": "a1", "name": "first", "summary": _summary(HARDEST, EASIEST, "action_scores/val/loss_loc/hardest")},
            {"id": "b2", "summary": _summary(HARDEST)}]
    spec = build_spec(runs, project="proj", entity="team")
    assert [(b["type"], b.get("text", b.get("media_browser"))) for b in spec["blocks"]] == [
        ("h1", "Action scores: hardest and easiest samples"),
        ("h2", "test/loss"), ("panel_grid", f"{EASIEST}/images"), ("panel_grid", f"{HARDEST}/images"),
        ("h2", "val/loss_loc"), ("panel_grid", "action_scores/val/loss_loc/hardest/images")]
    assert spec["blocks"][3]["table"] == f"{HARDEST}/table"
    assert spec["blocks"][3]["run_ids"] == ["a1", "b2"]
    assert spec["runs"] == [{"id": "a1", "name": "first"}, {"id": "b2", "name": "b2"}]
    with pytest.raises(ActionScoresError, match=r"^run c3 has no action-score panels: run `action-scores analyze`"):
        build_spec([{"id": "c3", "summary": {"action_scores.status": "done"}}], project="proj")


def test_the_report_is_built_without_a_network_with_the_specs_blocks_and_keys() -> None:
    runs = [{"id": "a1", "summary": _summary(HARDEST, EASIEST)}, {"id": "b2", "summary": _summary(HARDEST)}]
    report = build_report(build_spec(runs, project="proj", entity="team", title="Digits"))
    assert (report.project, report.entity, report.title) == ("proj", "team", "Digits")
    assert [type(block) for block in report.blocks] == [wr.H1, wr.H2, wr.PanelGrid, wr.PanelGrid]
    assert report.blocks[1].text == "test/loss"
    grids = report.blocks[2:]
    assert [[type(panel) for panel in grid.panels] for grid in grids] == [[wr.MediaBrowser, wr.WeavePanelSummaryTable]] * 2
    assert [grid.panels[0].media_keys for grid in grids] == [[f"{EASIEST}/images"], [f"{HARDEST}/images"]]
    assert [grid.panels[1].table_name for grid in grids] == [f"{EASIEST}/table", f"{HARDEST}/table"]
    (runset,) = grids[0].runsets
    assert (runset.entity, runset.project, runset.query) == ("team", "proj", "a1 | b2")


def test_publish_without_a_server_names_what_it_needs_and_keeps_the_spec(
        wandb_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tracker = WandbTracker()
    run_id = tracker.start()
    rows = [{"image": np.full((8, 8, 3), 40 * i, dtype=np.uint8), "caption": f"action {i}", "sample_id": i}
            for i in range(3)]
    tracker.write_samples(HARDEST, rows)  # what the job logs: a real offline run's summary gets the keys
    folder = tracker.offline_folder
    tracker.finish()
    out = tmp_path / "spec.json"
    assert main(["report", str(folder), "--publish", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "could not publish the report" in error and "needs a W&B server and WANDB_API_KEY" in error
    assert f"Its spec is written to {out}" in error
    spec = json.loads(out.read_text())
    assert [b["media_browser"] for b in spec["blocks"] if b["type"] == "panel_grid"] == [f"{HARDEST}/images"]
    assert spec["runs"] == [{"id": run_id, "name": run_id}]
