"""Dataflow Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE) for `beam_curator run`.

The template launcher runs this file as

    python run_template.py --input=gs://... --output=gs://... --model_dir=... [--name=value ...]
                           --runner=DataflowRunner --project=... --region=... [launcher options]

i.e. every template parameter (templates/metadata.json) arrives as `--name=value`, next to the
Beam/Dataflow pipeline options. They are parsed by the same `CuratorOptions` as the CLI and the
graph is built by the same builder (`beam_curator.pipelines.build_run`), so a template run and
`python -m beam_curator run` build the same graph.

On Dataflow this only submits the job: a Flex Template launch must not wait for the job to end
(the launcher VM has a time limit, and the launcher hands the job to the service itself). The
job writes report.html and then summary.json itself; the run record left in --output says the
output is the job's until then. On any other runner (FnApiRunner in the tests, Flink,
Portable) it does exactly what `python -m beam_curator run` does.
"""
from __future__ import annotations

import logging
import sys
from typing import List, Optional, Tuple

_LOG = logging.getLogger("beam_curator.template")


def template_argv(argv: List[str]) -> List[str]:
    """The launcher's argv, with DataflowRunner named when the launcher left the runner out.

    (`curator_options` falls back to the offline FnApiRunner, which on a launcher VM would run
    the whole job on the launcher.)
    """
    from apache_beam.options.pipeline_options import (
        GoogleCloudOptions,
        PipelineOptions,
        StandardOptions,
    )

    given = PipelineOptions(argv)
    if (not given.view_as(StandardOptions).runner
            and given.view_as(GoogleCloudOptions).template_location):
        return list(argv) + ["--runner=DataflowRunner"]
    return list(argv)


def submits_only(options) -> bool:
    """True when the job is handed to Dataflow (directly or through the template launcher)."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    from beam_curator.options import runner_name

    runner = runner_name(options).lower().split(".")[-1]
    return (runner in ("dataflowrunner", "testdataflowrunner")
            or bool(options.view_as(GoogleCloudOptions).template_location))


def launch(argv: List[str]) -> Tuple[object, object]:
    """Build the `run` graph and hand it to the runner: (options, result).

    Dataflow: returns right after submission (or, with --dry_run=True, after the job proto is
    built, without contacting the service). Other runners: runs to the end like the CLI, and
    the result is summary.json's content.
    """
    from beam_curator import cli
    from beam_curator.options import curator_options

    argv = template_argv(argv)
    options = curator_options(argv)
    if not submits_only(options):
        return options, cli.run_pipeline("run", argv)

    from beam_curator.pipelines import build_pipeline

    pipeline, claim = build_pipeline("run", options)
    # The job writes --output on its own after this launcher returns: the run record says so
    # (a second launch into the same --output is refused until the job's summary.json).
    claim.mark_handed_to_job()
    try:
        result = pipeline.run()   # no wait_until_finish(): the launcher submits the job
    except BaseException:
        claim.mark_handed_to_job(False)
        claim.release(finished=False)
        raise
    claim.hand_to_job()
    return options, result


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from beam_curator import cli
    from beam_curator.errors import user_errors
    from beam_curator.options import CuratorOptions

    try:
        options, result = launch(argv)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    opts = options.view_as(CuratorOptions)
    if submits_only(options):
        _LOG.info("Job submitted: it writes %s/summary.json as its last file when it ends.",
                  opts.output.rstrip("/"))
    else:
        cli.print_summary("run", opts.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
