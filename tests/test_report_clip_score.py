"""The report's CLIP-score section (beam_curator.report): built from REAL runs' outputs.

Two tiny runs over the same two captioned shards, one with every basic filter and
--clip_score_keep_fraction, one with an absolute --clip_score_threshold; every scored caption
carries `<script>` and `&`. Checked against numpy and a full sort of samples/*.parquet: the
histogram's bars, where the threshold line sits, the highest- and lowest-scoring ids, the
escaped captions, and the samples each filter took. Plus synthetic outputs (no pipeline) for
ties across many files and for an output without scores.
"""
from __future__ import annotations

import html
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_curator.schema import (
    FILTERED_ASPECT_RATIO,
    FILTERED_CAPTION_LANGUAGE,
    FILTERED_CAPTION_LENGTH,
    FILTERED_CLIP_SCORE,
    FILTERED_IMAGE_SIZE,
    FILTERED_NSFW,
    STATUSES,
)
from beam_curator.synthetic import SyntheticSample, draw_image, encode, write_shard
from tests.conftest import parquet_rows, run_args

SUBJECTS = ["a red square", "a photo of a dog", "two blue circles", "a green field",
            "an orange ellipse", "a small purple box", "a city street at night", "a yellow cat"]
THUMB_STRIP = 5      # load.CLIP_EXTREMES
# the chart geometry of charts.histogram_svg
X0, X1 = 56, 580 - 16


def caption_of(shard: int, i: int) -> str:
    return (f"{SUBJECTS[i % len(SUBJECTS)]} & friends, picture {shard}-{i} "
            f"<script>window.__pwned={shard}{i}</script> on a plain background")


def write_captioned_shards(directory: Path) -> dict:
    """Two shards, each: 8 scored candidates, and 2 samples for each basic filter (one-word
    caption, French caption, 24 px image, 120x36 image). Returns {id: caption or None}."""
    rng = random.Random(11)
    directory.mkdir(parents=True)
    captions = {}
    for s in range(2):
        planned = [(f"c{i:02d}", draw_image(rng, 48), caption_of(s, i)) for i in range(8)]
        for i in range(2):
            planned += [
                (f"short{i}", draw_image(rng, 48), "purple"),
                (f"french{i}", draw_image(rng, 48),
                 "une petite photo d'un carré violet sur un fond uni"),
                (f"small{i}", draw_image(rng, 24), "a small purple square on a plain field"),
                (f"wide{i}", draw_image(rng, 120).resize((120, 36)),
                 "a wide purple band on a plain field")]
        samples = []
        for key, image, caption in planned:
            fields = {"png": encode(image, "png")}
            if caption is not None:
                fields["txt"] = caption.encode()
            samples.append(SyntheticSample(key, fields))
            captions[f"{s:05d}/{key}"] = caption
        write_shard(str(directory / f"{s:05d}.tar"), samples)
    return captions


@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory, tiny_model_dir):
    from beam_curator import cli

    root = tmp_path_factory.mktemp("clip-report")
    captions = write_captioned_shards(root / "data")
    common = dict(progress_interval=0, aesthetic_threshold="none", nsfw_threshold="none",
                  dedup="false")
    fraction = root / "fraction"
    summary = cli.run_pipeline("run", run_args(
        input_glob=str(root / "data" / "*.tar"), output=str(fraction),
        model_dir=tiny_model_dir, min_caption_words=2, caption_languages="en",
        min_image_side=32, max_aspect_ratio=3, clip_score_keep_fraction=0.5, **common))
    # an absolute threshold between the scores of the first run (same data, same model)
    scores = sorted(r["clip_score"] for r in parquet_rows(fraction / "samples")
                    if r["clip_score"] is not None)
    threshold = round((scores[3] + scores[4]) / 2, 6)
    absolute = root / "absolute"
    summary_abs = cli.run_pipeline("run", run_args(
        input_glob=str(root / "data" / "*.tar"), output=str(absolute),
        model_dir=tiny_model_dir, clip_score_threshold=threshold, **common))
    return {"captions": captions, "fraction": fraction, "summary": summary,
            "absolute": absolute, "summary_abs": summary_abs, "threshold": threshold}


def page_of(out: Path) -> str:
    return (out / "report.html").read_text(encoding="utf-8")


def scored_rows(out: Path) -> list:
    return [r for r in parquet_rows(out / "samples") if r["clip_score"] is not None]


def svg_of(page: str, chart_id: str) -> str:
    return page.split(f'id="{chart_id}"', 1)[1].split("</svg>", 1)[0]


