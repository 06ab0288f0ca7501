"""SDK workers reused across a job's stages on the Flink session cluster (issue 30).

Beam's Flink runner (2.62) stops a job's SDK worker on a TaskManager when the last task of the
job there closes, unless --environment_cache_millis defers it AND Beam's runner classes come
from Flink's own classloader (FlinkExecutableStageContextFactory: a release from the job's
classloader is synchronous). Between two batch stages no task runs, so on a stock cluster every
stage of every TaskManager started a fresh Python worker: 42 for a 100k dedup, 325 at 1M.
scripts/flink_cluster.sh puts Beam's jars in the cluster's lib/ (parent-first), and FlinkRunner
jobs of the CLI get --environment_cache_millis by default (beam_curator/options.py).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from beam_curator.options import FLINK_ENVIRONMENT_CACHE, curator_options


def _cache_millis(argv):
    return curator_options(argv).get_all_options(retain_unknown_options=True).get(
        "environment_cache_millis")


def test_flink_jobs_keep_their_workers_between_stages_unless_the_user_says_otherwise():
    default = FLINK_ENVIRONMENT_CACHE.split("=")[1]
    assert _cache_millis(["--runner", "FlinkRunner"]) == default
    assert _cache_millis(["--runner", "FlinkRunner", "--environment_cache_millis", "0"]) == "0"
    assert _cache_millis(["--runner", "FlinkRunner", "--environment_cache_millis=2500"]) \
        == "2500"
    # other runners: Beam's default (no caching; only portable runners read it)
    assert _cache_millis(["--runner", "FnApiRunner"]) in (0, "0")
    # below the restart strategy's largest backoff (15 s in flink_cluster.sh): a worker that
    # died is then dropped by the time a restarted task comes back to its TaskManager
    assert 0 < int(default) < 15_000


def _write_embeddings(directory: Path, n=6000, dim=64, seed=5) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from beam_curator.transforms.write import embeddings_to_arrow

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[: n // 50] = x[n // 50: 2 * (n // 50)] + 1e-3   # planted near-duplicates
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    directory.mkdir(parents=True)
    for part in range(2):
        rows = range(part * n // 2, (part + 1) * n // 2)
        pq.write_table(pa.table({"id": [f"p{part}/{i:05d}" for i in rows],
                                 "embedding": embeddings_to_arrow(list(x[rows.start:rows.stop]))}),
                       directory / f"part-{part}.parquet")
    return str(directory / "*.parquet")


@pytest.mark.flink
@pytest.mark.timeout(900)
def test_a_dedup_job_starts_one_worker_per_taskmanager(flink_cluster, reap_flink_job_servers,
                                                       tmp_path):
    """`dedup` runs ~100 Flink vertices one after the other (blocking exchanges); each
    TaskManager's pool starts one SDK worker for the whole job (it was one per stage)."""
    lib = flink_cluster.run_dir / "lib"
    conf = (flink_cluster.run_dir / "conf" / "config.yaml").read_text()
    if not flink_cluster.beam_lib:
        pytest.skip("cluster started with BEAM_CURATOR_FLINK_BEAM_LIB=0")
    assert "classloader.resolve-order: parent-first" in conf
    assert any(p.name.startswith("beam-runners-flink-") for p in lib.iterdir())
    assert not any(p.name.startswith("slf4j-") for p in lib.iterdir())
    flink_cluster.wait_ready()
    before = flink_cluster.worker_starts()
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "beam_curator", "dedup",
         "--embeddings", _write_embeddings(tmp_path / "emb"), "--n_clusters", "4",
         "--output", str(out), *flink_cluster.pipeline_args(parallelism=2)],
        capture_output=True, text=True, timeout=800, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    started = [a - b for a, b in zip(flink_cluster.worker_starts(), before)]
    jobs = sorted(flink_cluster.rest("/jobs/overview")["jobs"], key=lambda j: j["start-time"])
    vertices = len(flink_cluster.rest(f"/jobs/{jobs[-1]['jid']}")["vertices"])
    # one each, and a spare for a TaskManager left idle longer than the cache between two
    # stages (a skewed stage elsewhere); before: one per stage the TaskManager ran
    assert vertices > 40 and all(1 <= s <= 2 for s in started), (started, vertices)
    assert (out / "summary.json").exists()


@pytest.mark.flink
@pytest.mark.timeout(900)
def test_staged_vectors_on_the_cluster_give_the_local_runners_duplicates(
        flink_cluster, reap_flink_job_servers, tmp_path):
    """--dedup_vector_transport staged on the cluster (its TaskManagers share this machine's
    disk, as a cluster shares an NFS mount): the workers find the launcher's marker, read the
    vectors from dedup/_staging instead of the shuffle, and decide what FnApiRunner decides;
    the staging directory is gone at the end."""
    import pyarrow.parquet as pq

    from beam_curator import cli

    embeddings = _write_embeddings(tmp_path / "emb")
    args = ["--embeddings", embeddings, "--n_clusters", "4"]
    cli.run_pipeline("dedup", [*args, "--output", str(tmp_path / "local"),
                               "--runner", "FnApiRunner"])
    flink_cluster.wait_ready()
    out = tmp_path / "flink"
    proc = subprocess.run(
        [sys.executable, "-m", "beam_curator", "dedup", *args, "--output", str(out),
         "--dedup_vector_transport", "staged", *flink_cluster.pipeline_args(parallelism=2)],
        capture_output=True, text=True, timeout=800, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def duplicates(run):
        return sorted(pq.read_table(run / "dedup" / "duplicates").column("id").to_pylist())

    found = duplicates(out)
    assert len(found) > 100 and found == duplicates(tmp_path / "local")   # ~120 planted
    assert not (out / "dedup" / "_staging").exists()


def test_the_cluster_script_refuses_a_run_dir_it_did_not_make(tmp_path):
    """It replaces conf/ and lib/ of its run dir: a user's directory named by mistake is
    refused, untouched; a new one is marked as its own."""
    from flink_support import REPO_ROOT

    mine = tmp_path / "mine"
    (mine / "lib").mkdir(parents=True)
    (mine / "lib" / "precious.jar").write_bytes(b"the user's")
    env = dict(__import__("os").environ, BEAM_CURATOR_FLINK_RUN_DIR=str(mine))
    proc = subprocess.run(["bash", "scripts/flink_cluster.sh", "up"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a run dir of this script" in proc.stderr
    assert sorted(p.name for p in mine.rglob("*")) == ["lib", "precious.jar"]
    fresh = tmp_path / "fresh"
    env["BEAM_CURATOR_FLINK_RUN_DIR"] = str(fresh)
    subprocess.run(["bash", "scripts/flink_cluster.sh", "status"], cwd=REPO_ROOT, env=env,
                   capture_output=True, text=True, timeout=60)
    assert (fresh / ".beam-curator-flink-run").exists()
