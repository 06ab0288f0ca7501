"""What users bring: mistyped options fail, real-world tars and other tools' outputs just work.

Shards are written by webdataset.TarWriter, by GNU tar (sorted, and in the scattered order
of `tar cf` without `--sort=name`) and in img2dataset's layout; the clip-retrieval embedding
set is made here in its layout (img_emb/*.npy + metadata/*.parquet).
"""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_curator import cli
from beam_curator.errors import OptionError
from beam_curator.options import curator_options
from beam_curator.schema import ErrorRecord, ShardSample
from beam_curator.transforms.read import list_shards
from beam_curator.webdataset import shard_samples
from tests.conftest import REPO, cli_fails, run_args

KEYS = [f"img{i:03d}" for i in range(6)]


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def sample_files(directory):
    """One jpg + txt + json per key, as files (what people tar up)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(KEYS):
        (directory / f"{key}.jpg").write_bytes(jpeg(i))
        (directory / f"{key}.txt").write_text(f"caption {key}")
        (directory / f"{key}.json").write_text(json.dumps({"key": key}))
    return directory


def gnu_tar(path, directory, names):
    subprocess.run(["tar", "-cf", str(path), "-C", str(directory), *names], check=True)
    return str(path)


def samples_of(path, shard="s"):
    items = list(shard_samples(shard, str(path)))
    return ([i for i in items if isinstance(i, ShardSample)],
            [i for i in items if isinstance(i, ErrorRecord)])


# ---- 1. mistyped options fail; Beam's own options pass -------------------------------------

@pytest.mark.parametrize("typo, meant", [("--n_cluster", "--n_clusters"),
                                         ("--nclusters", "--n_clusters"),
                                         ("--aesthetic-treshold", "--aesthetic-threshold")])
def test_a_mistyped_option_is_an_error_naming_the_closest(warm, one_shard, tmp_path, capsys,
                                                          no_pipeline_run, typo, meant):
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                         model_dir=warm) + [typo, "2"],
              f"unknown option {typo}", f"did you mean {meant}?")
    assert not (tmp_path / "o").exists()


def test_beam_options_pass_and_a_bad_runner_names_the_closest(capsys):
    curator_options(["--direct_num_workers", "2", "--temp_location", "/tmp",
                     "--direct_running_mode", "multi_processing", "--model-dir", "m"])
    # a Java job server's own flags pass through the runners that forward them
    curator_options(["--runner", "FlinkRunner", "--max_bundle_time_mills", "1000"])
    with pytest.raises(OptionError, match="unknown option --max_bundle_time_mills"):
        curator_options(["--max_bundle_time_mills", "1000"])   # FnApiRunner: nowhere to go
    assert cli.main(["dedup", "--embeddings", "x", "--output", "o",
                     "--runner", "DirectRuner"]) == 2
    err = capsys.readouterr().err
    assert "did you mean DirectRunner?" in err and "Traceback" not in err



def test_flink_batch_exchanges_are_blocking_unless_the_user_says_otherwise():
    def mode(argv):
        return curator_options(argv).get_all_options(retain_unknown_options=True).get(
            "execution_mode_for_batch")

    # dedup's route step reads a side input counted from its own input (FLINK-10672's shape)
    assert mode(["--runner", "FlinkRunner"]) == "BATCH_FORCED"
    assert mode(["--runner", "FlinkRunner", "--execution_mode_for_batch", "PIPELINED"]) \
        == "PIPELINED"
    assert mode(["--runner", "FlinkRunner", "--execution_mode_for_batch=BATCH"]) == "BATCH"
    assert mode(["--runner", "FnApiRunner"]) is None

def test_flink_tasks_get_at_most_512_mib_of_embeddings_each(tmp_path, capsys, caplog):
    """Beam's Flink batch runner stalls, silently, when one task's output passes ~1 GB: dedup
    on FlinkRunner takes at least one task per 512 MiB of embedding files."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    from beam_curator.flink_tasks import tasks_for_embeddings
    from beam_curator.options import size_flink_tasks

    def parallelism(argv, size):
        options = curator_options(argv)
        size_flink_tasks(options, *tasks_for_embeddings(size, "--embeddings"))
        return options.view_as(FlinkRunnerOptions).parallelism

    gib = 2**30
    assert parallelism(["--runner", "FlinkRunner"], 3 * gib // 2) == 3     # set when absent
    assert "set to 3, so that each Flink task gets at most 512 MiB of the 1.5 GiB" \
        in caplog.text
    assert parallelism(["--runner", "FlinkRunner"], gib // 4) == -1        # small: untouched
    assert parallelism(["--runner", "FlinkRunner", "--parallelism", "8"], 3 * gib) == 8
    assert parallelism(["--runner", "FnApiRunner"], 100 * gib) == -1      # one process
    with pytest.raises(OptionError, match="--parallelism 6 or more"):
        parallelism(["--runner", "FlinkRunner", "--parallelism=4"], 3 * gib)
    # The CLI measures the files it is given (sizes from the listing; sparse files here)
    # and refuses before anything runs or --output is claimed.
    emb = tmp_path / "emb"
    emb.mkdir()
    for name in ("a.parquet", "b.parquet"):
        with open(emb / name, "wb") as handle:
            handle.truncate(400 << 20)
    cli_fails(capsys, ["dedup", "--embeddings", str(emb), "--output", str(tmp_path / "out"),
                       "--runner", "FlinkRunner", "--parallelism", "1"],
              "--parallelism 2 or more", "0.8 GiB of --embeddings")
    assert not (tmp_path / "out").exists()


# ---- 2. member order: webdataset's, GNU tar's sorted and scattered -------------------------

def test_every_tar_order_gives_the_same_samples_with_their_sidecars(tmp_path):
    import webdataset as wds

    files = sample_files(tmp_path / "files")
    exts = ("jpg", "txt", "json")
    shards = {
        "sorted": gnu_tar(tmp_path / "sorted.tar", files,
                          ["--sort=name", *sorted(os.listdir(files))]),
        # what `tar cf` without --sort=name stores: directory order, keys scattered
        "scattered": gnu_tar(tmp_path / "scattered.tar", files,
                             [f"{k}.{e}" for e in exts for k in KEYS]),
        "scattered2": gnu_tar(tmp_path / "scattered2.tar", files,
                              [f"{k}.{e}" for k in KEYS[::-1] for e in exts][1::2]
                              + [f"{k}.{e}" for k in KEYS[::-1] for e in exts][0::2]),
    }
    with wds.TarWriter(str(tmp_path / "wds.tar")) as writer:
        for key in KEYS:
            writer.write({"__key__": key, **{e: (files / f"{key}.{e}").read_bytes()
                                             for e in exts}})
    shards["webdataset"] = str(tmp_path / "wds.tar")
    for name, path in shards.items():
        samples, errors = samples_of(path)
        assert errors == [], name
        assert sorted(s.id for s in samples) == [f"s/{k}" for k in KEYS], name
        for s in samples:
            assert s.error is None, (name, s.error)
            assert s.image_bytes == (files / f"{s.key}.jpg").read_bytes(), name
            assert s.sidecars["txt"] == f"caption {s.key}".encode(), name
            assert json.loads(s.sidecars["json"]) == {"key": s.key}, name


def test_a_key_really_written_twice_is_still_one_error_in_a_scattered_shard(tmp_path):
    files = sample_files(tmp_path / "files")
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "img000.jpg").write_bytes(jpeg(99))
    path = tmp_path / "s.tar"
    gnu_tar(path, files, [f"{k}.jpg" for k in KEYS] + [f"{k}.txt" for k in KEYS])
    subprocess.run(["tar", "-rf", str(path), "-C", str(tmp_path / "again"), "img000.jpg"],
                   check=True)
    samples, _ = samples_of(path)
    by_id = {s.id: s for s in samples}
    assert by_id["s/img000"].error is None and by_id["s/img000"].sidecars["txt"]
    assert "duplicate key" in by_id["s/img000.dup2"].error
    assert by_id["s/img000.dup2"].image_bytes == jpeg(99)


def test_scattering_found_late_names_the_fix(tmp_path, monkeypatch):
    import beam_curator.webdataset as webdataset

    monkeypatch.setattr(webdataset, "GROUPING_WINDOW", 2)
    files = sample_files(tmp_path / "files")
    names = [f"{k}.{e}" for k in KEYS for e in ("jpg", "json")] + ["img000.txt"]
    samples, _ = samples_of(gnu_tar(tmp_path / "late.tar", files, names))
    late = [s for s in samples if s.id == "s/img000.dup2"][0]
    assert "tar --sort=name -cf" in late.error


# ---- 3. keys with dots -------------------------------------------------------------------

def test_a_key_with_dots_says_why_and_how_to_rename(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "dots.tar")) as writer:
        writer.write({"__key__": "photo.2023.01", "jpg": jpeg(1), "txt": b"caption"})
    (sample,), _ = samples_of(tmp_path / "dots.tar")
    assert sample.key == "photo" and sample.image_bytes is None
    assert "has dots in its key" in sample.error
    assert "photo.2023.01.jpg" in sample.error and "photo_2023_01.jpg" in sample.error


