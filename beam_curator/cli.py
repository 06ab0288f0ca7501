"""Command line: argument parsing -> options -> pipeline builders. Nothing else lives here.

    python -m beam_curator run|embed|dedup|remove [options, any Beam runner flag]
    python -m beam_curator report --output DIR
    python -m beam_curator models init-random|download --dir DIR
    python -m beam_curator synthetic --dir DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

PIPELINE_COMMANDS = ("run", "embed", "dedup", "remove")
USAGE = """usage: python -m beam_curator COMMAND [options]

Curate webdataset image datasets with Apache Beam.

pipelines (each takes every Beam pipeline option too: --runner, --temp_location, ...):
  run      shards -> embeddings, scores, filters, dedup -> curated shards + parquet + report
  embed    step 1: shards -> embeddings and scores (OUTPUT/embeddings, OUTPUT/rejected)
  dedup    step 2: embeddings parquet (or clip-retrieval's img_emb/) -> OUTPUT/dedup
  remove   step 3: shards minus removal ids -> curated shards

tools:
  report     redraw OUTPUT/report.html of a finished run
  models     init-random | download | check  (model weights in --dir)
  synthetic  write a small synthetic webdataset

`python -m beam_curator COMMAND --help` lists a command's options with their defaults.
Example:
  python -m beam_curator run --input 'shards/*.tar' --output out --model_dir models
"""


class _HeldBeamErrors:
    """Holds back Beam's ERROR records while a local pipeline runs.

    A failing bundle makes Beam log its traceback at ERROR (dozens of lines) before the run
    raises. When that failure is one the user can fix (a full disk), the one-line `error:` is
    all they need, so the records are dropped (`drop`); any other failure, or a run that ends
    well, gets every record replayed, in order, when the block ends. In-process runners fail
    the pipeline on the first failing bundle, so nothing is held for long; remote runners'
    logs stay live.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.drop = False
        self._held: list = []        # (handler, record), in the order they came
        self._filters: list = []

    def __enter__(self):
        if not self.enabled:
            return self
        for handler in logging.getLogger().handlers:
            def hold(record, handler=handler):
                if record.name.split(".")[0] == "apache_beam" and record.levelno >= logging.ERROR:
                    self._held.append((handler, record))
                    return False
                return True
            handler.addFilter(hold)
            self._filters.append((handler, hold))
        return self

    def __exit__(self, *exc_info):
        for handler, hold in self._filters:
            handler.removeFilter(hold)
        self._filters = []
        if not self.drop:
            for handler, record in self._held:
                handler.handle(record)
        self._held = []
        return False


def run_pipeline(command: str, argv: List[str]) -> dict:
    """Build and run one pipeline; returns summary.json's content (or {})."""
    from apache_beam.io.filesystems import FileSystems

    from beam_curator import outputs
    from beam_curator.options import (
        CuratorOptions,
        curator_options,
        is_local_runner,
        runner_name,
    )
    from beam_curator.pipelines import build_pipeline
    from beam_curator.progress import run_with_progress

    options = curator_options(argv)
    opts = options.view_as(CuratorOptions)
    logging.getLogger(__name__).info("%s on %s", command, runner_name(options))
    pipeline, claim = build_pipeline(command, options)   # --output is now this run's
    summary_path = outputs.summary_file(opts.output)
    finished = False
    held = _HeldBeamErrors(enabled=is_local_runner(options))
    try:
        with held:
            try:
                # Live progress lines on the local runner; remote runners have their own UIs.
                run_with_progress(pipeline,
                                  opts.progress_interval if is_local_runner(options) else 0)
                finished = FileSystems.exists(summary_path)
            except Exception as exc:
                from beam_curator.errors import disk_full_error, user_errors

                full = disk_full_error(exc, opts.output)
                held.drop = full is not None or isinstance(exc, user_errors())
                if full is not None:
                    raise full from None
                raise
    finally:
        claim.release(finished=finished)
    if finished:
        with FileSystems.open(summary_path) as handle:
            return json.loads(handle.read().decode("utf-8"))
    return {}


def print_summary(command: str, output: str, summary: dict) -> None:
    from beam_curator.progress import final_summary_lines

    print("\n" + "\n".join(final_summary_lines(summary or {"command": command}, output)))


def models_command(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="beam_curator models")
    sub = parser.add_subparsers(dest="action", required=True)
    rand = sub.add_parser("init-random", help="tiny random weights in the real layout")
    rand.add_argument("--dir", required=True)
    rand.add_argument("--arch", default="tiny",
                      help="'tiny' (default) or any open_clip architecture, e.g. ViT-B-32")
    rand.add_argument("--seed", type=int, default=0)
    rand.add_argument("--force", action="store_true", help="replace model files in --dir")
    down = sub.add_parser("download", help="the real weights (needs network)")
    down.add_argument("--dir", required=True)
    down.add_argument("--force", action="store_true", help="replace model files in --dir")
    check = sub.add_parser("check", help="check a model dir without loading the model")
    check.add_argument("--dir", required=True)
    check.add_argument("--verify-sha256", action="store_true")
    args = parser.parse_args(argv)
    if args.action == "init-random":
        from beam_curator.models import init_random

        init_random(args.dir, arch=args.arch, seed=args.seed, overwrite=args.force)
        print(f"wrote RANDOM {args.arch} weights to {args.dir} (for demos and tests only: "
              "scores are meaningless)")
    elif args.action == "check":
        from beam_curator.models import check_model_dir

        manifest = check_model_dir(args.dir, verify_sha256=args.verify_sha256)
        print(f"{args.dir}: {manifest.clip_arch}, {manifest.embed_dim}-d embeddings, "
              f"{'RANDOM' if manifest.random_weights else 'real'} weights: OK")
    else:
        from beam_curator.models import download

        download(args.dir, overwrite=args.force)
        print(f"downloaded the real weights to {args.dir}")
    return 0


def report_command(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="beam_curator report")
    parser.add_argument("--output", required=True, help="an output directory of `run`")
    args = parser.parse_args(argv)
    from beam_curator.ownership import hold_output
    from beam_curator.report import write_report

    with hold_output(args.output):   # never while a run is writing this output
        _check_report_target(args.output)
        print(f"wrote {write_report(args.output)}")
    return 0


def _check_report_target(out: str) -> None:
    """The report draws a `run` output; anything else would only gain a stray report.html
    written after its summary.json."""
    from beam_curator.errors import OptionError
    from beam_curator.report.load import load_summary

    summary, _ = load_summary(out)
    command = summary.get("command") if isinstance(summary, dict) else None
    if command != "run":
        raise OptionError(
            f"--output {out} holds the output of `{command or 'an unknown command'}`, not of "
            "`run`: the report draws a run's samples, scores and dedup together. Point "
            "--output at the output directory of a `run`.")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # faiss's loader tries its AVX512 and AVX2 builds first and logs each miss at INFO ("Could
    # not load library with AVX2 support") even when the build it then loads works.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from beam_curator.errors import user_errors

    try:
        if command in PIPELINE_COMMANDS:
            if any(a in ("-h", "--help") for a in rest):
                return _pipeline_help(command)
            summary = run_pipeline(command, rest)
            from beam_curator.options import CuratorOptions, curator_options

            print_summary(command, curator_options(rest).view_as(CuratorOptions).output, summary)
            return 0
        if command == "models":
            return models_command(rest)
        if command == "report":
            return report_command(rest)
        if command == "synthetic":
            from beam_curator.synthetic import main as synthetic_main

            synthetic_main(rest)
            return 0
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


def _pipeline_help(command: str) -> int:
    from beam_curator.options import CuratorOptions

    parser = argparse.ArgumentParser(prog=f"python -m beam_curator {command}",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description="Plus every Beam pipeline option (--runner, "
                                                 "--temp_location, --project, ...). Options "
                                                 "are also spelled with hyphens (--model-dir).")
    CuratorOptions._add_argparse_args(parser)
    parser.print_help()
    return 0
