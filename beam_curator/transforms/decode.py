"""Decode + preprocess: image bytes -> (SampleInfo, uint8 HWC pixels), or an error sample.

Resizing and cropping (open_clip's eval transform) happen here, on the CPU workers; the
float conversion and normalisation happen on the inference device (transforms/embed.py), so
elements between the two stages are 4x smaller and the host-to-GPU copy is uint8.

One bad image never fails its shard: whatever Pillow or the preprocessing raises becomes a
SampleResult with status `error`, stage `decode` and a reason that names the cause. The image
bytes stop here; the curated shards are written later by re-reading the source tar.

The cheap filters run here too, before any pixel is decoded, so that a sample they drop
never costs a decode or a forward (`SampleChecks`, in this order, the first failing check
wins): caption length, caption language (from the sidecar), then the shorter side and the
aspect ratio of the original image (from its header). With a CLIP score asked for, the
caption is tokenized here, on the CPU workers, and travels to the model as `ImageAndText`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageOps, UnidentifiedImageError

from beam_curator.captions import (
    LanguageId,
    caption_chars,
    caption_of,
    caption_words,
    parse_languages,
)
from beam_curator.schema import (
    ERROR,
    FILTERED_ASPECT_RATIO,
    FILTERED_CAPTION_LANGUAGE,
    FILTERED_CAPTION_LENGTH,
    FILTERED_IMAGE_SIZE,
    STAGE_DECODE,
    STAGE_READ,
    SampleResult,
    info_of,
)

ERRORS = "errors"


def read_preprocess_cfg(model_dir: str) -> dict:
    """open_clip's preprocessing settings from MODEL_DIR/clip/open_clip_config.json."""
    from beam_curator.models.layout import CLIP_CONFIG_PATH, preprocess_cfg_of

    with FileSystems.open(FileSystems.join(model_dir, CLIP_CONFIG_PATH)) as handle:
        return preprocess_cfg_of(json.loads(handle.read().decode("utf-8")))


def _open_clip_cfg(preprocess_cfg: dict):
    from open_clip.transform import PreprocessCfg

    known = {f.name for f in dataclasses.fields(PreprocessCfg)}
    return PreprocessCfg(**{k: v for k, v in preprocess_cfg.items() if k in known})


def build_preprocess(preprocess_cfg: dict):
    """open_clip's eval transform up to (not including) ToTensor + Normalize -> uint8 HWC.

    Feeding `normalize_pixels` with a stack of these gives exactly open_clip's full transform.
    The pixels stay (H, W, 3), the layout PIL decodes to: stacking contiguous images into a
    batch is a plain copy, and moving channels first costs nothing on the device.
    """
    import torch

    geometric = geometric_steps(preprocess_cfg)

    def to_pixels(image):
        for step in geometric:
            image = step(image)
        return torch.from_numpy(np.array(image, dtype=np.uint8))

    return to_pixels


def geometric_steps(preprocess_cfg: dict) -> list:
    """open_clip's eval transform steps before ToTensor (resize, crop, mode): torchvision
    transforms that take a PIL image or a (3, H, W) uint8 tensor alike."""
    from open_clip.transform import image_transform_v2

    full = image_transform_v2(_open_clip_cfg(preprocess_cfg), is_train=False)
    steps = list(full.transforms)
    cut = next(i for i, step in enumerate(steps) if "ToTensor" in type(step).__name__)
    return steps[:cut]


def normalization(preprocess_cfg: dict):
    """(mean, std) per channel, as open_clip's Normalize uses them."""
    cfg = _open_clip_cfg(preprocess_cfg)
    return tuple(cfg.mean), tuple(cfg.std)


def normalize_pixels(pixels, mean, std):
    """uint8 (n, H, W, 3) -> float32 (n, 3, H, W), scaled to [0, 1] and normalised
    (ToTensor + Normalize); runs wherever `pixels` are, on the device in the handler.
    `mean` and `std`: per-channel sequences, or float32 tensors already beside `pixels`
    (used as they are, without a copy)."""
    import torch

    x = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    x = x.div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


class ImageError(ValueError):
    """The image cannot be used; the message is the reason written to errors/."""


class Filtered(Exception):
    """A cheap check dropped the sample: its status and the reason."""

    def __init__(self, status: str, reason: str, size: Optional[Tuple[int, int]] = None):
        super().__init__(reason)
        self.status = status
        self.size = size   # (width, height) of the image, when the check read it


