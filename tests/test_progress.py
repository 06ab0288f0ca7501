"""Progress lines on the local runner (beam_curator.progress): live counts while a bundle runs."""
from __future__ import annotations

import io
import re
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_curator.progress import (
    ProgressReporter,
    final_summary_lines,
    run_with_progress,
)

N = 120


class _SlowCounted(beam.DoFn):
    """Emits the counters the real pipeline emits, slowly enough to be seen mid-bundle."""

    def __init__(self):
        self.read = beam.metrics.Metrics.counter("curator", "samples_read")
        self.embedded = beam.metrics.Metrics.counter("curator_clip", "num_inferences")
        self.errors = beam.metrics.Metrics.counter("curator", "decode_errors")

    def process(self, x):
        time.sleep(0.01)
        self.read.inc()
        self.embedded.inc()
        if x % 40 == 0:
            self.errors.inc()
        yield x


def _pipeline(n: int = N) -> beam.Pipeline:
    p = beam.Pipeline(options=PipelineOptions(["--runner", "FnApiRunner"]))
    _ = (p | beam.Create(range(n)) | beam.Reshuffle() | beam.ParDo(_SlowCounted())
         | beam.Map(lambda x: x))
    return p


def _numbers(line: str, label: str):
    match = re.search(rf"{label} ([\d,]+)", line)
    return int(match.group(1).replace(",", "")) if match else None


def test_live_lines_while_a_single_bundle_runs():
    stream = io.StringIO()
    started = time.monotonic()
    result = run_with_progress(_pipeline(), interval_s=0.2, stream=stream)
    assert time.monotonic() - started > 0.2 * 2
    assert result.state == "DONE"
    lines = stream.getvalue().splitlines()
    progress = [line for line in lines if line.startswith("[progress ")]
    assert progress, lines
    # The whole ParDo is ONE bundle on FnApiRunner: a count strictly between 0 and N can
    # only come from reading the bundle while it runs.
    seen = [_numbers(line, "read") for line in progress if _numbers(line, "read") is not None]
    assert any(0 < n < N for n in seen), lines
    assert seen == sorted(seen)                       # never goes down
    assert "img/s" in " ".join(progress)
    final = lines[-1]
    assert final.startswith("[done ")
    assert _numbers(final, "read") == N and _numbers(final, "embedded") == N
    assert _numbers(final, "errors") == 3


def test_interval_zero_prints_nothing():
    stream = io.StringIO()
    result = run_with_progress(_pipeline(10), interval_s=0, stream=stream)
    assert result.state == "DONE"
    assert stream.getvalue() == ""


def test_other_runners_get_one_final_line():
    stream = io.StringIO()
    p = beam.Pipeline(options=PipelineOptions(["--runner", "BundleBasedDirectRunner"]))
    _ = p | beam.Create(range(10)) | beam.ParDo(_SlowCounted())
    run_with_progress(p, interval_s=0.2, stream=stream)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[done ")
    assert _numbers(lines[0], "read") == 10


def test_reporter_line_format_and_monotonic_values():
    clock = iter([0.0, 10.0, 20.0, 30.0]).__next__
    snapshots = iter([
        {("curator", "samples_read"): 100, ("curator_clip", "num_inferences"): 50},
        {("curator", "samples_read"): 90, ("curator_clip", "num_inferences"): 250},  # a dip
    ]).__next__
    stream = io.StringIO()
    reporter = ProgressReporter(snapshots, interval_s=10, stream=stream, clock=clock)
    first = reporter.tick()
    second = reporter.tick()
    assert first == "[progress 0:10] read 100 · embedded 50 (5.0 img/s, avg 5.0)"
    assert second == "[progress 0:20] read 100 · embedded 250 (20.0 img/s, avg 12.5)"
    final = reporter.tick(final_counters={("curator", "samples_read"): 300,
                                          ("curator", "passed_filters"): 200,
                                          ("curator", "filtered"): 90})
    # no RunInference counter: embedded = passed + filtered
    assert final == "[done 0:30] read 300 · embedded 290 (9.7 img/s) · passed 200 · filtered 90"
    assert stream.getvalue().splitlines() == [first, second, final]


def test_final_summary_lines(tmp_path):
    (tmp_path / "curated").mkdir()
    (tmp_path / "report.html").write_text("<!DOCTYPE html>")
    summary = {
        "command": "run", "random_weights": True, "samples_read": 10,
        "counts": {"kept": 6, "filtered_aesthetic": 2, "error": 2},
        "accounting": {"ok": True, "input": 10, "sum_of_statuses": 10},
        "shard_errors": [{"shard": "a", "reason": "x"}],
        "curated_samples_written": 6,
    }
    lines = final_summary_lines(summary, str(tmp_path))
    text = "\n".join(lines)
    assert lines[0] == f"run finished: outputs in {tmp_path}"
    assert "RANDOM" in text
    assert re.search(r"kept\s+6\s+60\.0%", text)
    assert "accounting: input 10 = sum of statuses 10 -> OK" in text
    assert "shard-level errors: 1" in text
    assert "curated samples written: 6" in text
    assert f"report: {tmp_path}/report.html" in text
    assert "per-sample statuses" not in text          # samples/ does not exist here


class _Fails(beam.DoFn):
    def process(self, x):
        time.sleep(0.05)
        if x == 5:
            raise ValueError("boom in the DoFn")
        yield x


def test_a_failing_pipeline_raises_and_the_lines_stop():
    import threading

    stream = io.StringIO()
    p = beam.Pipeline(options=PipelineOptions(["--runner", "FnApiRunner"]))
    _ = p | beam.Create(range(10)) | beam.Reshuffle() | beam.ParDo(_Fails())
    try:
        run_with_progress(p, interval_s=0.1, stream=stream)
    except Exception as exc:   # Beam wraps the DoFn's error
        assert "boom in the DoFn" in str(exc)
    else:
        raise AssertionError("the pipeline should have failed")
    assert not [t for t in threading.enumerate() if t.name == "beam-curator-progress"]
    assert "[done" not in stream.getvalue()


def test_the_final_line_of_a_real_run_matches_its_summary(small_dataset, tiny_model_dir,
                                                          tmp_path, capsys):
    """Every counter the line names is emitted by the real transforms, and the final line
    agrees with summary.json."""
    import os

    from beam_curator.cli import run_pipeline
    from tests.conftest import run_args

    shards = os.path.join(os.path.dirname(small_dataset.shards[0]), "*.tar")
    summary = run_pipeline("run", run_args(input_glob=shards, output=str(tmp_path / "out"),
                                           model_dir=tiny_model_dir, n_clusters=3,
                                           progress_interval=30))
    final = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("[done")][-1]
    counts = summary["counts"]
    assert _numbers(final, "read") == summary["samples_read"]
    assert _numbers(final, "errors") == counts["error"]
    assert _numbers(final, "duplicates") == (counts["exact_duplicate"]
                                             + counts["semantic_duplicate"])
    assert _numbers(final, "kept") == counts["kept"]
    assert _numbers(final, r"kept \(written\)") == summary["curated_samples_written"]
