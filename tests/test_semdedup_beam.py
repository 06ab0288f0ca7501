"""The `dedup` pipeline on embeddings whose answer is known, against a brute-force reference."""
from __future__ import annotations

import dataclasses
import glob
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_curator.cli import run_pipeline
from tests.dedup_reference import planted_embeddings, reference_semdedup

pytestmark = pytest.mark.slow
EPS = 0.01


def write_embeddings(directory, ids, vectors, hashes=None, files=3, row_group=20):
    os.makedirs(directory, exist_ok=True)
    order = np.random.default_rng(3).permutation(len(ids))   # rows in no useful order
    for f, part in enumerate(np.array_split(order, files)):
        columns = {"id": [ids[i] for i in part],
                   "embedding": pa.array([vectors[i].tolist() for i in part],
                                         type=pa.list_(pa.float32()))}
        if hashes is not None:
            columns["content_hash"] = [hashes[i] for i in part]
        pq.write_table(pa.table(columns), os.path.join(directory, f"part-{f}.parquet"),
                       row_group_size=row_group)
    return os.path.join(directory, "*.parquet")


def read_dir(path, sort="id"):
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    return table.sort_by(sort).to_pylist() if table is not None else []


def dedup(embeddings, out, *extra):
    return run_pipeline("dedup", ["--embeddings", embeddings, "--output", str(out),
                                  "--runner", "FnApiRunner", "--eps", str(EPS), *map(str, extra)])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    ids, vectors, planted = planted_embeddings(n_groups=4, per_group=25, dim=32, seed=0)
    directory = tmp_path_factory.mktemp("emb")
    return ids, vectors, planted, write_embeddings(str(directory), ids, vectors)


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    summary = dedup(planted[3], out, "--n_clusters", 4, "--kmeans_seed", 1)
    return out, summary


def test_trained_run_matches_the_reference(planted, trained):
    ids, vectors, plants, _ = planted
    out, summary = trained
    centroids = np.load(out / "dedup" / "centroids.npy")
    assert centroids.shape == (4, 32)
    ref = reference_semdedup(ids, vectors, centroids, EPS, "hard")
    pairs = {r["id"]: r for r in read_dir(out / "dedup" / "pairwise_results")}
    kmeans = {r["id"]: r for r in read_dir(out / "dedup" / "kmeans")}
    dups = {r["id"] for r in read_dir(out / "dedup" / "duplicates")}
    assert set(pairs) == set(ids) == set(kmeans)
    for id_, (cluster, max_id, score, is_dup) in ref.items():
        assert kmeans[id_]["centroid"] == cluster
        assert pairs[id_]["max_id"] == max_id, id_
        # Both accumulate in float64; ours is then rounded once to float32.
        assert pairs[id_]["cosine_sim_score"] == pytest.approx(score, abs=1e-7)
        assert (id_ in dups) == is_dup, id_
    assert dups == {i for i, r in ref.items() if r[3]}
    # Planted copies at cosine >= 1 - eps lose exactly one member, the 0.98 and 0.9 ones
    # none (every other pair in this data is below 0.97).
    for copy, (source, cos) in plants.items():
        if cos >= 1 - EPS:
            assert (copy in dups) != (source in dups), copy
        else:
            assert copy not in dups and source not in dups, copy
    assert summary["n_duplicates"] == len(dups) and summary["n_embeddings"] == len(ids)


def test_loaded_centroids_give_the_trained_assignment_and_easy_matches_reference(
        planted, trained, tmp_path):
    ids, vectors, _, embeddings = planted
    out, _ = trained
    centroids_path = out / "dedup" / "centroids.npy"
    dedup(embeddings, tmp_path, "--centroids", centroids_path, "--which_to_keep", "easy")
    assert read_dir(tmp_path / "dedup" / "kmeans") == read_dir(out / "dedup" / "kmeans")
    ref = reference_semdedup(ids, vectors, np.load(centroids_path), EPS, "easy")
    pairs = {r["id"]: r for r in read_dir(tmp_path / "dedup" / "pairwise_results")}
    assert {i: pairs[i]["max_id"] for i in ids} == {i: r[1] for i, r in ref.items()}


