"""The curation report: OUTPUT/report.html, built from a run's written outputs only.

    from beam_curator.report import write_report
    path = write_report("OUT")          # -> "OUT/report.html"

    python -m beam_curator report --output OUT

One self-contained HTML file (inline CSS and SVG charts, thumbnails as base64 data: URIs, no
scripts, no network): the accounting table (counts per status, input = sum, per shard),
histograms of the aesthetic and NSFW scores with the thresholds drawn, the cluster sizes and the
cosine-similarity distribution with the 1 - eps line, a gallery of removed duplicates beside the
sample each duplicates, the aesthetic extremes, the CLIP image-caption score when the run has
one (its histogram with the threshold, the samples each filter took, the highest- and
lowest-scoring pairs with their captions), with a --reference the matches (settings, a
histogram of each candidate's best reference cosine with the threshold, the highest-cosine
matches), with a --target the clusters it touched, the top error reasons, the run's options,
and a banner when the model weights were random. Every piece of text from the data is escaped.

Modules: load.py (outputs -> aggregates), thumbs.py (thumbnails from the source shards),
charts.py (SVG), render.py (HTML).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

from beam_curator import outputs
from beam_curator.report.load import ReportError, RunData, load_run
from beam_curator.report.render import render_report
from beam_curator.report.thumbs import Thumb, fetch_thumbnails

__all__ = ["write_report", "build_report", "ReportError"]

_LOG = logging.getLogger(__name__)


def _wanted_ids(data: RunData):
    wanted = set()
    for pair in data.pairs:
        wanted.add(pair.id)
        wanted.add(pair.duplicate_of)
    wanted.update(i for _, i in data.spotlight_best)
    wanted.update(i for _, i in data.spotlight_worst)
    wanted.update(i for _, i in data.clip_best)
    wanted.update(i for _, i in data.clip_worst)
    wanted.update(m.id for m in data.reference_matches)
    return wanted


def build_report(output_dir: str, thumbnails: bool = True,
                 summary: Optional[dict] = None) -> str:
    """The report's HTML for a finished run's output directory (nothing written).

    `summary`: the run's summary when it is not written yet (the run writes report.html just
    before summary.json, so that summary.json stays the last file of a finished run).
    """
    data = load_run(output_dir, summary=summary)
    thumbs: Dict[str, Thumb] = {}
    if thumbnails:
        max_pixels: Optional[int] = data.options.get("max_image_pixels")
        thumbs = fetch_thumbnails(_wanted_ids(data), data.shard_urls, max_pixels,
                                  data.options.get("max_member_bytes"),
                                  data.options.get("caption_field"))
    return render_report(data, thumbs)


def write_report(output_dir: str, summary: Optional[dict] = None) -> str:
    """Write OUTPUT/report.html (temp name, then rename) and return its path."""
    from beam_curator.atomic import write_atomically

    page = build_report(output_dir, summary=summary).encode("utf-8")
    path = outputs.report_file(output_dir.rstrip("/") or output_dir)
    write_atomically(path, lambda stream: stream.write(page), mime_type="text/html")
    _LOG.info("wrote %s (%d kB)", path, len(page) // 1024)
    return path
