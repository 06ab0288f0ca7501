"""beam_curator.worker_pool, the SDK worker pool beside each Flink TaskManager: refuses
--device cuda without a GPU, and never leaves a TaskManager waiting for a worker that died
while starting (Beam's TaskManager would wait for it forever)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from beam_curator.worker_pool import WORKER_MALLOC_ENV, check_device, worker_environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_device_cuda_refused_clearly_without_gpu():
    port = free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")   # no GPU visible, on any machine
    proc = subprocess.run([sys.executable, "-m", "beam_curator.worker_pool", "--port", str(port),
                           "--device", "cuda"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--device cuda: torch sees no CUDA device" in proc.stderr
    assert "CUDA_VISIBLE_DEVICES=''" in proc.stderr
    assert "--device cpu" in proc.stderr   # says what to do instead
    with socket.socket() as s:             # and it never listened
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_device_cpu_hides_gpus_from_workers():
    assert check_device("cpu") == {"CUDA_VISIBLE_DEVICES": ""}
    assert check_device("auto") == {}


# Frees a 16 MiB block (glibc then raises its mmap threshold to 16 MiB), then allocates and
# frees 100 arrays of 2 MiB with small live arrays between them, as a worker's chunks and
# elements are: prints the MiB of RSS that the freed arrays left in the process.
_RETENTION_PROBE = """
import numpy as np
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) >> 10
big = np.ones(4 << 20, np.float32); del big
base = rss()
arrays, alive = [], []
for _ in range(100):
    arrays.append(np.ones(1 << 19, np.float32))
    alive.append(np.ones(1024, np.float32))
del arrays
print(rss() - base)
"""


def _retained_mib(env) -> int:
    out = subprocess.run([sys.executable, "-c", _RETENTION_PROBE], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc, /proc")
def test_workers_return_freed_arrays_to_the_os(monkeypatch):
    """The pool pins glibc's mmap threshold for its workers: 200 MiB of freed arrays leave
    the process instead of staying in its malloc arenas (as they do without the pin)."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    env = worker_environment()
    assert env["MALLOC_MMAP_THRESHOLD_"] == WORKER_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert _retained_mib(env) < 50
    without_pin = {k: v for k, v in env.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    assert _retained_mib(without_pin) > 150    # the probe shows the problem it fixes


def test_worker_malloc_setting_yields_to_the_environment(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    env = worker_environment({"CUDA_VISIBLE_DEVICES": ""})
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536" and env["CUDA_VISIBLE_DEVICES"] == ""


def _children(pid: int) -> list:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_worker_dying_before_it_connects_fails_start_worker(tmp_path):
    """A worker killed during start-up turns into a StartWorker error, not a reply that the
    TaskManager would follow by waiting forever for a connection."""
    import grpc
    from apache_beam.portability.api import (
        beam_fn_api_pb2,
        beam_fn_api_pb2_grpc,
        endpoints_pb2,
    )

    port = free_port()
    # a "control endpoint" that accepts TCP but never speaks gRPC: the worker stays in start-up
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    pool = subprocess.Popen([sys.executable, "-m", "beam_curator.worker_pool",
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "pool.log", "w"))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(channel)
        request = beam_fn_api_pb2.StartWorkerRequest(
            worker_id="w1", control_endpoint=endpoints_pb2.ApiServiceDescriptor(
                url=f"127.0.0.1:{silent.getsockname()[1]}"))
        result = {}
        call = threading.Thread(target=lambda: result.update(r=stub.StartWorker(request)))
        call.start()
        deadline = time.monotonic() + 60
        while not _children(pool.pid):
            assert time.monotonic() < deadline, "the pool started no worker"
            time.sleep(0.1)
        time.sleep(0.5)
        assert call.is_alive(), "StartWorker replied before the worker connected"
        for worker in _children(pool.pid):
            os.kill(worker, signal.SIGKILL)
        call.join(timeout=30)
        assert not call.is_alive(), "StartWorker still waits for a dead worker"
        assert "did not connect" in result["r"].error
        channel.close()
    finally:
        pool.terminate()
        pool.wait(timeout=30)
        silent.close()
