"""`dedup` of N and 10N embeddings on a Flink session cluster: flat memory, linear time.

Starts the production-shaped session cluster of scripts/flink_cluster.sh (a JobManager, two
TaskManagers, each with its own Python SDK worker pool, EXTERNAL environment) on its own
ports, then for N and scale x N synthetic 768-d embeddings (rows per cluster held constant,
k = n / rows; rows per Flink task held constant, --parallelism = n / --rows-per-task) runs
`python -m beam_curator dedup` on it and on the local FnApiRunner, and prints, N beside
scale x N:

* wall time of the Flink job (goal: <= 1.1 x scale),
* peak RSS (VmHWM from /proc, sampled every 0.2 s) of every Python SDK worker process and of
  each TaskManager JVM (goal: flat, <= 1.3x),
* Flink's time over FnApiRunner's on the same data, and how many SDK workers the pools
  started (their "started worker" log lines: one per TaskManager when workers are reused
  across stages, one per stage per TaskManager when not; issue 30),
* whether the Flink duplicates equal FnApiRunner's,
* each TaskManager's peak heap (used, committed), managed, direct and non-heap memory, from
  Flink's metrics: what its RSS is made of,
* which Flink vertices (fused stages) were running when the largest SDK workers reached their
  peaks (from the JobManager's REST API): where the memory goes.

    python bench/flink_scale.py --n 100000 --scale 10
    python bench/flink_scale.py --n 1000000 --single     # one size: attribute its memory
    BEAM_CURATOR_FLINK_BEAM_LIB=0 python bench/flink_scale.py ...   # a stock cluster: Beam's
                                   # classes shipped with each job, workers not reused
    python bench/flink_scale.py --job-server per-job ...   # no --job_endpoint: FlinkRunner
                                   # starts a job server for every job

    python bench/flink_scale.py --transport shuffle ...   # vectors through Flink's shuffle
    python bench/flink_scale.py --live-heap ...   # + each TaskManager's live heap (slower)

Jobs go through the cluster's running job server (--job_endpoint) unless --job-server per-job.
Vectors reach the pairwise step through dedup/_staging (--transport staged, the default: the
TaskManagers share this machine's disk as a cluster's share an NFS mount) or through Flink's
shuffle (--transport shuffle: what a cluster without a shared --output must use).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.sampling import BackgroundSampler  # noqa: E402 - importable once REPO is on the path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _vm_hwm(pid: int) -> int:
    """Peak resident set of a process in bytes (the kernel's high-water mark)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(c) for c in handle.read().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


# What a TaskManager's memory holds, from Flink's own metrics (one cheap REST call per TM).
TM_METRICS = {"heap_used": "Status.JVM.Memory.Heap.Used",
              "heap_committed": "Status.JVM.Memory.Heap.Committed",
              "managed_used": "Status.Flink.Memory.Managed.Used",
              "direct_used": "Status.JVM.Memory.Direct.MemoryUsed",
              "non_heap_used": "Status.JVM.Memory.NonHeap.Used"}


class PeakRss(BackgroundSampler):
    """Samples VmHWM of the TaskManagers and of every SDK worker under the pools, and each
    TaskManager's Flink memory metrics (REST, every 1 s) when `master` is given."""

    def __init__(self, run_dir: str, master: str = ""):
        self._run_dir = run_dir
        self._master = master
        self.tm_metrics = {}   # TaskManager id -> {TM_METRICS key: peak bytes}
        self.tm, self.workers = {}, {}
        self.peak_at = {}   # worker pid -> wall time (s) its high-water mark last rose
        super().__init__()

    def _pids(self, pattern: str) -> list:
        pids = []
        for path in glob.glob(os.path.join(self._run_dir, "pids", pattern)):
            try:
                pids.append(int(open(path).read().strip()))
            except (OSError, ValueError):
                pass
        return pids

    def _sample_metrics(self):
        try:
            for tm in _rest(self._master, "/taskmanagers")["taskmanagers"]:
                got = _rest(self._master, f"/taskmanagers/{tm['id']}/metrics?get="
                            + ",".join(TM_METRICS.values()))
                values = {m["id"]: int(float(m["value"])) for m in got}
                peak = self.tm_metrics.setdefault(tm["id"], dict.fromkeys(TM_METRICS, 0))
                for key, metric in TM_METRICS.items():
                    peak[key] = max(peak[key], values.get(metric, 0))
        except (OSError, ValueError, KeyError):
            pass   # a missed sample; RSS is still sampled

    def _loop(self):
        tick = 0
        while not self._stop.wait(0.2):
            tick += 1
            if self._master and tick % 5 == 0:
                self._sample_metrics()
            for pid in self._pids("tm[0-9].pid"):   # not tm<i>.supervisor.pid
                self.tm[pid] = max(self.tm.get(pid, 0), _vm_hwm(pid))
            for pool in self._pids("pool[0-9].pid"):
                for worker in _descendants(pool):
                    hwm = _vm_hwm(worker)
                    if hwm > self.workers.get(worker, 0):
                        self.workers[worker] = hwm
                        self.peak_at[worker] = time.time()


class LiveHeap(BackgroundSampler):
    """With --live-heap: every 4 s, a full GC of each TaskManager (`jcmd GC.run`) and its heap
    used right after (`GC.heap_info`): the peak of what is live, where RSS and Flink's
    heap_used metric also count garbage not yet collected. The forced GCs slow the job."""

    _USED = re.compile(r"total (\d+)K, used (\d+)K")

    def __init__(self, run_dir: str):
        self._run_dir = run_dir
        self.peaks = {}   # TaskManager pid -> (live MB, committed MB) at the live peak
        super().__init__()

    def _sample(self, pid: int):
        subprocess.run(["jcmd", str(pid), "GC.run"], capture_output=True, timeout=60)
        info = subprocess.run(["jcmd", str(pid), "GC.heap_info"], capture_output=True,
                              text=True, timeout=60).stdout
        found = self._USED.search(info)
        if found:
            got = (int(found.group(2)) // 1024, int(found.group(1)) // 1024)
            self.peaks[pid] = max(self.peaks.get(pid, (0, 0)), got)

    def _loop(self):
        while not self._stop.wait(4.0):
            for path in glob.glob(os.path.join(self._run_dir, "pids", "tm[0-9].pid")):
                try:
                    self._sample(int(open(path).read().strip()))
                except (OSError, ValueError, subprocess.SubprocessError):
                    pass   # a missed sample


def _duplicates(out: str) -> list:
    import pyarrow.parquet as pq

    return sorted(pq.ParquetDataset(os.path.join(out, "dedup", "duplicates")).read()
                  .column("id").to_pylist())


def _rest(master: str, path: str):
    with urllib.request.urlopen(f"http://{master}{path}", timeout=10) as response:
        return json.loads(response.read())


def _last_job(master: str) -> dict:
    jobs = sorted(_rest(master, "/jobs/overview")["jobs"], key=lambda j: j["start-time"])
    return _rest(master, f"/jobs/{jobs[-1]['jid']}")


def _job_vertices(job: dict) -> list:
    """(name, start s, end s) of every vertex of a job (REST /jobs/<id>)."""
    now = time.time()
    return [(v["name"], v["start-time"] / 1000,
             v["end-time"] / 1000 if v["end-time"] > 0 else now) for v in job["vertices"]]


def _short(vertex_name: str) -> str:
    """Flink's vertex names list every fused Beam transform; keep the step names."""
    return " ".join(vertex_name.split())[:160]


def _where_peaks_were(rss: PeakRss, vertices: list, top: int = 3) -> list:
    """The largest SDK workers and the vertices running when each reached its peak."""
    out = []
    for pid, peak in sorted(rss.workers.items(), key=lambda kv: -kv[1])[:top]:
        at = rss.peak_at.get(pid, 0)
        out.append({"peak_rss_mb": round(peak / 2**20),
                    "running": [_short(n) for n, start, end in vertices
                                if start - 1 <= at <= end + 1]})
    return out


JOB_TIMEOUT_S = 3600   # a hung job (e.g. a TaskManager out of heap) ends the bench


def _dedup(data: str, out: str, k: int, extra: list) -> float:
    started = time.perf_counter()
    with open(out + ".log", "w") as log:   # the job server is chatty on stderr
        proc = subprocess.run(
            [sys.executable, "-m", "beam_curator", "dedup", "--embeddings",
             os.path.join(data, "*.parquet"), "--output", out, "--n_clusters", str(k),
             "--kmeans_iterations", "10", "--progress_interval", "0", *extra],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=JOB_TIMEOUT_S)
    if proc.returncode:
        raise SystemExit(open(out + ".log").read()[-5000:])
    return time.perf_counter() - started


def _worker_starts(run_dir: str) -> int:
    """SDK workers the pools have started so far ("started worker" lines of their logs)."""
    count = 0
    for path in glob.glob(os.path.join(run_dir, "log", "pool*.out")):
        with open(path, errors="replace") as handle:
            count += sum("started worker" in line for line in handle)
    return count


def measure(n: int, args, cluster: dict, work: str) -> dict:
    from bench.dedup import write_parquet
    from bench.synthetic import make_planted_embeddings

    data = os.path.join(work, f"emb-{n}")
    ids, vectors, _ = make_planted_embeddings(n, args.d, n // 100, args.seed,
                                              n_centers=max(1, n // args.rows_per_cluster))
    write_parquet(data, ids, vectors, rows_per_file=10_000)
    del vectors, ids
    k = max(1, n // args.rows_per_cluster)
    tasks = max(4, math.ceil(n / args.rows_per_task))
    extra = (["--pairwise_block_size", str(args.pairwise_block_size)]
             if args.pairwise_block_size else [])
    local_s = _dedup(data, os.path.join(work, f"local-{n}"), k,
                     ["--runner", "FnApiRunner", *extra])
    flink_out = os.path.join(work, f"flink-{n}")
    starts_before = _worker_starts(cluster["run_dir"])
    live = LiveHeap(cluster["run_dir"])
    with PeakRss(cluster["run_dir"], master=cluster["master"]) as rss, \
            (live if args.live_heap else contextlib.nullcontext()):
        flink_s = _dedup(data, flink_out, k,
                         cluster["args"] + [f"--parallelism={tasks}"] + extra
                         + list(args.flink_arg))
    starts = _worker_starts(cluster["run_dir"]) - starts_before
    try:
        job = _last_job(cluster["master"])
        peaks = _where_peaks_were(rss, _job_vertices(job))
        # what the JobManager scheduled: vertices (fused stages, sources, shuffles) and
        # their tasks (one per --parallelism each, run even when it gets no data)
        shape = {"vertices": len(job["vertices"]),
                 "tasks": sum(v["parallelism"] for v in job["vertices"]),
                 "job_s": round((job["end-time"] - job["start-time"]) / 1000, 1)}
    except OSError as exc:   # the numbers above stand without it
        peaks = shape = f"REST API not reachable: {exc}"
    same = _duplicates(flink_out) == _duplicates(os.path.join(work, f"local-{n}"))
    with open(os.path.join(flink_out, "summary.json")) as handle:
        info = json.load(handle)["dedup"]
    shutil.rmtree(data, ignore_errors=True)
    return {"n": n, "k": k, "flink_parallelism": tasks,
            "flink_s": round(flink_s, 1), "fnapi_s": round(local_s, 1),
            "flink_over_fnapi": round(flink_s / local_s, 2),
            "sdk_worker_starts": starts,   # the pools' "started worker" log lines
            "flink_job": shape,
            "sdk_workers": len(rss.workers),   # processes seen under the pools
            "peak_rss_sdk_worker_mb": round(max(rss.workers.values(), default=0) / 2**20),
            "peak_rss_taskmanagers_mb": sorted(round(v / 2**20) for v in rss.tm.values()),
            "same_duplicates_as_fnapi": same, "n_duplicates": len(_duplicates(flink_out)),
            "largest_cluster": info.get("largest_cluster"),
            "pairwise_block_size": info.get("pairwise_block_size"),
            "clusters_split_into_blocks": info.get("clusters_split_into_blocks"),
            "taskmanager_live_heap_peak_mb": (sorted(live.peaks.values()) if args.live_heap
                                              else "not sampled (--live-heap)"),
            "taskmanager_memory_peak_mb": [
                {key: round(v / 2**20) for key, v in peaks_of_tm.items()}
                for _, peaks_of_tm in sorted(rss.tm_metrics.items())],
            "largest_sdk_workers": peaks}


def warm_up(cluster: dict, work: str, n: int = 20_000) -> None:
    """One small untimed dedup first: a session cluster runs job after job, and only the
    first after it starts pays the JVMs' class loading and JIT and the first worker starts
    (71 s against 39 s for the same 100k job, BENCHMARKS.md)."""
    from bench.dedup import write_parquet
    from bench.synthetic import make_planted_embeddings

    data = os.path.join(work, "emb-warm-up")
    ids, vectors, _ = make_planted_embeddings(n, 768, n // 100, 1, n_centers=n // 2000)
    write_parquet(data, ids, vectors, rows_per_file=10_000)
    _dedup(data, os.path.join(work, "flink-warm-up"), n // 2000,
           cluster["args"] + ["--parallelism=4"])
    shutil.rmtree(data, ignore_errors=True)


def start_cluster(work: str, job_server: str, transport: str) -> dict:
    from tests.flink_support import fetch_flink, free_port_pair

    run_dir = os.path.join(work, "flink-run")
    env = dict(os.environ, BEAM_CURATOR_FLINK_RUN_DIR=run_dir,
               BEAM_CURATOR_FLINK_REST_PORT=str(_free_port()),
               BEAM_CURATOR_FLINK_RPC_PORT=str(_free_port()),
               BEAM_CURATOR_FLINK_POOL_PORT=str(_free_port()),
               BEAM_CURATOR_FLINK_JOB_PORT=str(free_port_pair()))
    up = subprocess.run(["bash", "scripts/flink_cluster.sh", "up"], cwd=REPO, env=env,
                        check=True, capture_output=True, text=True)
    master = up.stdout.strip().splitlines()[-1]
    facts = fetch_flink()
    args = ["--runner", "FlinkRunner", f"--flink_master={master}",
            f"--flink_version={facts['BEAM_FLINK_VERSION']}",
            f"--flink_job_server_jar={facts['BEAM_FLINK_JOB_SERVER_JAR']}",
            "--environment_type=EXTERNAL",
            f"--environment_config=beam-worker-pool:{env['BEAM_CURATOR_FLINK_POOL_PORT']}",
            "--dedup_vector_transport", transport]
    if job_server == "cluster":
        args.append(f"--job_endpoint=localhost:{env['BEAM_CURATOR_FLINK_JOB_PORT']}")
    if facts.get("BEAM_FLINK_NO_JAR_STAGING") and \
            env.get("BEAM_CURATOR_FLINK_BEAM_LIB", "1") == "1":
        # the cluster has Beam's runner in its lib/: submit without the job server's jars
        args.append("--pipeline_resources_detector_factory_class="
                    + facts["BEAM_FLINK_NO_JAR_STAGING"])
    return {"run_dir": run_dir, "env": env, "args": args, "master": master}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--rows-per-cluster", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    ap.add_argument("--single", action="store_true", help="run N only (memory attribution)")
    ap.add_argument("--rows-per-task", type=int, default=25_000,
                    help="Flink --parallelism = ceil(n / this), at least 4: the rows one task "
                         "(one SDK bundle) holds, constant across sizes like the rows per "
                         "cluster; the 4 slots run extra tasks in waves")
    ap.add_argument("--pairwise-block-size", type=int, default=None,
                    help="--pairwise_block_size for both runs (default: the product's); "
                         "below the largest cluster of both sizes, every key is bounded "
                         "by it at N and 10N alike")
    ap.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                    help="measure the first job after the cluster starts (JVMs cold)")
    ap.add_argument("--job-server", choices=["cluster", "per-job"], default="cluster",
                    help="submit through the cluster's running job server (default), or let "
                         "FlinkRunner start one for every job (no --job_endpoint)")
    ap.add_argument("--transport", choices=["staged", "shuffle"], default="staged",
                    help="--dedup_vector_transport of the Flink runs (FnApiRunner's: auto, "
                         "i.e. staged)")
    ap.add_argument("--live-heap", action="store_true",
                    help="also sample each TaskManager's live heap (a forced full GC every "
                         "4 s: slows the Flink job; its time is then not comparable)")
    ap.add_argument("--flink-arg", action="append", default=[],
                    help="one more pipeline option for the Flink runs only (repeatable), "
                         "e.g. --flink-arg=--environment_cache_millis=0")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-flink-scale-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # still stop the cluster
    cluster = None
    try:
        cluster = start_cluster(work, args.job_server, args.transport)
        if args.warm_up:
            warm_up(cluster, work)
        small = measure(args.n, args, cluster, work)
        print(json.dumps({"small": small}, indent=1), flush=True)   # kept if the big run fails
        if args.single:
            return
        big = measure(args.n * args.scale, args, cluster, work)
        report = {"benchmark": "flink_scale", "small": small, "big": big,
                  "time_ratio": round(big["flink_s"] / small["flink_s"], 2),
                  "cluster_beam_lib": cluster["env"].get("BEAM_CURATOR_FLINK_BEAM_LIB", "1"),
                  "warmed_up": args.warm_up, "job_server": args.job_server,
                  "transport": args.transport,
                  "sdk_worker_rss_ratio": round(big["peak_rss_sdk_worker_mb"]
                                                / max(1, small["peak_rss_sdk_worker_mb"]), 2),
                  "taskmanager_rss_ratio": round(max(big["peak_rss_taskmanagers_mb"])
                                                 / max(1, max(small["peak_rss_taskmanagers_mb"])),
                                                 2)}
        print(json.dumps(report, indent=1))
    finally:
        if cluster is not None:
            subprocess.run(["bash", "scripts/flink_cluster.sh", "down"], cwd=REPO,
                           env=cluster["env"], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
