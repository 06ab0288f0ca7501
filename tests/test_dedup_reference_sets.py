"""Dedup against other sets (issue 27): --reference (decontamination, incremental curation),
--reference_exact, --target; checked against brute force on the same centroids."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_curator.cli import run_pipeline
from tests.dedup_reference import union_with_reference

EPS = 0.01
DIM = 32


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _near(rng, v, cos):
    """A unit vector at cosine `cos` from unit vector v."""
    noise = rng.normal(size=v.shape)
    noise -= (noise @ v) * v
    noise /= np.linalg.norm(noise)
    return cos * v + np.sqrt(1 - cos * cos) * noise


@pytest.fixture(scope="module")
def sets():
    """Reference A (400 rows), candidates B (500 rows): 40 B rows near-copy A rows (cosine
    0.9999 ... 0.95), 20 near-copy other B rows, in 4 tight groups so clusters matter."""
    rng = np.random.default_rng(11)
    centres = _unit(rng.normal(size=(4, DIM)))

    def around(n):
        g = rng.integers(0, 4, n)
        return _unit(centres[g] + 0.6 * rng.normal(size=(n, DIM)) / np.sqrt(DIM))

    a = around(400)
    b = around(500)
    for j in range(40):
        b[j] = _near(rng, a[j * 7].astype(np.float64), [0.9999, 0.995, 0.98, 0.95][j % 4])
    for j in range(20):
        b[100 + j] = _near(rng, b[200 + j].astype(np.float64), 0.998)
    a_ids = [f"a/{i:04d}" for i in range(len(a))]
    b_ids = [f"b/{i:04d}" for i in range(len(b))]
    centroids = _unit(centres + 0.05 * rng.normal(size=centres.shape))
    return a_ids, _unit(a), b_ids, _unit(b), centroids


def _write(directory, ids, vectors, files=2, row_group=64):
    os.makedirs(directory, exist_ok=True)
    for f, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        pq.write_table(pa.table({"id": [ids[i] for i in part],
                                 "embedding": pa.array([vectors[i].tolist() for i in part],
                                                       type=pa.list_(pa.float32()))}),
                       os.path.join(directory, f"part-{f}.parquet"), row_group_size=row_group)
    return str(directory)


def _read(path):
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def _dedup(tmp_path, sets, name, *extra):
    a_ids, a, b_ids, b, centroids = sets
    root = tmp_path / name
    np.save(root.parent / f"{name}-centroids.npy", centroids)
    out = root / "out"
    run_pipeline("dedup", ["--embeddings", _write(root / "b", b_ids, b),
                           "--reference", _write(root / "a", a_ids, a),
                           "--centroids", str(root.parent / f"{name}-centroids.npy"),
                           "--eps", str(EPS), "--output", str(out), "--runner", "FnApiRunner",
                           *extra])
    return out


def _answers(out):
    """candidate id -> (status, duplicate_of, cosine) for the removed ones, from the files."""
    removed = {r["id"] for r in _read(out / "dedup" / "duplicates")}
    refs = {r["id"]: (r["reference_id"], r["cosine_sim_score"])
            for r in _read(out / "dedup" / "reference_duplicates")}
    pairs = {r["id"]: (r["max_id"], r["cosine_sim_score"])
             for r in _read(out / "dedup" / "pairwise_results")}
    got = {}
    for id_ in removed:
        if id_ in refs:
            got[id_] = ("reference_duplicate",) + refs[id_]
        else:
            got[id_] = ("semantic_duplicate",) + pairs[id_]
    return got


def _same(got, want):
    assert set(got) == set(want)
    for id_, (status, other, cos) in want.items():
        assert got[id_][:2] == (status, other), id_
        assert got[id_][2] == pytest.approx(cos, abs=1e-6)


@pytest.mark.parametrize("extra", [
    [],                                                        # whole clusters, in bins
    ["--pairwise_block_size", "60"],                           # clusters cut into blocks
    ["--pairwise_block_size", "60", "--dedup_vector_transport", "shuffle"],
])
def test_reference_duplicates_equal_a_dedup_of_the_union_with_the_reference_first(
        tmp_path, sets, extra):
    """Incremental = union: B deduped against A gives what a dedup of A + B (A ranked first,
    same centroids) removes from B; A is never removed nor answered for."""
    a_ids, a, b_ids, b, centroids = sets
    out = _dedup(tmp_path, sets, "union", *extra)
    want = union_with_reference(b_ids, b, a_ids, a, centroids, EPS)
    got = _answers(out)
    _same(got, want)
    statuses = [s for s, _, _ in want.values()]
    assert statuses.count("reference_duplicate") >= 15 and "semantic_duplicate" in statuses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_embeddings"] == len(b_ids)                # reference rows not counted
    assert summary["n_reference_duplicates"] == statuses.count("reference_duplicate")
    reference = summary["dedup"]["reference"]
    assert reference["rows"] == len(a_ids) and reference["exact"] is False
    top = reference["top_matches"][0]
    assert top["cosine_sim"] == max(c for s, _, c in want.values() if s == "reference_duplicate")
    histogram = reference["best_cosine_histogram"]
    assert sum(histogram["counts"]) + histogram["below_low"] == \
        reference["candidates_that_met_a_reference_row"]
    kmeans = {r["id"] for r in _read(out / "dedup" / "kmeans")}
    assert kmeans == set(b_ids)                                 # only candidates written


def test_reference_exact_is_brute_force_over_every_reference_row(tmp_path, sets):
    a_ids, a, b_ids, b, centroids = sets
    out = _dedup(tmp_path, sets, "exact", "--reference_exact", "true",
                 "--reference_eps", "0.03", "--pairwise_block_size", "60")
    # brute force: every candidate against all of A at eps 0.03, then B's own dedup
    want = {}
    semantic = union_with_reference(b_ids, b, [], np.zeros((0, DIM), np.float32), centroids,
                                    EPS)
    scores = b.astype(np.float64) @ a.astype(np.float64).T
    for r, id_ in enumerate(b_ids):
        row = scores[r].astype(np.float32)
        best = row.max()
        if best >= np.float32(1 - 0.03):
            want[id_] = ("reference_duplicate", min(a_ids[q] for q in np.flatnonzero(row == best)),
                         float(best))
        elif id_ in semantic:
            want[id_] = semantic[id_]
    _same(_answers(out), want)
    assert sum(1 for s, _, _ in want.values() if s == "reference_duplicate") >= 25


def test_target_keeps_only_the_clusters_a_target_touches(tmp_path, sets):
    a_ids, a, b_ids, b, centroids = sets
    c = centroids.astype(np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    near_0 = a[np.argmax(a.astype(np.float64) @ c.T, axis=1) == 0][:5]   # cluster 0 only
    root = tmp_path / "target"
    np.save(tmp_path / "target-centroids.npy", centroids)
    out = root / "out"
    run_pipeline("dedup", ["--embeddings", _write(root / "b", b_ids, b),
                           "--target", _write(root / "t", [f"t{i}" for i in range(5)], near_0,
                                              files=1),
                           "--centroids", str(tmp_path / "target-centroids.npy"),
                           "--output", str(out), "--runner", "FnApiRunner"])
    labels = np.argmax(b.astype(np.float64) @ c.T, axis=1)
    filtered = {r["id"]: r["centroid"] for r in _read(out / "dedup" / "target_filtered")}
    assert filtered == {i: int(c) for i, c in zip(b_ids, labels) if c != 0}
    removed = {r["id"] for r in _read(out / "dedup" / "duplicates")}
    assert set(filtered) <= removed
    kept_side = set(b_ids) - set(filtered)
    assert {r["id"] for r in _read(out / "dedup" / "kmeans")} == kept_side
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dedup"]["target"]["clusters_touched"] == 1
    assert summary["dedup"]["target"]["candidates_kept"] == len(kept_side)
    assert summary["n_filtered_target"] == len(filtered)


def test_bad_reference_options_fail_before_the_output_is_claimed(tmp_path, sets):
    from beam_curator.errors import OptionError

    a_ids, a, b_ids, b, _ = sets
    emb = _write(tmp_path / "b", b_ids, b)
    out = tmp_path / "out"
    with pytest.raises(OptionError, match="matches no embeddings file"):
        run_pipeline("dedup", ["--embeddings", emb, "--reference", str(tmp_path / "none"),
                               "--output", str(out), "--runner", "FnApiRunner"])
    with pytest.raises(OptionError, match="needs|give one"):
        run_pipeline("dedup", ["--embeddings", emb, "--reference_exact", "true",
                               "--output", str(out), "--runner", "FnApiRunner"])
    small = _write(tmp_path / "a16", a_ids, np.ones((len(a_ids), 16), np.float32) / 4)
    with pytest.raises(OptionError, match="16-d"):
        run_pipeline("dedup", ["--embeddings", emb, "--reference", small,
                               "--output", str(out), "--runner", "FnApiRunner"])
    assert not out.exists()


def test_border_margin_only_adds_reference_matches_and_each_is_true(tmp_path, sets):
    """With --border_margin a candidate also meets the reference rows of its second cluster:
    it finds every match the plain run finds, and each match's cosine is the true one."""
    a_ids, a, b_ids, b, _ = sets
    plain = _answers(_dedup(tmp_path, sets, "plain"))
    border = _answers(_dedup(tmp_path, sets, "border", "--border_margin", "0.5"))
    ref_plain = {i for i, v in plain.items() if v[0] == "reference_duplicate"}
    ref_border = {i for i, v in border.items() if v[0] == "reference_duplicate"}
    assert ref_plain <= ref_border
    vectors = dict(zip(b_ids, b.astype(np.float64)))
    refs = dict(zip(a_ids, a.astype(np.float64)))
    for id_ in ref_border:
        _, ref_id, cos = border[id_]
        assert cos == pytest.approx(float(vectors[id_] @ refs[ref_id]), abs=1e-6)
        assert cos >= 1 - EPS - 1e-7


