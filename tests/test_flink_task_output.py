"""No silent stall on Flink (issue 30, item 3): `run` and `embed` size their Flink tasks from
the shards before anything runs, and a task whose output passes the limit fails, naming the
fix, instead of hanging (beam_curator/flink_tasks.py has the why).

The tests without a cluster check the estimate, the sizing and the guard on FnApiRunner; the
`flink` ones run `embed` on the session cluster with a tiny model of 32768-d embeddings
(128 KiB a vector), where 12,000 samples are ~1.6 GB of output: one task of it stalled."""
from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import FlinkRunnerOptions
from conftest import cli_fails

from beam_curator.errors import OptionError
from beam_curator.flink_tasks import (
    EXPECTED_SHARE_OF_LIMIT,
    TASK_OUTPUT_LIMIT_MIB,
    GuardTaskOutput,
    output_bytes_per_sample,
    peek_bytes_per_sample,
    tasks_for_shards,
)
from beam_curator.options import curator_options, size_flink_tasks
from beam_curator.transforms.read import list_shards

WIDE_DIM = 32768


@pytest.fixture(scope="module")
def uniform_shards(tmp_path_factory):
    from beam_curator.synthetic import make_dataset

    path = tmp_path_factory.mktemp("uniform")
    make_dataset(str(path), n_shards=4, per_shard=150, seed=3, size=24, n_exact=0, n_near=0,
                 n_corrupt=0)
    return path


def test_the_peek_counts_samples_per_byte_of_plain_and_gzipped_shards(uniform_shards, tmp_path):
    shards = sorted(uniform_shards.glob("*.tar"))
    total = sum(p.stat().st_size for p in shards)
    # a shard smaller than the peek is read whole: its exact bytes per sample
    assert peek_bytes_per_sample(str(shards[0])) == pytest.approx(
        shards[0].stat().st_size / 150, rel=0.01)
    estimate = total / peek_bytes_per_sample(str(shards[0]))
    assert 0.9 * 600 <= estimate <= 1.1 * 600, estimate
    # a shard larger than the peek: the rate from its first bytes only
    assert peek_bytes_per_sample(str(shards[0]), limit=200_000) == pytest.approx(
        shards[0].stat().st_size / 150, rel=0.2)
    # .tar.gz: bytes on disk per sample (what the listing's sizes count)
    gz = tmp_path / "00000.tar.gz"
    gz.write_bytes(gzip.compress(shards[0].read_bytes()))
    assert peek_bytes_per_sample(str(gz)) == pytest.approx(gz.stat().st_size / 150, rel=0.1)
    # not a tar: no estimate (the run reports that shard itself)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x00garbage" * 100)
    assert peek_bytes_per_sample(str(bad)) is None


def test_shard_sizes_come_from_the_listing_for_globs_and_directories(uniform_shards):
    from beam_curator.transforms.read import shard_sizes

    for pattern in (str(uniform_shards / "*.tar"), str(uniform_shards)):
        shards = list_shards(pattern)
        assert shard_sizes(pattern, shards) == [Path(u).stat().st_size for _, u in shards]
    # a spelling the listing does not use is matched on its own
    spelled = [(name, "/./".join(url.rsplit("/", 1)))
               for name, url in list_shards(str(uniform_shards))]
    assert "/./" in spelled[0][1]
    assert shard_sizes(str(uniform_shards), spelled) == \
        [Path(u).stat().st_size for _, u in spelled]


def _tasks(argv, shards, dim, limit_mib=TASK_OUTPUT_LIMIT_MIB):
    options = curator_options(argv)
    sizes = [Path(url).stat().st_size for _, url in shards]
    sized = tasks_for_shards(shards, sizes, dim, text_embeddings=False, limit_mib=limit_mib)
    size_flink_tasks(options, sized.need, sized.why)
    return options.view_as(FlinkRunnerOptions).parallelism, sized.samples


