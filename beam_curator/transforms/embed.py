"""Embed: Beam RunInference with our open_clip ModelHandler, keyed by the sample info.

RunInference does the batching (min/max batch size are options); the handler loads the model
once per worker (or once per machine with --large_model), picks CUDA when asked and available
and falls back to CPU with a log line, runs bf16 (or fp16) weights on GPU, and returns
L2-normalised float32 embeddings. A batch goes through the model in fixed-size forwards; the
uint8 (H, W, 3) pixels are staged in pinned memory, copied to the device and normalised there,
and the host stages the next forward while the GPU runs the current one.

With `clip_score`, the same handler also runs the model's text tower on the captions that
decode tokenized (`ImageAndText`), in fixed-size forwards like the images, and returns each
sample's image-caption cosine beside its embedding: the score travels with the record (one
float), never the caption embedding. With `text_embeddings` the caption embeddings leave the
inference step on an output of their own (`EmbedResult.text`), which `WriteTextEmbeddings`
writes per shard; they still never travel with the record.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)

from beam_curator.defaults import DEFAULT_INFERENCE_BATCH_SIZE

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

    def __init__(self, model, device: str, dtype, mean, std):
        self.model = model
        self.device = device
        self.dtype = dtype          # None: fp32
        self.mean = mean            # open_clip's Normalize, applied on the device: per-channel
        self.std = std              # tensors there (load_model), or tuples


DEFAULT_FORWARD_BATCH_CAP = 256   # images per forward unless --forward_batch_size says


def default_forward_batch_size(inference_batch_size: int) -> int:
    """The whole RunInference batch, cut into forwards of at most 256 images.

    256 ViT-L/14 images are 65,792 tokens per matrix multiply, which is enough to fill a
    large GPU, and four or more forwards per batch let the host stage one while the device
    runs another.
    """
    return min(inference_batch_size, DEFAULT_FORWARD_BATCH_CAP)


def encode_pixels(loaded: LoadedClipModel, pixels):
    """uint8 (n, H, W, 3) pixels, on the host or the device -> (n, d) float32 L2-normalised
    embeddings on the device. On CUDA this only queues work: nothing waits for the GPU."""
    import torch

    from beam_curator.transforms.decode import normalize_pixels

    with torch.inference_mode():
        pixels = pixels.to(loaded.device, non_blocking=True)
        pixels = normalize_pixels(pixels, loaded.mean, loaded.std)
        if loaded.dtype is not None:
            pixels = pixels.to(loaded.dtype)
        features = loaded.model.encode_image(pixels).float()
        return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def stage_pixels(images: Sequence[Any], rows: int, pinned: bool):
    """Copy `images` ((H, W, 3) uint8 each) into one (rows, H, W, 3) host buffer; the rows
    after them are zeros (padding). Pinned memory lets the copy to the GPU run asynchronously;
    PyTorch's pinned-memory cache hands the same buffers back call after call."""
    import torch

    first = images[0]
    buffer = torch.empty((rows, *first.shape), dtype=first.dtype, pin_memory=pinned)
    torch.stack(list(images), out=buffer[:len(images)])
    buffer[len(images):].zero_()
    return buffer


def embed_images(loaded: LoadedClipModel, images: Sequence[Any],
                 forward_batch_size: int) -> np.ndarray:
    """(H, W, 3) uint8 images -> (n, d) float32 L2-normalised embeddings, in order.

    The images go through the model `forward_batch_size` at a time and every forward has
    exactly that many rows (the last one zero-padded): BLAS and cuBLAS pick kernels, and so
    rounding, by shape, and Beam sizes batches adaptively, so a fixed shape is what makes an
    image's embedding independent of its neighbours and reruns bit-identical. On CUDA the
    forwards are queued without waiting, so while the GPU runs one forward the host stages
    the next into pinned memory; the one wait is the copy of the results at the end.
    """
    import torch

    pinned = loaded.device == "cuda"
    outputs = []
    for start in range(0, len(images), forward_batch_size):
        chunk = images[start:start + forward_batch_size]
        outputs.append(encode_pixels(loaded, stage_pixels(chunk, forward_batch_size, pinned)))
    embeddings = torch.cat(outputs)[:len(images)]
    return embeddings.cpu().numpy().astype(np.float32, copy=False)


