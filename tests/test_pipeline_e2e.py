"""End to end: `run` on a small synthetic webdataset, and the three-step flow against it."""
from __future__ import annotations

import collections
import glob
import json
import os

import numpy as np
import pytest

from beam_curator.cli import run_pipeline
from tests.conftest import parquet_rows as table
from tests.conftest import run_args, tar_members
from tests.dedup_reference import reference_semdedup

pytestmark = pytest.mark.slow
EPS = 0.002


@pytest.fixture(scope="module")
def run_output(small_dataset, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    input_glob = os.path.join(os.path.dirname(small_dataset.shards[0]), "*.tar")
    summary = run_pipeline("run", run_args(
        input_glob=input_glob, output=str(out), model_dir=tiny_model_dir, n_clusters=3,
        eps=EPS, aesthetic_threshold=4.9, nsfw_threshold=0.5, write_report="false"))
    samples = {r["id"]: r for r in table(out / "samples")}
    return out, summary, samples, input_glob


def test_every_sample_ends_in_exactly_one_status(run_output, small_dataset):
    _, summary, samples, _ = run_output
    assert summary["samples_read"] == small_dataset.n_samples == len(samples)
    assert summary["accounting"]["ok"] is True
    assert sum(summary["counts"].values()) == small_dataset.n_samples
    assert collections.Counter(r["status"] for r in samples.values()) == {
        k: v for k, v in summary["counts"].items() if v}
    assert summary["random_weights"] is True
    for status in ("kept", "filtered_aesthetic", "semantic_duplicate", "exact_duplicate", "error"):
        assert summary["counts"][status] > 0, status   # the data plants each of them


def test_corrupt_image_is_an_error_record(run_output, small_dataset):
    out, _, samples, _ = run_output
    (corrupt,) = small_dataset.corrupt
    assert samples[corrupt]["status"] == "error" and samples[corrupt]["stage"] == "decode"
    errors = table(out / "errors")
    assert [e["id"] for e in errors] == [corrupt] and errors[0]["reason"]


def test_exact_duplicates_keep_the_smallest_id(run_output):
    _, _, samples, _ = run_output
    groups = collections.defaultdict(list)
    for r in samples.values():
        if r["status"] in ("kept", "exact_duplicate", "semantic_duplicate"):
            groups[r["content_hash"]].append(r["id"])
    copies = [sorted(g) for g in groups.values() if len(g) > 1]
    assert copies, "the synthetic data plants exact copies"
    for group in copies:
        assert samples[group[0]]["status"] != "exact_duplicate"
        for other in group[1:]:
            assert samples[other]["status"] == "exact_duplicate"
            assert samples[other]["duplicate_of"] == group[0]


def test_semantic_decisions_match_the_brute_force_reference(run_output):
    out, _, samples, _ = run_output
    emb = {r["id"]: r["embedding"] for r in table(out / "embeddings")}
    candidates = sorted(i for i, r in samples.items()
                        if r["status"] in ("kept", "semantic_duplicate"))
    vectors = np.array([emb[i] for i in candidates], dtype=np.float32)
    centroids = np.load(out / "dedup" / "centroids.npy")
    ref = reference_semdedup(candidates, vectors, centroids, EPS, "hard")
    for id_, (cluster, max_id, score, is_dup) in ref.items():
        if abs(score - (1 - EPS)) < 1e-5:
            continue   # float32 vs float64 at the boundary: decided by the algorithm tests
        row = samples[id_]
        assert row["cluster"] == cluster
        assert row["status"] == ("semantic_duplicate" if is_dup else "kept"), id_
        if is_dup:
            assert row["duplicate_of"] == max_id


def test_curated_shards_hold_the_original_bytes_of_exactly_the_kept(run_output, small_dataset):
    out, summary, samples, _ = run_output
    kept = {i for i, r in samples.items() if r["status"] == "kept"}
    written = {}
    for path in sorted(glob.glob(str(out / "curated" / "*.tar"))):
        shard = os.path.basename(path)[:-4]
        source = dict(tar_members(os.path.join(os.path.dirname(small_dataset.shards[0]),
                                               shard + ".tar")))
        members = tar_members(path)
        assert len({name for name, _ in members}) == len(members)   # no member twice
        for name, data in members:
            assert source[name] == data, name   # byte-identical image and sidecars
            written.setdefault(f"{shard}/{name.split('.', 1)[0]}", set()).add(name)
    assert set(written) == kept
    for sample_id, names in written.items():   # every member of the sample came along
        key = sample_id.split("/", 1)[1]
        shard = sample_id.split("/", 1)[0]
        source = dict(tar_members(os.path.join(os.path.dirname(small_dataset.shards[0]),
                                               shard + ".tar")))
        assert names == {n for n in source if n.split(".", 1)[0] == key}
    assert summary["curated_samples_written"] == len(kept)


def test_curated_shards_read_with_webdataset(run_output):
    import webdataset as wds

    out, _, samples, _ = run_output
    urls = sorted(glob.glob(str(out / "curated" / "*.tar")))
    ids = [f"{os.path.basename(s['__url__'])[:-4]}/{s['__key__']}"
           for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(ids) == sorted(i for i, r in samples.items() if r["status"] == "kept")


def test_three_step_flow_keeps_exactly_the_same_ids(run_output, tiny_model_dir, tmp_path):
    out, _, samples, input_glob = run_output
    embed_out, dedup_out, remove_out = tmp_path / "e", tmp_path / "d", tmp_path / "r"
    run_pipeline("embed", run_args(input_glob=input_glob, output=str(embed_out),
                                   model_dir=tiny_model_dir, aesthetic_threshold=4.9,
                                   nsfw_threshold=0.5))
    # Two overlapping globs: each file is read once (a row read twice would be its own copy).
    every = str(embed_out / "embeddings" / "*.parquet")
    run_pipeline("dedup", ["--embeddings", f"{every},{sorted(glob.glob(every))[0]}",
                           "--output", str(dedup_out), "--runner", "FnApiRunner",
                           "--eps", str(EPS), "--centroids",
                           str(out / "dedup" / "centroids.npy")])
    run_pipeline("remove", ["--input", input_glob, "--output", str(remove_out),
                            "--runner", "FnApiRunner", "--removal_ids",
                            f"{embed_out / 'rejected'},{dedup_out / 'dedup' / 'duplicates'}"])
    kept_by_run = sorted(i for i, r in samples.items() if r["status"] == "kept")
    kept_by_steps = []
    for path in sorted(glob.glob(str(remove_out / "curated" / "*.tar"))):
        shard = os.path.basename(path)[:-4]
        kept_by_steps += sorted({f"{shard}/{n.split('.', 1)[0]}" for n, _ in tar_members(path)})
    assert sorted(kept_by_steps) == kept_by_run
    assert (sorted(glob.glob(str(remove_out / "curated" / "*.tar")))
            and json.load(open(remove_out / "summary.json"))["curated_samples_written"]
            == len(kept_by_run))
