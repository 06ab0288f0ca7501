"""Where the dedup math runs: numpy on the CPU (the reference), or torch on a device.

Every dedup function that does dense math (`train_kmeans`, the assignment functions,
`partial_max`, `max_sim_to_earlier`, `semdedup_cluster`) takes two optional keywords:

* `device`: None or "cpu" (the default: the CPU), "auto" (a CUDA GPU when one is visible,
  else the CPU, said once in the log at INFO; a Linux box without GPU device files is
  answered without importing torch), "cuda" or "cuda:N" (a GPU; when none is
  visible the CPU is used and a WARNING says so once -- the same rule as `--device` for
  embedding, so a GPU job that lands on a CPU worker still finishes);
* `backend`: None (chosen by the device: torch on a GPU, numpy on the CPU), "numpy" (CPU
  only), or "torch" (on any device; "torch" on the CPU is how the tests run the GPU code
  without a GPU). k-means has its own pair, "faiss" and "torch" (`kmeans.train_kmeans`).

Both backends make the same decisions: the torch code shortlists with fast float32 (or TF32)
matrix products and re-scores every candidate that could be the answer exactly, in float64,
with the numpy path's rounding and tie rules (`dedup.shortlist`).
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import sys
from functools import lru_cache
from typing import Optional

from beam_curator.defaults import DEVICES

_LOG = logging.getLogger(__name__)

NUMPY = "numpy"
TORCH = "torch"
FAISS = "faiss"
# DEVICES (auto, cpu, cuda; plus "cuda:N" here) is beam_curator.defaults'.


@dataclasses.dataclass(frozen=True)
class Backend:
    """A resolved choice: `name` is numpy or torch, `device` a torch device string."""

    name: str
    device: str

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


def check_device(device: Optional[str]) -> str:
    """Validate a requested device; None means the CPU."""
    if device is None:
        return "cpu"
    if not isinstance(device, str) or not (device in DEVICES or _is_indexed_cuda(device)):
        raise ValueError(f"device must be one of auto, cpu, cuda or cuda:N; got {device!r}")
    return device


def _is_indexed_cuda(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def _no_gpu_device_files() -> bool:
    """True on a Linux box with no NVIDIA (or ROCm, or WSL) device files: there torch cannot
    see a GPU, and asking it would cost its import (~4 s) in every worker process."""
    if not sys.platform.startswith("linux"):
        return False
    return not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")
                or os.path.exists("/dev/dxg"))


@lru_cache(maxsize=1)   # once per process: each torch.cuda.is_available() on a box without a
def cuda_visible() -> bool:   # GPU costs ~14 ms, and DoFns resolve the device per element
    if _no_gpu_device_files():
        return False
    try:
        import torch
    except ImportError:   # numpy-only environments: no GPU path at all
        return False
    return bool(torch.cuda.is_available())


def resolve_device(device: Optional[str]) -> str:
    """'auto' | 'cpu' | 'cuda[:N]' | None -> the torch device string the math runs on."""
    device = check_device(device)
    if device == "cpu":
        return "cpu"
    if cuda_visible():
        return "cuda" if device == "auto" else device
    _log_no_gpu(device)
    return "cpu"


@lru_cache(maxsize=None)   # once per process and request: a DoFn calls this per element
def _log_no_gpu(requested: str) -> None:
    if requested == "auto":
        _LOG.info("dedup: no CUDA device visible; k-means, assignment and pairwise run on "
                  "the CPU")
    else:
        _LOG.warning("dedup: device %r was asked for but no CUDA device is visible; running "
                     "on the CPU instead", requested)


def resolve(device: Optional[str] = None, backend: Optional[str] = None) -> Backend:
    """The backend and device for assignment and pairwise (see the module docstring)."""
    resolved = resolve_device(device)
    if backend is None:
        return Backend(TORCH if resolved != "cpu" else NUMPY, resolved)
    if backend == NUMPY:
        if resolved != "cpu":
            raise ValueError(f"backend 'numpy' runs on the CPU only, not on {resolved!r}; "
                             f"use backend 'torch' (or None) for a GPU")
        return Backend(NUMPY, "cpu")
    if backend == TORCH:
        return Backend(TORCH, resolved)
    raise ValueError(f"backend must be None, 'numpy' or 'torch'; got {backend!r}")
