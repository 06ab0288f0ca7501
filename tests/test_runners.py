"""The same `run` graph on every runner: FnApiRunner, PortableRunner (Python job service),
Flink embedded and the Flink session cluster (EXTERNAL worker pools) give identical kept ids,
removal sets and accounting."""
from __future__ import annotations

import glob
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flink_support import flink_pipeline_args

from beam_curator.cli import run_pipeline
from tests.conftest import run_args

pytestmark = [pytest.mark.flink, pytest.mark.slow, pytest.mark.timeout(900)]


def outcome(out) -> dict:
    """What must not depend on the runner."""
    def ids(path, column="id", where=None):
        files = sorted(glob.glob(os.path.join(path, "*.parquet")))
        rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
        return sorted(r[column] for r in rows if where is None or where(r))

    summary = __import__("json").load(open(os.path.join(out, "summary.json")))
    curated = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "curated", "*.tar")))
    return {
        "kept": ids(os.path.join(out, "samples"), where=lambda r: r["status"] == "kept"),
        "statuses": ids(os.path.join(out, "samples"), "status"),
        "removal": ids(os.path.join(out, "dedup", "duplicates")),
        "curated_files": curated,
        "counts": summary["counts"],
        "accounting": summary["accounting"],
    }


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory, tiny_model_dir):
    from beam_curator.synthetic import make_dataset

    data = tmp_path_factory.mktemp("runners-data")
    make_dataset(str(data), n_shards=2, per_shard=15, seed=7, n_exact=2, n_near=2)
    return str(data / "*.tar"), tiny_model_dir


@pytest.fixture(scope="module")
def baseline(tiny_inputs, tmp_path_factory):
    input_glob, model_dir = tiny_inputs
    out = tmp_path_factory.mktemp("fnapi")
    run_pipeline("run", run_args(input_glob=input_glob, output=str(out), model_dir=model_dir,
                                 n_clusters=3, write_report="false"))
    return out, outcome(out)


def run_on(runner_args, tiny_inputs, baseline, out):
    input_glob, model_dir = tiny_inputs
    base_out, expected = baseline
    args = run_args(input_glob=input_glob, output=str(out), model_dir=model_dir, n_clusters=3,
                    write_report="false", centroids=base_out / "dedup" / "centroids.npy")
    args = [a for a in args if a != "FnApiRunner" and a != "--runner"]
    run_pipeline("run", args + runner_args)
    got = outcome(out)
    assert got == expected
    assert got["accounting"]["ok"] and got["kept"]


def test_portable_runner_job_service(python_job_service, tiny_inputs, baseline, tmp_path):
    run_on(flink_pipeline_args("portable", python_job_service), tiny_inputs, baseline, tmp_path)


def test_flink_embedded(tiny_inputs, baseline, tmp_path, reap_flink_job_servers):
    run_on(flink_pipeline_args("embedded", parallelism=2), tiny_inputs, baseline, tmp_path)


def test_flink_session_cluster(flink_cluster, tiny_inputs, baseline, tmp_path,
                               reap_flink_job_servers):
    """Two TaskManagers, each with its own SDK worker pool (EXTERNAL), as in production."""
    run_on(flink_cluster.pipeline_args(parallelism=2), tiny_inputs, baseline, tmp_path)