class SampleChecks(NamedTuple):
    """The filters decode applies before the model; None switches one off.

    min_caption_words, min_caption_chars: DataComp's basic filter uses 2 and 5. A sample
      without a usable caption counts as 0 words and 0 characters.
    caption_languages: ISO 639 codes (fastText lid.176) to keep, e.g. ("en",).
    min_image_side: the shorter side of the original image in pixels (DataComp: 200).
    max_aspect_ratio: longer side / shorter side (DataComp: 3).
    caption_field: read the caption from this field of the .json sidecar, not the .txt.
    """

    min_caption_words: Optional[int] = None
    min_caption_chars: Optional[int] = None
    caption_languages: Optional[Tuple[str, ...]] = None
    min_image_side: Optional[int] = None
    max_aspect_ratio: Optional[float] = None
    caption_field: Optional[str] = None

    @property
    def measures_captions(self) -> bool:
        return (self.min_caption_words is not None or self.min_caption_chars is not None
                or bool(self.caption_languages))


def check_image_size(width: int, height: int, checks: SampleChecks) -> None:
    """Raise Filtered when the original image is too small or too elongated."""
    short, long = min(width, height), max(width, height)
    if checks.min_image_side is not None and short < checks.min_image_side:
        raise Filtered(FILTERED_IMAGE_SIZE,
                       f"shorter side {short} px < --min_image_side {checks.min_image_side}",
                       (width, height))
    if checks.max_aspect_ratio is not None and long > checks.max_aspect_ratio * max(short, 1):
        raise Filtered(FILTERED_ASPECT_RATIO,
                       f"aspect ratio {long / max(short, 1):.3f} ({width}x{height}) > "
                       f"--max_aspect_ratio {checks.max_aspect_ratio:g}", (width, height))


class ImageAndText(NamedTuple):
    """What EmbedImages gets when a CLIP score is asked for: the pixels, the caption's
    tokens (int64 (context_length,), None without a caption) and the caption itself (the
    text that was tokenized: what EmbedImages(text_embeddings=True) writes beside its
    embedding)."""

    pixels: Any
    tokens: Any = None
    caption: Optional[str] = None


def open_rgb(data: bytes, max_pixels: int, checks: Optional[SampleChecks] = None
             ) -> Image.Image:
    """Bytes -> an RGB PIL image, upright, first frame; ImageError with the reason otherwise.

    The pixel cap is checked from the header, before any pixel is decoded. Pillow's own
    decompression-bomb guard (Image.MAX_IMAGE_PIXELS, errors above twice it) still applies;
    DecodeFn.setup raises it when --max_image_pixels is larger. No warnings filter is touched
    here: `warnings.catch_warnings` is not thread-safe and workers decode on several threads.
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height} = {width * height} pixels, above "
                             f"--max_image_pixels {max_pixels} (decompression-bomb guard)")
        if width < 1 or height < 1:
            raise ImageError(f"image has no pixels ({width}x{height})")
        if checks is not None:
            check_image_size(width, height, checks)   # before a single pixel is decoded
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)   # animated: CLIP sees the first frame
        image.load()
    except (ImageError, Filtered):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"not a recognisable image ({len(data)} bytes): "
                         f"{data[:16]!r}...") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"image is corrupt or truncated: {type(exc).__name__}: {exc}") from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:   # noqa: BLE001 - a broken EXIF block: the pixels are fine, keep them
        pass
    return to_rgb(image)


def resized_pixels(width: int, height: int, preprocess_cfg: dict) -> int:
    """Pixels of the image open_clip's eval transform resizes to, before its centre crop."""
    size = preprocess_cfg.get("size", 224)
    size = max(size) if isinstance(size, (list, tuple)) else int(size)
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode == "shortest":
        scale = size / max(1, min(width, height))
        return int(round(width * scale)) * int(round(height * scale))
    return size * size


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB without surprises (16-bit scaled, alpha on white, CMYK converted)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # A plain convert("RGB") clips 16-bit values at 255: scale to 8 bits instead.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# open_clip's preprocessing for OpenAI CLIP weights at 224 px: what DecodeImages uses when no
# model dir says otherwise (a user's own model that takes CLIP-style input).
DEFAULT_PREPROCESS_CFG = {"size": 224, "mode": "RGB", "interpolation": "bicubic",
                          "resize_mode": "shortest", "fill_color": 0,
                          "mean": (0.48145466, 0.4578275, 0.40821073),
                          "std": (0.26862954, 0.26130258, 0.27577711)}