def test_block_split_shuffle_and_workers_give_the_unsplit_answer(planted, trained, tmp_path):
    _, _, _, embeddings = planted
    out, _ = trained
    centroids = out / "dedup" / "centroids.npy"
    baseline = read_dir(out / "dedup" / "pairwise_results")
    variants = {
        "split": ["--pairwise_block_size", 7],
        "bins": ["--pairwise_block_size", 60],   # ~25-row clusters: two per key
        "shuffle": ["--dedup_vector_transport", "shuffle"],
        "two_workers": ["--direct_num_workers", 2, "--direct_running_mode", "multi_processing",
                        "--pairwise_block_size", 5],
    }
    for name, args in variants.items():
        dedup(embeddings, tmp_path / name, "--centroids", centroids, *args)
        assert read_dir(tmp_path / name / "dedup" / "pairwise_results") == baseline, name
        assert not (tmp_path / name / "dedup" / "_staging").exists()


def test_random_keep_is_seeded_and_exact_copies_resolve_to_the_smallest_id(planted, tmp_path):
    ids, vectors, _, _ = planted
    # Three rows share bytes (same hash): the smallest id survives, the others are exact dups.
    hashes = [f"h{i}" for i in range(len(ids))]
    hashes[10] = hashes[40] = hashes[70] = "same"
    embeddings = write_embeddings(str(tmp_path / "emb"), ids, vectors, hashes)
    runs = []
    for name in ("a", "b"):
        dedup(embeddings, tmp_path / name, "--n_clusters", 4, "--which_to_keep", "random",
              "--kmeans_seed", 5)
        runs.append(read_dir(tmp_path / name / "dedup" / "pairwise_results"))
    assert runs[0] == runs[1]
    exact = read_dir(tmp_path / "a" / "dedup" / "duplicates")
    survivor = min(ids[10], ids[40], ids[70])
    copies = {ids[10], ids[40], ids[70]} - {survivor}
    assert copies <= {r["id"] for r in exact}
    pairs = {r["id"]: r for r in runs[0]}
    assert all(pairs[c]["max_id"] == survivor and pairs[c]["cosine_sim_score"] == 1.0
               for c in copies)
    # The shuffle transport drops the copies from the vectors it routes: the same answer.
    dedup(embeddings, tmp_path / "shuffle", "--n_clusters", 4, "--which_to_keep", "random",
          "--kmeans_seed", 5, "--dedup_vector_transport", "shuffle")
    assert read_dir(tmp_path / "shuffle" / "dedup" / "pairwise_results") == runs[0]
    assert read_dir(tmp_path / "shuffle" / "dedup" / "duplicates") == read_dir(
        tmp_path / "a" / "dedup" / "duplicates")


def test_border_margin_only_adds_duplicates(planted, trained, tmp_path):
    _, _, _, embeddings = planted
    out, _ = trained
    dedup(embeddings, tmp_path, "--centroids", out / "dedup" / "centroids.npy",
          "--border_margin", 2.0)
    default = {r["id"] for r in read_dir(out / "dedup" / "duplicates")}
    border = {r["id"] for r in read_dir(tmp_path / "dedup" / "duplicates")}
    assert default <= border
    # One priority per point in every cluster it joins: no planted pair loses both members.
    for copy, (source, _) in planted[2].items():
        assert not (copy in border and source in border), copy
    kmeans = read_dir(tmp_path / "dedup" / "kmeans")
    assert sorted(r["id"] for r in kmeans) == sorted(planted[0])   # one row per point: home


