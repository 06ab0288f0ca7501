"""Shared fixtures: a tiny random-weight model dir and a small synthetic webdataset, made once."""
from __future__ import annotations

import io
import logging
import os
import sys
import tarfile
import tempfile
import time
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


def with_option(args: list, name: str, value: str) -> list:
    """CLI args with --name set to value (replaced when present: an option given twice is an
    error)."""
    flag = f"--{name}"
    if flag in args:
        i = args.index(flag)
        return args[:i + 1] + [str(value)] + args[i + 2:]
    return args + [flag, str(value)]


# ---- bad options fail fast: fixtures shared by the option and safety tests -----------------

# Generous: the real guard is no_pipeline_run; this only catches work done before a refusal
# (model loading, reading shards) on a shared, busy 2-core machine.
FAST_S = 15.0


@pytest.fixture
def no_pipeline_run(monkeypatch, tmp_path_factory):
    """Any attempt to run a pipeline fails the test: the checks must come first.

    Also: a refused command leaves nothing in the temp dir (Beam makes one per Pipeline).
    """
    import apache_beam as beam

    def refuse(self, *args, **kwargs):
        raise AssertionError("the pipeline ran: this option should have failed before")

    monkeypatch.setattr(beam.Pipeline, "run", refuse)
    temp_root = tmp_path_factory.mktemp("tempdir")
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    yield
    assert not list(temp_root.iterdir()), "a refused command left files in the temp dir"


@pytest.fixture(scope="session")
def warm(tiny_model_dir):
    """Import the heavy modules once so the timings measure the checks, not imports."""
    from beam_curator import pipelines  # noqa: F401
    from beam_curator.models import check_model_dir
    from beam_curator.transforms import embed, semdedup  # noqa: F401 (RunInference: seconds)

    check_model_dir(tiny_model_dir)
    return tiny_model_dir


@pytest.fixture(scope="session")
def one_shard(tmp_path_factory):
    directory = tmp_path_factory.mktemp("one-shard")
    with tarfile.open(directory / "000.tar", "w") as tar:
        data = b"not decoded: the pipeline never runs in these tests"
        info = tarfile.TarInfo("k.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return str(directory / "*.tar")


def cli_fails(capsys, argv, *fragments):
    """The CLI exits 2, fast, and its stderr holds every fragment."""
    from beam_curator import cli

    started = time.monotonic()
    code = cli.main(argv)
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert elapsed < FAST_S, f"{elapsed:.1f} s to fail"
    return err


# Flink / portable runner fixtures (tests/flink_support.py): imported once, here, so a
# session cluster is never started twice.
from flink_support import (  # noqa: E402,F401
    flink_cluster,
    flink_job_server_jar,
    flink_session_cluster,
    pytest_runtest_makereport,
    python_job_service,
    reap_flink_job_servers,
)


def pytest_sessionfinish(session, exitstatus):
    # Beam stops its Flink job-server JVMs at interpreter exit and logs a warning for each,
    # after pytest's summary: keep pytest's summary the last thing a run prints.
    logging.getLogger("apache_beam.utils.subprocess_server").setLevel(logging.ERROR)
