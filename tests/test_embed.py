"""The embedding handler on a real (tiny, random) open_clip model, on the CPU.

What is checked here holds on a GPU too: the same code runs there, with pinned staging and
queued forwards (bench/gpu_embed.py measures that part).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from beam_curator.options import CuratorOptions, curator_options
from beam_curator.transforms.decode import build_preprocess, read_preprocess_cfg
from beam_curator.transforms.embed import (
    OpenClipModelHandler,
    default_forward_batch_size,
    stage_pixels,
)


def _photos(n: int, seed: int = 0):
    """n RGB images of different sizes and aspect ratios (not the model's input size)."""
    rng = np.random.default_rng(seed)
    sizes = [(37, 29), (64, 64), (20, 51), (90, 33), (33, 33)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8))
            for i in range(n)]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return OpenClipModelHandler(tiny_model_dir, device="cpu").load_model()


@pytest.fixture(scope="module")
def pixels(tiny_model_dir):
    preprocess = build_preprocess(read_preprocess_cfg(tiny_model_dir))
    return [preprocess(image) for image in _photos(11)]


def _embed(model_dir, loaded, images, forward_batch_size):
    handler = OpenClipModelHandler(model_dir, device="cpu", max_batch_size=len(images),
                                   forward_batch_size=forward_batch_size)
    results = list(handler.run_inference(images, loaded))
    assert len(results) == len(images)
    return np.stack([r.inference for r in results])


def test_the_handler_gives_open_clips_own_embeddings(tiny_model_dir, loaded, pixels):
    """Our split (uint8 HWC on the host, normalise on the device) = open_clip's transform,
    to the bit: same pixels in, and with the same batch shape, the same embeddings out."""
    from beam_curator.models import load_clip
    from beam_curator.transforms.decode import normalization, normalize_pixels

    clip = load_clip(os.path.join(tiny_model_dir, "clip"))
    reference_pixels = torch.stack([clip.preprocess(p) for p in _photos(11)])
    mean, std = normalization(read_preprocess_cfg(tiny_model_dir))
    assert torch.equal(normalize_pixels(torch.stack(pixels), mean, std), reference_pixels)
    with torch.no_grad():
        reference = clip.model.encode_image(reference_pixels)
    reference = torch.nn.functional.normalize(reference, dim=-1).numpy()

    ours = _embed(tiny_model_dir, loaded, pixels, forward_batch_size=len(pixels))
    assert ours.dtype == np.float32 and np.array_equal(ours, reference)
    split = _embed(tiny_model_dir, loaded, pixels, forward_batch_size=4)   # other shapes
    np.testing.assert_allclose(split, reference, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_forwards_of_any_size_give_the_same_embeddings_in_order(tiny_model_dir, loaded, pixels):
    whole = _embed(tiny_model_dir, loaded, pixels, forward_batch_size=len(pixels))
    for size in (1, 3, 4, 10):
        split = _embed(tiny_model_dir, loaded, pixels, forward_batch_size=size)
        np.testing.assert_allclose(split, whole, atol=2e-5)
    # each row is its own image: no row is a padding row or a neighbour's
    distances = np.linalg.norm(whole[:, None] - whole[None], axis=-1)
    assert (distances + np.eye(len(pixels)) * 9).min() > 1e-3


def test_an_embedding_does_not_depend_on_its_batch(tiny_model_dir, loaded, pixels):
    """Fixed-shape forwards: the same bits whatever the neighbours, the position, the padding.
    This is what makes reruns identical however a runner forms its batches."""
    alone = _embed(tiny_model_dir, loaded, pixels[:1], forward_batch_size=1)
    forward = 4
    first = _embed(tiny_model_dir, loaded, pixels[:3], forward_batch_size=forward)[0]
    later = _embed(tiny_model_dir, loaded, pixels[5:11] + pixels[:1], forward)[-1]
    assert np.array_equal(first, later)                 # position 3 of forward 2, padded
    np.testing.assert_allclose(first, alone[0], atol=2e-5)


def test_staging_pads_with_zero_rows(pixels):
    staged = stage_pixels(pixels[:3], 5, pinned=False)
    assert tuple(staged.shape) == (5, *pixels[0].shape) and staged.dtype == torch.uint8
    assert all(torch.equal(staged[i], pixels[i]) for i in range(3)) and not staged[3:].any()


def test_forward_batch_size_defaults(tiny_model_dir):
    assert default_forward_batch_size(64) == 64
    assert default_forward_batch_size(1024) == 256
    handler = OpenClipModelHandler(tiny_model_dir, max_batch_size=8)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 8}


@pytest.mark.parametrize("value, mode", [("false", None), ("true", "default"),
                                         ("max-autotune", "max-autotune"),
                                         ("reduce-overhead", "reduce-overhead")])
def test_torch_compile_takes_a_mode(value, mode):
    def parsed(argv):
        return curator_options(argv).view_as(CuratorOptions).torch_compile

    assert parsed(["--torch_compile", value]) == mode
    assert parsed([]) is None


def test_torch_compile_refuses_an_unknown_mode(capsys):
    with pytest.raises(SystemExit):
        curator_options(["--torch_compile", "fastest"]).view_as(CuratorOptions)
    assert "max-autotune" in capsys.readouterr().err
