"""Decode errors become error samples; modes become RGB; thresholds and options at their edges."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from beam_curator.errors import OptionError
from beam_curator.options import curator_options, validate_options
from beam_curator.schema import (
    ERROR,
    FILTERED_AESTHETIC,
    FILTERED_NSFW,
    STAGE_DECODE,
    STAGE_READ,
    ShardSample,
)
from beam_curator.transforms.decode import DecodeFn, ImageError, open_rgb
from beam_curator.transforms.filters import filter_status


def png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, I am text pretending to be a jpeg", "not a recognisable image"),
])
def test_unusable_bytes_raise_with_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        open_rgb(data, 10_000)


def test_truncated_jpeg_is_an_error():
    data = jpeg(Image.new("RGB", (64, 64), (10, 200, 30)))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_rgb(data[: len(data) // 2], 10_000)


def test_pixel_cap():
    data = png(Image.new("RGB", (100, 50)))
    assert open_rgb(data, 5000).size == (100, 50)
    with pytest.raises(ImageError, match=r"100x50 = 5000 pixels, above --max_image_pixels 4999"):
        open_rgb(data, 4999)


def test_modes_become_rgb():
    cmyk = open_rgb(jpeg(Image.new("CMYK", (8, 8), (0, 255, 255, 0))), 10_000)
    assert cmyk.mode == "RGB" and cmyk.getpixel((4, 4))[0] > 200   # red stays red
    sixteen = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    grey = open_rgb(png(sixteen), 10_000)
    assert grey.mode == "RGB" and 120 <= grey.getpixel((0, 0))[0] <= 135   # scaled, not clipped
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert open_rgb(png(rgba), 10_000).getpixel((0, 0)) == (255, 255, 255)   # alpha on white
    palette = Image.new("P", (8, 8), 3)
    assert open_rgb(png(palette), 10_000).mode == "RGB"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90° clockwise when shown
    upright = open_rgb(jpeg(image, exif=exif), 10_000)
    assert upright.size == (20, 40)


def test_decode_fn_turns_failures_into_error_samples(tiny_model_dir):
    fn = DecodeFn(tiny_model_dir, 10_000)
    fn.setup()
    good = ShardSample(id="s/a", shard="s", shard_url="u", key="a", image_ext="png",
                       image_bytes=png(Image.new("RGB", (48, 48), (1, 2, 3))))
    bad = ShardSample(id="s/b", shard="s", shard_url="u", key="b", image_ext="jpg",
                      image_bytes=b"\xff\xd8\xff garbage")
    no_image = ShardSample(id="s/c", shard="s", shard_url="u", key="c", error="no image")
    (info, tensor), = list(fn.process(good))
    assert info.id == "s/a" and (info.width, info.height) == (48, 48)
    assert tuple(tensor.shape) == (32, 32, 3)
    assert info.content_hash == hashlib.sha256(good.image_bytes).hexdigest()
    (bad_out,), (missing_out,) = list(fn.process(bad)), list(fn.process(no_image))
    assert bad_out.value.status == ERROR and bad_out.value.stage == STAGE_DECODE
    assert "recognisable" in bad_out.value.reason or "corrupt" in bad_out.value.reason
    assert missing_out.value.stage == STAGE_READ and missing_out.value.reason == "no image"


@pytest.mark.parametrize("aesthetic, nsfw, expected", [
    (5.0, 0.1, None),                    # exactly at the aesthetic threshold: kept
    (4.999, 0.1, FILTERED_AESTHETIC),
    (9.0, 0.5, FILTERED_NSFW),           # exactly at the NSFW threshold: filtered
    (9.0, 0.4999, None),
    (1.0, 0.9, FILTERED_NSFW),           # both: NSFW wins
])
def test_threshold_boundaries(aesthetic, nsfw, expected):
    assert filter_status(aesthetic, nsfw, 5.0, 0.5) == expected


def test_thresholds_can_be_switched_off():
    assert filter_status(0.0, 1.0, None, None) is None
    opts = validate_options(curator_options(["--aesthetic-threshold", "none",
                                             "--nsfw_threshold", "0.7"]))
    assert opts.aesthetic_threshold is None and opts.nsfw_threshold == 0.7


@pytest.mark.parametrize("args, fix", [
    (["--aesthetic_threshold", "11"], "1–10 scale"),
    (["--nsfw_threshold", "1.5"], "probability"),
    (["--eps", "1.2"], "must be in \\[0, 1\\)"),
    (["--n_clusters", "0"], "n_clusters"),
    (["--min_inference_batch_size", "9", "--inference_batch_size", "4"], "lower it"),
    (["--forward_batch_size", "65"], "between 1 and --inference_batch_size \\(64\\)"),
    (["--forward_batch_size", "0", "--inference_batch_size", "8"], "Lower it"),
])
def test_bad_options_fail_fast_naming_the_fix(args, fix):
    with pytest.raises(OptionError, match=fix):
        validate_options(curator_options(args))


def test_required_options_and_hyphen_spelling():
    with pytest.raises(OptionError, match="--input is required"):
        validate_options(curator_options([]), needs=("input",))
    opts = validate_options(curator_options(["--model-dir", "m", "--which-to-keep", "easy"]))
    assert (opts.model_dir, opts.which_to_keep) == ("m", "easy")