def clip_scores(loaded: LoadedClipModel, embeddings: np.ndarray, tokens: Sequence[Any],
                forward_batch_size: int) -> List[Optional[float]]:
    """Each row's cosine between its image embedding and its caption's (None where the
    token row is None: no caption). Captions go through the text tower grouped by their
    length bucket (models.text.TOKEN_BUCKETS), in forwards of exactly `forward_batch_size`
    rows, zero-padded, as the images do: a caption's forward shape is its own."""
    return clip_scores_and_captions(loaded, embeddings, tokens, forward_batch_size)[0]


def clip_scores_and_captions(loaded: LoadedClipModel, embeddings: np.ndarray,
                             tokens: Sequence[Any], forward_batch_size: int
                             ) -> Tuple[List[Optional[float]], List[Optional[np.ndarray]]]:
    """`clip_scores`, and each row's caption embedding the score was computed from:
    (d,) float32, L2-normalised (None without a caption)."""
    import torch

    from beam_curator.models.text import encode_tokens, token_bucket

    scores: List[Optional[float]] = [None] * len(tokens)
    texts: List[Optional[np.ndarray]] = [None] * len(tokens)
    by_length: Dict[int, List[int]] = {}
    for i, row in enumerate(tokens):
        if row is not None:
            by_length.setdefault(token_bucket(row, row.shape[-1]), []).append(i)
    for length, rows in sorted(by_length.items()):
        text = []
        for start in range(0, len(rows), forward_batch_size):
            chunk = [tokens[i] for i in rows[start:start + forward_batch_size]]
            batch = torch.zeros((forward_batch_size, chunk[0].shape[-1]), dtype=torch.long)
            batch[:len(chunk)] = torch.stack(list(chunk))
            text.append(encode_tokens(loaded.model, batch, loaded.device, length))
        text_embeddings = torch.cat(text)[:len(rows)].cpu().numpy().astype(np.float32)
        cosines = np.einsum("ij,ij->i", embeddings[rows], text_embeddings)
        for i, cosine, vector in zip(rows, cosines, text_embeddings):
            scores[i] = float(cosine)
            texts[i] = vector
    return scores, texts


