"""Smoke tests: a tiny real Beam pipeline (Create -> Map -> GroupByKey -> WriteToText)
on each way we run Beam on Flink (see tests/flink_support.py):

* PortableRunner + Beam's Python job service (LOOPBACK)
* FlinkRunner with an embedded Flink (``--flink_master=[local]``)
* FlinkRunner against the standalone session cluster (JobManager + two TaskManagers, each
  with its own SDK worker pool: ``--environment_type EXTERNAL``, as in production)

Fixtures come from tests/flink_support.py, imported once in tests/conftest.py.
"""
from __future__ import annotations

import glob
import os
import time
import uuid
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from flink_support import flink_pipeline_args

pytestmark = [pytest.mark.flink, pytest.mark.timeout(600)]

WORDS = ["apple", "banana", "apple", "cherry", "banana", "apple"]
EXPECTED = ["apple\t3", "banana\t2", "cherry\t1"]


def run_smoke_pipeline(args: list[str], out_dir: Path) -> tuple[list[str], float]:
    """Run the pipeline; return (sorted output lines, seconds)."""
    prefix = out_dir / "counts"
    t0 = time.monotonic()
    with beam.Pipeline(options=PipelineOptions(args)) as p:
        (p
         | "Create" >> beam.Create(WORDS)
         | "Pair" >> beam.Map(lambda w: (w, 1))
         | "Group" >> beam.GroupByKey()
         # a lambda travels by value: the SDK workers of a cluster cannot import this module
         | "Format" >> beam.MapTuple(lambda word, ones: f"{word}\t{sum(ones)}")
         | "Write" >> beam.io.WriteToText(str(prefix)))
    elapsed = time.monotonic() - t0
    shards = sorted(glob.glob(f"{prefix}*"))
    assert shards, f"no output files under {out_dir}: {os.listdir(out_dir)}"
    lines = []
    for shard in shards:
        lines.extend(Path(shard).read_text().splitlines())
    return sorted(lines), elapsed


def test_portable_runner_python_job_service(python_job_service, tmp_path):
    lines, secs = run_smoke_pipeline(
        flink_pipeline_args("portable", master=python_job_service), tmp_path)
    print(f"portable/python job service: {secs:.1f}s")
    assert lines == EXPECTED


def test_flink_embedded(flink_job_server_jar, reap_flink_job_servers, tmp_path):
    lines, secs = run_smoke_pipeline(
        flink_pipeline_args("embedded", jar=flink_job_server_jar, parallelism=2), tmp_path)
    print(f"flink embedded [local]: {secs:.1f}s")
    assert lines == EXPECTED


@pytest.mark.parametrize("own_job_server", [False, True],
                         ids=["cluster-job-server", "job-server-per-job"])
def test_flink_session_cluster(flink_cluster, reap_flink_job_servers, tmp_path, own_job_server):
    """Through the cluster's running job server (--job_endpoint), and through one that
    FlinkRunner starts for the job (no --job_endpoint)."""
    args = flink_cluster.pipeline_args(parallelism=2, own_job_server=own_job_server)
    assert ("--job_endpoint=" in " ".join(args)) is not own_job_server
    lines, secs = run_smoke_pipeline(args, tmp_path)
    print(f"flink session cluster {flink_cluster.master} (EXTERNAL, "
          f"{'own' if own_job_server else 'cluster'} job server): {secs:.1f}s")
    assert lines == EXPECTED


class _RecordBundleSizes(beam.DoFn):
    """Writes one file per bundle holding the bundle's element count."""

    def __init__(self, out_dir: str):
        self._out_dir = out_dir

    def start_bundle(self):
        self._n = 0

    def process(self, element):
        self._n += 1
        yield element

    def finish_bundle(self):
        path = os.path.join(self._out_dir, f"bundle-{uuid.uuid4().hex}")
        with open(path, "w") as f:
            f.write(str(self._n))


@pytest.mark.slow
def test_flink_streaming_bounds_bundles(flink_job_server_jar, reap_flink_job_servers,
                                        tmp_path):
    """On Flink batch a stage is one bundle per partition (max_bundle_size ignored,
    apache/beam#34178); with --streaming, max_bundle_size bounds the bundles."""
    n, max_bundle = 2000, 100
    args = flink_pipeline_args("embedded", jar=flink_job_server_jar, parallelism=1,
                               streaming=True, max_bundle_size=max_bundle)
    with beam.Pipeline(options=PipelineOptions(args)) as p:
        (p
         | beam.Create(list(range(n)))
         | beam.Reshuffle()
         | beam.ParDo(_RecordBundleSizes(str(tmp_path))))
    sizes = [int(Path(f).read_text()) for f in glob.glob(str(tmp_path / "bundle-*"))]
    assert sum(sizes) == n
    assert max(sizes) <= max_bundle
    assert len(sizes) >= n // max_bundle
