"""The Python SDK worker pool that runs beside each Flink TaskManager (`--environment_type
EXTERNAL`).

    python -m beam_curator.worker_pool --port 50000 [--host 127.0.0.1] [--device cuda]

A TaskManager asks its pool (`--environment_config HOST:PORT`, resolved on the TaskManager)
to start an SDK worker for a job; the pool starts one process per request and the worker
connects back to the TaskManager's control endpoint. Beam's own
`apache_beam.runners.worker.worker_pool_main` does the same; this one differs where a
production cluster needs it to:

* Workers run with this interpreter (`sys.executable`), not whatever `python` is first on
  $PATH, so they import the same installed beam_curator as the pool.
* A worker does not depend on the pool once started: it lives as long as its TaskManager
  keeps its control stream open. A pool that crashes and is restarted by its supervisor
  costs the running job nothing (a worker killed with its pool, as a container's would be,
  is a lost SDK harness: Flink restarts the task; see README, Run on Flink).
* It answers StartWorker only once the worker has connected: Beam's TaskManager waits
  without a timeout for a worker it was told is starting, so a worker dying during its
  start-up must show as a failed StartWorker, which Flink retries, not as a silent hang.
* It listens on one address (default 127.0.0.1: only the TaskManager on this host may ask
  it to run code), and `--device cuda` refuses to start when no GPU is visible, instead of
  every worker falling back to the CPU hours into a job.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from typing import Dict, List, Optional

_LOGGER = logging.getLogger("beam_curator.worker_pool")
DEVICES = ("auto", "cpu", "cuda")
READY_FD_ENV = "BEAM_CURATOR_WORKER_READY_FD"   # pipe a worker writes "1" to once connected
WORKER_CONNECT_TIMEOUT_S = 120


class NoGpuError(RuntimeError):
    """--device cuda on a host where torch sees no CUDA device."""


def check_device(device: str) -> Dict[str, str]:
    """The environment the workers get for `device`; raises NoGpuError for a missing GPU."""
    if device == "cpu":
        # Hide any GPU: the model handler's --device auto then picks the CPU.
        return {"CUDA_VISIBLE_DEVICES": ""}
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise NoGpuError(
                "--device cuda: torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
                f"CUDA_VISIBLE_DEVICES={'unset' if visible is None else repr(visible)}). "
                "Install a CUDA build of torch and the NVIDIA driver on this TaskManager "
                "host, check CUDA_VISIBLE_DEVICES, or start the pool with --device cpu.")
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        _LOGGER.info("workers will see %d GPU(s): %s", len(names), ", ".join(names))
    return {}


# glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so after
# the first freed chunk of vectors every array comes from the malloc arenas, and what is
# freed there stays in the process. On Flink at 1M rows that was 250-450 MB of free arena
# memory in the largest SDK workers (mallinfo2), growing with the work a worker had done.
# Pinned at glibc's 128 KiB default, a block that large is its own mapping, returned to the
# OS when freed. A value already in the pool's environment wins.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


def worker_environment(worker_env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The pool's environment for its workers: `worker_env` over os.environ, with
    WORKER_MALLOC_ENV where the environment does not set it."""
    return dict(WORKER_MALLOC_ENV, **os.environ, **(worker_env or {}))


def worker_command(control_url: str, worker_id: str) -> List[str]:
    return [sys.executable, "-m", "beam_curator.worker_pool", "worker",
            "--control_endpoint", control_url, "--worker_id", worker_id]