def test_border_margin_refuses_random_order():
    from beam_curator.errors import OptionError
    from beam_curator.options import curator_options, validate_options

    with pytest.raises(OptionError, match="hard or easy"):
        validate_options(curator_options(["--border_margin", "0.05",
                                          "--which_to_keep", "random"]))


def test_default_k_comes_from_the_data_and_small_inputs_still_dedup(planted, tmp_path):
    """No --n_clusters: one cluster per 10,000 candidates, at least one, so 100 rows are one
    cluster and every planted near-copy is found; summary.json says what was chosen."""
    ids, _, plants, embeddings = planted
    summary = dedup(embeddings, tmp_path)
    assert summary["dedup"]["n_clusters"] == 1
    assert summary["dedup"]["n_clusters_from"].startswith("auto")
    assert summary["dedup"]["sample_size"] == 64              # 64 per centroid, not per row
    dups = {r["id"] for r in read_dir(tmp_path / "dedup" / "duplicates")}
    for copy, (source, cos) in plants.items():
        if cos >= 1 - EPS:
            assert (copy in dups) != (source in dups), copy


def test_staged_rows_come_back_in_the_order_asked_and_a_short_file_is_an_error(tmp_path):
    from beam_curator.transforms.semdedup.vectors import read_staged_rows, write_staged

    vectors = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    path = write_staged(str(tmp_path / "chunk.f32"), vectors)
    # runs, gaps, repeats and reversed order: what a cluster's members ask of one chunk
    for rows in ([], [7], [5, 6, 7, 8], [299, 0, 150, 151, 151, 3], list(range(299, -1, -1))):
        assert np.array_equal(read_staged_rows(path, 5, rows), vectors[rows].reshape(-1, 5))
    assert np.array_equal(read_staged_rows(path, 5, None), vectors)
    with pytest.raises(OSError, match="past its end"):
        read_staged_rows(path, 5, [298, 299, 300])
    # written in a given order, through a buffer smaller than the file (2,500 rows)
    order = np.random.default_rng(1).permutation(2500)
    many = np.random.default_rng(2).normal(size=(2500, 5)).astype(np.float32)
    write_staged(str(tmp_path / "ordered.f32"), many, order)
    assert np.array_equal(read_staged_rows(str(tmp_path / "ordered.f32"), 5, None), many[order])
    empty = write_staged(str(tmp_path / "empty.f32"), np.zeros((0, 0), np.float32))
    assert os.path.getsize(empty) == 0