class DecodeFn(beam.DoFn):
    """ShardSample -> (SampleInfo, uint8 HWC pixels); SampleResult(error) to `errors`.

    The preprocessing comes from `model_dir`'s open_clip config, else `preprocess_cfg`."""

    def __init__(self, model_dir: Optional[str], max_pixels: int,
                 preprocess_cfg: Optional[dict] = None,
                 checks: Optional[SampleChecks] = None, tokenize: bool = False):
        self._model_dir = model_dir
        self._preprocess_cfg = preprocess_cfg or DEFAULT_PREPROCESS_CFG
        self._max_pixels = max_pixels
        self._checks = checks or SampleChecks()
        self._tokenize = tokenize
        self._preprocess = None
        self._cfg = None
        self._language_id = None
        self._tokenizer = None
        self.decoded = beam.metrics.Metrics.counter("curator", "decoded")
        self.errors = beam.metrics.Metrics.counter("curator", "decode_errors")
        self.filtered = beam.metrics.Metrics.counter("curator", "filtered_before_model")

    def setup(self):
        self._cfg = (read_preprocess_cfg(self._model_dir) if self._model_dir
                     else dict(self._preprocess_cfg))
        self._preprocess = build_preprocess(self._cfg)
        if self._checks.caption_languages:
            self._language_id = LanguageId()
        if self._tokenize:
            from beam_curator.models.text import caption_tokenizer

            self._tokenizer = caption_tokenizer(self._model_dir)
        if Image.MAX_IMAGE_PIXELS is not None and self._max_pixels > Image.MAX_IMAGE_PIXELS:
            # Pillow refuses images above twice its own cap; --max_image_pixels decides here.
            Image.MAX_IMAGE_PIXELS = self._max_pixels

    def _check_caption(self, info, text):
        """The caption's measures on the info; Filtered when a caption check fails."""
        checks = self._checks
        words, chars = caption_words(text), caption_chars(text)
        info = dataclasses.replace(info, caption_words=words, caption_chars=chars)
        if checks.min_caption_words is not None and words < checks.min_caption_words:
            return info, Filtered(FILTERED_CAPTION_LENGTH, f"caption has {words} word(s) < "
                                  f"--min_caption_words {checks.min_caption_words}")
        if checks.min_caption_chars is not None and chars < checks.min_caption_chars:
            return info, Filtered(FILTERED_CAPTION_LENGTH, f"caption has {chars} character(s)"
                                  f" < --min_caption_chars {checks.min_caption_chars}")
        if self._language_id is not None:
            language, prob = self._language_id(text)
            info = dataclasses.replace(info, caption_language=language,
                                       caption_language_prob=prob)
            if language not in checks.caption_languages:
                return info, Filtered(FILTERED_CAPTION_LANGUAGE, (
                    f"caption language {language} (p={prob:.2f})" if language
                    else "no caption to identify") + " not in --caption_languages "
                    + ",".join(checks.caption_languages))
        return info, None

    def process(self, sample):
        info = info_of(sample)
        if sample.error:
            self.errors.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, SampleResult(
                info=info, status=ERROR, reason=sample.error, stage=STAGE_READ))
            return
        caption = None
        if self._checks.measures_captions or self._tokenize:
            caption = caption_of(sample.sidecars, self._checks.caption_field)
        if self._checks.measures_captions:
            info, dropped = self._check_caption(info, caption.text)
            if dropped is not None:
                self.filtered.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, SampleResult(
                    info=info, status=dropped.status, reason=str(dropped)))
                return
        digest = hashlib.sha256(sample.image_bytes).hexdigest()
        info = dataclasses.replace(info, content_hash=digest)
        try:
            image = open_rgb(sample.image_bytes, self._max_pixels, self._checks)
            info = dataclasses.replace(info, width=image.width, height=image.height)
            resized = resized_pixels(image.width, image.height, self._cfg)
            if resized > self._max_pixels:
                # A 1 x 10^6 strip passes the pixel cap, but resizing its shortest side to the
                # model's input size would allocate gigabytes.
                raise ImageError(
                    f"image is {image.width}x{image.height}: resizing its shortest side to the "
                    f"model's input size makes {resized} pixels, above --max_image_pixels "
                    f"{self._max_pixels} (extreme aspect ratio)")
            tensor = self._preprocess(image)
        except Filtered as dropped:
            self.filtered.inc()
            if dropped.size:
                info = dataclasses.replace(info, width=dropped.size[0], height=dropped.size[1])
            yield beam.pvalue.TaggedOutput(ERRORS, SampleResult(
                info=info, status=dropped.status, reason=str(dropped)))
            return
        except ImageError as exc:
            reason = str(exc)
        except Exception as exc:   # noqa: BLE001 - one bad image never fails a shard
            reason = f"preprocessing failed: {type(exc).__name__}: {exc}"
        else:
            self.decoded.inc()
            if self._tokenize:
                tokens = (self._tokenizer([caption.text])[0] if caption.text is not None
                          else None)
                yield info, ImageAndText(tensor, tokens, caption.text)
            else:
                yield info, tensor
            return
        self.errors.inc()
        yield beam.pvalue.TaggedOutput(ERRORS, SampleResult(
            info=info, status=ERROR, reason=reason, stage=STAGE_DECODE))