def test_run_and_embed_tasks_are_sized_from_the_shards(uniform_shards, caplog):
    shards = list_shards(str(uniform_shards / "*.tar"))
    dim = 262144   # 1 MiB a vector: 600 samples are ~600 MiB of output
    per_sample = output_bytes_per_sample(dim, False)
    tasks, samples = _tasks(["--runner", "FlinkRunner"], shards, dim)
    assert 540 <= samples <= 660
    share = (TASK_OUTPUT_LIMIT_MIB << 20) // EXPECTED_SHARE_OF_LIMIT   # 256 MiB
    assert tasks == -(-samples * per_sample // share) >= 3
    assert f"--parallelism not given: set to {tasks}" in caplog.text
    # small vectors: one task is enough, the cluster's default is left alone
    assert _tasks(["--runner", "FlinkRunner"], shards, 768)[0] == -1
    # more given: kept
    assert _tasks(["--runner", "FlinkRunner", "--parallelism", "40"], shards, dim)[0] == 40
    # fewer: refused, naming the number
    with pytest.raises(OptionError, match=f"--parallelism {tasks} or more"):
        _tasks(["--runner", "FlinkRunner", "--parallelism=1"], shards, dim)
    # a lower limit: proportionally more tasks
    assert _tasks(["--runner", "FlinkRunner"], shards, dim, limit_mib=96)[0] == \
        -(-samples * per_sample // (32 << 20))
    # not Flink's batch runner: nothing to size (one process; bounded bundles when streaming)
    assert _tasks(["--runner", "FnApiRunner"], shards, dim)[0] == -1
    assert _tasks(["--runner", "FlinkRunner", "--streaming"], shards, dim)[0] == -1
    # with text embeddings every sample sends two vectors
    assert output_bytes_per_sample(dim, True) - per_sample == 4 * dim


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> str:
    from beam_curator.models import init_random

    path = tmp_path_factory.mktemp("wide-model") / "tiny-32768"
    init_random(str(path), arch="tiny", seed=0, embed_dim=WIDE_DIM)
    return str(path)


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """12,000 small images in 24 shards: ~1.6 GB of 32768-d output. Many shards a task:
    they reach the tasks through a hash partition, which evens out over many."""
    from beam_curator.synthetic import make_dataset

    path = tmp_path_factory.mktemp("wide-data")
    make_dataset(str(path), n_shards=24, per_shard=500, seed=4, size=16, n_exact=0, n_near=0,
                 n_corrupt=0, extensions=("png",))
    return path


def test_embed_with_too_few_tasks_for_its_vectors_fails_before_it_claims_the_output(
        capsys, wide_model_dir, wide_data, tmp_path):
    out = tmp_path / "out"
    cli_fails(capsys, ["embed", "--input", str(wide_data / "*.tar"), "--output", str(out),
                       "--model_dir", wide_model_dir, "--runner", "FlinkRunner",
                       "--parallelism", "2"],
              "--parallelism 2 is too small", "32768-d vectors")
    assert not out.exists()


def test_the_tasks_set_are_the_ones_the_job_is_submitted_with(wide_model_dir, wide_data,
                                                              tmp_path):
    """Beam's Pipeline copies its options when it is made: the sizing must set the copy that
    the runner submits (it once set the caller's, and the job ran on the default)."""
    import shutil as _shutil

    from beam_curator.pipelines import build_pipeline

    options = curator_options(["--input", str(wide_data / "*.tar"), "--output",
                               str(tmp_path / "out"), "--model_dir", wide_model_dir,
                               "--runner", "FlinkRunner"])
    prepared = build_pipeline("embed", options)
    try:
        submitted = prepared.pipeline.options.view_as(FlinkRunnerOptions).parallelism
        assert submitted >= 5
        labels = {t.full_label for t in prepared.pipeline.transforms_stack[0].parts}
        assert "GuardTaskOutput" in labels
    finally:
        _shutil.rmtree(prepared.pipeline.local_tempdir, ignore_errors=True)
    # and on FnApiRunner there is no guard in the graph
    local = curator_options(["--input", str(wide_data / "*.tar"), "--output",
                             str(tmp_path / "out2"), "--model_dir", wide_model_dir,
                             "--runner", "FnApiRunner"])
    prepared = build_pipeline("embed", local)
    try:
        labels = {t.full_label for t in prepared.pipeline.transforms_stack[0].parts}
        assert "GuardTaskOutput" not in labels
    finally:
        _shutil.rmtree(prepared.pipeline.local_tempdir, ignore_errors=True)


def test_the_guard_passes_what_fits_and_fails_a_bundle_that_does_not():
    from apache_beam.testing.util import assert_that, equal_to

    with beam.Pipeline("FnApiRunner") as p:
        out = p | beam.Create(range(100)) | GuardTaskOutput(10, limit=1000, parallelism=2)
        assert_that(out, equal_to(list(range(100))))
    with pytest.raises(Exception, match=r"emitted 101 samples .* Rerun with --parallelism 8"):
        with beam.Pipeline("FnApiRunner") as p:
            _ = p | beam.Create(range(200)) | GuardTaskOutput(10, limit=1000, parallelism=2)


# ---- on the session cluster ----------------------------------------------------------------

def _embed(cluster, data: Path, model_dir: str, out: Path, *extra, timeout=600):
    args = cluster.pipeline_args()
    # the cluster's tasks get --parallelism from the command, not the helper's default
    args = [a for a in args if not a.startswith("--parallelism")]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "beam_curator", "embed", "--input", str(data / "*.tar"),
         "--output", str(out), "--model_dir", model_dir, *args, *extra],
        capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


@pytest.mark.flink
@pytest.mark.timeout(900)
def test_a_default_embed_of_wide_vectors_runs_on_enough_tasks(
        flink_cluster, reap_flink_job_servers, wide_model_dir, wide_data, tmp_path):
    """12,000 x 128 KiB of output: one task (the cluster's default parallelism, 1) stalled;
    sized from the shards, the default command sets the tasks and finishes."""
    import pyarrow.parquet as pq

    flink_cluster.wait_ready()
    out = tmp_path / "out"
    proc, _ = _embed(flink_cluster, wide_data, wide_model_dir, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tasks = int(re.search(r"--parallelism not given: set to (\d+)", proc.stderr).group(1))
    assert tasks >= 5
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (out / "embeddings").glob("*.parquet"))
    assert rows == 12000
    jobs = sorted(flink_cluster.rest("/jobs/overview")["jobs"], key=lambda j: j["start-time"])
    vertices = flink_cluster.rest(f"/jobs/{jobs[-1]['jid']}")["vertices"]
    embedding = [v for v in vertices if "GuardTaskOutput" in v["name"]]
    assert embedding and all(v["parallelism"] == tasks for v in embedding), vertices


@pytest.mark.flink
@pytest.mark.timeout(900)
def test_a_task_the_estimate_misses_fails_loudly_within_minutes(
        flink_cluster, reap_flink_job_servers, wide_model_dir, wide_data, tmp_path):
    """The first shard (the one the estimate peeks at) holds large images, the others
    thousands of small ones: sized for a few hundred samples, one task gets 11,540. It fails on its
    guard, naming --parallelism, instead of stalling."""
    from beam_curator.synthetic import SyntheticSample, write_shard

    data = tmp_path / "skewed"
    data.mkdir()
    import os
    import random

    rng = random.Random(0)
    big = [SyntheticSample(f"a{i:04d}", {"png": _noise_png(rng, 200), "txt": b"noise"})
           for i in range(40)]
    write_shard(str(data / "00000.tar"), big)
    for shard in sorted(wide_data.glob("*.tar"))[1:]:
        shutil.copy(shard, data / shard.name)
    assert os.path.getsize(data / "00000.tar") > 4 << 20
    flink_cluster.wait_ready()
    # the failure is the same on every attempt: the cluster's restart strategy retries the
    # task 6 times (exponential backoff, 1 to 15 s), then fails the job
    # a 48 MiB limit: each attempt fails after ~380 samples instead of ~6,000 (the default
    # limit's path is the same code; the sizing test above runs it on the cluster)
    proc, elapsed = _embed(flink_cluster, data, wide_model_dir, tmp_path / "out",
                           "--flink_task_output_limit_mib", "48", timeout=600)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "TaskOutputTooLarge" in text and "Rerun with --parallelism" in text, text[-4000:]
    assert "more than the 48 MiB a task may" in text
    assert elapsed < 300, elapsed


def _noise_png(rng, size: int) -> bytes:
    import io

    from PIL import Image

    image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_flink_jobs_get_the_large_record_handler_unless_the_user_brings_a_flink_config(
        monkeypatch, tmp_path):
    """A GroupByKey whose values in one task pass one sort buffer (a 10,000-sample shard's
    embeddings rows) failed on Flink; the job conf this package ships lets Flink spill them."""
    from beam_curator.options import FLINK_JOB_CONF_DIR

    def conf_dir(argv):
        return curator_options(argv).get_all_options(retain_unknown_options=True).get(
            "flink_conf_dir")

    monkeypatch.delenv("FLINK_CONF_DIR", raising=False)
    assert conf_dir(["--runner", "FlinkRunner"]) == FLINK_JOB_CONF_DIR
    assert "taskmanager.runtime.large-record-handler: true" in (
        Path(FLINK_JOB_CONF_DIR) / "config.yaml").read_text()
    assert conf_dir(["--runner", "FlinkRunner", "--flink_conf_dir", str(tmp_path)]) \
        == str(tmp_path)
    assert conf_dir(["--runner", "FnApiRunner"]) is None
    monkeypatch.setenv("FLINK_CONF_DIR", str(tmp_path))   # Beam reads the user's then
    assert conf_dir(["--runner", "FlinkRunner"]) is None
