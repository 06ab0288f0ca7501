"""Small inline thumbnails (base64 JPEG data: URIs) of the few samples the report shows.

The images come from the source shards named by the samples' `shard_url` (the outputs never
hold image bytes, and removed samples are not in curated/). Each needed shard is streamed with
`shard_samples` and left as soon as every wanted id of it has been seen. A shard that moved or
broke only costs its thumbnails: the report says "image unavailable" and still renders.

The caption a CLIP score was computed from is not in the outputs (samples/ has its words,
characters and language only): `Thumb.scored_caption` is read here, from the same source
sample, by the pipeline's own rule (`captions.caption_of`: the `.txt` sidecar, or the run's
`--caption_field` of the `.json` one).
"""
from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

from beam_curator.captions import caption_of
from beam_curator.schema import ShardSample, shard_of_id

THUMB_PX = 96
_JPEG_QUALITY = 75
_MAX_TEXT = 300
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thumb:
    id: str
    data_uri: Optional[str]        # data:image/jpeg;base64,... or None when unavailable
    caption: Optional[str] = None  # the .txt sidecar (untrusted text, escaped when rendered)
    meta: Optional[str] = None     # the .json sidecar, verbatim (untrusted)
    note: Optional[str] = None     # why there is no image
    # The caption as the pipeline read it for the CLIP score (untrusted, cut to _MAX_TEXT);
    # None: the sample has no usable caption.
    scored_caption: Optional[str] = None


def make_thumbnail(image_bytes: bytes, max_pixels: Optional[int] = None,
                   size: int = THUMB_PX) -> str:
    """Image bytes -> a `data:image/jpeg;base64,...` URI of at most size x size pixels."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(image_bytes)) as image:
        if max_pixels and image.width * image.height > max_pixels:
            raise ValueError(f"{image.width}x{image.height} is over the pixel cap")
        image.draft("RGB", (size * 2, size * 2))   # JPEG: decode at a reduced scale
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P"
                                                  and "transparency" in image.info):
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            image = flat
        else:
            image = image.convert("RGB")
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=_JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _cut(text: str) -> str:
    return text[:_MAX_TEXT] + ("…" if len(text) > _MAX_TEXT else "")


def _sidecar_text(sample: ShardSample, ext: str) -> Optional[str]:
    for name, data in sample.sidecars.items():
        if name.lower() == ext:
            return _cut(data.decode("utf-8", errors="replace").strip())
    return None


def fetch_thumbnails(wanted: Iterable[str], shard_urls: Dict[str, str],
                     max_pixels: Optional[int] = None,
                     max_member_bytes: Optional[int] = None,
                     caption_field: Optional[str] = None) -> Dict[str, Thumb]:
    """ids -> Thumb, reading each needed source shard once and only as far as needed, with
    the run's member size limit (a shard is cut into the samples the run saw) and its
    `--caption_field` (for `scored_caption`)."""
    from beam_curator.defaults import DEFAULT_MAX_MEMBER_BYTES
    from beam_curator.webdataset import shard_samples

    max_member_bytes = max_member_bytes or DEFAULT_MAX_MEMBER_BYTES

    by_shard: Dict[str, set] = {}
    for sample_id in sorted(set(wanted)):
        by_shard.setdefault(shard_of_id(sample_id), set()).add(sample_id)
    thumbs: Dict[str, Thumb] = {}
    for shard, ids in sorted(by_shard.items()):
        url = shard_urls.get(shard)
        if not url:
            for i in ids:
                thumbs[i] = Thumb(i, None, note="source shard unknown")
            continue
        missing = set(ids)
        try:
            for item in shard_samples(shard, url, max_member_bytes):
                if not isinstance(item, ShardSample):
                    continue   # shard-level damage: the ids not reached stay unavailable
                if item.id not in missing:
                    continue
                missing.discard(item.id)
                thumbs[item.id] = _thumb_of(item, max_pixels, caption_field)
                if not missing:
                    break      # the rest of the shard is not needed
        except Exception as exc:   # noqa: BLE001 (a report never fails for a thumbnail)
            _LOG.warning("report: could not read thumbnails from %s: %s", url, exc)
        for i in missing:
            thumbs[i] = Thumb(i, None, note="image unavailable (source shard not readable)")
    return thumbs


def _thumb_of(sample: ShardSample, max_pixels: Optional[int],
              caption_field: Optional[str] = None) -> Thumb:
    caption = _sidecar_text(sample, "txt")
    meta = _sidecar_text(sample, "json")
    scored = caption_of(sample.sidecars, caption_field).text
    scored = _cut(scored) if scored is not None else None
    if sample.image_bytes is None:
        return Thumb(sample.id, None, caption, meta, note="sample has no image",
                     scored_caption=scored)
    try:
        uri = make_thumbnail(sample.image_bytes, max_pixels)
    except Exception as exc:   # noqa: BLE001 (corrupt, too large, unknown format)
        return Thumb(sample.id, None, caption, meta,
                     note=f"image not decodable ({type(exc).__name__})", scored_caption=scored)
    return Thumb(sample.id, uri, caption, meta, scored_caption=scored)