class WorkerPool:
    """Beam's BeamFnExternalWorkerPool service: StartWorker / StopWorker.

    Workers are started by the thread that calls `serve_forever` (the main thread); the gRPC
    handler only queues the request and waits, so one place owns and reaps the processes."""

    def __init__(self, worker_env: Optional[Dict[str, str]] = None):
        self._env = worker_environment(worker_env)
        self._requests: "queue.Queue" = queue.Queue()
        self._workers: Dict[str, subprocess.Popen] = {}
        self._stopping = threading.Event()

    # -- gRPC handlers (any thread) --
    def StartWorker(self, request, context):
        """Reply only once the worker has connected to the TaskManager's control endpoint.

        Beam's TaskManager waits without a timeout for a worker it was told is starting:
        a worker that died during its start-up (a few seconds of imports) would hang the
        task forever. Replying after the connection turns that death into a failed
        StartWorker (or a broken control stream), which Flink's restart strategy handles."""
        from apache_beam.portability.api import beam_fn_api_pb2

        done: concurrent.futures.Future = concurrent.futures.Future()
        self._requests.put((request.control_endpoint.url, request.worker_id, done))
        try:
            proc, ready_fd = done.result(timeout=60)
        except Exception as e:   # noqa: BLE001 - the runner shows the error to the user
            return beam_fn_api_pb2.StartWorkerResponse(error=f"worker pool: {e!r}")
        try:
            readable, _, _ = select.select([ready_fd], [], [], WORKER_CONNECT_TIMEOUT_S)
            connected = bool(readable) and os.read(ready_fd, 1) == b"1"
        finally:
            os.close(ready_fd)
        if connected:
            return beam_fn_api_pb2.StartWorkerResponse()
        proc.kill()
        return beam_fn_api_pb2.StartWorkerResponse(
            error=f"worker pool: worker {request.worker_id} (pid {proc.pid}) did not connect "
                  f"to {request.control_endpoint.url} within {WORKER_CONNECT_TIMEOUT_S}s "
                  f"(exit status {proc.poll()})")

    def StopWorker(self, request, context):
        from apache_beam.portability.api import beam_fn_api_pb2

        proc = self._workers.pop(request.worker_id, None)
        if proc is not None:
            _LOGGER.info("stopping worker %s (pid %d)", request.worker_id, proc.pid)
            _terminate(proc)
        return beam_fn_api_pb2.StopWorkerResponse()

    # -- main thread --
    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                url, worker_id, done = self._requests.get(timeout=1.0)
            except queue.Empty:
                self._reap()
                continue
            ready_r, ready_w = os.pipe()
            try:
                env = dict(self._env, **{READY_FD_ENV: str(ready_w)})
                proc = subprocess.Popen(worker_command(url, worker_id), env=env,
                                        stdin=subprocess.DEVNULL, pass_fds=(ready_w,))
                self._workers[worker_id] = proc
                _LOGGER.info("started worker %s (pid %d) for %s", worker_id, proc.pid, url)
                done.set_result((proc, ready_r))
            except Exception as e:   # noqa: BLE001
                os.close(ready_r)
                done.set_exception(e)
            finally:
                os.close(ready_w)   # the worker holds the only write end: EOF if it dies
        for proc in list(self._workers.values()):
            _terminate(proc)

    def stop(self, *_):
        self._stopping.set()

    def _reap(self) -> None:
        for worker_id, proc in list(self._workers.items()):
            if proc.poll() is not None:
                _LOGGER.info("worker %s (pid %d) exited with %s", worker_id, proc.pid,
                             proc.returncode)
                self._workers.pop(worker_id, None)


def _terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve(host: str, port: int, worker_env: Dict[str, str]) -> None:
    import grpc
    from apache_beam.portability.api import beam_fn_api_pb2_grpc

    pool = WorkerPool(worker_env)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=32))
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
    address = f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"worker pool: cannot listen on {address}")
    server.start()
    signal.signal(signal.SIGTERM, pool.stop)
    signal.signal(signal.SIGINT, pool.stop)
    _LOGGER.info("worker pool listening on %s (pid %d, workers: %s)", address, os.getpid(),
                 sys.executable)
    try:
        pool.serve_forever()
    finally:
        server.stop(grace=2)


# Imported by every worker before it connects, in one thread. A worker serves all the stages
# of its job on its TaskManager (--environment_cache_millis, README: Run on Flink), several
# bundles at once (one per task slot), and each bundle unpickles its DoFns in its own thread:
# two threads importing beam_curator.transforms.semdedup's package and one of its modules
# at the same time failed a task with "ImportError: cannot import name ... from partially
# initialized module" (Python's import deadlock avoidance; seen on the cluster, the task
# retried). Imported first, they are only looked up. These import neither torch nor faiss
# (~1 s); the embedding stage imports torch when it needs it.
WORKER_PRELOAD = ("beam_curator.pipelines", "beam_curator.transforms.dedup",
                  "beam_curator.transforms.semdedup")


def preload_modules(names=WORKER_PRELOAD) -> None:
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:   # noqa: BLE001 - the bundle that needs it reports the error
            _LOGGER.warning("worker: could not preload %s", name, exc_info=True)


