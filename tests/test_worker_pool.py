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

from beam_curator.worker_pool import check_device


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
