"""Rough edges of the input (issue 25, safety second pass): each test failed before the fix.

1. one huge tar member; 2. `.tar.gz` / `.tgz` shards; 3. one file named twice by --input;
4. what a key is; 5. `remove` with removal files of the wrong shape; 6. control and bidi
characters in the report. Real tar files, real parquet, real pipelines (FnApiRunner).
"""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
import tracemalloc
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_curator import cli
from beam_curator.defaults import DEFAULT_MAX_MEMBER_BYTES
from beam_curator.errors import ShardListError
from beam_curator.schema import ErrorRecord, ShardSample
from beam_curator.transforms.read import list_shards
from beam_curator.transforms.write import write_curated_shard
from beam_curator.webdataset import shard_samples
from tests.conftest import cli_fails, tar_members


def write_tar(path, members, mode="w"):
    """A tar (mode "w:gz" for a gzip one) of (name, bytes), in the order given."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def read(path, shard="000", **kwargs):
    items = list(shard_samples(shard, str(path), **kwargs))
    return ([i for i in items if isinstance(i, ShardSample)],
            [i for i in items if isinstance(i, ErrorRecord)])


def remove(tmp_path, input_, removal_ids, *extra) -> dict:
    out = tmp_path / "out"
    code = cli.main(["remove", "--input", str(input_), "--output", str(out),
                     "--removal_ids", str(removal_ids), "--runner", "FnApiRunner",
                     "--progress_interval", "0", *extra])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


class _ZeroReader(io.RawIOBase):
    """`size` zero bytes, made as they are read (a 64 MiB member without 64 MiB in memory)."""

    def __init__(self, size):
        self._left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self._left)
        buffer[:n] = bytes(n)
        self._left -= n
        return n


# ---- 1. one member's size ---------------------------------------------------------------

def test_an_oversized_member_is_a_sample_error_and_is_never_held_in_memory(tmp_path):
    # The shape: a small .tar.gz whose member inflates past the limit.
    path = tmp_path / "000.tar.gz"
    big = DEFAULT_MAX_MEMBER_BYTES + 1
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in (("a.jpg", b"1"), ("a.txt", b"caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("bomb.jpg")
        info.size = big
        tar.addfile(info, io.BufferedReader(_ZeroReader(big)))
        info = tarfile.TarInfo("z.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"2"))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        samples, errors = read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak:,} bytes held to skip one member"
    by_key = {s.key: s for s in samples}
    assert list(by_key) == ["a", "bomb", "z"] and not errors
    assert by_key["a"].error is None and by_key["z"].error is None   # read on past it
    assert f"{big:,} bytes, over --max_member_bytes" in by_key["bomb"].error
    assert not by_key["bomb"].image_bytes


def test_remove_honours_max_member_bytes_and_never_writes_the_sample(tmp_path):
    shard = write_tar(tmp_path / "000.tar", [("a.jpg", b"1"), ("big.jpg", b"x" * 5000),
                                             ("big.txt", b"its caption"), ("c.jpg", b"3")])
    ids = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string())}), ids)
    summary = remove(tmp_path, shard, ids, "--max_member_bytes", "4096")
    assert summary["curated_samples_written"] == 2
    assert [n for n, _ in tar_members(tmp_path / "out" / "curated" / "000.tar")] == \
        ["a.jpg", "c.jpg"]


def test_max_member_bytes_below_one_is_refused(tmp_path, capsys, one_shard, no_pipeline_run):
    cli_fails(capsys, ["remove", "--input", one_shard, "--output", str(tmp_path / "out"),
                       "--removal_ids", str(tmp_path), "--max_member_bytes", "0",
                       "--runner", "FnApiRunner"], "--max_member_bytes 0 must be >= 1")


# ---- 2. compressed shards ---------------------------------------------------------------

def test_a_directory_reads_tar_tar_gz_and_tgz_shards_alike(tmp_path):
    write_tar(tmp_path / "000.tar", [("a.jpg", b"0")])
    write_tar(tmp_path / "001.tar.gz", [("a.jpg", b"1")], mode="w:gz")
    write_tar(tmp_path / "002.tgz", [("a.jpg", b"2")], mode="w:gz")
    assert [name for name, _ in list_shards(str(tmp_path))] == ["000", "001", "002"]


def test_a_curated_shard_keeps_its_source_name_and_compression(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    members = [("a.jpg", b"A"), ("a.txt", b"cap a"), ("b.jpg", b"B"), ("c.jpg", b"C")]
    write_tar(data / "000.tar", members)
    write_tar(data / "001.tar.gz", members, mode="w:gz")
    write_tar(data / "002.tgz", members, mode="w:gz")
    ids = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": ["000/b", "001/b", "002/b"]}), ids)
    remove(tmp_path, data, ids)
    curated = tmp_path / "out" / "curated"
    assert sorted(os.listdir(curated)) == ["000.tar", "001.tar.gz", "002.tgz"]
    kept = [("a.jpg", b"A"), ("a.txt", b"cap a"), ("c.jpg", b"C")]
    for name in os.listdir(curated):
        assert tar_members(curated / name) == kept
    raw = (curated / "001.tar.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == bytes(4)    # gzip, mtime 0: reruns equal
    assert not (curated / "000.tar").read_bytes().startswith(b"\x1f\x8b")


# ---- 3. one file, two spellings -----------------------------------------------------------

def test_one_file_named_twice_is_read_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("a")
    write_tar("a/000.tar", [("k.jpg", b"1")])
    write_tar("a/001.tar", [("k.jpg", b"2")])
    os.symlink(os.path.abspath("a/001.tar"), "001.tar")
    for pattern in ("a/*.tar,a/000.tar", "./a/000.tar,a/000.tar,a/001.tar",
                    f"{tmp_path}/a/000.tar,a/000.tar,a/001.tar", "a/*.tar,001.tar"):
        shards = list_shards(pattern)
        assert sorted(name for name, _ in shards) == ["000", "001"], (pattern, shards)


def test_two_files_with_one_shard_name_are_still_refused(tmp_path):
    for directory in ("a", "b"):
        (tmp_path / directory).mkdir()
        write_tar(tmp_path / directory / "000.tar", [("k.jpg", directory.encode())])
    with pytest.raises(ShardListError, match="not unique"):
        list_shards(f"{tmp_path}/a/000.tar,{tmp_path}/b/000.tar")
    write_tar(tmp_path / "a" / "000.tgz", [("k.jpg", b"gz")], mode="w:gz")
    with pytest.raises(ShardListError, match="not unique"):
        list_shards(str(tmp_path / "a"))


# ---- 4. what a key is -----------------------------------------------------------------------

def test_two_spellings_of_one_key_are_one_sample_and_an_error(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    path = write_tar(tmp_path / "000.tar", [
        ("a.jpg", b"1"), ("./a.jpg", b"2"), ("d//e.jpg", b"3"), ("d/e.jpg", b"4"),
        (f"{nfc}.jpg", b"5"), (f"{nfd}.jpg", b"6"), ("./only.jpg", b"7")])
    samples, errors = read(path)
    assert not errors
    by_id = {s.id: s for s in samples}
    assert [i for i, s in by_id.items() if s.error is None] == \
        ["000/a", "000/d//e", f"000/{nfc}", "000/./only"]
    assert "names the same file as key 'a'" in by_id["000/./a"].error
    assert "names the same file as key 'd//e'" in by_id["000/d/e"].error
    assert ascii(nfc) in by_id[f"000/{nfd}"].error and "NFC" in by_id[f"000/{nfd}"].error
    # What is curated extracts to distinct files.
    good = [s for s in samples if s.error is None]
    write_curated_shard(str(tmp_path / "curated.tar"), good)
    with tarfile.open(tmp_path / "curated.tar") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    assert sorted(p.read_bytes() for p in (tmp_path / "x").rglob("*.jpg")) == \
        [b"1", b"3", b"5", b"7"]


def test_a_file_name_that_starts_with_a_dot_is_a_shard_error_that_says_so(tmp_path):
    path = write_tar(tmp_path / "000.tar", [("k.jpg", b"1"), (".hidden.jpg", b"2"),
                                            ("d/._k.jpg", b"3"), ("README", b"4")])
    samples, errors = read(path)
    assert [s.key for s in samples] == ["k"]
    reasons = {e.member: e.reason for e in errors}
    assert "starts with a dot" in reasons[".hidden.jpg"]
    assert "COPYFILE_DISABLE=1" in reasons["d/._k.jpg"]
    assert "has no extension" in reasons["README"]


# ---- 5. removal files ---------------------------------------------------------------------

@pytest.mark.parametrize("table, fragment", [
    (pa.table({"id": [1, 2]}), "its `id` column is int64, not strings"),
    (pa.table({"id": pa.nulls(2)}), "its `id` column is null, not strings"),
    (pa.table({"key": ["000/k"]}), "has no `id` column (it has: key)"),
    (None, "is not a readable parquet file"),
], ids=["integer", "all-null", "no-id", "not-parquet"])
def test_a_removal_file_of_the_wrong_shape_fails_before_any_work(
        tmp_path, capsys, one_shard, no_pipeline_run, table, fragment):
    ids = tmp_path / "ids"
    ids.mkdir()
    bad = ids / "part-1.parquet"
    if table is None:
        bad.write_bytes(b"not parquet at all")
    else:
        pq.write_table(table, bad)
    pq.write_table(pa.table({"id": ["000/k"]}), ids / "part-0.parquet")   # a good one beside
    err = cli_fails(capsys, ["remove", "--input", one_shard, "--output", str(tmp_path / "out"),
                             "--removal_ids", str(ids), "--runner", "FnApiRunner"],
                    f"error: --removal_ids: {bad}", fragment)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_single_removal_file_is_accepted_and_null_ids_are_counted(tmp_path):
    shard = write_tar(tmp_path / "000.tar", [("a.jpg", b"1"), ("b.jpg", b"2"),
                                             ("c.jpg", b"3")])
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"id": ["000/b", None, None]}), one)
    directory = tmp_path / "more"
    directory.mkdir()
    pq.write_table(pa.table({"id": pa.array(["000/c"]).dictionary_encode()}),
                   directory / "x.parquet")
    summary = remove(tmp_path, shard, f"{one},{directory}")
    assert summary["removal_ids"]["null"] == 2
    assert summary["removal_ids"]["listed"] == summary["removal_ids"]["matched"] == 2
    assert any("2 removal id(s) are null" in w for w in summary["warnings"])
    assert tar_members(tmp_path / "out" / "curated" / "000.tar") == [("a.jpg", b"1")]


# ---- 6. the report ------------------------------------------------------------------------

def test_control_and_bidi_characters_show_escaped_in_the_report(tmp_path, tiny_model_dir):
    from beam_curator.report import write_report
    from beam_curator.synthetic import draw_image, encode

    rng = random.Random(3)
    caption = "left\x00NUL \u202eRLO-reversed\u202c \u2066isolate\u2069 end"
    members = []
    for key in ("k0", "k1", "k\u202egpj.exe"):
        members += [(f"{key}.jpg", encode(draw_image(rng, 40), "jpg")),
                    (f"{key}.txt", caption.encode())]
    write_tar(tmp_path / "000.tar", members)
    out = tmp_path / "out"
    assert cli.main(["run", "--input", str(tmp_path / "000.tar"), "--output", str(out),
                     "--model_dir", tiny_model_dir, "--runner", "FnApiRunner",
                     "--dedup", "false", "--nsfw_threshold", "none",
                     "--progress_interval", "0", "--write_report", "false"]) == 0
    page = Path(write_report(str(out))).read_text(encoding="utf-8")
    for raw in ("\x00", "\u202e", "\u202c", "\u2066", "\u2069"):
        assert raw not in page, ascii(raw)
    assert "left\\u0000NUL \\u202eRLO-reversed\\u202c \\u2066isolate\\u2069 end" in page
    assert "000/k\\u202egpj" in page
