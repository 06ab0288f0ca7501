"""The curation report (beam_curator.report): built from a REAL run's outputs.

One tiny real pipeline run per session (2 synthetic shards x 30 + one shard planted with
script/markup payloads in keys, captions, json sidecars and tar member names), shared with
tests/test_report_browser.py through `shared_runs`; plus one even smaller run with dedup off,
zero kept and no errors.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from beam_curator.cli import main as cli_main
from beam_curator.cli import run_pipeline
from beam_curator.models import init_random
from beam_curator.synthetic import draw_image, encode, make_dataset

# ---- the planted payloads ---------------------------------------------------------------
SCRIPT_PAYLOAD = "<script>window.__pwned=1</script>"
IMG_PAYLOAD = '<img src=x onerror="window.__pwned=1">'
CAPTION = f"innocent caption {SCRIPT_PAYLOAD} {IMG_PAYLOAD}"
# A webdataset key may hold anything but '/' and '.': no dot means no `window.`; a bare
# `__pwned=1` in an event handler sets window.__pwned all the same.
KEY_PAYLOAD = '<img src=x onerror="__pwned=1">'
MEMBER_PAYLOAD = "<svg onload=__pwned=1>"        # a member without extension: shard error
JSON_PAYLOAD = {"url": "javascript:__pwned=1", "note": f"{SCRIPT_PAYLOAD}'\"&"}

SCRIPT_ESCAPED = "&lt;script&gt;window.__pwned=1&lt;/script&gt;"
IMG_ESCAPED = "&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;"
KEY_ESCAPED = "&lt;img src=x onerror=&quot;__pwned=1&quot;&gt;"
MEMBER_ESCAPED = "&lt;svg onload=__pwned=1&gt;"

_CACHE: dict = {}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def _first_image_of(shard_path: str):
    with tarfile.open(shard_path) as tar:
        for member in tar.getmembers():
            if member.name.rsplit(".", 1)[-1] in ("jpg", "png", "webp"):
                return member.name.rsplit(".", 1)[-1], tar.extractfile(member).read()
    raise AssertionError("no image in " + shard_path)


def write_hostile_shard(path: str, copy_of: str) -> None:
    """Shard 00002: payloads in a key, a caption, a json sidecar and a member name.

    - KEY_PAYLOAD: the same bytes as the first image of `copy_of` -> an exact duplicate whose
      original sorts first, so it is removed and shown in the duplicate gallery;
    - the same key again later in the shard -> an error sample whose reason quotes the key;
    - MEMBER_PAYLOAD (no extension) -> a shard-level error whose reason quotes the name.
    """
    import random

    ext, data = _first_image_of(copy_of)
    rng = random.Random(7)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, f"{KEY_PAYLOAD}.{ext}", data)
        _add(tar, f"{KEY_PAYLOAD}.txt", CAPTION.encode())
        _add(tar, f"{KEY_PAYLOAD}.json", json.dumps(JSON_PAYLOAD).encode())
        _add(tar, "plain0001.png", encode(draw_image(rng, 40), "png"))
        _add(tar, "plain0001.txt", CAPTION.encode())
        _add(tar, MEMBER_PAYLOAD, b"not a sample")
        _add(tar, f"{KEY_PAYLOAD}.jpg", encode(draw_image(rng, 40), "jpg"))
        _add(tar, f"{KEY_PAYLOAD}.txt", CAPTION.encode())


def _run(data_glob: str, out: str, models: str, *extra: str) -> dict:
    return run_pipeline("run", ["--input", data_glob, "--output", out, "--model_dir", models,
                                "--runner", "FnApiRunner", "--n_clusters", "3",
                                "--kmeans_iterations", "5", *extra, "--write_report", "false"])


def shared_runs(tmp_path_factory, models: str = None) -> dict:
    """Build (once per session) the real runs the report tests look at.

    `models`: a random-weight model dir (the session's `tiny_model_dir`); made here if None.
    """
    key = str(tmp_path_factory.getbasetemp())
    if key in _CACHE:
        return _CACHE[key]
    root = tmp_path_factory.mktemp("report-runs")
    if models is None:
        models = str(root / "models")
        init_random(models)
    # main run: 2 synthetic shards x 30 + the hostile shard
    data = root / "data"
    make_dataset(str(data), n_shards=2, per_shard=30, seed=0, n_exact=3, n_near=3,
                 n_corrupt=1)
    write_hostile_shard(str(data / "00002.tar"), copy_of=str(data / "00000.tar"))
    out = str(root / "out")
    summary = _run(str(data / "*.tar"), out, models, "--aesthetic_threshold", "5.0",
                   "--nsfw_threshold", "0.9")
    # tiny run: dedup off, nothing kept (threshold 10), no errors
    clean = root / "clean"
    make_dataset(str(clean), n_shards=1, per_shard=8, seed=1, n_exact=0, n_near=0,
                 n_corrupt=0)
    out_clean = str(root / "out-clean")
    summary_clean = _run(str(clean / "*.tar"), out_clean, models, "--dedup", "false",
                         "--aesthetic_threshold", "10", "--nsfw_threshold", "none")
    _CACHE[key] = {"root": root, "models": models, "out": out, "summary": summary,
                   "out_clean": out_clean, "summary_clean": summary_clean}
    return _CACHE[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    return shared_runs(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def report(runs):
    from beam_curator.report import write_report

    path = write_report(runs["out"])
    return path, Path(path).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def clean_report(runs):
    from beam_curator.report import write_report

    path = write_report(runs["out_clean"])
    return path, Path(path).read_text(encoding="utf-8")


# ---- structure of the page --------------------------------------------------------------
class _Tags(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags = []          # (tag, attrs dict)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag


def _tags(page: str):
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def _status_counts(page: str) -> dict:
    table = page.split('id="accounting-table"', 1)[1].split("</table>", 1)[0]
    return {status: int(n.replace(",", "")) for status, n in
            re.findall(r'<tr[^>]*data-status="([a-z_]+)"><td>.*?</td><td class="num">([\d,]+)'
                       r"</td>", table)}


# ---- tests ------------------------------------------------------------------------------
def test_report_written_atomically_in_the_output(runs, report):
    path, page = report
    assert path == os.path.join(runs["out"], "report.html")
    assert page.startswith("<!DOCTYPE html>")
    assert not [n for n in os.listdir(runs["out"]) if n.startswith(".tmp-")]


def test_accounting_table_matches_summary(runs, report):
    _, page = report
    summary = runs["summary"]
    counts = _status_counts(page)
    for status, n in summary["counts"].items():
        assert counts[status] == n, status
    assert counts["input"] == summary["samples_read"] == summary["accounting"]["input"]
    assert counts["sum"] == sum(summary["counts"].values()) == summary["samples_read"]
    assert summary["samples_read"] == 60 + 3        # 2 x 30 synthetic + 3 hostile samples
    # per-shard table: every shard with its input count
    shard_table = page.split('id="per-shard-table"', 1)[1].split("</table>", 1)[0]
    for shard, per in summary["per_shard"].items():
        assert re.search(rf'<td class="mono">{shard}</td><td class="num">{sum(per.values()):,}'
                         r"</td>", shard_table), shard
    assert 'id="random-weights-banner"' in page       # init_random weights


def test_thumbnails_inline_and_small(report):
    from PIL import Image

    _, page = report
    imgs = [a for t, a in _tags(page) if t == "img"]
    assert len(imgs) >= 4
    for attrs in imgs:
        assert attrs["src"].startswith("data:image/jpeg;base64,")
    raw = base64.b64decode(imgs[0]["src"].split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as image:
        assert max(image.size) <= 96
    # the exact duplicate from the hostile shard sits beside its original
    gallery = page.split('id="duplicates"', 1)[1].split("</section>", 1)[0]
    assert 'data-kind="exact_duplicate"' in gallery
    assert 'data-kind="semantic_duplicate"' in gallery


def test_thresholds_drawn_and_options_listed(report):
    _, page = report
    assert re.search(r'<line class="threshold threshold-aesthetic" data-threshold="5"', page)
    assert re.search(r'<line class="threshold threshold-nsfw" data-threshold="0.9"', page)
    assert re.search(r'<line class="threshold threshold-eps" data-threshold="0.99"', page)
    assert 'id="aesthetic-histogram"' in page and 'id="nsfw-histogram"' in page
    assert 'id="cluster-sizes"' in page
    options = page.split('id="options-table"', 1)[1].split("</table>", 1)[0]
    for name in ("--aesthetic_threshold", "--nsfw_threshold", "--n_clusters", "--eps",
                 "--which_to_keep"):
        assert name in options
    stats = page.split('id="cluster-stats">', 1)[1].split("</p>", 1)[0]
    assert "k chosen by --n_clusters" in stats and "k-means trained on" in stats


def test_no_network_and_no_scripts(report):
    _, page = report
    assert "http://" not in page and "https://" not in page
    assert "//" not in re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "", page).replace(
        "</", "")   # no protocol-relative URL either
    tags = _tags(page)
    names = {t for t, _ in tags}
    assert not names & {"script", "iframe", "object", "embed", "link", "base", "form", "frame"}
    for tag, attrs in tags:
        assert not [a for a in attrs if a.lower().startswith("on")], (tag, attrs)
        for attr in ("src", "href"):
            value = attrs.get(attr)
            if value is not None:
                assert value.startswith(("data:image/jpeg;base64,", "#")), (tag, attrs)
    csp = [a for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]


def test_untrusted_text_is_escaped(report):
    _, page = report
    # the payloads never appear raw ...
    for raw in (SCRIPT_PAYLOAD, IMG_PAYLOAD, KEY_PAYLOAD, MEMBER_PAYLOAD, "<script", "<svg on",
                "onerror=\"", "onload="):
        assert raw not in page.replace(MEMBER_ESCAPED, ""), raw
    assert re.search(r"<script", page, re.I) is None
    # ... only escaped, and they do show: the caption (gallery), the key (gallery id and the
    # duplicate-key error's reason and id), the member name (shard-level error)
    assert SCRIPT_ESCAPED in page
    assert IMG_ESCAPED in page
    assert f"00002/{KEY_ESCAPED}" in page
    assert f"key &#x27;{KEY_ESCAPED}&#x27; appears again" in page
    assert MEMBER_ESCAPED in page
    errors = page.split('id="errors-table"', 1)[1].split("</table>", 1)[0]
    assert KEY_ESCAPED in errors and MEMBER_ESCAPED in errors


def test_run_with_dedup_off_zero_kept_no_errors(runs, clean_report):
    _, page = clean_report
    summary = runs["summary_clean"]
    assert summary["counts"]["kept"] == 0 and summary["counts"]["error"] == 0
    assert not os.path.exists(os.path.join(runs["out_clean"], "dedup"))
    counts = _status_counts(page)
    assert counts["kept"] == 0 and counts["input"] == summary["samples_read"] == 8
    assert 'id="dedup-off"' in page and 'id="no-duplicates"' in page
    assert 'id="no-errors"' in page
    assert 'id="nsfw-threshold-off"' in page
    assert re.search(r'threshold-aesthetic" data-threshold="10"', page)
    assert "http://" not in page and "https://" not in page


def test_missing_source_shards_only_cost_thumbnails(runs, tmp_path):
    from beam_curator.report import build_report

    copy = tmp_path / "out"
    shutil.copytree(runs["out"], copy)
    # rewrite the shard urls to a place that does not exist
    import pyarrow.parquet as pq

    for path in (copy / "samples").glob("*.parquet"):
        table = pq.read_table(path)
        urls = [str(tmp_path / "gone" / os.path.basename(u)) for u in
                table.column("shard_url").to_pylist()]
        import pyarrow as pa

        table = table.set_column(table.schema.get_field_index("shard_url"), "shard_url",
                                 pa.array(urls, pa.string()))
        pq.write_table(table, path)
    page = build_report(str(copy))
    assert "data:image/jpeg" not in page
    assert "image unavailable" in page
    assert 'id="accounting-table"' in page


def test_failed_run_gets_a_red_banner(runs, tmp_path):
    from beam_curator.report import build_report

    copy = tmp_path / "out"
    shutil.copytree(runs["out_clean"], copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["accounting"]["ok"] = False
    (copy / "summary.FAILED.json").write_text(json.dumps(summary))
    (copy / "summary.json").unlink()
    page = build_report(str(copy), thumbnails=False)
    assert 'id="accounting-failed-banner"' in page and "summary.FAILED.json" in page
    assert '<span class="fail">FAILED</span>' in page


def test_report_cli_and_missing_summary(runs, tmp_path, capsys):
    assert cli_main(["report", "--output", runs["out_clean"]]) == 0
    assert "report.html" in capsys.readouterr().out
    assert cli_main(["report", "--output", str(tmp_path)]) == 2
    assert "summary.json" in capsys.readouterr().err


def test_every_shown_id_gets_its_status_from_samples(runs):
    """The gallery labels each shown sample with its status in samples/ (read from the
    shards of the shown ids only)."""
    import glob as globlib

    import pyarrow.parquet as pq

    from beam_curator.report.load import load_run

    data = load_run(runs["out"])
    statuses = {}
    for path in globlib.glob(os.path.join(runs["out"], "samples", "*.parquet")):
        table = pq.read_table(path, columns=["id", "status"])
        statuses.update(zip(table.column("id").to_pylist(), table.column("status").to_pylist()))
    shown = ({p.id for p in data.pairs} | {p.duplicate_of for p in data.pairs}
             | {i for _, i in data.spotlight_best} | {i for _, i in data.spotlight_worst}
             | {i for _, i in data.clip_best} | {i for _, i in data.clip_worst})
    assert data.pairs and shown
    assert data.id_status == {i: statuses[i] for i in shown}