class DecodeResult(NamedTuple):
    """What `DecodeImages` returns.

    decoded: (SampleInfo, pixels): uint8 (H, W, 3) torch tensors resized and centre-cropped
        the way the model expects (normalisation happens on the inference device); the info
        now has content_hash (sha256 of the original bytes), width and height.
    errors: SampleResult with status error, stage decode (or read, for samples the reader
        already marked) and the reason, and the samples a `SampleChecks` filter dropped
        (status filtered_caption_length, filtered_caption_language, filtered_image_size or
        filtered_aspect_ratio, with the reason).
    """

    decoded: beam.PCollection
    errors: beam.PCollection


class DecodeImages(beam.PTransform):
    """ShardSample -> DecodeResult: Pillow decode, EXIF rotation, first frame, any mode to
    RGB, a pixel cap against decompression bombs, then open_clip's resize and crop.

    Args:
      model_dir: a beam-curator model dir: the preprocessing of its open_clip config.
        None: `preprocess_cfg`, or OpenAI CLIP's at `image_size` px.
      max_image_pixels: larger images are errors (checked from the header, before decoding).
      image_size: the square input size when neither model_dir nor preprocess_cfg is given.
      preprocess_cfg: open_clip PreprocessCfg fields (size, mean, std, interpolation,
        resize_mode, ...), for a model of your own.
      checks: `SampleChecks`, the filters that run before the model (default: none).
      tokenize: also tokenize each caption with model_dir's open_clip tokenizer: the
        elements become (SampleInfo, ImageAndText), for EmbedImages(clip_score=True).

    Example::

        decoded = read.samples | DecodeImages(
            "models/", checks=SampleChecks(min_image_side=200, max_aspect_ratio=3.0))
        decoded.errors | beam.Map(lambda r: print(r.id, r.status, r.reason))
    """

    def __init__(self, model_dir: Optional[str] = None, *,
                 max_image_pixels: int = 89_478_485, image_size: int = 224,
                 preprocess_cfg: Optional[dict] = None,
                 checks: Optional[SampleChecks] = None, tokenize: bool = False):
        super().__init__()
        if tokenize and not model_dir:
            raise ValueError("DecodeImages(tokenize=True) needs the model_dir whose "
                             "tokenizer the CLIP score uses")
        self._model_dir = model_dir
        self._checks = (checks or SampleChecks())._replace(
            caption_languages=parse_languages((checks or SampleChecks()).caption_languages))
        self._tokenize = tokenize
        self._max_pixels = max_image_pixels
        self._cfg = dict(preprocess_cfg or DEFAULT_PREPROCESS_CFG)
        if preprocess_cfg is None:
            self._cfg["size"] = image_size

    def expand(self, samples):
        out = samples | "DecodePreprocess" >> beam.ParDo(
            DecodeFn(self._model_dir, self._max_pixels, self._cfg, self._checks,
                     self._tokenize)).with_outputs(
                ERRORS, main="decoded")
        return DecodeResult(decoded=out.decoded, errors=out[ERRORS])
