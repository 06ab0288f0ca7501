"""The public API (`import beam_curator`): every stage on its own with TestPipeline and
assert_that, and the README's "Use from Python" examples run as written."""
from __future__ import annotations

import os
import re
import tarfile

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to, is_not_empty

import beam_curator
from beam_curator import (
    DecodeImages,
    Deduplicate,
    DeduplicateEmbeddings,
    EmbedImages,
    FilterByScores,
    ReadWebDataset,
    RemoveSamples,
    SampleInfo,
    ScoreImages,
    WriteCuratedShards,
    WriteEmbeddings,
    WriteErrors,
    WriteSamples,
)
from tests.conftest import REPO, parquet_rows, tar_members


def pipeline():
    return test_pipeline.TestPipeline(runner="FnApiRunner")


def test_the_public_names_import_and_have_documented_examples():
    for name in beam_curator.__all__:
        value = getattr(beam_curator, name)
        if isinstance(value, type) and issubclass(value, beam.PTransform):
            doc = value.__doc__ or ""
            assert "Args:" in doc and "Example::" in doc, name


@pytest.fixture(scope="module")
def shards(small_dataset):
    return os.path.join(os.path.dirname(small_dataset.shards[0]), "*.tar")


def test_read_web_dataset(shards, small_dataset):
    with pipeline() as p:
        read = p | ReadWebDataset(shards)
        assert_that(read.samples | beam.combiners.Count.Globally(),
                    equal_to([small_dataset.n_samples]))
        assert_that(read.samples | beam.Filter(lambda s: s.error is None)
                    | beam.Map(lambda s: "txt" in s.sidecars) | beam.Distinct(),
                    equal_to([True]), label="captions")
        assert_that(read.shards | beam.Keys(), equal_to(["00000", "00001"]), label="shards")
        assert_that(read.errors, equal_to([]), label="errors")


def test_decode_images_with_a_model_dir_and_without(shards, tiny_model_dir, small_dataset):
    corrupt = set(small_dataset.corrupt)
    with pipeline() as p:
        read = p | ReadWebDataset(shards)
        with_model = read.samples | "Model" >> DecodeImages(tiny_model_dir)
        own_size = read.samples | "Own" >> DecodeImages(image_size=40)
        assert_that(with_model.errors | beam.Map(lambda r: (r.id, r.status, r.stage)),
                    equal_to([(i, "error", "decode") for i in corrupt]))
        assert_that(own_size.decoded | beam.MapTuple(
            lambda info, px: (tuple(px.shape), str(px.dtype), len(info.content_hash)))
                    | beam.Distinct(), equal_to([((40, 40, 3), "torch.uint8", 64)]),
                    label="shape")


class MeanColour(beam.ml.inference.base.ModelHandler):
    """A user's own model: the mean colour as a 3-d embedding (a torch tensor)."""

    def load_model(self):
        return None

    def run_inference(self, batch, model, inference_args=None):
        import torch

        return [torch.as_tensor(np.asarray(px).reshape(-1, 3).mean(axis=0) + 1.0)
                for px in batch]


def test_embed_images_with_ours_and_with_a_users_model_handler(shards, tiny_model_dir):
    from beam_curator.models import check_model_dir

    dim = check_model_dir(tiny_model_dir).embed_dim
    with pipeline() as p:
        decoded = (p | ReadWebDataset(shards)).samples | DecodeImages(tiny_model_dir)
        ours = decoded.decoded | "Ours" >> EmbedImages(tiny_model_dir, inference_batch_size=8)
        theirs = decoded.decoded | "Theirs" >> EmbedImages(model_handler=MeanColour())
        for label, embedded, want in (("ours", ours, dim), ("theirs", theirs, 3)):
            assert_that(embedded | f"{label}Shape" >> beam.MapTuple(
                lambda info, e: (e.dtype.name, e.shape[0], round(float(np.linalg.norm(e)), 5)))
                        | f"{label}Distinct" >> beam.Distinct(),
                        equal_to([("float32", want, 1.0)]), label=label)


def _info(i: int, shard="s") -> SampleInfo:
    return SampleInfo(id=f"{shard}/{i:03d}", shard=shard, shard_url=f"{shard}.tar",
                      key=f"{i:03d}", content_hash=f"h{i}")


def test_score_and_filter(tiny_model_dir):
    from beam_curator.models import check_model_dir

    dim = check_model_dir(tiny_model_dir).embed_dim
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with pipeline() as p:
        scored = (p | beam.Create([(_info(i), v) for i, v in enumerate(vectors)])
                  | ScoreImages(tiny_model_dir))
        everything = scored | "All" >> FilterByScores(aesthetic_threshold=None,
                                                      nsfw_threshold=None)
        nothing = scored | "None" >> FilterByScores(aesthetic_threshold=10.0,
                                                    nsfw_threshold=None)
        assert_that(everything.passed | beam.MapTuple(
            lambda info, _: info.aesthetic_score is not None and info.nsfw_score is not None)
            | "Scored" >> beam.Distinct(), equal_to([True]))
        assert_that(everything.filtered, equal_to([]), label="none filtered")
        assert_that(nothing.filtered | beam.MapTuple(lambda r, _: r.status)
                    | "Statuses" >> beam.Distinct(),
                    equal_to(["filtered_aesthetic"]), label="all filtered")