class OpenClipModelHandler(ModelHandler[Any, PredictionResult, LoadedClipModel]):
    """open_clip behind Beam's ModelHandler interface: the image tower, and with
    `clip_score` the text tower too (examples are then `ImageAndText`; the inference is
    (embedding, score), or with `text_embeddings` (embedding, score, caption embedding,
    caption), both None without a caption)."""

    def __init__(self, model_dir: str, *, device: str = "auto", precision: str = "auto",
                 min_batch_size: Optional[int] = None,
                 max_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                 forward_batch_size: Optional[int] = None, large_model: bool = False,
                 model_copies: Optional[int] = None, compile_mode: Optional[str] = None,
                 clip_score: bool = False, text_embeddings: bool = False):
        # Batching and model sharing are Beam's: its ModelHandler takes them. Full batches
        # by default: the fewest padded rows and the fewest calls.
        super().__init__(min_batch_size=min_batch_size or max_batch_size,
                         max_batch_size=max_batch_size, large_model=large_model,
                         model_copies=model_copies)
        self._model_dir = model_dir
        self._device = device
        self._precision = precision
        self._forward_batch_size = (forward_batch_size
                                    or default_forward_batch_size(max_batch_size))
        self._compile_mode = compile_mode     # None: eager; else a torch.compile mode
        self._clip_score = clip_score or text_embeddings
        self._text_embeddings = text_embeddings

    def load_model(self) -> LoadedClipModel:
        import torch

        from beam_curator.models import load_clip, localize_model_dir

        device = resolve_device(self._device)
        local_dir = localize_model_dir(self._model_dir)
        from beam_curator.transforms.decode import normalization, read_preprocess_cfg

        clip = load_clip(os.path.join(local_dir, "clip"), device=device)
        dtype = resolve_precision(self._precision, device)
        model = clip.model if dtype is None else clip.model.to(dtype)
        compiled = bool(self._compile_mode) and device == "cuda"
        if compiled:
            # Pays off on long GPU runs only; one shape to compile (every forward is full).
            model.visual = torch.compile(model.visual, mode=self._compile_mode)
        # On the device once: a tensor made from a tuple per call would be a synchronous copy,
        # making the host wait for the forward already queued before it could queue the next.
        mean, std = (torch.tensor(values, dtype=torch.float32, device=device)
                     for values in normalization(read_preprocess_cfg(local_dir)))
        _LOG.info("CLIP %s loaded on %s (%s weights%s, %d images per forward)%s", clip.arch,
                  device, str(dtype).replace("torch.", "") if dtype else "fp32",
                  f", compiled ({self._compile_mode})" if compiled else "",
                  self._forward_batch_size,
                  " — RANDOM WEIGHTS" if clip.random_weights else "")
        return LoadedClipModel(model, device, dtype, mean, std)

    def run_inference(self, batch: Sequence[Any], model: LoadedClipModel,
                      inference_args: Optional[Dict[str, Any]] = None
                      ) -> Iterable[PredictionResult]:
        if not self._clip_score:
            embeddings = embed_images(model, batch, self._forward_batch_size)
            # The example (150 kB of pixels at 224 px) is not kept: nothing downstream needs it.
            return [PredictionResult(None, row) for row in embeddings]
        from beam_curator.transforms.decode import ImageAndText

        pixels = [e.pixels if isinstance(e, ImageAndText) else e for e in batch]
        tokens = [e.tokens if isinstance(e, ImageAndText) else None for e in batch]
        embeddings = embed_images(model, pixels, self._forward_batch_size)
        if not self._text_embeddings:
            scores = clip_scores(model, embeddings, tokens, self._forward_batch_size)
            return [PredictionResult(None, (row, score))
                    for row, score in zip(embeddings, scores)]
        scores, texts = clip_scores_and_captions(model, embeddings, tokens,
                                                 self._forward_batch_size)
        captions = [e.caption if isinstance(e, ImageAndText) else None for e in batch]
        return [PredictionResult(None, (row, score, text,
                                        caption if text is not None else None))
                for row, score, text, caption in zip(embeddings, scores, texts, captions)]

    def get_metrics_namespace(self) -> str:
        return "curator_clip"


def _with_clip_score(info, result):
    embedding, score = result.inference
    return dataclasses.replace(info, clip_score=score), embedding


TEXT = "text"


class EmbedResult(NamedTuple):
    """What `EmbedImages(..., text_embeddings=True)` returns.

    embedded: (SampleInfo, embedding), as EmbedImages returns without text embeddings.
    text: (SampleInfo, caption embedding, caption) for each embedded sample with a caption:
        the (d,) float32 L2-normalised output of the same model's text tower that its
        `clip_score` (on the info) is the cosine with; for `WriteTextEmbeddings`.
    """

    embedded: beam.PCollection
    text: beam.PCollection


class _SplitTextFn(beam.DoFn):
    """(info, (embedding, score, caption embedding, caption)) -> (info, embedding), and
    (info, caption embedding, caption) to TEXT where there is a caption."""

    def process(self, element):
        info, result = element
        embedding, score, text, caption = result.inference
        info = dataclasses.replace(info, clip_score=score)
        yield info, embedding
        if text is not None:
            yield beam.pvalue.TaggedOutput(TEXT, (info, text, caption))


