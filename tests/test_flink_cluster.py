"""The production-shaped Flink cluster (scripts/flink_cluster.sh): two TaskManagers, each with
its own SDK worker pool reached by one --environment_config, the README's Flink commands run
exactly as written, and the field's filters (DataComp's basic ones, the CLIP score's
keep-top-fraction) deciding on the cluster what they decide on FnApiRunner."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flink_support import REPO_ROOT, fetch_flink, find_free_port, free_port_pair

pytestmark = [pytest.mark.flink, pytest.mark.timeout(900)]


def _hosts_file_of(pid: int) -> Path:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    opts = [a.decode() for a in cmdline if a.startswith(b"-Djdk.net.hosts.file=")]
    assert len(opts) == 1, cmdline
    return Path(opts[0].split("=", 1)[1])


def test_each_taskmanager_has_its_own_pool(flink_cluster, reap_flink_job_servers):
    """Two TaskManagers registered; each JVM resolves the one pool name to its own pool's
    address, where a live pool listens; a job's workers come from both pools."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    flink_cluster.wait_ready()
    assert flink_cluster.rest("/overview")["taskmanagers"] == 2
    name, port = flink_cluster.environment_config.split(":")
    addresses = []
    for i in (1, 2):
        hosts = _hosts_file_of(flink_cluster.pid(f"tm{i}")).read_text().split("\n")
        mapped = [line.split()[0] for line in hosts if line.split()[1:] == [name]]
        assert len(mapped) == 1
        addresses.append(mapped[0])
        pool_cmd = Path(f"/proc/{flink_cluster.pid(f'pool{i}')}/cmdline").read_bytes()
        assert b"beam_curator.worker_pool" in pool_cmd
        assert f"--host\0{mapped[0]}\0--port\0{port}".encode() in pool_cmd
    assert addresses[0] != addresses[1]

    def started(i):
        log = flink_cluster.run_dir / "log" / f"pool{i}.out"
        return len(re.findall(r"started worker", log.read_text(errors="replace")))

    before = [started(1), started(2)]
    with beam.Pipeline(options=PipelineOptions(flink_cluster.pipeline_args(parallelism=2))) as p:
        _ = (p | beam.Create(list(range(100))) | beam.Reshuffle() | beam.Map(lambda x: x * x))
    after = [started(1), started(2)]
    assert after[0] > before[0] and after[1] > before[1], (before, after)


