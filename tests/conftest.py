"""Shared fixtures: a tiny random-weight model dir and a small synthetic webdataset, made once."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
sys.path.insert(0, str(REPO))

# Tests name their runner; nothing may try to download Prism.
os.environ.setdefault("BEAM_CURATOR_TESTING", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from beam_curator.models import init_random

    path = tmp_path_factory.mktemp("models") / "tiny"
    init_random(str(path), arch="tiny", seed=0)
    return str(path)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    from beam_curator.synthetic import make_dataset

    path = tmp_path_factory.mktemp("data")
    return make_dataset(str(path), n_shards=2, per_shard=30, seed=1, n_exact=3, n_near=3,
                        n_corrupt=1)


def parquet_rows(directory) -> list:
    """Every row of DIR/*.parquet, as dicts, files in name order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(directory).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def tar_members(path) -> list:
    """[(member name, bytes)] of a tar's files, in order: a name written twice shows twice."""
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def run_args(*, input_glob: str, output: str, model_dir: str, **options) -> list:
    """CLI-style args for a tiny local run: FnApiRunner named explicitly."""
    args = ["--input", input_glob, "--output", output, "--model_dir", model_dir,
            "--runner", "FnApiRunner"]
    for name, value in options.items():
        args += [f"--{name}", str(value)]
    return args


# Flink / portable runner fixtures (tests/flink_support.py): imported once, here, so a
# session cluster is never started twice.
from flink_support import (flink_cluster, flink_job_server_jar,  # noqa: E402,F401
                           flink_session_cluster,
                           pytest_runtest_makereport, python_job_service,
                           reap_flink_job_servers)


def pytest_sessionfinish(session, exitstatus):
    # Beam stops its Flink job-server JVMs at interpreter exit and logs a warning for each,
    # after pytest's summary: keep pytest's summary the last thing a run prints.
    logging.getLogger("apache_beam.utils.subprocess_server").setLevel(logging.ERROR)