# ---- 4. remove with ids that match nothing -------------------------------------------------

def test_remove_counts_and_warns_about_ids_that_match_nothing(tmp_path, capsys):
    files = sample_files(tmp_path / "files")
    shard = gnu_tar(tmp_path / "00000.tar", files, ["--sort=name", *os.listdir(files)])
    ids = tmp_path / "ids"
    ids.mkdir()
    positional = ["0", "1", "2", "3"]            # NeMo Curator's ids: positions, not keys
    pq.write_table(pa.table({"id": positional + ["00000/img001"]}), ids / "ids.parquet")
    code = cli.main(["remove", "--input", shard, "--output", str(tmp_path / "out"),
                     "--removal_ids", str(ids), "--runner", "FnApiRunner",
                     "--progress_interval", "0"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["removal_ids"] == {"listed": 5, "matched": 1, "unmatched": 4,
                                      "unmatched_examples": ["0", "1", "2", "3"], "null": 0}
    assert summary["curated_samples_written"] == len(KEYS) - 1
    assert "4 of 5 removal ids match no sample" in summary["warnings"][0]
    assert "WARNING: 4 of 5 removal ids" in out


# ---- 5. directories and other tools' layouts -----------------------------------------------

def test_a_directory_is_its_tars_and_img2dataset_files_are_skipped_once(tmp_path, caplog):
    files = sample_files(tmp_path / "files")
    data = tmp_path / "img2dataset"
    data.mkdir()
    for n in ("00000", "00001"):
        gnu_tar(data / f"{n}.tar", files, ["--sort=name", *os.listdir(files)])
        pq.write_table(pa.table({"key": KEYS}), data / f"{n}.parquet")
        (data / f"{n}_stats.json").write_text("{}")
    want = [("00000", str(data / "00000.tar")), ("00001", str(data / "00001.tar"))]
    assert list_shards(str(data)) == want
    with caplog.at_level(logging.WARNING):
        assert list_shards(str(data / "*")) == want
    skipped = [r.message for r in caplog.records if "not tar shards" in r.message]
    assert len(skipped) == 1 and "skipped 4 file(s)" in skipped[0]


@pytest.mark.slow
def test_embeddings_dir_and_the_clip_retrieval_layout(tmp_path):
    """`dedup --embeddings DIR` for a directory of parquet and for clip-retrieval's output
    (float16 img_emb_N.npy + metadata_N.parquet): the same planted pairs are found."""
    from tests.dedup_reference import planted_embeddings

    ids, vectors, plants = planted_embeddings(n_groups=3, per_group=20, dim=32, seed=4)
    clip = tmp_path / "clip-retrieval"
    (clip / "img_emb").mkdir(parents=True)
    (clip / "metadata").mkdir()
    halves = np.array_split(np.arange(len(ids)), 2)
    for n, rows in enumerate(halves):
        np.save(clip / "img_emb" / f"img_emb_{n}.npy", vectors[rows].astype(np.float16))
        pq.write_table(pa.table({"image_path": [f"{ids[r]}.jpg" for r in rows],
                                 "caption": ["c"] * len(rows),
                                 "key": [ids[r] for r in rows]}),
                       clip / "metadata" / f"metadata_{n}.parquet")
    emb = tmp_path / "parquet"
    emb.mkdir()
    pq.write_table(pa.table({"id": ids, "embedding": pa.array(
        [v.tolist() for v in vectors], type=pa.list_(pa.float32()))}), emb / "e.parquet")
    # The bytes that size Flink's tasks: the vector files, not the clip-retrieval metadata;
    # float16 .npy counted as the float32 they become.
    from beam_curator.transforms.semdedup.sources import resolve_embeddings_sized
    assert resolve_embeddings_sized(str(emb))[2] == os.path.getsize(emb / "e.parquet")
    assert resolve_embeddings_sized(str(clip))[2] == 2 * sum(
        os.path.getsize(p) for p in (clip / "img_emb").iterdir())
    found = {}
    for name, source in (("parquet", emb), ("clip", clip)):
        out = tmp_path / f"out-{name}"
        summary = cli.run_pipeline("dedup", ["--embeddings", str(source), "--output", str(out),
                                             "--runner", "FnApiRunner", "--eps", "0.01"])
        assert summary["n_embeddings"] == len(ids)
        dups = pa.concat_tables([pq.read_table(out / "dedup" / "duplicates" / f)
                                 for f in sorted(os.listdir(out / "dedup" / "duplicates"))])
        found[name] = set(dups.column("id").to_pylist())
    for copy, (source, cos) in plants.items():
        if cos >= 0.995:   # far above 1 - eps: float16 storage cannot move it across
            assert (copy in found["clip"]) != (source in found["clip"]), copy
    assert found["clip"] == found["parquet"]


# ---- 7. help, small demos, progress, job service --------------------------------------------

def test_help_is_for_users_and_no_arguments_is_an_error(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m beam_curator COMMAND") and "run " in out
    assert "argument parsing" not in out            # not the module's internal docstring
    assert cli.main([]) == 2
    assert "usage:" in capsys.readouterr().err
    assert cli.main(["run", "--help"]) == 0
    helps = capsys.readouterr().out
    assert "(default: 0.01)" in helps and "(default: hard)" in helps


def test_tiny_synthetic_datasets_write(tmp_path):
    for shards, per_shard in ((1, 1), (1, 3), (3, 10)):
        assert cli.main(["synthetic", "--dir", str(tmp_path / f"{shards}-{per_shard}"),
                         "--shards", str(shards), "--per-shard", str(per_shard)]) == 0


def test_readme_names_the_head_files_init_random_writes(tmp_path):
    from beam_curator.models import init_random

    init_random(str(tmp_path / "m"), arch="tiny")
    readme = (REPO / "README.md").read_text()
    for head in ("aesthetic", "nsfw"):
        (name,) = os.listdir(tmp_path / "m" / head)
        assert f"{head}/{name}" in readme


def test_the_final_rate_on_other_runners_counts_the_run_time(tmp_path):
    import apache_beam as beam

    from beam_curator.progress import run_with_progress

    def slow(x):
        time.sleep(0.01)
        beam.metrics.Metrics.counter("curator", "passed_filters").inc()
        return x

    stream = io.StringIO()
    pipeline = beam.Pipeline(options=curator_options(["--runner", "BundleBasedDirectRunner"]))
    _ = pipeline | beam.Create(range(100)) | beam.Map(slow)
    started = time.monotonic()
    run_with_progress(pipeline, 10.0, stream)
    wall = time.monotonic() - started
    line = stream.getvalue().strip().splitlines()[-1]
    rate = float(line.split("(")[1].split(" img/s")[0])
    assert rate <= 100 / 1.0 and rate == pytest.approx(100 / wall, rel=0.5), line


@pytest.mark.parametrize("runner", ["PortableRunner", "FlinkRunner"])
def test_portable_runner_without_a_job_service_fails_fast(tmp_path, capsys, runner):
    import socket

    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    assert cli.main(["dedup", "--embeddings", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--runner", runner, "--job_endpoint", f"localhost:{port}"]) == 2
    assert time.monotonic() - started < 20
    assert "no job service answers there" in capsys.readouterr().err
