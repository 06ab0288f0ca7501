"""--text_embeddings (issue 26): the caption embeddings that the CLIP score computes, written
in clip-retrieval's `clip inference` layout (text_emb/*.npy float16 + metadata/*.parquet, row
for row) under OUTPUT/text_embeddings/, one pair of files per shard."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_curator.synthetic import SyntheticSample, draw_image, encode, write_shard
from tests.conftest import cli_fails, parquet_rows, run_args

# float16 keeps 11 significant bits: a unit vector's components are within ~5e-4 of the
# float32 ones, and a cosine of two such vectors within ~1e-3 of theirs.
F16_ATOL = 1e-3

CAPTIONS = {
    "000": ["a red square", "a photo of a dog", "", None, "a long caption " * 20,
            "une image", "a red square", "a photo of a dog"],
    "001": ["a blue circle on a green field", None, "a photo of a dog"],
}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Two shards: captions, repeats, an empty caption, none at all, one too long for the
    context, and an image that does not decode (with a caption: it has no embedding)."""
    rng = random.Random(7)
    directory = tmp_path_factory.mktemp("text-shards")
    expected = {}
    for shard, captions in CAPTIONS.items():
        samples = []
        for i, caption in enumerate(captions):
            key = f"k{i:02d}"
            fields = {"png": encode(draw_image(rng, 40), "png")}
            if caption is not None:
                fields["txt"] = caption.encode()
            samples.append(SyntheticSample(key, fields))
            expected[f"{shard}/{key}"] = caption
        samples.append(SyntheticSample("bad", {"png": b"not an image", "txt": b"a caption"}))
        write_shard(str(directory / f"{shard}.tar"), samples)
    return directory, expected


@pytest.fixture(scope="module")
def embedded(captioned, tiny_model_dir, tmp_path_factory):
    from beam_curator import cli

    directory, expected = captioned
    out = tmp_path_factory.mktemp("text-run") / "out"
    summary = cli.run_pipeline("embed", run_args(
        input_glob=str(directory / "*.tar"), output=str(out), model_dir=tiny_model_dir,
        progress_interval=0, inference_batch_size=4, text_embeddings="true"))
    return out, summary, expected


def read_layout(out: Path):
    """{shard: (float16 vectors, metadata rows)} of OUT/text_embeddings/."""
    root = out / "text_embeddings"
    found = {}
    for npy in sorted((root / "text_emb").glob("*.npy")):
        shard = npy.stem[len("text_emb_"):]
        rows = pq.read_table(root / "metadata" / f"metadata_{shard}.parquet").to_pylist()
        found[shard] = (np.load(npy), rows)
    return found


def open_clip_text(tiny_model_dir, captions):
    """open_clip's own tokenizer and encode_text, normalised (float32)."""
    import torch

    from tests.open_clip_reference import open_clip_model

    model, _, tokenizer = open_clip_model(tiny_model_dir)
    with torch.no_grad():
        features = model.encode_text(tokenizer(captions)).float()
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


def test_the_layout_is_clip_retrieval_s_and_rows_align(embedded):
    out, _, expected = embedded
    layout = read_layout(out)
    assert sorted(os.listdir(out / "text_embeddings")) == ["metadata", "text_emb"]
    assert sorted(layout) == ["000", "001"]
    assert sorted(os.listdir(out / "text_embeddings" / "metadata")) == [
        "metadata_000.parquet", "metadata_001.parquet"]
    captioned_ids = {i for i, c in expected.items() if (c or "").strip()}
    seen = []
    for shard, (vectors, rows) in layout.items():
        assert vectors.dtype == np.float16 and vectors.ndim == 2
        assert len(vectors) == len(rows)
        ids = [r["id"] for r in rows]
        assert ids == sorted(ids)
        for row in rows:
            assert row["shard"] == shard and row["id"] == f"{shard}/{row['key']}"
            assert row["image_path"] == row["key"]   # clip-retrieval's webdataset reader
            assert row["caption"] == expected[row["id"]].strip()
        seen += ids
    # every captioned, decoded sample once; no row without a caption, none for the bad image
    assert sorted(seen) == sorted(captioned_ids)
    assert not [i for i in seen if i.endswith("/bad")]


def test_the_vectors_are_open_clip_s_own_encode_text(embedded, tiny_model_dir):
    out, _, _ = embedded
    for vectors, rows in read_layout(out).values():
        reference = open_clip_text(tiny_model_dir, [r["caption"] for r in rows])
        stored = vectors.astype(np.float32)
        np.testing.assert_allclose(stored, reference, atol=F16_ATOL, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=F16_ATOL)
        # the same caption, the same vector (bit for bit: its forward has its own shape)
        by_caption = {}
        for vector, row in zip(vectors, rows):
            same = by_caption.setdefault(row["caption"], vector)
            assert np.array_equal(same, vector), row["caption"]


