"""`action-scores`: the command line of the post-hoc job.

    action-scores analyze --run-id <id>              # one run
    action-scores analyze --experiment <name>        # every finished run that needs it
    action-scores analyze --experiment <name> --force
    action-scores compare <run> <run> ...            # MLflow run ids, or W&B runs with --tracker wandb
    action-scores select --run-id <id> --by aum --fraction 0.1   # log the hardest samples as a selection
    action-scores upload --spool <folder>            # what a tracking outage left behind

Bad input ends with one line on stderr (`action-scores: error: ...`) and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import cast

from tracking import contract
from tracking.backends import TRACKERS, Tracker
from tracking.errors import ActionScoresError
from tracking.scoring.registry import SCORES

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off", ""}


def _flag(value: str) -> bool:
    """Booleans as `mlflow run -P force=true` passes them."""
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _epoch_or_default(value: str) -> int | None:
    """A zero-based epoch, or "" for the default (as `mlflow run -P el2n_epoch=` passes it)."""
    if value == "":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a zero-based epoch number, got {value!r}")
    return int(value)


def _dynamics_help(all_scores: bool = False) -> str:
    """The registered scores with their directions, for help texts (the registry is numpy only: no torch)."""
    return ", ".join(f"{score.name} ({score.direction})" for score in SCORES.values()
                     if all_scores or not (score.per_loss_part or not score.panels))


def _tracker_options(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    """`--tracker` (named by the registry) and `--tracking-uri`, the same for every command."""
    parser.add_argument("--tracker", default=default, choices=sorted(TRACKERS), help=what)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")


def _tracker(args: argparse.Namespace, name: str, offline: bool | None = None) -> Tracker:
    """The tracker `name` built with the options the command line gave it. `offline`: W&B runs given
    as offline folders (True: no network call), as server paths (False), or either ($WANDB_MODE)."""
    from tracking.backends import MLflowTracker, WandbTracker, make_tracker

    modes = {True: "offline", False: "online", None: None}
    options = {MLflowTracker.name: {"tracking_uri": getattr(args, "tracking_uri", None)},
               WandbTracker.name: {"mode": modes[offline]}}
    return make_tracker(name, **options.get(name, {}))


def _offline(refs: Sequence[str]) -> bool | None:
    """W&B runs as given: all offline folders (True), some on a server, entity/project/run_id (False),
    or bare ids ($WANDB_MODE decides)."""
    from tracking.backends.wandb_backend import is_offline_run_folder

    if all(is_offline_run_folder(ref) for ref in refs):
        return True
    return False if any(ref.count("/") == 2 and not os.path.exists(ref) for ref in refs) else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="action-scores", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    analyze = commands.add_parser(
        "analyze",
        help="score a run's per-sample tables and log scores and panels back to it",
        description=(
            f"Reads {contract.LOSSES_DIR}/<split>/epoch_EEEE.parquet (or the parts of a sharded epoch, "
            f"epoch_EEEE/part-RRRRR.parquet) from a run, sums each sample's "
            f"loss over epochs (its action), and writes {contract.SCORES_DIR}/<split>/scores.parquet, "
            f"{contract.SCORES_DIR}/<split>/<objective>/hardest.png and easiest.png (plus by_class/; objective: "
            f"loss or a loss part), {contract.SCORES_DIR}/<split>/<score>/hardest.png and easiest.png for each "
            f"training-dynamics score the tables allow ({_dynamics_help()}), summary metrics and the tag {contract.STATUS_TAG}={contract.STATUS_DONE} back to the same run."
        ),
    )
    target = analyze.add_argument_group("which runs (one of)")
    target.add_argument("--run-id", default="", help="analyse this run")
    target.add_argument("--experiment", default="", help="analyse every finished run of this experiment "
                        "(W&B: a project)")
    target.add_argument("--wandb-run", default="", help="a W&B run on a server: entity/project/run_id")
    target.add_argument("--wandb-dir", default="", help="a W&B offline run folder (wandb/offline-run-<time>-<id>)")
    analyze.add_argument(
        "--force", type=_flag, nargs="?", const=True, default=False, help="redo runs already analysed"
    )
    analyze.add_argument("--top-k", type=int, default=10, help="samples per panel row (default 10)")
    analyze.add_argument("--data-root", default="", help="where the run's data lives now, if it moved")
    analyze.add_argument("--no-panels", action="store_true", help="log scores only")
    analyze.add_argument("--pictures", default="", metavar="MODULE:FUNCTION",
                         help="for runs without recorded media or a built-in dataset: a function of a sample id "
                              "that returns a uint8 image (HxW or HxWx3), imported from the current folder")
    analyze.add_argument("--engine", default="arrow", choices=["arrow", "duckdb", "spark"],
                         help="scoring engine: arrow (default, one epoch at a time), duckdb (one query; "
                              "spills to disk when a run's sums outgrow memory) or spark (every score as Spark "
                              "aggregations; the active SparkSession, else one on --spark-master; needs the spark "
                              "extra and Java 17+)")
    analyze.add_argument("--spark-master", default=None, metavar="URL",
                         help="with --engine spark and no active SparkSession: the master of the session made "
                              "(default local[*])")
    analyze.add_argument("--workers", type=int, default=None, metavar="N",
                         help="with --experiment: runs analysed at once (default 4; MLflow only, W&B one at a time); "
                              "a run that fails is named in the summary and the others go on")
    analyze.add_argument("--el2n-epoch", type=_epoch_or_default, default=None,
                         help="zero-based epoch whose table gives el2n (default: epochs // 10, a tenth into training)")
    _tracker_options(analyze, "mlflow", "where the runs live (--wandb-run and --wandb-dir imply wandb)")
    compare = commands.add_parser(
        "compare",
        help="rank correlation and top-k overlap of one score of several analysed runs, logged to a new run",
        description=("Reads action_scores/<split>/scores.parquet of each run (same dataset and split), and logs to a "
                     "new run tagged with its sources: the Spearman correlation matrix of --score and the overlap "
                     "of the top-k hardest in that score's direction (CSV and a heatmap PNG) and a combined score, "
                     "each sample's mean rank (action_scores_compare/<split>/)."),
    )
    compare.add_argument("runs", nargs="+", help="run ids (space or comma separated), at least two; W&B: offline "
                         "run folders, run ids under $WANDB_DIR/wandb, or entity/project/run_id on a server")
    compare.add_argument("--split", default="", help="split to compare (default: the one every run has scored)")
    compare.add_argument("--top-k", type=int, default=50, help="how many hardest samples to overlap (default 50)")
    compare.add_argument("--score", default="action", choices=list(SCORES), metavar="SCORE",
                         help=f"the score to compare (default action): {_dynamics_help(all_scores=True)}")
    compare.add_argument("--experiment", default="", help="experiment of the new run (default: the active one; "
                         "W&B: the compared runs' project)")
    _tracker_options(compare, "", "where the runs live (default: wandb when the runs are W&B offline folders, "
                                  "else mlflow); a W&B comparison run is written beside the runs it compares")
    report = commands.add_parser(
        "report",
        help="lay out the panels of analysed W&B runs as a W&B report",
        description=("Builds a report spec (one section per split and objective: the images and the table of the "
                     "hardest and easiest samples) and writes it to --out; with --publish and a W&B server "
                     "(WANDB_API_KEY), saves it as a report instead."),
    )
    report.add_argument("runs", nargs="+", help="W&B offline run folders, or entity/project/run_id on a server")
    report.add_argument("--out", default="action-scores-report.json", help="where to write the spec")
    report.add_argument("--title", default="")
    report.add_argument("--publish", action="store_true", help="save the report on the W&B server")
    _select_parser(commands)
    upload = commands.add_parser(
        "upload",
        help="log the tables and metrics that training could not upload (the tracker was unreachable)",
        description=("Performs the writes left in a run's spool folder (named at the end of training) in "
                     "order: tables replace files of the same name, metrics already logged are not repeated, "
                     "and the run is ended as training ended it. Safe to run again."),
    )
    upload.add_argument("--spool", required=True, help="the run's spool folder ($ACTION_SCORES_SPOOL/mlflow-<run id>)")
    upload.add_argument("--run-id", default="", help="refuse a spool folder of another run")
    _tracker_options(upload, "", "the backend of the spool (default: the one its run.json names)")
    return parser


def _number_or_none(value: str) -> float | None:
    """A number, or "" for not given (as `mlflow run -P fraction=` passes it)."""
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


def _select_parser(commands: argparse._SubParsersAction) -> None:
    """`select`'s options; the scores are named without importing the job (pandas), as `tracking.selection.choices`."""
    select = commands.add_parser(
        "select",
        help="choose the hardest samples of an analysed run by a score and log the selection to the run",
        description=(f"Ranks a split of an analysed run by --by in that score's own direction, takes --fraction of "
                     f"it or every sample at least as hard as --threshold, and logs "
                     f"{contract.SCORES_DIR}/<split>/selections/selection_NNNN.parquet (sample_id, the score, rank, "
                     "label, "
                     "suggested_label: the most frequent prediction where it differs from the label); on MLflow "
                     "also a dataset input of the run, on W&B a dataset artifact. Retrain with "
                     "`mlflow run . -e classify -P exclude=<run id>` or `-P relabel=<run id>`."),
    )
    select.add_argument("--run-id", required=True, help="an analysed run (W&B: an offline run folder, a run id, "
                        "or entity/project/run_id)")
    select.add_argument("--split", default="", help="the split to select from (default: the only one scored)")
    select.add_argument("--by", default="fused", choices=[*SCORES, "fused"], metavar="SCORE",
                        help=f"the score (default fused): {_dynamics_help(all_scores=True)}, or fused (higher = "
                             "harder: the probability of a flipped label from all of them)")
    select.add_argument("--fraction", type=_number_or_none, default=None,
                        help="share of the split to take, hardest first, in (0, 1]")
    select.add_argument("--threshold", type=_number_or_none, default=None,
                        help="take every sample at least as hard as this value of the score")
    _tracker_options(select, "", "where the run lives (default: wandb for a W&B offline folder, else mlflow)")