# A worker that serves a whole job keeps what each task left behind. Beam's Flink runner
# registers a new ProcessBundleDescriptor for every task (DefaultJobBundleFactory.prepare),
# and on batch runs one bundle with it; the Python SDK keeps every descriptor for good and
# each finished BundleProcessor, with its DoFns and whatever they hold, for 60-120 s
# (BundleProcessorCache, DEFAULT_BUNDLE_PROCESSOR_CACHE_SHUTDOWN_THRESHOLD_S). At 1M rows
# on 40 tasks a step that is thousands of tasks per worker, and the largest worker grew
# 675 -> 1,111 MB from 100k to 1M (BENCHMARKS.md, Flink, issue 30). Here a processor idle
# for WORKER_IDLE_PROCESSOR_S is shut down, and then its descriptor forgotten (the SDK asks
# the runner for it again should a bundle come back for it: streaming reuses them).
WORKER_IDLE_PROCESSOR_S = 5.0


def _forget_idle_descriptors(cache, idle_s: float) -> None:
    """Every idle_s: drop the descriptors whose processors the cache has shut down."""
    import time

    while True:
        time.sleep(idle_s)
        try:
            cutoff = time.time() - idle_s
            with cache._lock:
                busy = {d for d, _ in cache.active_bundle_processors.values()}
                busy |= {d for d, *_ in cache.processors_being_created.values()}
                for d, last in list(cache.last_access_times.items()):
                    if last < cutoff and d not in busy \
                            and not cache.cached_bundle_processors.get(d):
                        cache.last_access_times.pop(d, None)
                        cache.cached_bundle_processors.pop(d, None)
                        cache.fns.pop(d, None)
        except Exception:   # noqa: BLE001 - another Beam's internals: stop trimming
            _LOGGER.warning("worker: cannot trim Beam's bundle processor cache", exc_info=True)
            return


def run_worker(control_endpoint: str, worker_id: str) -> None:
    """One SDK worker: serves the TaskManager's control endpoint until it closes."""
    from apache_beam.runners.worker import sdk_worker
    from apache_beam.runners.worker.sdk_worker import SdkHarness

    preload_modules()
    # read by the cache's periodic shutdown thread, which SdkHarness() starts
    sdk_worker.DEFAULT_BUNDLE_PROCESSOR_CACHE_SHUTDOWN_THRESHOLD_S = WORKER_IDLE_PROCESSOR_S

    # Same settings as Beam's worker_pool_main: no state cache, default data buffering.
    # The constructor returns once the control channel is connected: tell the pool.
    harness = SdkHarness(control_endpoint, worker_id=worker_id, state_cache_size=0,
                         data_buffer_time_limit_ms=-1)
    cache = getattr(harness, "_bundle_processor_cache", None)
    if cache is not None:
        threading.Thread(target=_forget_idle_descriptors, args=(cache, WORKER_IDLE_PROCESSOR_S),
                         name="forget-idle-descriptors", daemon=True).start()
    ready_fd = os.environ.pop(READY_FD_ENV, None)
    if ready_fd is not None:
        try:
            os.write(int(ready_fd), b"1")
            os.close(int(ready_fd))
        except OSError:   # the pool is gone: serve the TaskManager all the same
            pass
    harness.run()


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s")
    if argv[:1] == ["worker"]:
        parser = argparse.ArgumentParser(prog="beam_curator.worker_pool worker")
        parser.add_argument("--control_endpoint", required=True)
        parser.add_argument("--worker_id", required=True)
        args = parser.parse_args(argv[1:])
        run_worker(args.control_endpoint, args.worker_id)
        return 0
    parser = argparse.ArgumentParser(prog="python -m beam_curator.worker_pool",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", "--service_port", type=int, required=True,
                        help="port of the pool service (Beam's spelling --service_port works)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: the TaskManager on "
                             "this host; the pool runs whatever code a caller sends)")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="cuda: refuse to start without a visible GPU; cpu: hide GPUs "
                             "from the workers; auto: leave the environment as it is")
    args = parser.parse_args(argv)
    try:
        env = check_device(args.device)
    except NoGpuError as e:
        print(f"beam_curator.worker_pool: {e}", file=sys.stderr)
        return 2
    serve(args.host, args.port, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