def bar_totals(svg: str) -> list:
    """The stacked bars' totals, left to right, from their tooltips (empty bars: no rect)."""
    tips = re.findall(r"<rect [^>]*><title>([^<]*)</title></rect>", svg)
    totals, last = [], None
    for tip in tips:
        if tip == last:     # the next segment of the same bar
            continue
        last = tip
        totals.append(sum(int(n) for n in re.findall(r": (\d+)", html.unescape(tip))))
    return totals


def table_rows(page: str, table_id: str) -> list:
    table = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr (data-[^>]*)>(.*?)</tr>", table)


# ---- the runs are what the tests need -----------------------------------------------------
def test_the_run_exercises_every_filter(clip_runs):
    counts = clip_runs["summary"]["counts"]
    assert counts[FILTERED_CAPTION_LENGTH] == counts[FILTERED_CAPTION_LANGUAGE] == 4
    assert counts[FILTERED_IMAGE_SIZE] == counts[FILTERED_ASPECT_RATIO] == 4
    assert counts[FILTERED_CLIP_SCORE] > 0 and counts["kept"] > 0
    assert clip_runs["summary"]["clip_score"]["scored"] == 16
    assert 0 < clip_runs["summary_abs"]["counts"][FILTERED_CLIP_SCORE] < 40


# ---- the histogram --------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fraction", "absolute"])
def test_histogram_counts_are_numpy_s(clip_runs, which):
    from beam_curator.report.load import load_run
    from beam_curator.report.render import clip_score_view

    out = clip_runs[which]
    rows = scored_rows(out)
    scores = np.array([r["clip_score"] for r in rows], dtype=np.float64)
    data = load_run(str(out))
    edges, counts = clip_score_view(data)
    assert data.clip.total == len(scores) > 0
    assert edges[0] <= scores.min() and scores.max() <= edges[-1]
    total = sum(counts.values())
    assert total.tolist() == np.histogram(scores, bins=edges)[0].tolist()
    for series, statuses in (("passed", {"kept"}), (FILTERED_CLIP_SCORE, {FILTERED_CLIP_SCORE})):
        mine = np.array([r["clip_score"] for r in rows if r["status"] in statuses])
        assert counts[series].tolist() == np.histogram(mine, bins=edges)[0].tolist(), series
    # ... and the page draws those bars, in that order
    svg = svg_of(page_of(out), "clip-score-histogram")
    assert bar_totals(svg) == [int(n) for n in total if n]


def _line_x(svg: str, kind: str):
    m = re.search(rf'<line class="threshold threshold-{kind}" data-threshold="([^"]+)" '
                  r'x1="([\d.]+)"', svg)
    return (m.group(1), float(m.group(2))) if m else (None, None)


def test_keep_fraction_threshold_line_sits_at_the_quantile(clip_runs):
    from beam_curator.report.load import load_run
    from beam_curator.report.render import clip_score_view

    out = clip_runs["fraction"]
    info = clip_runs["summary"]["clip_score"]
    scores = np.array([r["clip_score"] for r in scored_rows(out)], dtype=np.float32)
    assert info["threshold"] == float(np.quantile(scores, 0.5, method="lower"))
    page = page_of(out)
    svg = svg_of(page, "clip-score-histogram")
    edges, _ = clip_score_view(load_run(str(out)))
    value, x = _line_x(svg, "clip_score")
    assert value is not None, "no threshold line"
    assert float(value) == pytest.approx(info["threshold"], abs=1e-6)
    expected = X0 + (info["threshold"] - edges[0]) / (edges[-1] - edges[0]) * (X1 - X0)
    assert x == pytest.approx(expected, abs=0.06)
    assert "(top 50 %)" in svg and "--clip_score_threshold" not in svg
    note = page.split('id="clip-threshold-note">', 1)[1].split("</p>", 1)[0]
    assert "--clip_score_keep_fraction" in note and "16 scored sample(s), exact" in note


def test_absolute_threshold_line_is_labelled_so(clip_runs):
    out, threshold = clip_runs["absolute"], clip_runs["threshold"]
    page = page_of(out)
    svg = svg_of(page, "clip-score-histogram")
    value, x = _line_x(svg, "clip_score")
    assert float(value) == pytest.approx(threshold, abs=1e-6)
    assert "(--clip_score_threshold)" in svg and "top " not in svg
    note = page.split('id="clip-threshold-note">', 1)[1].split("</p>", 1)[0]
    assert "(absolute)" in note
    # every sample left of the line was filtered, every one right of it kept
    for row in scored_rows(out):
        assert (row["status"] == FILTERED_CLIP_SCORE) == (row["clip_score"] < threshold)