def readme_flink_block() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("### A cluster shaped like production"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_flink_commands_as_written(tmp_path, tiny_model_dir):
    """The README's block, verbatim, in a directory laid out like a checkout after `make demo`
    (only the ports and run dir move, through the scripts' own environment variables, so a
    cluster someone already runs on the defaults is left alone)."""
    from beam_curator.synthetic import make_dataset

    facts = fetch_flink()
    block = readme_flink_block()
    assert "make flink-up" in block and "--environment_type EXTERNAL" in block
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("Makefile", "scripts", "pyproject.toml", "setup.py"):
        os.symlink(REPO_ROOT / name, work / name)
    venv = Path(sys.executable).parent.parent
    os.symlink(venv, work / ".venv")
    # what `make demo` leaves: demo-models/ and demo-data/ (smaller than make demo's 300)
    shutil.copytree(tiny_model_dir, work / "demo-models")
    make_dataset(str(work / "demo-data"), n_shards=2, per_shard=12, seed=5, n_exact=1, n_near=1)

    rest, rpc, pool, job = find_free_port(), find_free_port(), find_free_port(), free_port_pair()
    script = (block.replace("localhost:18081", f"localhost:{rest}")
                   .replace("beam-worker-pool:18099", f"beam-worker-pool:{pool}")
                   .replace("localhost:18097", f"localhost:{job}")
                   .replace("~/.cache/beam-curator/flink", facts["FLINK_CACHE_DIR"]))
    env = dict(os.environ,
               PATH=f"{venv / 'bin'}:{os.environ['PATH']}", VIRTUAL_ENV=str(venv),
               BEAM_CURATOR_FLINK_RUN_DIR=str(tmp_path / "run"),
               BEAM_CURATOR_FLINK_REST_PORT=str(rest), BEAM_CURATOR_FLINK_RPC_PORT=str(rpc),
               BEAM_CURATOR_FLINK_POOL_PORT=str(pool), BEAM_CURATOR_FLINK_JOB_PORT=str(job))
    env.pop("BEAM_CURATOR_FLINK_MASTER", None)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                          capture_output=True, text=True, timeout=800)
    secs = time.monotonic() - t0
    logs = ""
    if proc.returncode != 0:
        subprocess.run(["bash", "scripts/flink_cluster.sh", "down"], cwd=work, env=env,
                       capture_output=True, timeout=180)
        logs = "\n".join(f"== {f}\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted((tmp_path / "run" / "log").glob("*")))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n{logs}"
    print(f"README Flink commands: {secs:.0f}s")
    summary = json.loads((work / "out-flink" / "summary.json").read_text())
    assert summary["accounting"]["ok"] and summary["counts"]["kept"] > 0
    curated = {p.name for p in (work / "out-flink" / "curated").glob("*.tar")}
    assert curated and curated <= {"00000.tar", "00001.tar"}
    # both TaskManagers' pools served the job, and flink-down left nothing running
    for i in (1, 2):
        assert "started worker" in (tmp_path / "run" / "log" / f"pool{i}.out").read_text()
    status = subprocess.run(["bash", "scripts/flink_cluster.sh", "status"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 3 and "pids:    none" in status.stdout, status.stdout


@pytest.mark.timeout(1200)   # the cluster's start (first test of a session) counts too
def test_field_filters_on_the_cluster_match_fnapi_runner(flink_cluster, tmp_path,
                                                         tiny_model_dir):
    """`run` with --min_caption_words, --caption_languages en, --min_image_side,
    --max_aspect_ratio and --clip_score_keep_fraction, submitted to the cluster as a user does
    (EXTERNAL workers, parallelism 2), gives every sample the status and clip_score that
    FnApiRunner gives it, and the same keep-fraction threshold (a global combiner over both
    TaskManagers' scores, read as a side input)."""
    import pyarrow.parquet as pq
    from test_report_clip_score import write_captioned_shards

    from beam_curator import cli

    write_captioned_shards(tmp_path / "data")
    args = ["run", "--input", str(tmp_path / "data" / "*.tar"), "--model_dir", tiny_model_dir,
            "--min_caption_words", "2", "--caption_languages", "en", "--min_image_side", "32",
            "--max_aspect_ratio", "3", "--clip_score_keep_fraction", "0.5",
            "--aesthetic_threshold", "none", "--n_clusters", "2",
            "--write_report", "false", "--progress_interval", "0"]
    local = tmp_path / "fnapi"
    t0 = time.monotonic()
    expected = cli.run_pipeline(args[0], args[1:] + ["--output", str(local),
                                                     "--runner", "FnApiRunner"])
    t_local = time.monotonic() - t0

    flink_cluster.wait_ready()
    on_flink = tmp_path / "flink"
    log = tmp_path / "flink.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        # its own process group: a hang is killed with the job server it started
        proc = subprocess.Popen([sys.executable, "-m", "beam_curator", *args, "--output",
                                 str(on_flink), *flink_cluster.pipeline_args(parallelism=2)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=720)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    t_flink = time.monotonic() - t0
    assert rc == 0, log.read_text(errors="replace")[-6000:]
    print(f"field filters: FnApiRunner {t_local:.0f}s, Flink session cluster {t_flink:.0f}s")

    got = json.loads((on_flink / "summary.json").read_text())
    assert got["accounting"]["ok"] and expected["accounting"]["ok"]
    assert got["counts"] == expected["counts"]
    for status in ("filtered_caption_length", "filtered_caption_language",
                   "filtered_image_size", "filtered_aspect_ratio", "filtered_clip_score",
                   "kept"):
        assert got["counts"][status] > 0, status   # the data exercises every filter
    assert got["clip_score"] == expected["clip_score"]     # threshold, scored, passed, exact
    assert got["clip_score"]["exact"] and got["clip_score"]["scored"] == 16

    def rows(out):
        table = pq.read_table(out / "samples",
                              columns=["id", "status", "reason", "clip_score"]).to_pylist()
        return {r["id"]: (r["status"], r["reason"], r["clip_score"]) for r in table}

    assert rows(on_flink) == rows(local)
    threshold = got["clip_score"]["threshold"]
    for status, _, score in rows(on_flink).values():
        if score is not None and status in ("kept", "filtered_clip_score"):
            assert (status == "kept") == (score >= threshold)