def test_a_chunk_sends_one_element_per_bin_of_whole_clusters_read_in_one_run(tmp_path):
    """The staged store keeps a chunk's vectors in cluster order after the assign step; Route
    packs small clusters into bins of at most pairwise_block_size members: one element per
    (chunk, bin) whose staged rows are one run of the file, so the pairwise step reads them
    with one read, and gets the right vectors."""
    from beam_curator.dedup import blocks
    from beam_curator.transforms.semdedup.assign import AssignFn
    from beam_curator.transforms.semdedup.config import DedupConfig
    from beam_curator.transforms.semdedup.records import BinKey, pairwise_key
    from beam_curator.transforms.semdedup.route import RouteFn
    from beam_curator.transforms.semdedup.rows import CheckRowsFn
    from beam_curator.transforms.semdedup.sources import row_group_chunks
    from beam_curator.transforms.semdedup.vectors import StagedVectors

    rng = np.random.default_rng(4)
    ids = [f"s{i:03d}" for i in range(200)]
    vectors = rng.normal(size=(200, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pattern = write_embeddings(str(tmp_path / "emb"), ids, vectors, files=1, row_group=200)
    config = DedupConfig(output=str(tmp_path / "out"), pairwise_block_size=70,
                         vector_transport="staged")
    store = StagedVectors(config)
    (chunk,) = row_group_chunks(glob.glob(pattern)[0], "part", 8, config)

    def run(fn, *args):
        fn.setup()
        fn.start_bundle()
        out = list(fn.process(*args))
        fn.finish_bundle()   # what the store writes behind is done by here
        fn.teardown()
        return out

    (chunk,) = [c for c in run(CheckRowsFn(config, store), chunk)
                if not isinstance(c, beam.pvalue.TaggedOutput)]
    assert os.listdir(config.staging_dir) == [f"chunk-{chunk.name}.f32"]   # the first copy
    (assigned,) = run(AssignFn(config, store), chunk, vectors[:8])
    sizes = dict(assigned.cluster_counts())
    assert len(sizes) > 3 and max(sizes.values()) <= 70
    routed = list(RouteFn(config, store).process(assigned, sizes))
    bins = blocks.pack_clusters(sizes, 70)
    routed = [(pairwise_key(key), part) for key, part in routed]
    assert all(isinstance(key, BinKey) for key, _ in routed)
    assert sorted(key.first_cluster for key, _ in routed) == sorted(set(bins.values()))
    assert len(routed) < len(sizes)                        # fewer elements than clusters
    by_id = dict(zip(ids, vectors))
    for key, part in routed:
        members = part.members
        assert part.block == 0 and not part.reference
        assert len(members) <= 70 and members.vectors is None   # references, not vectors
        assert set(members.cluster.tolist()) == {c for c, b in bins.items()
                                                 if b == key.first_cluster}
        assert np.array_equal(np.diff(members.rows), np.ones(len(members) - 1))   # one run
        assert np.array_equal(store.read(members), np.stack([by_id[i] for i in members.ids]))
        for cluster, part in members.by_cluster():
            assert len(part) == sizes[cluster] and part.cluster is None
    staging = os.listdir(config.staging_dir)
    assert staging == [f"chunk-{chunk.name}.by-cluster.f32"]   # the first copy is dropped
    store.discard_all()
    assert not os.path.exists(config.staging_dir)


def test_small_clusters_pack_in_order_and_never_past_the_bound():
    from beam_curator.dedup import blocks

    sizes = {5: 5, 0: 30, 1: 30, 2: 100, 3: 10, 4: 50, 6: 60, 7: 1}
    bins = blocks.pack_clusters(sizes, 60)
    assert bins == {0: 0, 1: 0, 3: 3, 4: 3, 5: 5, 6: 6, 7: 7}   # 2 is cut into blocks
    for first in set(bins.values()):
        assert sum(sizes[c] for c, b in bins.items() if b == first) <= 60
    # bins fill to min(bin_rows, block_rows); a cluster above bin_rows is a bin of its own
    assert blocks.pack_clusters(sizes, 100, bin_rows=70) == {
        0: 0, 1: 0, 2: 2, 3: 3, 4: 3, 5: 3, 6: 6, 7: 6}


def test_members_survive_beam_coding_with_every_column():
    """Members pickle their per-member columns as one bytes (Members.__reduce__)."""
    from apache_beam.coders.typecoders import registry

    from beam_curator.transforms.semdedup.records import Members

    coder = registry.get_coder(object)
    rng = np.random.default_rng(0)
    full = Members(ids=("a", "b", "c"), cos_dist=rng.random(3, dtype=np.float32),
                   l2_dist=rng.random(3, dtype=np.float32), border=np.array([1, 0, 1], bool),
                   vectors=rng.random((3, 4), dtype=np.float32), dim=4, paths=("x", "y"),
                   path_index=np.array([0, 1, 1], np.int32), rows=np.array([5, 0, 9]),
                   cluster=np.array([2, 2, 7]))
    empty = Members(ids=(), cos_dist=np.zeros(0, np.float32), l2_dist=np.zeros(0, np.float32),
                    border=np.zeros(0, bool))
    for members in (full, empty, full.take([2]), dataclasses.replace(full, vectors=None)):
        back = coder.decode(coder.encode(((1,), (0, members))))[1][1]
        assert back.ids == members.ids and back.dim == members.dim
        assert back.paths == members.paths
        for name in ("cos_dist", "l2_dist", "border", "vectors", "path_index", "rows",
                     "cluster"):
            a, b = getattr(members, name), getattr(back, name)
            assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))
    with pytest.raises(ValueError, match="shape"):
        coder.encode(dataclasses.replace(full, rows=np.arange(4)))