@pytest.mark.slow
def test_run_against_its_own_earlier_output_removes_every_sample(small_dataset,
                                                                 tiny_model_dir, tmp_path):
    """New shards against an already curated set, in `run`: the same shards again, with the
    first run's embeddings as --reference and its centroids, are all reference duplicates
    (each meets itself at cosine 1) but the exact copies, which the exact pre-pass takes
    first; the accounting still holds, nothing is kept."""
    from tests.conftest import parquet_rows, run_args

    shards = os.path.join(os.path.dirname(small_dataset.shards[0]), "*.tar")
    first = tmp_path / "first"
    run_pipeline("run", run_args(input_glob=shards, output=str(first), model_dir=tiny_model_dir,
                                 n_clusters=3, aesthetic_threshold="none",
                                 nsfw_threshold="none", write_report="false"))
    second = tmp_path / "second"
    summary = run_pipeline("run", run_args(
        input_glob=shards, output=str(second), model_dir=tiny_model_dir,
        aesthetic_threshold="none", nsfw_threshold="none", write_report="false",
        reference=str(first / "embeddings"), centroids=str(first / "dedup" / "centroids.npy")))
    before = {r["id"]: r["status"] for r in parquet_rows(first / "samples")}
    after = {r["id"]: r for r in parquet_rows(second / "samples")}
    assert set(after) == set(before)
    semantic = [i for i, s in before.items() if s not in ("error", "exact_duplicate")]
    assert len(semantic) > 40
    assert all(after[i]["status"] == "reference_duplicate" for i in semantic)
    assert all(after[i]["duplicate_of"] == i for i in semantic)   # each meets itself
    assert all(after[i]["status"] == "exact_duplicate"
               for i, s in before.items() if s == "exact_duplicate")
    assert summary["counts"]["reference_duplicate"] == len(semantic)
    assert summary["accounting"]["ok"] and summary["counts"]["kept"] == 0


def test_best_reference_presorted_gives_the_same_answer_and_ties_go_to_the_smallest_id():
    from beam_curator.dedup.reference import best_reference, sorted_by_id

    rng = np.random.default_rng(5)
    refs = _unit(rng.normal(size=(50, 8)))
    refs[7] = refs[3]                                     # two rows tie for every candidate
    ids = [f"r{(i * 13) % 50:02d}" for i in range(50)]   # not in id order
    cands = np.concatenate([refs[[3, 10]], _unit(rng.normal(size=(5, 8)))])
    sim, got = best_reference(cands, refs, ids)
    sorted_refs, sorted_ids = sorted_by_id(refs, ids)
    sim2, got2 = best_reference(cands, sorted_refs, sorted_ids, presorted=True)
    assert np.array_equal(sim, sim2) and list(got) == list(got2)
    assert got[0] == min(ids[3], ids[7]) and sim[0] == pytest.approx(1.0, abs=1e-6)
    brute = (cands.astype(np.float64) @ refs.astype(np.float64).T).astype(np.float32).max(axis=1)
    assert np.array_equal(sim, brute)
