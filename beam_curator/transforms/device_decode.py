"""JPEG decode + open_clip resize/crop on the inference device (nvJPEG through torchvision).

A CPU core decodes and resizes only ~100-300 images/s (more for small images), and one H100
runs ViT-L/14 at ~2,250 images/s, so a GPU box can run out of cores before the GPU runs out of
work. This module is the building block for decoding on the GPU instead: JPEG bytes in,
(n, S, S, 3) uint8 pixels on the device out -- the layout `transforms.embed` stages and
normalises. It is not wired into the pipeline (see ARCHITECTURE.md, "JPEG decode on the
device"); `bench/gpu_embed.py --parts decode` measures it beside the CPU path.

What it gives, against the Pillow path (`decode.open_rgb` + `decode.build_preprocess`):
* on the CPU (`device="cpu"`, the fallback), torchvision's libjpeg-turbo decodes to the very
  pixels Pillow decodes; open_clip's resize on a tensor then differs from Pillow's resize by at
  most a few levels of 255 (mean ~0.15: tests/test_device_decode.py);
* on CUDA, nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's as well; the
  benchmark reports by how much.
Only JPEGs for which that holds go to the device (`device_decodable`): 3-channel or grayscale,
baseline, no EXIF rotation, complete. Everything else keeps the Pillow path.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec's; this module uses
`torchvision.io.decode_jpeg`, which the GPU images in use (torchvision 0.26) have.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence, Tuple

from PIL import Image

from beam_curator.transforms.decode import geometric_steps

_EOI = b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112


def device_decodable(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) when `data` is a JPEG the device path decodes like Pillow, else None.

    Reads the header only. Refused (None): not a JPEG, CMYK/YCCK, progressive (nvJPEG's
    batched decode is for baseline JPEGs), an EXIF orientation other than upright (Pillow's
    path rotates it), or no end-of-image marker (truncated: Pillow reports those as errors).
    """
    if not data.endswith(_EOI):
        return None
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        if image.info.get("progressive") or image.info.get("progression"):
            return None
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            return None
        return image.size
    except Exception:   # noqa: BLE001 - anything odd in the header: the Pillow path decides
        return None


class DeviceJpegDecoder:
    """JPEG bytes -> (n, S, S, 3) uint8 pixels on `device`, resized and cropped as open_clip's
    eval transform does (its own torchvision steps, run on tensors).

    A batch that the device refuses is decoded on the CPU instead (counted in `fallbacks`):
    the pixels are then libjpeg-turbo's, Pillow's own.
    """

    def __init__(self, preprocess_cfg: dict, device: str = "cuda"):
        self._steps = geometric_steps(preprocess_cfg)
        self.device = device
        self.fallbacks = 0

    def _decode(self, jpegs: Sequence[bytes], device: str) -> list:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        return decoded if isinstance(decoded, list) else [decoded]

    def __call__(self, jpegs: Sequence[bytes]):
        import torch

        if not jpegs:
            raise ValueError("no JPEGs to decode")
        try:
            images = self._decode(jpegs, self.device)
        except RuntimeError:
            if self.device == "cpu":
                raise
            self.fallbacks += 1
            images = [image.to(self.device) for image in self._decode(jpegs, "cpu")]
        pixels = []
        for image in images:            # (3, H, W) uint8; sizes differ until resized
            for step in self._steps:
                image = step(image)
            pixels.append(image)
        return torch.stack(pixels).permute(0, 2, 3, 1).contiguous()