# ---- extremes and captions ------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fraction", "absolute"])
def test_extremes_are_the_true_extremes(clip_runs, which):
    from beam_curator.report.load import load_run

    out = clip_runs[which]
    rows = [r for r in scored_rows(out) if r["status"] != FILTERED_NSFW]
    best = sorted(rows, key=lambda r: (-r["clip_score"], r["id"]))[:THUMB_STRIP]
    worst = sorted(rows, key=lambda r: (r["clip_score"], r["id"]))[:THUMB_STRIP]
    data = load_run(str(out))
    assert [i for _, i in data.clip_best] == [r["id"] for r in best]
    assert [i for _, i in data.clip_worst] == [r["id"] for r in worst]
    assert [s for s, _ in data.clip_best] == [r["clip_score"] for r in best]
    page = page_of(out)
    for key, expected in (("best", best), ("worst", worst)):
        shown = [re.search(r'data-id="([^"]+)" data-score="([^"]+)"', attrs).groups()
                 for attrs, _ in table_rows(page, f"clip-{key}-table")]
        assert [i for i, _ in shown] == [r["id"] for r in expected]
        assert [float(s) for _, s in shown] == pytest.approx(
            [r["clip_score"] for r in expected], abs=1e-6)


def test_captions_are_the_scored_ones_escaped(clip_runs):
    out, captions = clip_runs["fraction"], clip_runs["captions"]
    page = page_of(out)
    # the payload shows, but only escaped
    assert re.search(r"<script", page, re.I) is None
    assert "__pwned" not in re.sub(r"&lt;script&gt;window\.__pwned=\d+&lt;/script&gt;", "",
                                   page)
    for key in ("best", "worst"):
        rows = table_rows(page, f"clip-{key}-table")
        assert len(rows) == THUMB_STRIP
        for attrs, cells in rows:
            sample_id = re.search(r'data-id="([^"]+)"', attrs).group(1)
            caption = captions[sample_id]
            assert "<script>" in caption and "&" in caption
            cell = re.search(r'<td class="caption-text">(.*?)</td>', cells).group(1)
            assert cell == html.escape(caption, quote=True)
            assert "&amp; friends" in cell and "&lt;script&gt;" in cell
            assert '<img src="data:image/jpeg;base64,' in cells


