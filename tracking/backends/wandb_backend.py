"""Weights & Biases backend of `Tracker`, offline-first.

Writing: files go into the run folder's `files/` (so an offline run folder holds every
table whole and `wandb sync` uploads them) and, for per-epoch tables, also into a
versioned artifact per split (`per_sample_losses-<split>`, version N = epoch N). Params
become the run config; job status and summary values go to the run summary, and the
status also becomes a run tag (`action_scores.status=done`).

Reading: an offline run is a folder `offline-run-<time>-<id>`; a resumed offline run
(the post-hoc job writing back) gets a folder of its own with the same id, so a run is
read as the union of every folder with its id, the newest winning. Config and summary
come from the `.wandb` records through `wandb leet inspect --json`, the CLI that wandb
ships for exactly that (sturdier than importing wandb's private protobuf modules).
Online runs (`entity/project/run_id`) are read through `wandb.Api`. Offline, a bare run id
names the run's folders under `$WANDB_DIR/wandb`.

No network call is made when the mode is offline (the default when WANDB_MODE is unset),
and no login is needed for offline use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracking import contract
from tracking.backends.base import Tracker
from tracking.backends.lock import file_lock
from tracking.backends.uploads import Operation, unwritten_error
from tracking.errors import ActionScoresError

if TYPE_CHECKING:
    import pandas as pd

STATUS_PREFIX = "action_scores."


def _wandb_core() -> Path | None:
    """wandb's own `wandb-core` binary, found without importing wandb (which takes a second)."""
    spec = importlib.util.find_spec("wandb")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (binary := Path(location) / "bin" / "wandb-core").is_file():
            return binary
    return None


def _leet_records(wandb_file: Path) -> list[dict[str, Any]]:
    """The records of one `.wandb` file, as JSON objects.

    `wandb leet inspect --json` is a Python CLI that imports wandb (1.7 s) only to run
    `wandb-core leet inspect` with these arguments (0.05 s): that is called directly, and the CLI
    is the fallback should a wandb version change the binary's arguments."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    commands = [[str(wandb_cli) if wandb_cli.exists() else "wandb", "leet", "inspect", "--json", str(wandb_file)]]
    if (core := _wandb_core()) is not None:
        commands.insert(0, [str(core), "leet", "inspect", "--no-observability", "--json", "--run-file",
                            str(wandb_file), str(wandb_file.parent.parent)])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    raise ActionScoresError(f"cannot read W&B records of {wandb_file}: {result.stderr.strip()[-300:]}")


def offline_root() -> Path:
    """Where W&B puts offline run folders when no `dir` is given: `$WANDB_DIR/wandb` (default ./wandb)."""
    return Path(os.environ.get("WANDB_DIR", ".")) / "wandb"


def is_offline_run_folder(path: str | Path) -> bool:
    """Whether `path` is one folder of a W&B offline run (it holds `run-<id>.wandb`)."""
    return Path(path).is_dir() and any(Path(path).glob("run-*.wandb"))


def _wait_for_a_new_folder_name(run: OfflineRun) -> None:
    """Offline, a resumed run gets the folder `offline-run-<local time to the second>-<id>`: in the second its
    newest folder was made, that would be the same folder, and the resumed run's writes would be lost in it.
    A job that finishes within a second of training (a small run) waits for the next second."""
    stamps = [found.group(1) for folder in run.folders
              if (found := re.fullmatch(r"offline-run-(\d{8}_\d{6})-\w+", folder.name))]
    deadline = time.monotonic() + 2  # at most a second's wait, unless the clock went back
    while stamps and datetime.now().strftime("%Y%m%d_%H%M%S") <= max(stamps) and time.monotonic() < deadline:
        time.sleep(0.05)


class OfflineRun:
    """Every offline folder of one W&B run id, read without a server."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder).resolve()
        runs = list(folder.glob("run-*.wandb"))
        if not folder.is_dir() or not runs:
            raise ActionScoresError(f"{folder} is not a W&B offline run folder (no run-<id>.wandb inside)")
        self.run_id = runs[0].stem[len("run-"):]
        self.root = folder.parent  # the `wandb/` folder holding every run folder
        self.folders = sorted(self.root.glob(f"*-{self.run_id}"))  # oldest first (names start with the time)
        if folder not in self.folders:  # renamed or copied elsewhere: the folder given is the run
            self.folders = [folder]
        self.project = ""
        self.config: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.finished = False  # the training run (the oldest folder) exited with code 0
        for run_folder in self.folders:
            for wandb_file in run_folder.glob("run-*.wandb"):
                for record in _leet_records(wandb_file):
                    kind = record.get("type")
                    if kind == "run":
                        self.project = record["run"].get("project", self.project)
                        self.config |= record["run"].get("config", {}).get("update", {})
                    elif kind == "config":
                        self.config |= record["config"].get("update", {})
                    elif kind == "summary":
                        self.summary |= record["summary"].get("update", {})
                    elif kind == "exit" and run_folder == self.folders[0]:
                        self.finished = record["exit"].get("exit_code", 0) == 0

    def files(self, prefix: str) -> dict[str, Path]:
        """Run-relative path -> newest local copy, for files under `prefix`."""
        found: dict[str, Path] = {}
        for run_folder in self.folders:
            base = run_folder / "files"
            for path in (base / prefix).rglob("*") if (base / prefix).is_dir() else []:
                if path.is_file():
                    found[path.relative_to(base).as_posix()] = path
        return dict(sorted(found.items()))