def _unit_embedding(result) -> np.ndarray:
    """A user handler's inference (numpy, torch tensor, list) -> float32 unit vector."""
    inference = result.inference if isinstance(result, PredictionResult) else result
    if hasattr(inference, "detach"):
        inference = inference.detach().float().cpu().numpy()
    vector = np.asarray(inference, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


class EmbedImages(beam.PTransform):
    """(SampleInfo, pixels) -> (SampleInfo, float32 L2-normalised embedding): RunInference.

    With `model_dir`, our open_clip handler (CLIP ViT-L/14 for LAION's heads): Beam batches,
    every forward has a fixed shape (an embedding never depends on its batch), bf16 weights
    on GPU, CPU fallback logged. Or bring any Beam `ModelHandler` whose examples are the
    decoded pixels (uint8 (H, W, 3) torch tensors from DecodeImages) and whose inference is
    one embedding per example (numpy, torch or list); it is normalised to unit length,
    which dedup and the score heads expect.

    Args:
      model_dir: a beam-curator model dir (clip/, aesthetic/, nsfw/; `models init-random`
        or `models download`). Ignored when model_handler is given.
      model_handler: your own ModelHandler (see above).
      device, precision: "auto" | "cpu" | "cuda"; "auto" | "fp32" | "bf16" | "fp16".
      inference_batch_size, min_inference_batch_size, forward_batch_size: batching (see the
        README's options table).
      large_model, model_copies: share one model per machine (Beam's large_model).
      torch_compile: None, or a torch.compile mode for the image tower on GPU.
      accelerator: a resource hint for this step only, e.g.
        "type:nvidia-l4;count:1;install-nvidia-driver" (Dataflow).
      clip_score: also score each image against its caption with the same model's text
        tower (the elements must come from DecodeImages(tokenize=True)); the info's
        `clip_score` is then the cosine (None without a caption).
      text_embeddings: also hand on the caption embeddings the score was computed from:
        the transform then returns an `EmbedResult` (embedded, text) instead of one
        PCollection. Implies clip_score.

    Example::

        embedded = decoded.decoded | EmbedImages("models/", device="auto")
    """

    def __init__(self, model_dir: Optional[str] = None, *,
                 model_handler: Optional[ModelHandler] = None, device: str = "auto",
                 precision: str = "auto",
                 inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                 min_inference_batch_size: Optional[int] = None,
                 forward_batch_size: Optional[int] = None, large_model: bool = False,
                 model_copies: Optional[int] = None, torch_compile: Optional[str] = None,
                 accelerator: Optional[str] = None, clip_score: bool = False,
                 text_embeddings: bool = False):
        super().__init__()
        clip_score = clip_score or text_embeddings
        if model_handler is None and not model_dir:
            raise ValueError("EmbedImages needs a model_dir or a model_handler")
        if clip_score and model_handler is not None:
            raise ValueError("EmbedImages(clip_score=True) scores with our open_clip handler "
                             "(model_dir): a model_handler of your own has no text tower here")
        self._clip_score = clip_score
        self._own = model_handler is not None
        self._handler = model_handler or OpenClipModelHandler(
            model_dir, device=device, precision=precision,
            min_batch_size=min_inference_batch_size, max_batch_size=inference_batch_size,
            forward_batch_size=forward_batch_size, large_model=large_model,
            model_copies=model_copies, compile_mode=torch_compile, clip_score=clip_score,
            text_embeddings=text_embeddings)
        self._text_embeddings = text_embeddings
        self._accelerator = accelerator

    def expand(self, decoded):
        inference = RunInference(KeyedModelHandler(self._handler))
        if self._accelerator:
            # GPU only where it pays: the rest of the graph stays on cheap CPU workers.
            inference = inference.with_resource_hints(accelerator=self._accelerator)
        if self._text_embeddings:
            split = (decoded
                     | "RunInference" >> inference
                     | "Unwrap" >> beam.ParDo(_SplitTextFn()).with_outputs(
                         TEXT, main="embedded"))
            return EmbedResult(embedded=split.embedded, text=split[TEXT])
        if self._own:
            unwrap = lambda info, result: (info, _unit_embedding(result))   # noqa: E731
        elif self._clip_score:
            unwrap = _with_clip_score
        else:
            unwrap = lambda info, result: (info, result.inference)   # noqa: E731
        return (decoded
                | "RunInference" >> inference
                | "Unwrap" >> beam.MapTuple(unwrap))