def test_captions_follow_caption_field(clip_runs, tmp_path):
    """With --caption_field the pair shows the .json field the score was computed from."""
    from beam_curator.report import build_report
    from beam_curator.report.load import load_run
    from beam_curator.report.thumbs import fetch_thumbnails

    data = load_run(str(clip_runs["fraction"]))
    wanted = {i for _, i in data.clip_best}
    thumbs = fetch_thumbnails(wanted, data.shard_urls)
    assert {t.scored_caption for t in thumbs.values()} == \
        {clip_runs["captions"][i] for i in wanted}
    # the same run's outputs, rendered as if the caption came from a .json field: the .txt
    # is not the caption then, and the shards have no .json, so no caption is shown
    copy = tmp_path / "out"
    shutil.copytree(clip_runs["fraction"], copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["options"]["caption_field"] = "caption"
    (copy / "summary.json").write_text(json.dumps(summary))
    page = build_report(str(copy))
    assert "&lt;script&gt;" not in page.split('id="clip-score"', 1)[1].split("</section>")[0]
    assert "caption unavailable" in page


# ---- filters and accounting -----------------------------------------------------------------
def test_filter_counts_in_the_order_a_sample_meets_them(clip_runs):
    page, counts = page_of(clip_runs["fraction"]), clip_runs["summary"]["counts"]
    rows = table_rows(page, "filter-counts-table")
    statuses = [re.search(r'data-status="([a-z_]+)"', a).group(1) for a, _ in rows]
    assert statuses == [FILTERED_CAPTION_LENGTH, FILTERED_CAPTION_LANGUAGE, FILTERED_IMAGE_SIZE,
                        FILTERED_ASPECT_RATIO, FILTERED_NSFW, "filtered_aesthetic",
                        FILTERED_CLIP_SCORE]
    for status, (_, cells) in zip(statuses, rows):
        n = int(re.findall(r'<td class="num">([\d,]+)</td>', cells)[0].replace(",", ""))
        assert n == counts[status], status
    settings = {s: c for s, (_, c) in zip(statuses, rows)}
    assert "--min_caption_words 2" in settings[FILTERED_CAPTION_LENGTH]
    assert "--caption_languages en" in settings[FILTERED_CAPTION_LANGUAGE]
    assert "--min_image_side 32" in settings[FILTERED_IMAGE_SIZE]
    assert "--max_aspect_ratio 3" in settings[FILTERED_ASPECT_RATIO]
    assert "--clip_score_keep_fraction 0.5" in settings[FILTERED_CLIP_SCORE]
    assert ">off<" in settings[FILTERED_NSFW]


def test_accounting_lists_every_status_with_a_label_in_summary_order(clip_runs):
    from beam_curator.report.render import STATUS_LABELS

    page, summary = page_of(clip_runs["fraction"]), clip_runs["summary"]
    rows = table_rows(page, "accounting-table")
    listed = [re.search(r'data-status="([a-z_]+)"', a).group(1) for a, _ in rows]
    # schema.STATUSES order (summary.json's counts are written with sorted keys)
    assert listed[:len(STATUSES)] == list(STATUSES) and set(summary["counts"]) == set(STATUSES)
    for status, (_, cells) in zip(STATUSES, rows):
        assert html.escape(STATUS_LABELS[status]) in cells
        assert f'<code class="status-name">{status}</code>' in cells
        n = int(re.findall(r'<td class="num">([\d,]+)</td>', cells)[0].replace(",", ""))
        assert n == summary["counts"][status], status
    assert '<a href="#clip-score">CLIP score</a>' in page


# ---- synthetic outputs: many files, ties, no scores -----------------------------------------
def _fake_output(root: Path, n_files: int, per_file: int, seed: int = 0) -> np.ndarray:
    """An output dir with summary.json and samples/ only: clip scores on a coarse grid (many
    ties), some null, some NSFW-filtered."""
    rng = np.random.default_rng(seed)
    (root / "samples").mkdir(parents=True)
    statuses = np.array(["kept", FILTERED_CLIP_SCORE, "filtered_aesthetic", FILTERED_NSFW])
    all_rows = []
    for f in range(n_files):
        scores = np.round(rng.normal(0.2, 0.08, per_file), 2).astype(np.float32)
        null = rng.random(per_file) < 0.1
        status = statuses[rng.integers(0, len(statuses), per_file)]
        ids = [f"{f:05d}/{k:06d}" for k in rng.permutation(per_file)]
        table = pa.table({
            "id": ids, "shard": [f"{f:05d}"] * per_file, "status": status.tolist(),
            "shard_url": [str(root / f"{f:05d}.tar")] * per_file,
            "clip_score": pa.array([None if z else float(s) for s, z in zip(scores, null)],
                                   pa.float32())})
        pq.write_table(table, root / "samples" / f"{f:05d}.parquet")
        all_rows += table.to_pylist()
    counts = {s: sum(1 for r in all_rows if r["status"] == s) for s in STATUSES}
    (root / "summary.json").write_text(json.dumps({
        "command": "run", "samples_read": len(all_rows), "counts": counts,
        "options": {"clip_score_keep_fraction": 0.3},
        "clip_score": {"keep_fraction": 0.3, "threshold": 0.25, "scored": 1, "exact": True}}))
    return all_rows


def test_extremes_and_histogram_over_many_files_with_ties(tmp_path):
    from beam_curator.report.load import load_run
    from beam_curator.report.render import clip_score_view

    rows = _fake_output(tmp_path, n_files=7, per_file=900)
    data = load_run(str(tmp_path))
    scored = [r for r in rows if r["clip_score"] is not None]
    edges, counts = clip_score_view(data)
    assert sum(counts.values()).tolist() == np.histogram(
        [r["clip_score"] for r in scored], bins=edges)[0].tolist()
    shown = [r for r in scored if r["status"] != FILTERED_NSFW]
    assert [i for _, i in data.clip_best] == [
        r["id"] for r in sorted(shown, key=lambda r: (-r["clip_score"], r["id"]))[:THUMB_STRIP]]
    assert [i for _, i in data.clip_worst] == [
        r["id"] for r in sorted(shown, key=lambda r: (r["clip_score"], r["id"]))[:THUMB_STRIP]]


def test_no_clip_section_without_scores(tmp_path):
    from beam_curator.report import build_report

    _fake_output(tmp_path, n_files=1, per_file=50)
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["options"] = {}
    del summary["clip_score"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    for path in (tmp_path / "samples").glob("*.parquet"):   # an older output: no column
        table = pq.read_table(path)
        pq.write_table(table.drop(["clip_score"]), path)
    page = build_report(str(tmp_path), thumbnails=False)
    assert 'id="clip-score"' not in page and "#clip-score" not in page
    assert 'id="accounting-table"' in page