class WandbTracker(Tracker):
    """W&B backend. `attach` takes an offline run folder, a bare run id (offline: found under
    `$WANDB_DIR/wandb`), or `entity/project/run_id` with a server.

    A run is one process's: offline, its folder and `.wandb` records are written by the process that
    opened it, and another process's `wandb.init(id=..., resume=...)` makes a folder of its own. So under
    torchrun it keeps `several_writers` False: the ranks gather their shares to rank 0, which writes each
    epoch's table whole (`tracking.record.recorder.LossRecorder.end_epoch`)."""

    name = "wandb"

    def __init__(self, project: str | None = None, entity: str | None = None, mode: str | None = None,
                 keep_local: bool | None = None) -> None:
        """`keep_local`: keep the spool's copy of each table once it is in the run (see `RunWriter.keep_local`)."""
        self.keep_local = keep_local
        self.project = project or os.environ.get("WANDB_PROJECT") or "action-scores"
        self.entity = entity or os.environ.get("WANDB_ENTITY")
        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        self._live: Any = None  # the wandb Run we write to
        self._offline: OfflineRun | None = None
        self._online: Any = None  # wandb.apis.public.Run
        self._refs: dict[str, str] = {}  # run id -> the folder or path it was found at, so ids attach again

    @property
    def native(self) -> Any:
        return self._live

    @property
    def offline_folder(self) -> Path | None:
        """The offline folder of the run being written, for `attach` and `wandb sync`."""
        return Path(self._live.dir).parent if self._live is not None and self.mode == "offline" else None

    def start(self, experiment: str | None = None, run_name: str | None = None) -> str:
        """A new run. After `attach` (compare writing its result), the new run goes into the attached
        run's project and, offline, beside its folders."""
        import wandb

        attached = self._offline or self._online
        project = experiment or (attached.project if attached else None) or self.project
        # Always where `attach` and `find_runs` look: wandb keeps the WANDB_DIR of its first run in a process.
        folder = str(self._offline.root.parent if self._offline else offline_root().parent)
        self._offline = self._online = None
        self._live = wandb.init(project=project, entity=self.entity, name=run_name, mode=self.mode,
                                dir=folder)  # type: ignore[arg-type]
        self._run_id = self._live.id
        if self.offline_folder is not None:
            self._refs[self._run_id] = str(self.offline_folder)
        return self._run_id

    def attach(self, run_id: str) -> None:
        """Point at a run; a failed attach keeps the previous one."""
        ref = self._refs.get(run_id, run_id)
        if not Path(ref).exists() and self.mode == "offline" and "/" not in ref:  # a bare id
            ref = str(next(iter(sorted(offline_root().glob(f"offline-run-*-{ref}"))), ref))
        offline = online = None
        if Path(ref).exists():
            offline = OfflineRun(ref)
        elif self.mode == "offline":
            raise ActionScoresError(
                f"W&B run {run_id!r} not found: no such offline run folder, nor a run of that id under "
                f"{offline_root().resolve()} ($WANDB_DIR/wandb), and W&B is offline; pass the run's offline "
                "folder (wandb/offline-run-<time>-<id>)"
            )
        else:
            import wandb

            try:
                online = wandb.Api().run(ref)
            except Exception as error:  # wandb raises its own CommError/ValueError variants
                raise ActionScoresError(f"W&B run {run_id!r} not found: {error}") from None
        self.finish()
        self._offline, self._online = offline, online
        self._run_id = offline.run_id if offline else online.id
        self._refs[self._run_id] = str(offline.folders[0]) if offline else ref

    def _writer(self) -> Any:
        """The live run; for an attached run, resume it (offline: a new folder with the same id)."""
        if self._live is None:
            import wandb

            project = self._offline.project if self._offline else self._online.project
            entity = None if self._offline else self._online.entity
            if self._offline:
                _wait_for_a_new_folder_name(self._offline)
            self._live = wandb.init(id=self.run_id, project=project or self.project, entity=entity,
                                    resume="allow", mode=self.mode,
                                    dir=str(self._offline.root.parent) if self._offline else None)
        return self._live

    def finish(self, failed: bool = False) -> None:
        """End the run after the tables handed to `log_table` (bounded wait); exit code 1 (a failed run)
        when one could not be written, which is then raised unless `failed` already says so."""
        unwritten = self._close_table_uploads()
        if self._live is not None:
            self._live.finish(exit_code=1 if failed or unwritten else 0)
            self._live = None
            if self._offline is not None:  # re-read, so that what was written back is visible
                self._offline = OfflineRun(self._offline.folders[0])
        if unwritten and not failed:
            raise unwritten_error(self.run_id, unwritten)

    def write_params(self, params: Mapping[str, object]) -> None:
        self._writer().config.update({key: value for key, value in params.items()}, allow_val_change=True)

    def write_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is None:
            self._writer().summary.update(dict(metrics))
        else:
            self._writer().log(dict(metrics), step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        run = self._writer()
        run.summary.update(dict(tags))
        run.tags = tuple(sorted(set(run.tags or ()) | {f"{k}={v}"[:64] for k, v in tags.items()}))

    def write_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        import wandb

        run = self._writer()
        target = Path(run.dir) / artifact_dir / Path(local_path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, target)
        run.save(str(target), base_path=run.dir, policy="now")
        if artifact_dir.startswith("per_sample_losses/"):
            artifact = wandb.Artifact(artifact_dir.replace("/", "-"), type="per_sample_losses")
            artifact.add_file(str(local_path), name=f"{artifact_dir}/{Path(local_path).name}")
            run.log_artifact(artifact)

    def write_dataset(self, local_path: str | Path, artifact_dir: str, name: str, context: str) -> None:
        """The file among the run's files, and a `dataset` artifact `name` (a new version per call),
        its metadata saying `context`."""
        import wandb

        self.write_artifact(local_path, artifact_dir)
        artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", name), type="dataset", metadata={"context": context})
        artifact.add_file(str(local_path), name=f"{artifact_dir}/{Path(local_path).name}")
        self._writer().log_artifact(artifact)

    def params(self) -> dict[str, str]:
        config = self._offline.config if self._offline else dict(self._online.config)
        return {key: str(value) for key, value in config.items() if not key.startswith("_")}

    def summary(self) -> dict[str, Any]:
        """The attached run's summary: its tags, scalar results and the keys of its logged media."""
        return dict(self._offline.summary if self._offline else self._online.summary)

    def describe(self) -> dict[str, Any]:
        """What a W&B report needs of the attached run: id, name, summary, project and entity."""
        if self._offline:
            return {"id": self.run_id, "name": self.run_id, "summary": self.summary(),
                    "project": self._offline.project, "entity": ""}
        return {"id": self.run_id, "name": self._online.name, "summary": self.summary(),
                "project": self._online.project, "entity": self._online.entity}

    def tags(self) -> dict[str, str]:
        return {key: value for key, value in self.summary().items()
                if key.startswith(STATUS_PREFIX) and isinstance(value, str)}

    def list_files(self, artifact_dir: str) -> list[str]:
        if self._offline:
            return list(self._offline.files(artifact_dir))
        prefix = artifact_dir.rstrip("/") + "/"
        return sorted(f.name for f in self._online.files() if f.name.startswith(prefix))

    def download(self, artifact_path: str, dst_dir: str | Path) -> Path:
        target = Path(dst_dir) / contract.relative_artifact_path(artifact_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if self._offline:
            source = self._offline.files(artifact_path.rsplit("/", 1)[0]).get(artifact_path)
            if source is None:
                raise ActionScoresError(f"{artifact_path} is not in the offline run {self.run_id}")
            shutil.copyfile(source, target)
        else:
            self._online.file(artifact_path).download(root=str(dst_dir), replace=True)
        return target

    def local_file(self, artifact_path: str) -> Path | None:
        """An offline run's file is in its folder: read in place (the newest folder's copy, as `download`)."""
        if not self._offline:
            return None
        return self._offline.files(contract.relative_artifact_path(artifact_path).parent.as_posix()).get(artifact_path)

    def find_runs(self, experiment: str) -> list[str]:
        """Offline: the first folder of each finished run of project `experiment`, newest first."""
        if self.mode == "offline":
            oldest: dict[str, Path] = {}  # run id -> its first folder (folder names start with the time)
            for folder in sorted(offline_root().glob("offline-run-*")):
                oldest.setdefault(folder.name.rsplit("-", 1)[1], folder)
            runs = [OfflineRun(folder) for folder in sorted(oldest.values(), reverse=True)]
            return [str(run.folders[0]) for run in runs if run.project == experiment and run.finished]
        import wandb

        path = f"{self.entity}/{experiment}" if self.entity else experiment
        return [f"{path}/{run.id}" for run in wandb.Api().runs(path, filters={"state": "finished"})]

    def artifact_uri(self, artifact_path: str) -> str:
        if self._offline:
            return str(self._offline.files(artifact_path.rsplit("/", 1)[0]).get(artifact_path, artifact_path))
        return f"{self._online.url}/files/{artifact_path}"

    def upload_spool(self, spool: Path, run_id: str | None = None) -> list[Operation]:
        folder = spool if is_offline_run_folder(spool) else "<the run's folder wandb/offline-run-<time>-<id>>"
        raise ActionScoresError(
            f"{spool}: a W&B offline run writes straight to its run folder, so nothing is spooled for "
            f"`action-scores upload`; to send the run to a W&B server, use `wandb sync {folder}`"
        )

    def write_samples(self, key: str, rows: list[dict[str, Any]]) -> None:
        """W&B-native view of a ranked panel: captioned `wandb.Image`s and a table with the images."""
        import wandb

        images = [wandb.Image(row["image"], caption=row["caption"]) for row in rows]
        columns = [c for c in rows[0] if c != "image"] if rows else []
        table = wandb.Table(columns=["image", *columns],
                            data=[[image, *(row[c] for c in columns)] for image, row in zip(images, rows)])
        self._writer().log({f"{key}/images": images, f"{key}/table": table})

    def write_scatter(self, key: str, points: pd.DataFrame, x: str, y: str, title: str) -> None:
        """A W&B scatter chart of `points` (its table is logged with it, so hovering a point shows the row)."""
        import wandb

        table = wandb.Table(dataframe=points.reset_index(drop=True))
        self._writer().log({key: wandb.plot.scatter(table, x, y, title=title)})

    @contextmanager
    def job_lock(self) -> Iterator[None]:
        """Offline, hold the attached run with a file lock beside its folders (`wandb/.action-scores-<id>.lock`),
        so that two jobs (`analyze`, `select`) never resume it at once: each would write a folder of its own,
        and the newer would hide the other's files. A second job fails, naming the first. Online, W&B has no
        lock to take: nothing is held."""
        if self._offline is None:
            yield
            return
        with file_lock(self.run_id, self._offline.root / f".action-scores-{self.run_id}.lock"):
            yield
