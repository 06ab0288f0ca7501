"""JPEG decode on the device (transforms/device_decode.py) against the Pillow path.

On the CPU the device path's decoder is libjpeg-turbo through torchvision: the same pixels as
Pillow. What differs is open_clip's resize run on a tensor instead of a PIL image; these tests
pin how much (a few levels of 255 at most, mean ~0.15) and that it barely moves an embedding.
Where a GPU is visible, nvJPEG's pixels are compared too.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from beam_curator.transforms.decode import (
    build_preprocess,
    open_rgb,
    read_preprocess_cfg,
)
from beam_curator.transforms.device_decode import DeviceJpegDecoder, device_decodable
from bench.synthetic import textured_jpeg

CFG = {"size": 224, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
       "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
       "resize_mode": "shortest"}       # ViT-L/14's (open_clip's OpenAI preprocessing)
SHAPES = [(512, 512, 2, False), (640, 480, 0, False), (300, 700, 2, False),
          (512, 384, 2, True), (224, 224, 2, False), (100, 80, 1, False)]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small torch ops on a shared 2-core box run far faster on one thread than on two
    spinning against the box's other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pillow_pixels(jpegs, cfg=CFG):
    preprocess = build_preprocess(cfg)
    return np.stack([preprocess(open_rgb(data, 10**9)).numpy() for data in jpegs])


@pytest.fixture(scope="module")
def jpegs():
    rng = np.random.default_rng(0)
    return [textured_jpeg(rng, w, h, subsampling=sub, gray=gray) for w, h, sub, gray in SHAPES]


def test_cpu_device_path_is_within_a_few_levels_of_pillow(jpegs):
    got = DeviceJpegDecoder(CFG, "cpu")(jpegs)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (len(jpegs), 224, 224, 3)
    want = pillow_pixels(jpegs)
    diff = np.abs(got.numpy().astype(int) - want.astype(int))
    # Measured: max 0-3 per image (3 only when upsampling 100 x 80), mean 0.14-0.21; the 224 x
    # 224 image needs no resize and is identical.
    assert diff.max() <= 3 and diff.mean() < 0.25
    assert (diff > 1).mean() < 1e-3
    assert diff[SHAPES.index((224, 224, 2, False))].max() == 0


def test_the_difference_barely_moves_an_embedding(jpegs, tiny_model_dir):
    from beam_curator.transforms.embed import OpenClipModelHandler, embed_images

    cfg = read_preprocess_cfg(tiny_model_dir)
    loaded = OpenClipModelHandler(tiny_model_dir, device="cpu").load_model()
    device_px = list(DeviceJpegDecoder(cfg, "cpu")(jpegs))
    pillow_px = [torch.from_numpy(p) for p in pillow_pixels(jpegs, cfg)]
    a = embed_images(loaded, device_px, 8)
    b = embed_images(loaded, pillow_px, 8)
    cosine = np.sum(a.astype(np.float64) * b, axis=1)
    assert cosine.min() > 0.999, cosine


def test_only_jpegs_that_decode_alike_go_to_the_device():
    rng = np.random.default_rng(1)
    plain = textured_jpeg(rng, 64, 48)
    assert device_decodable(plain) == (64, 48)
    assert device_decodable(textured_jpeg(rng, 32, 32, gray=True)) == (32, 32)

    def saved(image, fmt="JPEG", **kwargs):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    image = Image.open(io.BytesIO(plain))
    exif = Image.Exif()
    exif[0x0112] = 6                                  # rotated: Pillow's path turns it upright
    assert device_decodable(saved(image, exif=exif)) is None
    exif[0x0112] = 1
    assert device_decodable(saved(image, exif=exif)) == (64, 48)
    assert device_decodable(saved(image.convert("CMYK"))) is None
    assert device_decodable(saved(image, progressive=True)) is None
    assert device_decodable(saved(image, fmt="PNG")) is None
    assert device_decodable(plain[:-100]) is None    # truncated: no end-of-image marker
    assert device_decodable(b"") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_pixels_close_to_pillow(jpegs):
    decoder = DeviceJpegDecoder(CFG, "cuda")
    got = decoder(jpegs).cpu().numpy().astype(int)
    diff = np.abs(got - pillow_pixels(jpegs).astype(int))
    print(f"nvJPEG vs Pillow: max {diff.max()}, mean {diff.mean():.3f}, "
          f"fallbacks {decoder.fallbacks}")
    assert diff.mean() < 2.0
