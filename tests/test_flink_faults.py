"""Faults survived on the production-shaped Flink cluster (tests/flink_support.py): in the middle
of a `run` (while the embedding stage runs) and of a `dedup` (while the pairwise step runs),
SIGKILL (a) one TaskManager or (b) one SDK worker pool together with the SDK workers it
started (what a crashed pool container takes with it). Flink's restart strategy re-runs the
lost tasks, the supervisor brings the process back, and every output file equals a clean
run's, byte for byte, with nothing missing and nothing extra.

The clean run and the faulted run write to the same --output path (the clean output is moved
aside first), since summary.json records the output path. Commands are submitted as a user
does: `python -m beam_curator ... --runner FlinkRunner ... --environment_type EXTERNAL`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.flink, pytest.mark.slow, pytest.mark.timeout(1200)]

# Where each command is killed: `run` while its fused read/decode/embed stage (named after its
# top-level transforms, among them "Embed") runs; `dedup` while the stage fed by the reduce
# side of the GroupByClusterBlocks shuffle (the pairwise step) runs, not the reduce itself.
PAIRWISE_INPUT = "GroupReduce (GroupReduce at Dedup/SemDeDup/Core/Route/GroupByCluster"
STAGES = {"run": dict(name_part="Embed"), "dedup": dict(after=PAIRWISE_INPUT)}


def tree_digest(root: Path) -> dict:
    """{relative path: sha256} of every file under root (temp files and all)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_dedup_embeddings(directory: Path, n=72_000, dim=128, clusters=12, seed=3) -> str:
    """An embeddings parquet (id, embedding) big enough that the pairwise step runs for
    seconds on each TaskManager (about 6 s here with SDK workers reused; at 36,000 rows it was
    2 s and the test's watcher, polling a REST view refreshed each second, could miss it):
    `clusters` blobs, 5 % planted near-duplicates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from beam_curator.transforms.write import embeddings_to_arrow

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    dup = rng.choice(n, n // 20, replace=False)
    x[dup] = x[(dup + 1) % n] + 1e-3 * rng.normal(size=(len(dup), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    directory.mkdir(parents=True)
    for part in range(4):
        rows = range(part * n // 4, (part + 1) * n // 4)
        table = pa.table({"id": [f"{part:05d}/{i:06d}" for i in rows],
                          "embedding": embeddings_to_arrow(list(x[rows.start:rows.stop]))})
        pq.write_table(table, directory / f"part-{part}.parquet", row_group_size=3000)
    return str(directory / "*.parquet")


@pytest.fixture(scope="module")
def fault_inputs(tmp_path_factory, tiny_model_dir):
    from beam_curator.synthetic import make_dataset

    root = tmp_path_factory.mktemp("faults")
    make_dataset(str(root / "shards"), n_shards=4, per_shard=40, seed=7, n_exact=3, n_near=3)
    return {
        "run": ["--input", str(root / "shards" / "*.tar"), "--model_dir", tiny_model_dir,
                "--n_clusters", "4", "--write_report", "false"],
        "dedup": ["--embeddings", write_dedup_embeddings(root / "embeddings"),
                  "--n_clusters", "12"],
    }


def submit(cluster, command: str, args: list, output: Path) -> subprocess.Popen:
    log = open(output.parent / f"{output.name}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "beam_curator", command, *args, "--output", str(output),
         *cluster.pipeline_args(parallelism=2)],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(output.parent),
        start_new_session=True)   # its own group: a failed test kills it with its job server


def finish(proc: subprocess.Popen, output: Path, timeout=900) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    log = (output.parent / f"{output.name}.log").read_text(errors="replace")
    assert rc == 0, f"exit status {rc}:\n{log[-4000:]}"


@pytest.fixture(scope="module")
def clean_runs(flink_cluster, fault_inputs, tmp_path_factory):
    """{command: (output path to reuse, digest of its clean output)}: one clean run each."""
    if not flink_cluster.owned:
        pytest.skip("fault tests kill cluster processes: not on a cluster they did not start")
    root = tmp_path_factory.mktemp("clean")
    clean = {}
    for command in STAGES:
        out = root / command
        t0 = time.monotonic()
        finish(submit(flink_cluster, command, fault_inputs[command], out), out)
        print(f"clean {command} on the cluster: {time.monotonic() - t0:.0f}s")
        digest = tree_digest(out)
        assert "summary.json" in digest
        shutil.move(str(out), str(root / f"{command}-clean"))
        clean[command] = (out, digest)
    return clean


def kill_during(cluster, proc, t0_ms: int, stage: dict, victim: str, timeout=600):
    """Wait until a subtask of `stage` runs and has been fed its input (so its SDK worker is
    connected and working), then SIGKILL the TaskManager running it, or that TaskManager's
    pool and the pool's workers. Returns (job id, killed process name, seconds to kill)."""
    t_start = time.monotonic()
    while proc.poll() is None and time.monotonic() - t_start < timeout:
        jid = cluster.job_after(t0_ms)
        subtasks = cluster.running_subtasks(jid, **stage) if jid else []
        # fed its input, or running for a second (its metrics lag by up to a second)
        busy = [s for s in subtasks
                if s["metrics"].get("read-records", 0) > 0 or s.get("duration", 0) >= 1000]
        if busy:
            tm = busy[0]["taskmanager"]            # "tm1" / "tm2"
            name = tm if victim == "taskmanager" else "pool" + tm[2:]
            pids = [cluster.pid(name)]
            if victim == "pool":
                pids += cluster.worker_pids(name)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            print(f"killed {name} (pids {pids}) while {busy[0]['vertex'][:60]}... ran on {tm}")
            return jid, name, pids[0]
        time.sleep(0.2)
    pytest.fail(f"the stage {stage} never ran (job finished or {timeout}s passed)")


@pytest.mark.parametrize("victim", ["taskmanager", "pool"])
@pytest.mark.parametrize("command", ["run", "dedup"])
def test_fault_survived_byte_identical(flink_cluster, fault_inputs, clean_runs, command,
                                       victim):
    out, expected = clean_runs[command]
    flink_cluster.wait_ready()
    t0 = time.monotonic()
    t0_ms = int(time.time() * 1000)
    proc = submit(flink_cluster, command, fault_inputs[command], out)
    try:
        jid, name, old_pid = kill_during(flink_cluster, proc, t0_ms, STAGES[command], victim)
        t_kill = time.monotonic()
        finish(proc, out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    t_done = time.monotonic()
    failures = flink_cluster.exceptions(jid)
    back = flink_cluster.wait_ready()
    print(f"{command}, {name} killed at {t_kill - t0:.0f}s: job done {t_done - t_kill:.0f}s "
          f"later, {len(failures)} task failure(s) recovered; cluster whole again "
          f"{back:.0f}s after that")
    assert flink_cluster.rest(f"/jobs/{jid}")["state"] == "FINISHED"
    # the kill hit the job: Flink recorded a failure and restarted tasks
    assert failures, "no task failed: the kill did not touch the job"
    # the supervisor replaced the killed process
    assert flink_cluster.pid(name) != old_pid
    got = tree_digest(out)
    assert sorted(got) == sorted(expected), "files missing or extra after recovery"
    assert got == expected, [k for k in expected if got.get(k) != expected[k]]
    shutil.rmtree(out)
