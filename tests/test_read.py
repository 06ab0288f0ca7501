"""Reading webdataset shards: keys, extensions, sidecars, ids, damaged tars."""
from __future__ import annotations

import io
import tarfile

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from beam_curator.errors import ShardListError
from beam_curator.schema import ErrorRecord, ShardSample
from beam_curator.transforms.read import ReadWebDataset, list_shards
from beam_curator.webdataset import shard_samples, split_member_name


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def samples_and_errors(path, shard="s"):
    items = list(shard_samples(shard, str(path)))
    return ([i for i in items if isinstance(i, ShardSample)],
            [i for i in items if isinstance(i, ErrorRecord)])


def test_split_member_name_follows_webdataset():
    assert split_member_name("a/b/0001.seg.png") == ("a/b/0001", "seg.png")
    assert split_member_name("0001.JPG") == ("0001", "JPG")
    assert split_member_name("noext") is None


def test_every_image_extension_and_sidecars_verbatim(tmp_path):
    members = [("k1.jpg", b"J"), ("k1.txt", b"cap 1"), ("k1.json", b'{"a": 1}'),
               ("k2.jpeg", b"JE"), ("k2.cls", b"7"),
               ("k3.png", b"P"), ("k3.txt", "ünïcode".encode()),
               ("k4.webp", b"W"),
               ("dir/k5.JPG", b"UP"), ("dir/k5.txt", b"upper")]
    samples, errors = samples_and_errors(write_tar(tmp_path / "000.tar", members), shard="000")
    assert errors == []
    by_key = {s.key: s for s in samples}
    assert [s.key for s in samples] == ["k1", "k2", "k3", "k4", "dir/k5"]
    assert by_key["k1"].id == "000/k1"
    assert by_key["dir/k5"].id == "000/dir/k5"
    assert (by_key["k1"].image_ext, by_key["k1"].image_bytes) == ("jpg", b"J")
    assert by_key["k1"].sidecars == {"txt": b"cap 1", "json": b'{"a": 1}'}
    assert by_key["k2"].sidecars == {"cls": b"7"}
    assert by_key["k3"].sidecars["txt"] == "ünïcode".encode()
    assert (by_key["k4"].image_ext, by_key["k4"].image_bytes) == ("webp", b"W")
    assert (by_key["dir/k5"].image_ext, by_key["dir/k5"].image_bytes) == ("JPG", b"UP")
    assert all(s.error is None for s in samples)


def test_sample_without_image_is_an_error_sample(tmp_path):
    samples, _ = samples_and_errors(write_tar(tmp_path / "a.tar", [("k.txt", b"only text")]))
    assert len(samples) == 1 and samples[0].image_bytes is None
    assert "no image member" in samples[0].error and "txt" in samples[0].error


def test_duplicate_key_later_in_shard_gets_its_own_id_and_an_error(tmp_path):
    path = write_tar(tmp_path / "a.tar", [("k.jpg", b"1"), ("j.jpg", b"2"), ("k.jpg", b"3")])
    samples, _ = samples_and_errors(path, shard="a")
    assert [s.id for s in samples] == ["a/k", "a/j", "a/k.dup2"]
    assert samples[0].error is None and "duplicate key" in samples[2].error


def test_truncated_tar_keeps_earlier_samples(tmp_path):
    big = bytes(range(256)) * 40
    path = write_tar(tmp_path / "t.tar", [("a.jpg", b"A"), ("b.jpg", b"B"), ("c.jpg", big)])
    data = open(path, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 3 * 512 + 1024 + 700])   # stops inside c.jpg
    samples, errors = samples_and_errors(cut, shard="cut")
    assert [s.key for s in samples if s.error is None] == ["a", "b"]
    assert [s.key for s in samples if s.error] == ["c"]
    assert len(errors) == 1 and "truncated" in errors[0].reason


def test_not_a_tar_and_empty_tar_are_shard_errors(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 30)
    samples, errors = samples_and_errors(junk)
    assert samples == [] and len(errors) == 1
    assert "is not a readable tar archive" in errors[0].reason
    empty = write_tar(tmp_path / "empty.tar", [])
    samples, errors = samples_and_errors(empty)
    assert samples == [] and len(errors) == 1 and "no samples" in errors[0].reason


def test_unsafe_member_paths_never_become_samples(tmp_path):
    path = write_tar(tmp_path / "u.tar", [("../evil.jpg", b"x"), ("/abs.jpg", b"y"),
                                          ("ok.jpg", b"z")])
    samples, errors = samples_and_errors(path)
    assert [s.key for s in samples] == ["ok"]
    assert sorted(e.member for e in errors) == ["../evil.jpg", "/abs.jpg"]


def test_list_shards_fails_fast(tmp_path):
    with pytest.raises(ShardListError, match="matches no file"):
        list_shards(str(tmp_path / "*.tar"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_tar(tmp_path / "a" / "0.tar", [("k.jpg", b"1")])
    write_tar(tmp_path / "b" / "0.tar", [("k.jpg", b"1")])
    with pytest.raises(ShardListError, match="not unique"):
        list_shards(str(tmp_path / "*" / "*.tar"))
    assert [n for n, _ in list_shards(str(tmp_path / "a" / "*.tar"))] == ["0"]


def test_read_transform_on_several_shards(tmp_path):
    for s in range(3):
        write_tar(tmp_path / f"{s:03d}.tar", [(f"k{i}.png", bytes([s, i])) for i in range(4)])
    with beam.Pipeline(runner="FnApiRunner") as p:
        read = p | ReadWebDataset(str(tmp_path / "*.tar"))
        assert_that(read.samples | beam.Map(lambda s: (s.id, s.image_bytes)),
                    equal_to([(f"{s:03d}/k{i}", bytes([s, i])) for s in range(3)
                              for i in range(4)]))
        assert_that(read.errors, equal_to([]), label="no errors")