@pytest.mark.parametrize("transport", ["staged", "shuffle"])
def test_a_worker_that_does_not_see_the_launchers_output_fails_at_once_naming_the_fix(
        planted, tmp_path, transport):
    """Dedup's scratch files (staged vectors, k-means samples) live under --output, so every
    worker must see the launcher's --output. Built, the graph has written its marker; a
    worker that does not find it (here: the marker is gone before the run, as on a host that
    does not share the path) fails with a message naming the fix, and a stale staged file
    left there by another run is never read."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_curator.transforms.dedup import DeduplicateEmbeddings
    from beam_curator.transforms.semdedup.vectors import write_staged

    _, _, _, embeddings = planted
    out = tmp_path / "out"
    p = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions())
    p | DeduplicateEmbeddings(embeddings, str(out), n_clusters=4, vector_transport=transport)
    staging = out / "dedup" / "_staging"
    (marker,) = [f for f in os.listdir(staging) if f.startswith("RUN-")]
    os.remove(staging / marker)
    stale = np.ones((40, 32), np.float32)   # another run's first copies: wrong vectors
    for name in (f"{f:05d}-{rg:05d}" for f in range(3) for rg in range(2)):
        write_staged(str(staging / f"chunk-{name}.f32"), stale)
    with pytest.raises(Exception, match="does not see the --output the launcher wrote") as e:
        p.run().wait_until_finish()
    assert "mount such as NFS" in str(e.value) and marker in str(e.value)
    assert not (out / "dedup" / "pairwise_results").exists()


def test_staged_vectors_are_refused_only_where_they_cannot_be_read_at_random():
    """staged needs a file system path (a shared mount on a cluster), not an object store;
    auto picks it for every file system --output (the workers must see it either way: the
    marker check) and shuffle for an object store."""
    from beam_curator.errors import OptionError
    from beam_curator.options import curator_options, resolve_vector_transport, validate_options

    flink = ["--runner", "FlinkRunner", "--flink_master", "localhost:8081"]
    for output in ("/mnt/shared/out", "file:///mnt/shared/out"):
        options = curator_options([*flink, "--output", output,
                                   "--dedup_vector_transport", "staged"])
        validate_options(options)
        assert resolve_vector_transport(options) == "staged"
    for runner in (flink, ["--runner", "FnApiRunner"]):
        assert resolve_vector_transport(curator_options([*runner, "--output", "/o"])) \
            == "staged"
        assert resolve_vector_transport(curator_options(
            [*runner, "--output", "gs://bucket/o"])) == "shuffle"
    with pytest.raises(OptionError, match="file system path.*shuffle"):
        validate_options(curator_options(["--output", "gs://bucket/out",
                                          "--dedup_vector_transport", "staged"]))


def test_the_kmeans_sample_is_gathered_in_id_order_whatever_the_parts():
    """The trainer's matrix: the sample files' rows sorted by id (stable), so every runner
    and chunking trains on the same matrix, gathered without a second full copy."""
    from beam_curator.transforms.semdedup.centroids import _in_id_order

    rng = np.random.default_rng(2)
    ids = [f"id{j:03d}" for j in rng.permutation(60)] + ["id007"]   # a repeat stays stable
    vectors = rng.normal(size=(61, 5)).astype(np.float32)
    cuts = [0, 7, 8, 30, 61]
    parts = [(ids[a:b], vectors[a:b]) for a, b in zip(cuts, cuts[1:])]
    got = _in_id_order(ids, parts)
    assert np.array_equal(got, vectors[np.argsort(np.array(ids), kind="stable")])
    assert parts == [None] * 4   # each part let go once copied
