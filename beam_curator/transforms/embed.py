"""Embed: Beam RunInference with our open_clip ModelHandler, keyed by the sample info.

RunInference does the batching (min/max batch size are options); the handler loads the model
once per worker (or once per machine with --large_model), picks CUDA when asked and available
and falls back to CPU with a log line, runs bf16 (or fp16) weights on GPU, normalises the uint8
pixels on the device, and returns L2-normalised float32 embeddings.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import (KeyedModelHandler, ModelHandler, PredictionResult,
                                           RunInference)

_LOG = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """'auto' | 'cpu' | 'cuda' -> the device to use; CUDA missing means CPU, said in the log."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        _LOG.warning("--device cuda was asked for but no CUDA device is visible: using the CPU.")
    else:
        _LOG.info("No CUDA device visible: embedding on the CPU.")
    return "cpu"


def resolve_precision(requested: str, device: str):
    """The dtype the weights run in on GPU (None = fp32; always fp32 on the CPU).

    The weights themselves are cast, not autocast: measured on an H100 with ViT-L/14, bf16
    weights ran 1.4x faster than fp32 weights under bf16 autocast (BENCHMARKS.md).
    """
    import torch

    if device != "cuda" or requested == "fp32":
        return None
    if requested == "fp16":
        return torch.float16
    return torch.bfloat16   # 'auto' and 'bf16'


class LoadedClipModel:
    """What the handler hands to run_inference: the model and how to feed it."""

    def __init__(self, model, device: str, dtype=None, mean=(0.0, 0.0, 0.0),
                 std=(1.0, 1.0, 1.0)):
        self.model = model
        self.device = device
        self.dtype = dtype          # None: fp32
        self.mean = mean            # open_clip's Normalize, applied on the device
        self.std = std


def embed_batch(loaded: LoadedClipModel, batch) -> np.ndarray:
    """(n, 3, H, W) pixels -> (n, d) float32 L2-normalised embeddings.

    uint8 batches (what DecodeFn emits) are scaled and normalised on the device; float
    batches are taken as already normalised.
    """
    import torch

    from beam_curator.transforms.decode import normalize_pixels

    with torch.inference_mode():
        pixels = batch.to(loaded.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            pixels = normalize_pixels(pixels, loaded.mean, loaded.std)
        if loaded.dtype is not None:
            pixels = pixels.to(loaded.dtype)
        features = loaded.model.encode_image(pixels).float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy().astype(np.float32, copy=False)


class OpenClipModelHandler(ModelHandler[Any, PredictionResult, LoadedClipModel]):
    """open_clip image tower behind Beam's ModelHandler interface."""

    def __init__(self, model_dir: str, *, device: str = "auto", precision: str = "auto",
                 min_batch_size: Optional[int] = None, max_batch_size: int = 64,
                 large_model: bool = False, model_copies: Optional[int] = None,
                 compile_model: bool = False):
        super().__init__()
        self._model_dir = model_dir
        self._device = device
        self._precision = precision
        # Full batches by default: every batch is padded to max_batch_size anyway.
        self._min_batch_size = min_batch_size or max_batch_size
        self._max_batch_size = max_batch_size
        self._large_model = large_model
        self._model_copies = model_copies
        self._compile = compile_model

    def load_model(self) -> LoadedClipModel:
        from beam_curator.models import load_clip, localize_model_dir

        device = resolve_device(self._device)
        local_dir = localize_model_dir(self._model_dir)
        from beam_curator.transforms.decode import normalization, read_preprocess_cfg

        clip = load_clip(os.path.join(local_dir, "clip"), device=device)
        dtype = resolve_precision(self._precision, device)
        model = clip.model if dtype is None else clip.model.to(dtype)
        if self._compile and device == "cuda":
            import torch

            model.visual = torch.compile(model.visual)   # pays off on long GPU runs only
        mean, std = normalization(read_preprocess_cfg(local_dir))
        _LOG.info("CLIP %s loaded on %s (%s weights%s)%s", clip.arch, device,
                  str(dtype).replace("torch.", "") if dtype else "fp32",
                  ", compiled" if self._compile and device == "cuda" else "",
                  " — RANDOM WEIGHTS" if clip.random_weights else "")
        return LoadedClipModel(model, device, dtype, mean, std)

    def run_inference(self, batch: Sequence[Any], model: LoadedClipModel,
                      inference_args: Optional[Dict[str, Any]] = None
                      ) -> Iterable[PredictionResult]:
        import torch

        pixels = torch.stack(list(batch))
        n = pixels.shape[0]
        if n < self._max_batch_size:
            # Fixed-shape batches: BLAS/cuBLAS pick kernels (and rounding) by batch size and
            # Beam sizes batches adaptively, so without padding an image's embedding would
            # change in the last bits with its neighbours, and reruns would not be identical.
            padding = pixels.new_zeros((self._max_batch_size - n, *pixels.shape[1:]))
            pixels = torch.cat([pixels, padding])
        embeddings = embed_batch(model, pixels)[:n]
        # The example (a 600 kB tensor at 224 px) is not kept: nothing downstream needs it.
        return [PredictionResult(None, row) for row in embeddings]

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._min_batch_size, "max_batch_size": self._max_batch_size}

    def share_model_across_processes(self) -> bool:
        return self._large_model

    def model_copies(self) -> int:
        return self._model_copies or 1

    def get_metrics_namespace(self) -> str:
        return "curator_clip"


class EmbedImages(beam.PTransform):
    """(SampleInfo, tensor) -> (SampleInfo, float32 embedding) through RunInference."""

    def __init__(self, handler: OpenClipModelHandler, accelerator: Optional[str] = None):
        super().__init__()
        self._handler = handler
        self._accelerator = accelerator

    def expand(self, decoded):
        inference = RunInference(KeyedModelHandler(self._handler))
        if self._accelerator:
            # GPU only where it pays: the rest of the graph stays on cheap CPU workers.
            inference = inference.with_resource_hints(accelerator=self._accelerator)
        return (decoded
                | "RunInference" >> inference
                | "Unwrap" >> beam.MapTuple(lambda info, result: (info, result.inference)))
