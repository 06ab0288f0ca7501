"""The report's "Matched a reference" and "Target" sections (issue 27): built from REAL runs.

Two tiny runs over the same shards: a first one without --reference (no such section), then a
second with --reference and --target written from the first one's embeddings of cluster 0
(and its centroids): the reference ids are rewritten to carry `<b>&"`, so they reach the page
(summary.json's top matches, samples' duplicate_of) only escaped; the target touches cluster 0
only, so the other clusters' candidates are filtered_target. Checked against summary.json and
samples/*.parquet: the histogram's bars, where the threshold line sits, the top-matches table,
the target counts and the new statuses' labels. Plus a hand-written summary (no pipeline) for
an odd reference block.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_curator.schema import FILTERED_TARGET, KEPT, REFERENCE_DUPLICATE, STATUSES
from tests.conftest import parquet_rows, run_args

MARK = 'ref<b>&"'            # every reference id starts with it
MARK_ESCAPED = "ref&lt;b&gt;&amp;&quot;"
# the chart geometry of charts.histogram_svg
X0, X1 = 56, 580 - 16


def _write_embeddings(path: Path, ids: list, vectors: list) -> str:
    path.mkdir(parents=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()),
                             "embedding": pa.array(vectors, pa.list_(pa.float32()))}),
                   path / "part-0.parquet")
    return str(path)


@pytest.fixture(scope="module")
def ref_runs(tmp_path_factory, small_dataset, tiny_model_dir):
    from beam_curator.cli import run_pipeline

    root = tmp_path_factory.mktemp("reference-report")
    shards = str(Path(small_dataset.shards[0]).parent / "*.tar")
    common = dict(aesthetic_threshold="none", nsfw_threshold="none", progress_interval=0)
    first = root / "first"
    summary_first = run_pipeline("run", run_args(input_glob=shards, output=str(first),
                                                 model_dir=tiny_model_dir, n_clusters=3,
                                                 **common))
    cluster = {r["id"]: r["cluster"] for r in parquet_rows(first / "samples")}
    emb = {r["id"]: r["embedding"] for r in parquet_rows(first / "embeddings")}
    in_0 = sorted(i for i in emb if cluster.get(i) == 0)
    # reference: every third cluster-0 embedding, its id rewritten; target: all of cluster 0
    picked = in_0[::3]
    reference = _write_embeddings(root / "reference", [MARK + i for i in picked],
                                  [emb[i] for i in picked])
    target = _write_embeddings(root / "target", [f"t/{i}" for i in in_0],
                               [emb[i] for i in in_0])
    second = root / "second"
    summary = run_pipeline("run", run_args(
        input_glob=shards, output=str(second), model_dir=tiny_model_dir, reference=reference,
        target=target, centroids=str(first / "dedup" / "centroids.npy"), **common))
    return {"first": first, "summary_first": summary_first, "second": second,
            "summary": summary, "picked": picked, "cluster_0": in_0}


def page_of(out: Path) -> str:
    return (out / "report.html").read_text(encoding="utf-8")


def section_of(page: str, section_id: str) -> str:
    return page.split(f'<section id="{section_id}">', 1)[1].split("</section>", 1)[0]


def svg_of(page: str, chart_id: str) -> str:
    return page.split(f'id="{chart_id}"', 1)[1].split("</svg>", 1)[0]


def table_rows(page: str, table_id: str) -> list:
    table = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr (data-[^>]*)>(.*?)</tr>", table)


def _attr(attrs: str, name: str) -> str:
    return html.unescape(re.search(rf' ?{name}="([^"]*)"', attrs).group(1))


# ---- the runs are what the tests need -----------------------------------------------------
def test_the_runs_exercise_the_reference_and_the_target(ref_runs):
    summary, picked = ref_runs["summary"], ref_runs["picked"]
    info = summary["dedup"]["reference"]
    assert info["rows"] == len(picked) >= 5 and info["exact"] is False
    assert summary["dedup"]["target"]["clusters_touched"] == 1
    counts = summary["counts"]
    assert counts[REFERENCE_DUPLICATE] >= len(picked) and counts[FILTERED_TARGET] > 0
    assert counts[KEPT] > 0 and summary["accounting"]["ok"]
    rows = {r["id"]: r for r in parquet_rows(ref_runs["second"] / "samples")}
    statuses = {rows[m["id"]]["status"] for m in info["top_matches"]}
    # the table shows reference duplicates and matches below the threshold alike
    assert REFERENCE_DUPLICATE in statuses and len(statuses) > 1
    assert all(r["duplicate_of"].startswith(MARK) for r in rows.values()
               if r["status"] == REFERENCE_DUPLICATE)
    hist = info["best_cosine_histogram"]
    assert sum(1 for c in hist["counts"] if c) >= 3, "the histogram should have a shape"


# ---- only with a reference / a target -----------------------------------------------------
def test_sections_only_with_a_reference_and_a_target(ref_runs):
    first, second = page_of(ref_runs["first"]), page_of(ref_runs["second"])
    assert "reference" not in ref_runs["summary_first"]["dedup"]
    for page, present in ((first, False), (second, True)):
        assert ('<section id="reference">' in page) is present
        assert ('<a href="#reference">Matched a reference</a>' in page) is present
        assert ('<section id="target">' in page) is present
        assert ('<a href="#target">Target</a>' in page) is present
        assert ('id="reference-histogram"' in page) is present


def test_no_sections_without_reference_in_the_summary(ref_runs, tmp_path):
    """The same outputs, rendered from a summary without the dedup.reference/target blocks."""
    from beam_curator.report.load import load_run
    from beam_curator.report.render import render_report

    summary = json.loads((ref_runs["second"] / "summary.json").read_text())
    del summary["dedup"]["reference"], summary["dedup"]["target"]
    page = render_report(load_run(str(ref_runs["second"]), summary=summary), {})
    assert 'id="reference"' not in page and "#reference" not in page
    assert 'id="target"' not in page and "#target" not in page
    assert MARK_ESCAPED not in page
    assert 'id="dedup"' in page and 'id="accounting-table"' in page


# ---- the settings and counts --------------------------------------------------------------
def test_settings_and_counts_are_the_summary_s(ref_runs):
    info = ref_runs["summary"]["dedup"]["reference"]
    section = section_of(page_of(ref_runs["second"]), "reference")
    settings = dict(re.findall(r"<tr><td>([a-z_ ]+)</td><td[^>]*>(.*?)</td></tr>", section))
    assert settings["threshold"].startswith("cosine ≥ <b>0.99</b>")
    assert settings["reference_eps"] == "0.01"
    assert settings["compared"].startswith("within clusters")
    assert settings["reference rows"] == str(info["rows"])
    counts = section.split('id="reference-counts">', 1)[1].split("</p>", 1)[0]
    n_candidates = ref_runs["summary"]["dedup"]["n_candidates"]
    assert f"<b>{info['reference_duplicates']}</b> of {n_candidates} candidates" in counts
    assert f"{info['candidates_that_met_a_reference_row']} met a reference row" in counts


# ---- the histogram ------------------------------------------------------------------------
def test_histogram_bars_are_the_summary_counts_where_they_belong(ref_runs):
    from beam_curator.report.render import reference_view

    hist = ref_runs["summary"]["dedup"]["reference"]["best_cosine_histogram"]
    page = page_of(ref_runs["second"])
    edges, bars = reference_view(ref_runs["summary"]["dedup"]["reference"])
    assert bars["candidates"].tolist() == hist["counts"] and len(edges) == 41
    assert edges[0] == hist["low"] and edges[-1] == hist["high"]
    assert np.diff(edges) == pytest.approx(hist["bin_width"], abs=1e-12)
    svg = svg_of(page, "reference-histogram")
    rects = re.findall(r'<rect x="([\d.]+)" [^>]*><title>([^<]*)</title></rect>', svg)
    nonzero = [(i, c) for i, c in enumerate(hist["counts"]) if c]
    assert [int(re.search(r"candidates: (\d+)", t).group(1)) for _, t in rects] == \
        [c for _, c in nonzero]
    span = hist["high"] - hist["low"]
    for (x, _), (i, _) in zip(rects, nonzero):   # each bar starts at its bin's left edge
        left = X0 + (hist["low"] + i * hist["bin_width"] - hist["low"]) / span * (X1 - X0)
        assert float(x) == pytest.approx(left + 0.5, abs=0.06), i
    note = page.split('id="reference-below-low">', 1)[1].split("</p>", 1)[0]
    assert f"<b>{hist['below_low']}</b> candidate(s)" in note
    assert f"below {hist['low']:g}" in note


def test_threshold_line_sits_at_the_threshold(ref_runs):
    info = ref_runs["summary"]["dedup"]["reference"]
    hist = info["best_cosine_histogram"]
    svg = svg_of(page_of(ref_runs["second"]), "reference-histogram")
    m = re.search(r'<line class="threshold threshold-reference" data-threshold="([^"]+)" '
                  r'x1="([\d.]+)"', svg)
    assert m, "no threshold line"
    assert float(m.group(1)) == pytest.approx(info["threshold"], abs=1e-9) == 0.99
    expected = X0 + (info["threshold"] - hist["low"]) / (hist["high"] - hist["low"]) * (X1 - X0)
    assert float(m.group(2)) == pytest.approx(expected, abs=0.06)
    assert "duplicate ≥ 0.99" in svg


# ---- the top matches ----------------------------------------------------------------------
def test_top_matches_are_the_summary_s_in_order_and_escaped(ref_runs):
    info = ref_runs["summary"]["dedup"]["reference"]
    top = info["top_matches"]
    assert 0 < len(top) <= 20 and all(m["reference_id"].startswith(MARK) for m in top)
    page = page_of(ref_runs["second"])
    rows = table_rows(page, "reference-matches-table")
    assert [_attr(a, "data-id") for a, _ in rows] == [m["id"] for m in top]
    assert [_attr(a, "data-reference-id") for a, _ in rows] == [m["reference_id"] for m in top]
    assert [float(_attr(a, "data-cosine")) for a, _ in rows] == pytest.approx(
        [m["cosine_sim"] for m in top], abs=1e-6)
    status = {r["id"]: r["status"] for r in parquet_rows(ref_runs["second"] / "samples")}
    for (_, cells), m in zip(rows, top):
        # the reference id, escaped as text (and never raw anywhere on the page)
        assert f'<td class="id">{html.escape(m["reference_id"], quote=True)}</td>' in cells
        assert MARK_ESCAPED in cells
        assert f'<b>{m["cosine_sim"]:.4f}</b>' in cells
        badge = re.search(r'<span class="badge" style="background:(#[0-9a-f]{6})">([a-z_]+)'
                          r"</span>", cells)
        assert badge and badge.group(2) == status[m["id"]]
        assert '<img src="data:image/jpeg;base64,' in cells     # the candidate's thumbnail
    assert MARK not in page and "<b>&" not in page


# ---- the target -----------------------------------------------------------------------------
def test_target_section_counts(ref_runs):
    summary = ref_runs["summary"]
    target = summary["dedup"]["target"]
    counts = section_of(page_of(ref_runs["second"]), "target").split(
        'id="target-counts">', 1)[1].split("</p>", 1)[0]
    assert f"clusters touched: <b>{target['clusters_touched']}</b> of 3" in counts
    assert target["filtered_target"] == summary["counts"][FILTERED_TARGET]
    assert f"samples filtered_target: <b>{target['filtered_target']}</b>" in counts
    assert f"samples kept: <b>{summary['counts'][KEPT]}</b>" in counts
    assert f"{target['rows']} target row(s)" in counts
    assert target["rows"] == len(ref_runs["cluster_0"])


# ---- the new statuses -----------------------------------------------------------------------
def test_new_statuses_have_labels_and_colours(ref_runs):
    from beam_curator.report.render import STATUS_COLORS, STATUS_LABELS

    summary, page = ref_runs["summary"], page_of(ref_runs["second"])
    rows = {_attr(a, "data-status"): cells for a, cells in table_rows(page, "accounting-table")}
    for status in (REFERENCE_DUPLICATE, FILTERED_TARGET):
        assert status in STATUSES
        cells = rows[status]
        assert html.escape(STATUS_LABELS[status]) in cells
        assert f'<code class="status-name">{status}</code>' in cells
        assert f"background:{STATUS_COLORS[status]}" in cells
        n = int(re.findall(r'<td class="num">([\d,]+)</td>', cells)[0].replace(",", ""))
        assert n == summary["counts"][status]
    assert len(set(STATUS_COLORS.values())) == len(STATUS_COLORS)   # each its own colour
    # the samples each filter took: the target filter last, only for a run with a --target
    listed = [_attr(a, "data-status") for a, _ in table_rows(page, "filter-counts-table")]
    assert listed[-1] == FILTERED_TARGET
    first = page_of(ref_runs["first"])
    assert FILTERED_TARGET not in [_attr(a, "data-status")
                                   for a, _ in table_rows(first, "filter-counts-table")]
    # the cluster-size bars draw the reference duplicates too
    assert f"{REFERENCE_DUPLICATE}: " in svg_of(page, "cluster-sizes")


# ---- hand-written summaries (no pipeline) ---------------------------------------------------
def _fake_output(root: Path, reference: dict, target: dict = None) -> None:
    """summary.json with the given dedup.reference (and target), and a one-row samples/."""
    (root / "samples").mkdir()
    pq.write_table(pa.table({"id": ["00000/a"], "shard": ["00000"], "status": ["kept"],
                             "shard_url": [str(root / "00000.tar")]}),
                   root / "samples" / "00000.parquet")
    counts = {s: 0 for s in STATUSES}
    counts["kept"] = 1
    dedup = {"n_candidates": 1, "reference": reference}
    if target is not None:
        dedup["target"] = target
    (root / "summary.json").write_text(json.dumps({
        "command": "run", "samples_read": 1, "counts": counts,
        "options": {"reference": "gs://x/<y>&", "target": "t"}, "dedup": dedup}))


def test_hand_written_histogram_below_low_and_exact(tmp_path):
    from beam_curator.report import build_report

    counts = [(k * 7) % 5 for k in range(40)]
    _fake_output(tmp_path, {"threshold": 0.95, "reference_eps": 0.05, "exact": True, "rows": 3,
                            "reference_duplicates": 4, "top_matches": [],
                            "best_cosine_histogram": {"low": 0.75, "high": 1.0,
                                                      "bin_width": 0.00625, "counts": counts,
                                                      "below_low": 17}})
    page = build_report(str(tmp_path), thumbnails=False)
    svg = svg_of(page, "reference-histogram")
    tips = re.findall(r"<rect [^>]*><title>([^<]*)</title></rect>", svg)
    assert [int(re.search(r"candidates: (\d+)", t).group(1)) for t in tips] == \
        [c for c in counts if c]
    x = float(re.search(r'threshold-reference" data-threshold="0.95" x1="([\d.]+)"', svg)[1])
    assert x == pytest.approx(X0 + 0.2 / 0.25 * (X1 - X0), abs=0.06)
    note = page.split('id="reference-below-low">', 1)[1].split("</p>", 1)[0]
    assert "<b>17</b> candidate(s)" in note and "below 0.75" in note
    assert "met no reference row" not in note          # exact: every candidate met them all
    assert 'id="no-reference-matches"' in page and 'id="target"' not in page


def test_odd_reference_block_renders_bounded_and_escaped(tmp_path):
    from beam_curator.report import build_report

    matches = [{"id": f"00000/<i>{k}\u202e", "reference_id": f"<script>{k}</script>",
                "cosine_sim": 1.0 - k / 100} for k in range(30)]
    _fake_output(tmp_path, {"threshold": 0.95, "reference_eps": 0.05, "exact": True, "rows": 3,
                            "reference_duplicates": 1, "top_matches": matches,
                            "best_cosine_histogram": {"low": 0.75, "high": 1.0,
                                                      "counts": "not a list"}},
                 {"clusters_touched": 2, "filtered_target": 0, "rows": "<3>"})
    page = build_report(str(tmp_path), thumbnails=False)
    assert 'id="no-reference-histogram"' in page and 'id="reference-histogram"' not in page
    rows = table_rows(page, "reference-matches-table")
    assert [_attr(a, "data-id") for a, _ in rows] == [m["id"].replace("\u202e", "\\u202e")
                                                      for m in matches[:20]]
    assert "<script>" not in page and "<i>" not in page and "\u202e" not in page
    assert "gs://x/&lt;y&gt;&amp;" in page and "&lt;3&gt; target row(s)" in page
    assert "compared</td><td>exact: every candidate" in page