def _planted(n=40, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors[n - 3:] = vectors[:3] + rng.normal(scale=1e-4, size=(3, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def test_deduplicate_samples(tmp_path):
    vectors = _planted()
    infos = [_info(i) for i in range(len(vectors))]
    infos[5] = SampleInfo(**{**infos[5].__dict__, "content_hash": "h0"})   # bytes of 000
    with pipeline() as p:
        dedup = (p | beam.Create(list(zip(infos, vectors)))
                 | Deduplicate(str(tmp_path), n_clusters=2, eps=0.01))
        # each planted pair loses exactly one member (which one: the keep rule's choice)
        assert_that(dedup.results | beam.Filter(lambda r: r.status != "kept")
                    | beam.Map(lambda r: (r.status, frozenset((r.id, r.duplicate_of)))),
                    equal_to([("exact_duplicate", frozenset({"s/005", "s/000"})),
                              ("semantic_duplicate", frozenset({"s/037", "s/000"})),
                              ("semantic_duplicate", frozenset({"s/038", "s/001"})),
                              ("semantic_duplicate", frozenset({"s/039", "s/002"}))]))
        assert_that(dedup.info | beam.Map(lambda i: i["n_clusters"]), equal_to([2]),
                    label="info")
    assert (tmp_path / "dedup" / "centroids.npy").exists()
    assert len(parquet_rows(tmp_path / "embeddings")) == len(vectors)   # written for it


def test_deduplicate_embeddings_gives_decisions(tmp_path):
    import pyarrow as pa

    vectors = _planted()
    pq.write_table(pa.table({"id": [f"s/{i:03d}" for i in range(len(vectors))],
                             "embedding": pa.array([v.tolist() for v in vectors],
                                                   type=pa.list_(pa.float32()))}),
                   tmp_path / "e.parquet")
    with pipeline() as p:
        dedup = p | DeduplicateEmbeddings(str(tmp_path / "*.parquet"), str(tmp_path / "out"),
                                          n_clusters=2)
        assert_that(dedup.results | beam.Filter(lambda d: d.status != "kept")
                    | beam.Map(lambda d: frozenset((d.id, d.duplicate_of))),
                    equal_to([frozenset({"s/037", "s/000"}), frozenset({"s/038", "s/001"}),
                              frozenset({"s/039", "s/002"})]))
        assert_that(dedup.counts, equal_to([("kept", 37), ("semantic_duplicate", 3)]),
                    label="counts")
    # Without rows (what the `dedup` command runs): the same counts, the same files.
    with pipeline() as p:
        dedup = p | DeduplicateEmbeddings(str(tmp_path / "*.parquet"), str(tmp_path / "out2"),
                                          n_clusters=2, with_rows=False)
        assert_that(dedup.results, equal_to([]), label="no rows")
        assert_that(dedup.counts, equal_to([("kept", 37), ("semantic_duplicate", 3)]),
                    label="counts")
    assert (parquet_rows(tmp_path / "out2" / "dedup" / "duplicates")
            == parquet_rows(tmp_path / "out" / "dedup" / "duplicates"))


def test_writers_and_curated_shards(shards, tmp_path, small_dataset):
    from beam_curator.schema import ERROR, KEPT, SampleResult, info_of

    out = str(tmp_path / "out")
    with pipeline() as p:
        read = p | ReadWebDataset(shards)
        results = read.samples | beam.Map(lambda s: SampleResult(
            info=info_of(s), status=ERROR if s.error else KEPT, reason=s.error,
            stage="read" if s.error else None))
        assert_that(results | WriteSamples(out), is_not_empty(), label="samples")
        (results, read.errors) | beam.Flatten() | WriteErrors(out)
        kept = results | beam.Filter(lambda r: r.id.endswith("0"))
        counts = kept | WriteCuratedShards(out, shards=read.shards)
        assert_that(counts | beam.Values() | beam.CombineGlobally(sum),
                    equal_to([2 * 3]), label="curated")   # keys ...0, ...10, ...20 per shard
        info = SampleInfo(id="00000/x", shard="00000", shard_url="u", key="x")
        assert_that(p | beam.Create([(info, np.ones(4, np.float32))]) | WriteEmbeddings(out)
                    | beam.Map(os.path.basename), equal_to(["00000.parquet"]),
                    label="embeddings")
    assert len(parquet_rows(tmp_path / "out" / "samples")) == small_dataset.n_samples
    names = [n for shard in sorted((tmp_path / "out" / "curated").glob("*.tar"))
             for n, _ in tar_members(shard)]
    assert names and all(n.split(".")[0].endswith("0") for n in names)


def test_remove_samples(shards, tmp_path):
    out = str(tmp_path / "out")
    with pipeline() as p:
        read = p | ReadWebDataset(shards)
        counts = (p | beam.Create(["00000/000000000", "nope/1"])
                  | RemoveSamples(out, shards=read.shards))
        assert_that(counts | beam.Map(lambda c: (c.shard, c.listed, c.matched)),
                    equal_to([("00000", 1, 1), ("00001", 0, 0), ("nope", 1, 0)]))
    with tarfile.open(tmp_path / "out" / "curated" / "00000.tar") as tar:
        assert not any(m.name.startswith("000000000.") for m in tar)


# ---- the README's examples, as written --------------------------------------------------------

def readme_python_blocks() -> list:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_the_readme_examples_run_as_written(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import shutil

    from beam_curator.synthetic import make_dataset

    blocks = readme_python_blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    make_dataset("demo-data", n_shards=2, per_shard=30, seed=3)
    shutil.copytree(tiny_model_dir, "demo-models")
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    statuses = {r["status"] for r in parquet_rows(tmp_path / "py-out" / "samples")}
    assert "kept" in statuses and "exact_duplicate" in statuses
    assert list((tmp_path / "py-out" / "curated").glob("*.tar"))
    assert "duplicate of" in capsys.readouterr().out

