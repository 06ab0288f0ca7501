"""Render the report: one self-contained HTML page (inline CSS and SVG, data: thumbnails).

Rules of this module:
- every value that comes from the data (ids, keys, shard names, captions, json sidecars, error
  reasons, option values) goes through `esc()` = `html.escape(..., quote=True)`, in text and
  in attributes alike, after control and bidi characters (NUL, U+202E, ...) are written out
  as `\\u202e` (`charts.visible`) so that they show and reorder nothing; nothing from the
  data ever lands in a tag name, an attribute name, a URL, a style or a script;
- the page holds no <script>, no event handler attribute and no external reference, and its
  Content-Security-Policy (`default-src 'none'`, images from data: only) makes the browser
  refuse any script or network load even if one slipped in.
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from beam_curator.report.charts import (
    Threshold,
    bars_svg,
    esc,
    fmt_num,
    histogram_svg,
    legend_html,
)
from beam_curator.report.load import Pair, ReferenceMatch, RunData
from beam_curator.report.thumbs import THUMB_PX, Thumb
from beam_curator.schema import (
    ERROR,
    EXACT_DUPLICATE,
    FILTERED_AESTHETIC,
    FILTERED_ASPECT_RATIO,
    FILTERED_CAPTION_LANGUAGE,
    FILTERED_CAPTION_LENGTH,
    FILTERED_CLIP_SCORE,
    FILTERED_IMAGE_SIZE,
    FILTERED_NSFW,
    FILTERED_TARGET,
    KEPT,
    REFERENCE_DUPLICATE,
    SEMANTIC_DUPLICATE,
    STATUSES,
)

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
       "form-action 'none'")

STATUS_COLORS = {
    KEPT: "#3f8f5a",
    FILTERED_AESTHETIC: "#d38b2c",
    FILTERED_NSFW: "#b8475b",
    EXACT_DUPLICATE: "#3b73c4",
    SEMANTIC_DUPLICATE: "#7b61c9",
    ERROR: "#7d7d7d",
    FILTERED_CAPTION_LENGTH: "#8c6d46",
    FILTERED_CAPTION_LANGUAGE: "#a8873a",
    FILTERED_IMAGE_SIZE: "#4f8f8f",
    FILTERED_ASPECT_RATIO: "#6b9c3f",
    FILTERED_CLIP_SCORE: "#c4568f",
    FILTERED_TARGET: "#a0633c",
    REFERENCE_DUPLICATE: "#1f5f8b",
}
# What each status means, for people (the table shows the status name beside it).
STATUS_LABELS = {
    KEPT: "kept",
    FILTERED_AESTHETIC: "aesthetic score below the threshold",
    FILTERED_NSFW: "NSFW score at or above the threshold",
    EXACT_DUPLICATE: "exact duplicate (same image bytes)",
    SEMANTIC_DUPLICATE: "semantic duplicate",
    ERROR: "error (unreadable or undecodable)",
    FILTERED_CAPTION_LENGTH: "caption too short",
    FILTERED_CAPTION_LANGUAGE: "caption not in an allowed language",
    FILTERED_IMAGE_SIZE: "image too small (shorter side)",
    FILTERED_ASPECT_RATIO: "aspect ratio too extreme",
    FILTERED_CLIP_SCORE: "CLIP image–caption score below the threshold",
    FILTERED_TARGET: "outside the target's clusters (--target)",
    REFERENCE_DUPLICATE: "duplicate of a reference row (--reference)",
}
# The filters in the order a sample meets them (README, "Order"): the first failing check
# wins. (status, the options that set it)
FILTER_ORDER = (
    (FILTERED_CAPTION_LENGTH, ("min_caption_words", "min_caption_chars")),
    (FILTERED_CAPTION_LANGUAGE, ("caption_languages",)),
    (FILTERED_IMAGE_SIZE, ("min_image_side",)),
    (FILTERED_ASPECT_RATIO, ("max_aspect_ratio",)),
    (FILTERED_NSFW, ("nsfw_threshold",)),
    (FILTERED_AESTHETIC, ("aesthetic_threshold",)),
    (FILTERED_CLIP_SCORE, ("clip_score_threshold", "clip_score_keep_fraction")),
    # In the dedup step, after the filters above; listed only when the run had a --target.
    (FILTERED_TARGET, ("target",)),
)
SCORE_COLORS = {"passed": STATUS_COLORS[KEPT], FILTERED_AESTHETIC: STATUS_COLORS[
    FILTERED_AESTHETIC], FILTERED_NSFW: STATUS_COLORS[FILTERED_NSFW]}
SCORE_LABELS = {"passed": "passed the filters", FILTERED_AESTHETIC: "filtered_aesthetic",
                FILTERED_NSFW: "filtered_nsfw"}
COSINE_COLORS = {KEPT: STATUS_COLORS[KEPT], SEMANTIC_DUPLICATE: STATUS_COLORS[SEMANTIC_DUPLICATE]}
CLIP_COLORS = {"passed": STATUS_COLORS[KEPT], FILTERED_CLIP_SCORE: STATUS_COLORS[
    FILTERED_CLIP_SCORE], FILTERED_AESTHETIC: STATUS_COLORS[FILTERED_AESTHETIC],
    FILTERED_NSFW: STATUS_COLORS[FILTERED_NSFW], "other": "#9aa1ab"}
CLIP_LABELS = {"passed": "passed the filters", FILTERED_CLIP_SCORE: "filtered_clip_score",
               FILTERED_AESTHETIC: "filtered_aesthetic", FILTERED_NSFW: "filtered_nsfw",
               "other": "other statuses"}
CLIP_MIN_SPAN = 0.1       # the CLIP-score histogram spans at least this much cosine
REFERENCE_COLORS = {"candidates": STATUS_COLORS[REFERENCE_DUPLICATE]}
REFERENCE_LABELS = {"candidates": "candidates, by the cosine of their nearest reference row"}
MAX_SHARD_ROWS = 200
MAX_CLUSTER_BARS = 200

_CSS = """
:root { --fg:#1d2430; --muted:#5b6472; --line:#d9dee5; --bg:#f6f7f9; --card:#fff;
        --warn:#fff3cd; --warn-line:#e0b400; --bad:#fde2e4; --bad-line:#c0392b; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 "DejaVu Sans", "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color:var(--fg); background:var(--bg); }
header { padding:20px 28px 8px; }
h1 { margin:0 0 4px; font-size:24px; }
h2 { margin:0 0 10px; font-size:18px; }
h3 { margin:16px 0 6px; font-size:15px; }
.sub, .note { color:var(--muted); }
.note { font-size:12.5px; margin:4px 0; }
main { padding:0 28px 28px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px;
          padding:16px 20px; margin:14px 0; }
nav { padding:0 28px; font-size:13px; }
nav a { color:#2c5ea8; margin-right:14px; text-decoration:none; }
.banner { margin:12px 28px 0; padding:12px 16px; border-radius:8px; font-weight:600;
          border:2px solid var(--warn-line); background:var(--warn); }
.banner.bad { border-color:var(--bad-line); background:var(--bad); }
.banner span { font-weight:400; display:block; margin-top:2px; }
table { border-collapse:collapse; font-size:13px; }
th, td { border-bottom:1px solid var(--line); padding:4px 10px; text-align:left;
         vertical-align:top; }
th { background:#eef1f5; font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.total td { font-weight:700; border-top:2px solid var(--fg); }
.ok { color:#2d7a46; font-weight:700; } .fail { color:var(--bad-line); font-weight:700; }
.swatch { display:inline-block; width:11px; height:11px; border-radius:2px; margin-right:6px;
          vertical-align:-1px; }
.legend { font-size:12.5px; margin:2px 0 6px; }
.legend .key { margin-right:16px; white-space:nowrap; }
.charts { display:flex; flex-wrap:wrap; gap:18px; }
.chartbox { max-width:580px; }
.chart { max-width:100%; height:auto; background:#fff; }
.chart .grid { stroke:#e8ebef; } .chart .axis { stroke:#8a93a0; }
.chart .tick { font-size:11px; fill:#5b6472; } .chart .axis-label { font-size:12px; fill:#1d2430; }
.chart .threshold { stroke:#c0392b; stroke-width:2; stroke-dasharray:6 4; }
.chart .threshold-label { font-size:12px; fill:#c0392b; font-weight:700; }
.gallery { display:grid; grid-template-columns:repeat(auto-fill, minmax(330px, 1fr)); gap:10px; }
.pair { display:flex; gap:8px; align-items:flex-start; border:1px solid var(--line);
        border-radius:6px; padding:8px; }
.pair .sim { align-self:center; text-align:center; font-size:12px; color:var(--muted);
             min-width:58px; }
.pair .sim b { display:block; color:var(--fg); font-size:13px; }
figure { margin:0; width:130px; font-size:11.5px; }
figure img, figure .noimg { width:""" + str(THUMB_PX) + """px; height:""" + str(THUMB_PX) + """px;
        object-fit:contain; background:#eceff3; border-radius:4px; display:block; }
figure .noimg { display:flex; align-items:center; justify-content:center; text-align:center;
        color:var(--muted); font-size:11px; padding:4px; }
figcaption { margin-top:3px; }
.id { font-family:"DejaVu Sans Mono", Menlo, Consolas, monospace; font-size:11px;
      word-break:break-all; }
figure .id { display:block; }
.caption { color:var(--muted); word-break:break-word; max-height:4.4em; overflow:hidden; }
.badge { display:inline-block; padding:0 6px; border-radius:9px; color:#fff; font-size:10.5px; }
.strip { display:flex; flex-wrap:wrap; gap:10px; }
td.caption-text { max-width:560px; word-break:break-word; }
td.thumb img, td.thumb .noimg { width:""" + str(THUMB_PX) + """px;
        height:""" + str(THUMB_PX) + """px; object-fit:contain; background:#eceff3;
        border-radius:4px; display:block; }
td.thumb .noimg { color:var(--muted); font-size:11px; padding:4px; }
.status-name { color:var(--muted); font-size:11.5px; margin-left:6px; }
#filter-counts-table code { white-space:nowrap; }
td.reason { max-width:640px; word-break:break-word; }
code, .mono { font-family:"DejaVu Sans Mono", Menlo, Consolas, monospace; font-size:12px; }
details summary { cursor:pointer; color:#2c5ea8; margin:8px 0; }
footer { color:var(--muted); font-size:12px; padding:0 28px 24px; }
"""


def _clip(text, limit: int) -> str:
    """Long untrusted text cut to `limit` characters (escaped later, never here)."""
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + "…"


def _badge(status: Optional[str]) -> str:
    if not status:
        return ""
    color = STATUS_COLORS.get(status, "#555")
    return f'<span class="badge" style="background:{color}">{esc(status)}</span>'


def _int(value) -> str:
    """A count with thousands separators; anything else escaped as text."""
    return f"{value:,}" if isinstance(value, int) else esc(value)


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "—"


def render_report(data: RunData, thumbs: Dict[str, Thumb]) -> str:
    summary = data.summary
    title = f"Curation report — {data.output_dir}"
    parts: List[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        "<header><h1>Curation report</h1>",
        f'<div class="sub">output <code>{esc(data.output_dir)}</code> · command '
        f'<code>{esc(summary.get("command", "?"))}</code> · model_dir '
        f'<code>{esc(summary.get("model_dir") or data.options.get("model_dir") or "?")}'
        "</code></div></header>",
    ]
    parts += _banners(data)
    clip = _has_clip_section(data)
    parts.append('<nav><a href="#accounting">Accounting</a><a href="#scores">Scores</a>'
                 + ('<a href="#clip-score">CLIP score</a>' if clip else "")
                 + '<a href="#dedup">Dedup</a>'
                 + ('<a href="#reference">Matched a reference</a>' if data.reference else "")
                 + ('<a href="#target">Target</a>' if data.target else "")
                 + '<a href="#duplicates">Duplicate gallery</a>'
                 '<a href="#spotlight">Aesthetic extremes</a><a href="#errors">Errors</a>'
                 '<a href="#options">Options</a></nav><main>')
    parts.append(_accounting(data))
    parts.append(_scores(data))
    if clip:
        parts.append(_clip_score(data, thumbs))
    parts.append(_dedup(data))
    if data.reference:
        parts.append(_reference(data, thumbs))
    if data.target:
        parts.append(_target(data))
    parts.append(_gallery(data, thumbs))
    parts.append(_spotlight(data, thumbs))
    parts.append(_errors(data))
    parts.append(_options(data))
    parts.append("</main><footer>Written by beam-curator from the run's outputs "
                 f"({esc(data.summary_name)}, samples/, errors/, dedup/) and thumbnails of the "
                 "source shards. Self-contained: no scripts, no network.</footer>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _banners(data: RunData) -> List[str]:
    out = []
    summary = data.summary
    if summary.get("random_weights"):
        out.append('<div class="banner" id="random-weights-banner">RANDOM MODEL WEIGHTS — '
                   "scores, embeddings, filters and duplicates in this report are meaningless."
                   "<span>The model directory was written by <code>models init-random</code> "
                   "(for demos and tests). Use <code>models download</code> for the real "
                   "weights.</span></div>")
    if data.summary_name != "summary.json" or not summary.get("accounting", {}).get("ok", True):
        out.append('<div class="banner bad" id="accounting-failed-banner">ACCOUNTING FAILED — '
                   "this run did not finish cleanly."
                   f"<span>The report was built from {esc(data.summary_name)}: input and "
                   "the sum of statuses disagree, so the outputs must not be used.</span></div>")
    counts = summary.get("counts") or {}
    if counts and data.samples_files:
        diff = {s: (counts.get(s, 0), data.counts_from_samples.get(s, 0))
                for s in set(counts) | set(data.counts_from_samples)
                if counts.get(s, 0) != data.counts_from_samples.get(s, 0)}
        if diff:
            text = ", ".join(f"{esc(s)}: summary {a} vs samples {b}"
                             for s, (a, b) in sorted(diff.items()))
            out.append('<div class="banner bad" id="samples-mismatch-banner">samples/*.parquet '
                       f"disagrees with {esc(data.summary_name)}<span>{text}</span></div>")
    if not counts:
        out.append('<div class="banner">This output has no per-status counts (command '
                   f"<code>{esc(summary.get('command'))}</code>): the report shows what the "
                   "outputs hold.</div>")
    return out


def _accounting(data: RunData) -> str:
    summary = data.summary
    counts = summary.get("counts") or data.counts_from_samples
    acc = summary.get("accounting") or {}
    total_in = summary.get("samples_read", acc.get("input", sum(counts.values())))
    if not summary.get("counts") and not data.samples_files:
        return ('<section id="accounting"><h2>Accounting</h2><p class="note" '
                f'id="no-accounting">This output ({esc(summary.get("command"))}) has no '
                "samples/ and no per-status counts.</p></section>")
    rows = []
    for status in list(STATUSES) + sorted(set(counts) - set(STATUSES)):
        n = int(counts.get(status, 0))
        label = (f'{esc(STATUS_LABELS[status])}<code class="status-name">{esc(status)}</code>'
                 if status in STATUS_LABELS else esc(status))
        rows.append(f'<tr data-status="{esc(status)}"><td><span class="swatch" style="background:'
                    f'{STATUS_COLORS.get(status, "#555")}"></span>{label}</td>'
                    f'<td class="num">{n:,}</td><td class="num">{_pct(n, total_in)}</td></tr>')
    total = sum(int(v) for v in counts.values())
    ok = acc.get("ok", total == total_in)
    check = ('<span class="ok">OK</span>' if ok else '<span class="fail">FAILED</span>')
    html = [
        '<section id="accounting"><h2>Accounting</h2>',
        '<p class="note">Every sample read ends in exactly one status; the pipeline checks '
        "that the input equals the sum of the statuses.</p>",
        '<table id="accounting-table"><tr><th>status</th><th class="num">samples</th>'
        '<th class="num">share</th></tr>', "".join(rows),
        f'<tr class="total" data-status="sum"><td>sum of statuses</td><td class="num">{total:,}'
        '</td><td class="num"></td></tr>',
        f'<tr class="total" data-status="input"><td>input (samples read)</td>'
        f'<td class="num">{_int(total_in)}</td><td class="num">{check}</td></tr></table>',
    ]
    extra = []
    for key in ("curated_samples_written", "curated_shards_written"):
        if key in summary:
            extra.append(f"{esc(key.replace('_', ' '))}: <b>{esc(summary[key])}</b>")
    if extra:
        html.append('<p class="note">' + " · ".join(extra) + "</p>")
    html.append(_per_shard(data))
    html.append("</section>")
    return "".join(html)


def _per_shard(data: RunData) -> str:
    per_shard = data.summary.get("per_shard") or {}
    if not per_shard:
        return ""
    shards = sorted(per_shard)
    shown = shards[:MAX_SHARD_ROWS]
    # Only the statuses some shard has (kept always): eleven columns, most of them zero on a
    # run without the field's filters, would hide the ones that matter.
    present = {s for c in per_shard.values() for s, n in (c or {}).items() if n}
    columns = [s for s in STATUSES if s == KEPT or s in present]
    head = "".join(f'<th class="num">{esc(s)}</th>' for s in columns)
    rows = []
    for shard in shown:
        c = per_shard[shard] or {}
        cells = "".join(f'<td class="num">{int(c.get(s, 0)):,}</td>' for s in columns)
        url = data.shard_urls.get(shard, "")
        rows.append(f'<tr><td class="mono">{esc(shard)}</td><td class="num">'
                    f'{sum(int(v) for v in c.values()):,}</td>{cells}'
                    f'<td class="id">{esc(url)}</td></tr>')
    more = (f'<p class="note">Showing the first {len(shown)} of {len(shards)} shards '
            "(summary.json has them all).</p>" if len(shards) > len(shown) else "")
    n_errors = data.summary.get("n_shard_errors", len(data.summary.get("shard_errors") or []))
    errs = (f'<p class="note">Shard-level errors: {n_errors:,} (see Errors).</p>'
            if n_errors else "")
    return ("<details open><summary>Per shard "
            f"({len(shards)})</summary>"
            f'<table id="per-shard-table"><tr><th>shard</th><th class="num">input</th>{head}'
            f"<th>source</th></tr>{''.join(rows)}</table>{more}{errs}</details>")


def _scores(data: RunData) -> str:
    opts = data.options
    a_th = opts.get("aesthetic_threshold")
    n_th = opts.get("nsfw_threshold")
    parts = ['<section id="scores"><h2>Scores</h2>',
             '<p class="note">Scores of every embedded sample, coloured by what happened to '
             "it. The NSFW filter runs before the aesthetic filter.</p>",
             legend_html(SCORE_COLORS, SCORE_LABELS), '<div class="charts">']
    if data.aesthetic.total:
        edges, counts = data.aesthetic.view(0.5, include=[a_th])
        ths = [Threshold(a_th, f"keep ≥ {fmt_num(a_th)}", "aesthetic")] if a_th is not None \
            else []
        parts.append("<div>" + histogram_svg(
            edges, counts, SCORE_COLORS, title="LAION aesthetic score",
            x_label="aesthetic score (LAION, 1–10 scale)", thresholds=ths,
            chart_id="aesthetic-histogram") + _threshold_note(
                "aesthetic", a_th, "--aesthetic_threshold", "kept when score ≥") + "</div>")
    else:
        parts.append('<p class="note">No aesthetic scores in samples/.</p>')
    if data.nsfw.total:
        edges, counts = data.nsfw.view(0.05, include=[n_th])
        ths = [Threshold(n_th, f"filter ≥ {fmt_num(n_th)}", "nsfw")] if n_th is not None else []
        parts.append("<div>" + histogram_svg(
            edges, counts, SCORE_COLORS, title="NSFW score", x_label="NSFW score (0–1)",
            thresholds=ths, chart_id="nsfw-histogram") + _threshold_note(
                "nsfw", n_th, "--nsfw_threshold", "filtered when score ≥") + "</div>")
    else:
        parts.append('<p class="note">No NSFW scores in samples/.</p>')
    clipped = data.aesthetic.clipped + data.nsfw.clipped
    parts.append("</div>")
    if clipped:
        parts.append(f'<p class="note">{clipped} score(s) outside the chart range were drawn in '
                     "its end bars.</p>")
    parts.append("</section>")
    return "".join(parts)


def _threshold_note(kind: str, value, flag: str, rule: str) -> str:
    if value is None:
        return (f'<p class="note threshold-off" id="{kind}-threshold-off">{esc(kind)} filter '
                f"off (<code>{esc(flag)} none</code>).</p>")
    return (f'<p class="note" id="{kind}-threshold-note">{esc(flag)} = '
            f"<b>{esc(fmt_num(value, 6))}</b>: {esc(rule)} {esc(fmt_num(value, 6))}.</p>")


class ClipThreshold(NamedTuple):
    value: Optional[float]   # None: no CLIP-score filter, or nothing was scored
    source: str              # "threshold" (--clip_score_threshold), "keep_fraction" or "off"
    label: str               # what the chart's line says


def clip_threshold(data: RunData) -> ClipThreshold:
    """The run's CLIP-score threshold: the absolute --clip_score_threshold, or the one the
    keep-fraction's quantile gave (summary.json["clip_score"])."""
    opts = data.options
    info = data.summary.get("clip_score") or {}
    if opts.get("clip_score_threshold") is not None:
        t = float(opts["clip_score_threshold"])
        return ClipThreshold(t, "threshold", f"keep ≥ {fmt_num(t, 4)} (--clip_score_threshold)")
    fraction = info.get("keep_fraction", opts.get("clip_score_keep_fraction"))
    if fraction is not None:
        t = info.get("threshold")
        t = float(t) if t is not None else None
        return ClipThreshold(t, "keep_fraction",
                             f"keep ≥ {fmt_num(t, 4)} (top {fmt_num(100 * fraction, 4)} %)")
    return ClipThreshold(None, "off", "")


def clip_score_view(data: RunData) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """(bar edges, counts per series) of the CLIP-score histogram as the page draws it."""
    return data.clip.view(CLIP_MIN_SPAN, include=[clip_threshold(data).value])


def _has_clip_section(data: RunData) -> bool:
    """The run scored pairs, or filtered by the score (and then maybe scored none); not for
    a `dedup` output (no samples/: its --clip_score_threshold only picks candidates)."""
    return bool(data.clip.total) or (bool(data.samples_files)
                                     and clip_threshold(data).source != "off")


def _clip_score(data: RunData, thumbs: Dict[str, Thumb]) -> str:
    opts = data.options
    th = clip_threshold(data)
    parts = ['<section id="clip-score"><h2>CLIP score</h2>',
             '<p class="note">The cosine of each image\'s embedding and its caption\'s, from the '
             "same CLIP model (null without a usable caption). "
             f'<b id="clip-scored">{data.clip.total:,}</b> of {data.rows:,} samples were '
             "scored; the basic filters (caption length and language, image size, aspect ratio) "
             "run before the model, so the samples they take have no score.</p>"]
    info = data.summary.get("clip_score") or {}
    if th.source == "threshold":
        parts.append(f'<p class="note" id="clip-threshold-note">--clip_score_threshold = '
                     f"<b>{esc(fmt_num(th.value, 6))}</b> (absolute): kept when score ≥ "
                     f"{esc(fmt_num(th.value, 6))}; a sample without a caption is filtered.</p>")
    elif th.source == "keep_fraction":
        fraction = info.get("keep_fraction", opts.get("clip_score_keep_fraction"))
        how = ("exact" if info.get("exact") else
               "approximate (Beam's ApproximateQuantiles)") if "exact" in info else "?"
        scored = info.get("scored")
        parts.append(
            f'<p class="note" id="clip-threshold-note">--clip_score_keep_fraction = '
            f"<b>{esc(fmt_num(fraction, 6))}</b>: threshold <b>{esc(fmt_num(th.value, 6))}</b>, "
            f"computed as the (1 − {esc(fmt_num(fraction, 6))}) quantile of "
            f"{_int(scored) if scored is not None else '?'} scored sample(s), {esc(how)} "
            "(summary.json clip_score); kept when score ≥ the threshold"
            + (f"; {_int(info['passed'])} sample(s) passed it" if "passed" in info else "")
            + ". A sample without a caption is filtered.</p>")
    else:
        parts.append('<p class="note threshold-off" id="clip-threshold-off">CLIP-score filter '
                     "off (no <code>--clip_score_threshold</code> or "
                     "<code>--clip_score_keep_fraction</code>).</p>")
    parts.append('<div class="charts">')
    if data.clip.total:
        edges, counts = clip_score_view(data)
        colors = {n: c for n, c in CLIP_COLORS.items()
                  if n in ("passed", FILTERED_CLIP_SCORE) or counts[n].any()}
        ths = [Threshold(th.value, th.label, "clip_score")] if th.value is not None else []
        parts.append('<div class="chartbox">' + legend_html(colors, CLIP_LABELS) + histogram_svg(
            edges, counts, colors, title="CLIP image–caption score",
            x_label="CLIP score (cosine of image and caption embeddings)", thresholds=ths,
            chart_id="clip-score-histogram") + "</div>")
    else:
        parts.append('<p class="note" id="no-clip-scores">No CLIP scores in samples/ (no '
                     "sample reached the model with a usable caption).</p>")
    parts.append(_filter_counts(data) + "</div>")
    if data.clip.clipped:
        parts.append(f'<p class="note">{data.clip.clipped} score(s) outside [−1, 1] (rounding) '
                     "were drawn in the end bars.</p>")
    for title, key, items in (("Highest CLIP scores", "best", data.clip_best),
                              ("Lowest CLIP scores", "worst", data.clip_worst)):
        if items:
            parts.append(f"<h3>{esc(title)}</h3>" + _clip_pairs(key, items, data, thumbs))
    if data.clip_best or data.clip_worst:
        parts.append('<p class="note">Captions as the pipeline read them from the source shards '
                     "(the <code>.txt</code> sidecar, or <code>--caption_field</code> of the "
                     "<code>.json</code>), cut at 300 characters; samples/ holds the score, not "
                     "the caption. NSFW-filtered samples are never shown.</p>")
    parts.append("</section>")
    return "".join(parts)


def _filter_counts(data: RunData) -> str:
    """How many samples each filter took, in the order a sample meets them (the target
    filter, in the dedup step, only for a run with a --target)."""
    summary, opts = data.summary, data.options
    counts = summary.get("counts") or data.counts_from_samples
    total_in = summary.get("samples_read", sum(counts.values()))
    with_target = bool(data.target or opts.get("target") or counts.get(FILTERED_TARGET))
    rows = []
    for status, flags in FILTER_ORDER:
        if status == FILTERED_TARGET and not with_target:
            continue
        n = int(counts.get(status, 0))
        on = [f"--{f} {_option_text(opts.get(f))}" for f in flags if opts.get(f) is not None]
        setting = (" · ".join(f"<code>{esc(x)}</code>" for x in on) if on
                   else '<span class="note">off</span>')
        rows.append(f'<tr data-status="{esc(status)}"><td><span class="swatch" style="'
                    f'background:{STATUS_COLORS[status]}"></span>{esc(STATUS_LABELS[status])}'
                    f'<code class="status-name">{esc(status)}</code></td><td>{setting}</td>'
                    f'<td class="num">{n:,}</td><td class="num">{_pct(n, total_in)}</td></tr>')
    return ('<div class="chartbox"><h3>Samples each filter took</h3><p class="note">In the '
            "order a sample meets them: the first failing check wins, so a sample is counted "
            "once, by the first filter it fails"
            + (" (the target filter runs in the dedup step, after the others)"
               if with_target else "")
            + ". Share of the input.</p>"
            '<table id="filter-counts-table"><tr><th>filter</th><th>setting</th>'
            '<th class="num">samples</th><th class="num">share</th></tr>'
            + "".join(rows) + "</table></div>")


def _option_text(value) -> str:
    if isinstance(value, float):
        return fmt_num(value, 6)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _clip_pairs(key: str, items: List[Tuple[float, str]], data: RunData,
                thumbs: Dict[str, Thumb]) -> str:
    rows = []
    for score, sample_id in items:
        thumb = thumbs.get(sample_id)
        if thumb is None:
            caption = '<span class="note">caption not loaded (thumbnails off)</span>'
        elif thumb.scored_caption is None:
            caption = f'<span class="note">caption unavailable ({esc(thumb.note or "none")})</span>'
        else:
            caption = esc(thumb.scored_caption)
        rows.append(f'<tr data-id="{esc(sample_id)}" data-score="{score:.6f}"><td class="thumb">'
                    f'{_thumb_img(sample_id, thumb, f"clip score {score:.4f}")}</td>'
                    f'<td class="num"><b>{score:.4f}</b></td><td>'
                    f'{_badge(data.id_status.get(sample_id))} <span class="id">'
                    f'{esc(_clip(sample_id, 160))}</span></td>'
                    f'<td class="caption-text">{caption}</td></tr>')
    return (f'<table id="clip-{esc(key)}-table"><tr><th>image</th><th class="num">score</th>'
            f'<th>id</th><th>caption</th></tr>{"".join(rows)}</table>')


def _dedup(data: RunData) -> str:
    opts = data.options
    parts = ['<section id="dedup"><h2>Dedup</h2>']
    if not data.dedup_present:
        parts.append('<p class="note" id="dedup-off">No <code>dedup/</code> directory: dedup '
                     f"was off for this run (<code>--dedup {esc(opts.get('dedup'))}</code>) "
                     "or found no candidates.</p></section>")
        return "".join(parts)
    n_exact = data.n_pairs.get(EXACT_DUPLICATE, 0)
    n_sem = data.n_pairs.get(SEMANTIC_DUPLICATE, 0)
    eps = opts.get("eps")
    if data.n_removal_ids is not None:
        parts.append(f"<p>dedup/duplicates lists <b>{data.n_removal_ids}</b> removal id(s) "
                     "(exact + semantic); this output has no samples/, so no gallery.</p>")
    else:
        parts.append(
            f'<p>Exact duplicates (same image bytes): <b>{n_exact}</b> · semantic duplicates '
            f"(cosine ≥ 1 − eps = {esc(fmt_num(1 - eps, 6)) if eps is not None else '?'}): "
            f"<b>{n_sem}</b> · which_to_keep <code>{esc(opts.get('which_to_keep'))}</code>"
            "</p>")
    parts.append('<div class="charts">')
    # cluster sizes
    sizes = {c: dict(v) for c, v in data.clusters.items()}
    k = data.n_centroids if data.n_centroids is not None else len(sizes)
    for c in range(k):
        sizes.setdefault(c, {})
    if sizes:
        totals = sorted(((sum(v.values()), c) for c, v in sizes.items()),
                        key=lambda t: (-t[0], t[1]))
        values = [t[0] for t in totals]
        empty = sum(1 for v in values if v == 0)
        median = sorted(values)[len(values) // 2]
        source = "dedup/centroids.npy" if data.n_centroids is not None else "from samples/"
        plan = data.summary.get("dedup") or {}
        chosen = (f" · k chosen by {esc(plan['n_clusters_from'])}, k-means trained on "
                  f"{plan['sample_size']:,} embeddings · clusters cut into blocks of "
                  f"≤ {plan['pairwise_block_size']:,}: {plan['clusters_split_into_blocks']}"
                  if plan.get("n_clusters_from") else "")
        parts.append(f'<div class="chartbox"><h3>Cluster sizes</h3><p class="note" '
                     f'id="cluster-stats">k = {k} clusters ({source}) · {sum(values)} '
                     f"candidates · largest {values[0]} · median {median} · smallest "
                     f"{values[-1]} · empty {empty}{chosen}</p>")
        colors = {KEPT: STATUS_COLORS[KEPT], SEMANTIC_DUPLICATE: STATUS_COLORS[SEMANTIC_DUPLICATE]}
        for status in (REFERENCE_DUPLICATE, FILTERED_TARGET):   # --reference, --target
            if any(v.get(status) for v in sizes.values()):
                colors[status] = STATUS_COLORS[status]
        if any("assigned" in v for v in sizes.values()):     # from dedup/kmeans only
            colors = {"assigned": STATUS_COLORS[SEMANTIC_DUPLICATE]}
        if len(totals) <= MAX_CLUSTER_BARS:
            items = [{name: sizes[c].get(name, 0) for name in colors} for _, c in totals]
            parts.append(legend_html(colors) + bars_svg(
                items, colors, title="Cluster sizes, largest first",
                x_label=f"{len(totals)} clusters, largest first (bar = one cluster)",
                labels=[f"cluster {c}" for _, c in totals], chart_id="cluster-sizes"))
        else:
            parts.append(_size_histogram(values))
        parts.append("</div>")
    # cosine similarity
    if data.cosine.total:
        edges, counts = data.cosine.view(0.05, include=[1 - eps if eps is not None else None])
        ths = ([Threshold(1 - eps, f"duplicate ≥ {fmt_num(1 - eps, 6)}", "eps")]
               if eps is not None else [])
        parts.append('<div class="chartbox"><h3>Max cosine similarity to an earlier-ranked '
                     "cluster member</h3>"
                     f'<p class="note">Semantic duplicate when ≥ 1 − eps (eps = '
                     f"{esc(fmt_num(eps, 6))}, inclusive). Not drawn: the {data.first_ranked} "
                     "first-ranked member(s) of their clusters (no earlier member).</p>"
                     + legend_html(COSINE_COLORS) + histogram_svg(
                         edges, counts, COSINE_COLORS, title="Max cosine similarity",
                         x_label="cosine similarity", thresholds=ths,
                         chart_id="cosine-histogram") + "</div>")
    parts.append("</div>")
    files = ", ".join(f"{esc(k)}: {v} file(s)" for k, v in sorted(data.dedup_files.items()))
    if files:
        parts.append(f'<p class="note">dedup/ holds {files}.</p>')
    parts.append("</section>")
    return "".join(parts)


def reference_view(info: dict) -> Optional[Tuple[np.ndarray, Dict[str, np.ndarray]]]:
    """(bar edges, {"candidates": counts}) of the best-reference-cosine histogram, from
    summary.json's dedup.reference.best_cosine_histogram (equal bins from low to high); None
    when it has none or it does not read as one."""
    hist = info.get("best_cosine_histogram")
    try:
        low, high = float(hist["low"]), float(hist["high"])
        counts = np.asarray([int(c) for c in hist["counts"]], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        return None
    if not len(counts) or not (math.isfinite(low) and math.isfinite(high) and low < high):
        return None
    return np.linspace(low, high, len(counts) + 1), {"candidates": counts}


def _reference(data: RunData, thumbs: Dict[str, Thumb]) -> str:
    """--reference: the settings, how many candidates are reference duplicates, the
    histogram of each candidate's best reference cosine near the threshold, the top matches."""
    info, opts = data.reference, data.options
    threshold = info.get("threshold")
    threshold = float(threshold) if isinstance(threshold, (int, float)) else None
    eps = info.get("reference_eps")
    exact = info.get("exact")
    mode = ("exact: every candidate against every reference row" if exact else
            "within clusters: each candidate against the reference rows of its cluster (its "
            "nearest centroid)") if exact is not None else "?"
    parts = ['<section id="reference"><h2>Matched a reference</h2>',
             '<p class="note">Dedup against another set (<code>--reference</code>: an '
             "evaluation set, or an already curated one): a candidate whose embedding is within "
             "the threshold of a reference row is a <code>reference_duplicate</code>, "
             "<code>duplicate_of</code> the reference id; reference rows are never removed nor "
             "counted.</p>",
             '<table id="reference-settings"><tr><th>setting</th><th>value</th></tr>'
             f'<tr><td>reference</td><td class="mono">{esc(opts.get("reference", "?"))}</td></tr>'
             f'<tr><td>threshold</td><td>cosine ≥ <b>{esc(fmt_num(threshold, 6))}</b> '
             f"(1 − reference_eps, inclusive)</td></tr>"
             f"<tr><td>reference_eps</td><td>{esc(fmt_num(eps, 6))}</td></tr>"
             f"<tr><td>compared</td><td>{esc(mode)}</td></tr>"
             f'<tr><td>reference rows</td><td>{_int(info.get("rows", "?"))}</td>'
             "</tr></table>"]
    n_dups = info.get("reference_duplicates", "?")
    met = info.get("candidates_that_met_a_reference_row")
    n_candidates = (data.summary.get("dedup") or {}).get("n_candidates")
    of = f" of {_int(n_candidates)} candidates" if n_candidates is not None else ""
    parts.append(f'<p id="reference-counts"><b>{_int(n_dups)}</b>{of} are reference '
                 "duplicates"
                 + (f" · {_int(met)} met a reference row (had one to compare with)"
                    if met is not None else "") + ".</p>")
    counts = data.summary.get("counts") or {}
    if (REFERENCE_DUPLICATE in counts and isinstance(n_dups, int)
            and counts[REFERENCE_DUPLICATE] != n_dups):
        parts.append(f'<p class="note">{_int(counts[REFERENCE_DUPLICATE])} sample(s) ended '
                     "with the status reference_duplicate (Accounting).</p>")
    parts.append(_input_checks_note("reference", info.get("input_checks")))
    view = reference_view(info)
    hist = info.get("best_cosine_histogram") or {}
    if view is not None:
        edges, bars = view
        ths = ([Threshold(threshold, f"duplicate ≥ {fmt_num(threshold, 6)}", "reference")]
               if threshold is not None else [])
        below = hist.get("below_low", 0)
        parts.append(
            '<div class="chartbox"><h3>Best reference cosine of each candidate</h3>'
            '<p class="note" id="reference-below-low">Near the threshold only: '
            f"<b>{_int(below)}</b> candidate(s) whose nearest reference row is below "
            f"{esc(fmt_num(float(edges[0]), 6))} are not drawn"
            + (", nor those that met no reference row (in a cluster without one)"
               if not exact else "") + ".</p>"
            + legend_html(REFERENCE_COLORS, REFERENCE_LABELS) + histogram_svg(
                edges, bars, REFERENCE_COLORS, title="Best reference cosine",
                x_label="cosine of the candidate and its nearest reference row",
                thresholds=ths, chart_id="reference-histogram") + "</div>")
    else:
        parts.append('<p class="note" id="no-reference-histogram">summary.json has no '
                     "histogram of the reference cosines.</p>")
    if data.reference_matches:
        parts.append("<h3>Highest-cosine matches</h3>"
                     + _reference_table(data.reference_matches, data, thumbs)
                     + '<p class="note">Each candidate beside its nearest reference row, highest '
                     "cosine first (summary.json's top matches); the status is the candidate's "
                     "(an exact copy among the candidates is removed before the reference "
                     "is met). Reference rows have no thumbnail: the reference is embeddings "
                     "only.</p>")
    else:
        parts.append('<p class="note" id="no-reference-matches">No candidate met a reference '
                     "row.</p>")
    parts.append("</section>")
    return "".join(parts)


def _reference_table(matches: List[ReferenceMatch], data: RunData,
                     thumbs: Dict[str, Thumb]) -> str:
    rows = []
    for m in matches:
        known = m.cosine_sim is not None and math.isfinite(m.cosine_sim)
        sim = f"{m.cosine_sim:.4f}" if known else "?"
        rows.append(f'<tr data-id="{esc(m.id)}" data-reference-id="{esc(m.reference_id)}" '
                    f'data-cosine="{f"{m.cosine_sim:.6f}" if known else ""}"><td class="thumb">'
                    f'{_thumb_img(m.id, thumbs.get(m.id), f"cosine {sim}")}</td>'
                    f'<td class="num"><b>{esc(sim)}</b></td>'
                    f'<td>{_badge(data.id_status.get(m.id))} <span class="id">'
                    f'{esc(_clip(m.id, 160))}</span></td>'
                    f'<td class="id">{esc(_clip(m.reference_id, 160))}</td></tr>')
    return ('<table id="reference-matches-table"><tr><th>candidate</th>'
            '<th class="num">cosine</th><th>candidate id</th><th>reference id</th></tr>'
            + "".join(rows) + "</table>")


def _input_checks_note(what: str, checks) -> str:
    """The rows of --reference / --target the input checks set aside or normalised."""
    if not isinstance(checks, dict):
        return ""
    invalid = (checks.get("invalid_rows") or {}).get("count") or 0
    normalized = checks.get("normalized_rows") or 0
    if not invalid and not normalized:
        return ""
    return (f'<p class="note" id="{esc(what)}-input-checks">Input checks of the {esc(what)} '
            f"rows: {_int(invalid)} invalid (left out), {_int(normalized)} normalised to unit "
            "length (summary.json has the reasons).</p>")


def _target(data: RunData) -> str:
    """--target (DataComp's image-based filter): the clusters a target row touches keep their
    candidates, the others' are filtered_target."""
    info = data.target
    # a `dedup` output has no statuses (no samples/, no counts): no kept count to show
    counts = data.summary.get("counts") or (data.counts_from_samples if data.samples_files
                                            else {})
    k = (data.summary.get("dedup") or {}).get("n_clusters", data.n_centroids)
    of = f" of {_int(k)}" if k is not None else ""
    kept = counts.get(KEPT)
    return ('<section id="target"><h2>Target</h2>'
            '<p class="note">A candidate is kept only when its nearest centroid is also the '
            "nearest centroid of some <code>--target</code> row; the others are "
            "<code>filtered_target</code> and take no part in the dedup.</p>"
            f'<p id="target-counts">target <code>{esc(data.options.get("target", "?"))}</code> '
            f'· {_int(info.get("rows", "?"))} target row(s) · clusters touched: '
            f'<b>{_int(info.get("clusters_touched", "?"))}</b>{of} · samples filtered_target: '
            f'<b>{_int(info.get("filtered_target", "?"))}</b>'
            + (f" · samples kept: <b>{_int(kept)}</b>" if kept is not None else "") + "</p>"
            + _input_checks_note("target", info.get("input_checks")) + "</section>")


def _size_histogram(values: List[int]) -> str:
    top = max(values) or 1
    n_bars = min(50, top + 1)
    width = math.ceil((top + 1) / n_bars)
    edges = np.arange(0, width * n_bars + 1, width, dtype=float)
    counts, _ = np.histogram(values, bins=edges)
    colors = {"clusters": "#7b61c9"}
    return histogram_svg(edges, {"clusters": counts}, colors, title="Cluster size distribution",
                         x_label="cluster size (candidates)", chart_id="cluster-sizes")


def _thumb_img(sample_id: str, thumb: Optional[Thumb], role: str) -> str:
    thumb = thumb or Thumb(sample_id, None, note="not loaded")
    if thumb.data_uri:
        # data_uri is ours (base64 of a JPEG we encoded): only [A-Za-z0-9+/=] after the prefix.
        return (f'<img src="{esc(thumb.data_uri)}" width="{THUMB_PX}" height="{THUMB_PX}" '
                f'alt="{esc(role)} {esc(sample_id)}">')
    return f'<div class="noimg">{esc(thumb.note or "image unavailable")}</div>'


def _figure(sample_id: str, thumb: Optional[Thumb], status: Optional[str], role: str,
            prefix: str = "") -> str:
    """One thumbnail with its badge, id and caption; `prefix` is trusted markup of ours."""
    thumb = thumb or Thumb(sample_id, None, note="not loaded")
    tip = sample_id
    if thumb.caption:
        tip += "\n" + thumb.caption
    if thumb.meta:
        tip += "\n" + thumb.meta
    img = _thumb_img(sample_id, thumb, role)
    caption = (f'<div class="caption">{esc(thumb.caption)}</div>' if thumb.caption else "")
    return (f'<figure title="{esc(_clip(tip, 1200))}">{img}<figcaption>{prefix}'
            f'{_badge(status)} <span class="id">{esc(_clip(sample_id, 160))}</span>{caption}'
            "</figcaption></figure>")


def _gallery(data: RunData, thumbs: Dict[str, Thumb]) -> str:
    parts = ['<section id="duplicates"><h2>Duplicate gallery</h2>']
    total = sum(data.n_pairs.values())
    if data.n_removal_ids is not None:
        parts.append(f'<p class="note">No samples/ in this output: the {data.n_removal_ids} '
                     "removal id(s) are in dedup/duplicates; run `report` on a `run` output "
                     "for the gallery.</p></section>")
        return "".join(parts)
    if not data.pairs:
        parts.append('<p class="note" id="no-duplicates">No duplicates were removed'
                     + ("" if data.dedup_present else " (dedup was off)") + ".</p></section>")
        return "".join(parts)
    parts.append(f'<p class="note">{len(data.pairs)} of {total} removed duplicates, each beside '
                 "the sample it duplicates (exact duplicates first, then semantic ones spread "
                 "over the similarity range, most similar first). Hover for captions.</p>")
    parts.append('<div class="gallery">')
    for pair in data.pairs:
        parts.append(_pair_html(pair, data, thumbs))
    parts.append("</div></section>")
    return "".join(parts)


def _pair_html(pair: Pair, data: RunData, thumbs: Dict[str, Thumb]) -> str:
    if pair.status == EXACT_DUPLICATE:
        sim = "<b>identical</b>bytes"
    else:
        sim = (f"<b>{esc(f'{pair.cosine_sim:.4f}')}</b>cosine"
               if pair.cosine_sim is not None and math.isfinite(pair.cosine_sim) else "<b>?</b>")
    return (f'<div class="pair" data-kind="{esc(pair.status)}">'
            + _figure(pair.id, thumbs.get(pair.id), data.id_status.get(pair.id, pair.status),
                      "removed")
            + f'<div class="sim">{sim}<br>duplicate of →</div>'
            + _figure(pair.duplicate_of, thumbs.get(pair.duplicate_of),
                      data.id_status.get(pair.duplicate_of), "original")
            + "</div>")


def _spotlight(data: RunData, thumbs: Dict[str, Thumb]) -> str:
    parts = ['<section id="spotlight"><h2>Aesthetic extremes</h2>']
    if not data.spotlight_best and not data.spotlight_worst:
        parts.append('<p class="note">No kept or aesthetic-filtered samples to show.</p>'
                     "</section>")
        return "".join(parts)
    for title, items in (("Highest aesthetic scores among kept samples", data.spotlight_best),
                         ("Lowest aesthetic scores among filtered samples",
                          data.spotlight_worst)):
        if not items:
            continue
        parts.append(f"<h3>{esc(title)}</h3><div class=\"strip\">")
        for score, sample_id in items:
            parts.append(_figure(sample_id, thumbs.get(sample_id), data.id_status.get(sample_id),
                                 f"score {score:.2f}", prefix=f"<b>{score:.2f}</b> "))
        parts.append("</div>")
    parts.append('<p class="note">NSFW-filtered samples are never shown.</p></section>')
    return "".join(parts)


def _errors(data: RunData) -> str:
    parts = ['<section id="errors"><h2>Errors</h2>']
    if not data.n_errors:
        parts.append('<p class="note" id="no-errors">No errors: every sample was read and '
                     "decoded.</p></section>")
        return "".join(parts)
    parts.append(f"<p>{data.n_errors} error record(s) in errors/, {data.n_error_reasons} "
                 "distinct reason(s); the most frequent:</p>")
    rows = "".join(
        f'<tr><td class="num">{g.count}</td><td>{esc(g.stage)}</td>'
        f'<td class="reason">{esc(_clip(g.reason, 600))}</td>'
        f'<td class="id">{esc(_clip(g.example, 200))}</td></tr>'
        for g in data.errors)
    parts.append('<table id="errors-table"><tr><th class="num">count</th><th>stage</th>'
                 f"<th>reason</th><th>example</th></tr>{rows}</table></section>")
    return "".join(parts)


def _options(data: RunData) -> str:
    opts = data.options
    rows = "".join(f'<tr><td class="mono">--{esc(k)}</td><td class="mono">'
                   f"{esc(json.dumps(v, ensure_ascii=False, sort_keys=True))}</td></tr>"
                   for k, v in sorted(opts.items()))
    extra = "".join(f'<tr><td class="mono">{esc(k)}</td><td class="mono">'
                    f"{esc(json.dumps(data.summary.get(k), ensure_ascii=False))}</td></tr>"
                    for k in ("command", "model_dir", "random_weights") if k in data.summary)
    return ('<section id="options"><h2>Options of the run</h2>'
            '<table id="options-table"><tr><th>option</th><th>value</th></tr>'
            f"{extra}{rows}</table></section>")