def test_the_stored_cosine_is_the_clip_score(embedded):
    out, summary, _ = embedded
    images = {r["id"]: np.asarray(r["embedding"], np.float32)
              for r in parquet_rows(out / "embeddings")}
    samples = {r["id"]: r for r in parquet_rows(out / "samples")}
    n = 0
    for vectors, rows in read_layout(out).values():
        for vector, row in zip(vectors.astype(np.float32), rows):
            cosine = float(images[row["id"]] @ vector)
            assert row["clip_score"] == pytest.approx(samples[row["id"]]["clip_score"],
                                                      abs=1e-7)
            assert cosine == pytest.approx(row["clip_score"], abs=F16_ATOL), row["id"]
            n += 1
    info = summary["text_embeddings"]
    assert info == {"written": True, "rows": n, "files": 2,
                    "text_emb": "text_embeddings/text_emb",
                    "metadata": "text_embeddings/metadata"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["text_embeddings"] == info and on_disk["options"]["text_embeddings"]


def test_the_option_is_refused_without_the_clip_score(warm, one_shard, tmp_path, capsys,
                                                      no_pipeline_run):
    for command in ("embed", "run"):
        cli_fails(capsys, [command] + run_args(
            input_glob=one_shard, output=str(tmp_path / command), model_dir=warm,
            text_embeddings="true", clip_score="false"),
            "--text_embeddings", "drop --clip_score false")
    assert not (tmp_path / "embed").exists() and not (tmp_path / "run").exists()


def test_a_rerun_with_overwrite_leaves_no_stale_text_files(embedded, captioned,
                                                           tiny_model_dir, tmp_path):
    """The previous run wrote files for shards 000 and 001 (and a killed attempt left a temp
    file); the rerun reads 000 only: exactly its files remain."""
    from beam_curator import cli
    from beam_curator.atomic import TMP_PREFIX

    previous, _, _ = embedded
    directory, _ = captioned
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    leftover = out / "text_embeddings" / "text_emb" / f"{TMP_PREFIX}0123456789ab-text_emb_9.npy"
    leftover.write_bytes(b"half")
    summary = cli.run_pipeline("embed", run_args(
        input_glob=str(directory / "000.tar"), output=str(out), model_dir=tiny_model_dir,
        progress_interval=0, inference_batch_size=4, text_embeddings="true",
        overwrite="true"))
    files = sorted(str(p.relative_to(out)) for p in (out / "text_embeddings").rglob("*")
                   if p.is_file())
    assert files == ["text_embeddings/metadata/metadata_000.parquet",
                     "text_embeddings/text_emb/text_emb_000.npy"]
    assert summary["text_embeddings"]["files"] == 1
    assert np.array_equal(np.load(out / "text_embeddings" / "text_emb" / "text_emb_000.npy"),
                          np.load(previous / "text_embeddings" / "text_emb" /
                                  "text_emb_000.npy"))


def test_run_writes_them_too_and_without_the_option_there_are_none(captioned, tiny_model_dir,
                                                                     tmp_path):
    from beam_curator import cli

    directory, _ = captioned
    out = tmp_path / "out"
    summary = cli.run_pipeline("run", run_args(
        input_glob=str(directory / "001.tar"), output=str(out), model_dir=tiny_model_dir,
        progress_interval=0, text_embeddings="true", dedup="false", write_report="false",
        aesthetic_threshold="none", nsfw_threshold="none"))
    assert summary["accounting"]["ok"]
    assert summary["text_embeddings"]["rows"] == 2
    assert [r["caption"] for r in read_layout(out)["001"][1]] == [
        "a blue circle on a green field", "a photo of a dog"]
    # the same run without the option: no text_embeddings/ at all, nothing in the summary
    summary = cli.run_pipeline("run", run_args(
        input_glob=str(directory / "001.tar"), output=str(out), model_dir=tiny_model_dir,
        progress_interval=0, dedup="false", write_report="false",
        aesthetic_threshold="none", nsfw_threshold="none", overwrite="true"))
    assert not (out / "text_embeddings").exists() and "text_embeddings" not in summary


def test_the_text_files_dedup_as_a_clip_retrieval_pair(embedded, tmp_path):
    """What the README says: DeduplicateEmbeddings over the (npy, metadata) pairs (our
    clip-retrieval reader: ids from the `id` column, float16 re-normalised) dedups the
    captions; a repeated caption has the very same vector, so every copy after the first
    kept one is a semantic duplicate."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that

    from beam_curator import DeduplicateEmbeddings

    out, _, expected = embedded
    root = out / "text_embeddings"
    pairs = [(str(root / "text_emb" / f"text_emb_{s}.npy"),
              str(root / "metadata" / f"metadata_{s}.parquet")) for s in ("000", "001")]
    by_caption = {}
    for sample_id, caption in expected.items():
        if (caption or "").strip():
            by_caption.setdefault(caption.strip(), []).append(sample_id)

    def check(decisions):
        status = {d.id: d.status for d in decisions}
        assert sorted(status) == sorted(i for ids in by_caption.values() for i in ids)
        for ids in by_caption.values():
            kept = [i for i in ids if status[i] == "kept"]
            assert len(kept) <= 1, ids
            if len(ids) > 1:
                assert sum(status[i] == "semantic_duplicate" for i in ids) >= len(ids) - 1

    with beam.Pipeline(runner="FnApiRunner") as p:
        dedup = p | DeduplicateEmbeddings(str(root), str(tmp_path / "d"), n_clusters=1,
                                          eps=0.001, resolved=([], pairs))
        assert_that(dedup.results, check)
