"""A W&B report laying out the job's panels for one or more analysed runs.

The layout is built as a plain spec (JSON) first, from what the job logged to each run
(`action_scores/<split>/<objective>/{hardest,easiest}/{images,table}`). With a W&B
server and an API key, `publish` turns the spec into a wandb-workspaces report and
saves it; with none, the spec is written to a file, to publish later from anywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tracking.errors import ActionScoresError

_PANEL_KEY = re.compile(r"^(action_scores/[^/]+/[^/]+/(?:hardest|easiest))/(images|table)(?:\.|$)")


def panel_keys(summary: dict[str, Any]) -> list[str]:
    """The `action_scores/<split>/<objective>/<which>` prefixes the job logged, from a run summary."""
    found = {match.group(1) for key in summary if (match := _PANEL_KEY.match(key))}
    return sorted(found)


def build_spec(runs: list[dict[str, Any]], project: str, entity: str = "", title: str = "") -> dict[str, Any]:
    """Report spec: one section per split/objective, a media browser of images and the table beside it.

    `runs` holds `{"id", "name", "summary"}` for each analysed run; runs without panels are an error.
    """
    sections: dict[str, list[str]] = {}
    for run in runs:
        keys = panel_keys(run["summary"])
        if not keys:
            raise ActionScoresError(f"run {run['id']} has no action-score panels: run `action-scores analyze` first")
        for key in keys:
            sections.setdefault(key.rsplit("/", 1)[0], []).append(key)
    blocks: list[dict[str, Any]] = [{"type": "h1", "text": title or "Action scores: hardest and easiest samples"}]
    for section, keys in sorted(sections.items()):
        blocks.append({"type": "h2", "text": section.removeprefix("action_scores/")})
        for key in sorted(set(keys)):
            blocks.append({"type": "panel_grid", "run_ids": [r["id"] for r in runs],
                           "media_browser": f"{key}/images", "table": f"{key}/table"})
    return {"entity": entity, "project": project, "title": blocks[0]["text"],
            "runs": [{"id": r["id"], "name": r.get("name", r["id"])} for r in runs], "blocks": blocks}


def write_spec(spec: dict[str, Any], path: str | Path) -> Path:
    """Save the spec as JSON, to publish later where there is a server."""
    path = Path(path)
    path.write_text(json.dumps(spec, indent=2))
    return path


def publish(spec: dict[str, Any]) -> str:
    """Create the report on the W&B server (needs WANDB_API_KEY); returns its URL."""
    report = build_report(spec)
    report.save()
    return report.url


def build_report(spec: dict[str, Any]) -> Any:
    """The spec as a `wandb_workspaces` report, not saved: built without a network, so that what `publish`
    sends can be checked anywhere; only `save` (and serialising its run sets) needs a server."""
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(entity=spec["entity"], project=spec["project"],
                       query=" | ".join(r["id"] for r in spec["runs"]))
    blocks: list[Any] = []
    for block in spec["blocks"]:
        if block["type"] == "h1":
            blocks.append(wr.H1(block["text"]))
        elif block["type"] == "h2":
            blocks.append(wr.H2(block["text"]))
        else:
            blocks.append(wr.PanelGrid(runsets=[runset], panels=[
                wr.MediaBrowser(media_keys=[block["media_browser"]], num_columns=5),
                wr.WeavePanelSummaryTable(table_name=block["table"]),
            ]))
    return wr.Report(project=spec["project"], entity=spec["entity"], title=spec["title"], blocks=blocks)