def _select(args: argparse.Namespace) -> int:
    from tracking.backends import MLflowTracker, WandbTracker
    from tracking.backends.wandb_backend import is_offline_run_folder
    from tracking.selection import describe, select_run

    name = args.tracker or (WandbTracker.name if is_offline_run_folder(args.run_id) else MLflowTracker.name)
    tracker = _tracker(args, name, offline=_offline([args.run_id]) if name == WandbTracker.name else None)
    selection = select_run(tracker, args.run_id, by=args.by, split=args.split or None, fraction=args.fraction,
                           threshold=args.threshold)
    print(describe(selection, tracker))
    return 0


def _upload(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tracking.backends.uploads import read_run_record
    from tracking.backends.wandb_backend import WandbTracker, is_offline_run_folder

    spool = Path(args.spool)
    name = args.tracker or (WandbTracker.name if is_offline_run_folder(spool) else read_run_record(spool).get("backend"))
    tracker = _tracker(args, name)
    done = tracker.upload_spool(spool, run_id=args.run_id or None)
    tables = sum(op.kind == "artifact" for op in done)
    print(f"run {tracker.run_id}: {len(done)} pending write(s) done ({tables} table(s))" if done
          else f"run {tracker.run_id}: nothing left to upload in {spool}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tracking.backends.wandb_backend import WandbTracker
    from tracking.report.wandb_report import build_report, build_spec, publish, write_spec

    tracker = cast(WandbTracker, _tracker(args, WandbTracker.name, offline=_offline(args.runs)))
    runs, project, entity = [], "", ""
    for ref in args.runs:
        tracker.attach(ref)
        described = tracker.describe()
        runs.append({key: described[key] for key in ("id", "name", "summary")})
        project, entity = project or described["project"], entity or described["entity"]
    spec = build_spec(runs, project, entity, args.title)
    if args.publish:
        build_report(spec)  # every block is made before anything is sent
        try:
            print(f"report published: {publish(spec)}")
            return 0
        except Exception as error:  # wandb's own errors: no key, no server, no permission
            path = write_spec(spec, args.out)
            raise ActionScoresError(
                f"could not publish the report ({type(error).__name__}: {str(error)[:200]}); publishing needs a "
                f"W&B server and WANDB_API_KEY. Its spec is written to {path}: sync the runs (`wandb sync "
                "<folder>`), then rerun with --publish where the server is reachable") from None
    path = write_spec(spec, args.out)
    print(f"report spec written to {path}; publishing needs a W&B server: "
          f"sync the runs (`wandb sync <folder>`), then rerun with --publish and WANDB_API_KEY set")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from tracking.backends import MLflowTracker, WandbTracker
    from tracking.backends.wandb_backend import is_offline_run_folder
    from tracking.compare import COMPARE_DIR, compare_runs

    refs = [ref for item in args.runs for ref in item.replace(",", " ").split()]
    wandb_folders = any(is_offline_run_folder(ref) for ref in refs)
    tracker = _tracker(args, args.tracker or (WandbTracker.name if wandb_folders else MLflowTracker.name),
                       offline=_offline(refs))
    run_ids = []
    for ref in refs:  # W&B folders and paths become run ids the tracker attaches to again
        tracker.attach(ref)
        run_ids.append(tracker.run_id)
    result = compare_runs(tracker, run_ids, split=args.split or None, top_k=args.top_k,
                          experiment=args.experiment or None, score=args.score)
    print(f"compared {len(run_ids)} runs on split {result.split!r}; logged to run {result.run_id}")
    print(f"Spearman correlation of {result.score}:\n" + result.spearman.round(3).to_string())
    print(f"top-{args.top_k} hardest overlap:\n" + result.overlap.round(3).to_string())
    tracker.attach(result.run_id)
    print(f"  heatmap: {tracker.artifact_uri(f'{COMPARE_DIR}/{result.split}/heatmap.png')}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from tracking.analyze import DEFAULT_WORKERS, analyze_experiment, analyze_run, describe, summarize
    from tracking.backends import WandbTracker

    targets = [args.run_id, args.experiment, args.wandb_run, args.wandb_dir]
    if sum(bool(t) for t in targets) != 1:
        raise ActionScoresError("give exactly one of --run-id, --experiment, --wandb-run or --wandb-dir")
    if args.spark_master is not None and args.engine != "spark":
        raise ActionScoresError("--spark-master applies to --engine spark only")
    if args.wandb_run or args.wandb_dir:
        args.tracker, args.run_id = WandbTracker.name, args.wandb_run or args.wandb_dir
    tracker = _tracker(args, args.tracker, offline=True if args.wandb_dir else False if args.wandb_run else None)
    options = dict(top_k=args.top_k, force=args.force, data_root=args.data_root or None, panels=not args.no_panels,
                   engine=args.engine, el2n_epoch=args.el2n_epoch, pictures=args.pictures or None)
    if args.engine == "spark":  # made here, on the master asked for; the engine then finds it active
        from tracking.scoring.spark_engine import spark_session

        spark_session(args.spark_master)
    if args.workers is not None and not args.experiment:
        raise ActionScoresError("--workers applies to --experiment only (one run is one job)")
    if args.run_id:
        results = [analyze_run(tracker, args.run_id, **options)]
    else:
        workers = DEFAULT_WORKERS if args.workers is None else args.workers
        results = analyze_experiment(tracker, args.experiment, workers=workers, **options)
        if not results:
            print(f"experiment {args.experiment!r}: no finished run has per-sample tables")
    for result in results:
        print(describe(result, tracker))
    if args.experiment and results:
        print(summarize(results, args.experiment))
    return 1 if any(r.status == "failed" for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `action-scores` console script."""
    logging.basicConfig(level=logging.WARNING, format="action-scores: %(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar of our own instead
    args = _parser().parse_args(argv)
    try:
        commands = {"report": _report, "upload": _upload, "compare": _compare, "analyze": _analyze, "select": _select}
        return commands[args.command](args)
    except ActionScoresError as error:
        print(f"action-scores: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
