"""The pure semantic-dedup algorithms against a brute-force reference, on embeddings built so that
the answer is known: tight groups around random directions, planted near-duplicates at known
cosine similarities, exact copies, a chain."""
from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from beam_curator.dedup import (
    assign_to_centroids,
    assign_top2,
    assign_with_runner_up,
    border_assignments,
    duplicate_threshold,
    is_duplicate,
    load_centroids,
    max_sim_to_earlier,
    pairwise,
    rank_cluster,
    sample_fraction,
    sample_mask,
    save_centroids,
    semdedup_cluster,
    train_kmeans,
)

D = 48


# ---- building embeddings with a known answer -----------------------------------------------

def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def near(rng, u, cos):
    """A unit vector at exactly `cos` (in float64) from unit vector u."""
    g = rng.standard_normal(u.shape[0])
    w = unit(g - (g @ u) * u)
    return cos * u + np.sqrt(1.0 - cos * cos) * w


def planted_cluster(seed, n_members=30, prefix="c"):
    """One cluster: members around a centre, plus planted near-duplicates.

    Returns ids, float32 vectors, the centre (float64 unit) and the planted groups whose
    members are pairwise >= 0.98 cosine (each group: one kept, the rest duplicates at eps=0.02).
    """
    rng = np.random.default_rng(seed)
    center = unit(rng.standard_normal(D))
    members = unit(center + 0.8 * rng.standard_normal((n_members, D)) / np.sqrt(D))
    vecs = [m for m in members]
    ids = [f"{prefix}/{i:03d}" for i in range(n_members)]
    groups = []

    def add(v, name):
        vecs.append(v)
        ids.append(f"{prefix}/{name}")
        return ids[-1]

    groups.append([ids[0], add(near(rng, members[0], 0.999), "n999")])
    groups.append([ids[1], add(near(rng, members[1], 0.99), "n990")])
    add(near(rng, members[2], 0.9), "n900")                        # not a dup at eps <= 0.1
    groups.append([ids[3], add(members[3].copy(), "copy-a"), add(members[3].copy(), "copy-b")])
    b = near(rng, members[4], 0.997)                                 # chain a ~ b ~ c
    groups.append([ids[4], add(b, "chain-b"), add(near(rng, b, 0.997), "chain-c")])
    # Shuffle the input order: nothing may depend on it.
    perm = rng.permutation(len(ids))
    ids = [ids[p] for p in perm]
    vectors = np.asarray([vecs[p] for p in perm], dtype=np.float32)
    return ids, vectors, center, groups


def cos_dist_to(vectors, center):
    return (1.0 - np.sum(vectors.astype(np.float64) * center, axis=1)).astype(np.float32)


# ---- brute-force reference ----------------------------------------------------------------

def reference_order(ids, cos_dist, which):
    if which == "hard":
        return sorted(range(len(ids)), key=lambda r: (-float(cos_dist[r]), ids[r]))
    return sorted(range(len(ids)), key=lambda r: (float(cos_dist[r]), ids[r]))


def reference_pairwise(vectors_ranked):
    """Full n x n cosine matrix in float64, plain loops: (max_sim, argmax) per ranked row."""
    v = vectors_ranked.astype(np.float64)
    sim = (v @ v.T).tolist()
    n = len(sim)
    max_sim, argmax = [0.0] * n, [-1] * n
    for r in range(1, n):
        best, arg = -np.inf, -1
        for q in range(r):
            if sim[r][q] > best:        # strict: ties keep the earliest-ranked
                best, arg = sim[r][q], q
        max_sim[r], argmax[r] = best, arg
    return np.array(max_sim), np.array(argmax)


def f32_bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ---- pairwise + ranking against the reference --------------------------------------------

@pytest.mark.parametrize("which", ["hard", "easy", "random"])
@pytest.mark.parametrize("eps", [0.02, 0.005, 0.15])
def test_semdedup_cluster_matches_reference(which, eps):
    ids, vectors, center, groups = planted_cluster(seed=7)
    cd = cos_dist_to(vectors, center)
    n = len(ids)
    results = {}
    for block_size in (1, 3, 7, n):
        out = semdedup_cluster(ids, vectors, cd, which, eps, seed=3, cluster=5,
                               block_size=block_size)
        results[block_size] = out
        ranked_ids = [row[0] for row in out]
        if which == "random":
            order = [ids.index(i) for i in ranked_ids]
        else:
            order = reference_order(ids, cd, which)
            assert ranked_ids == [ids[r] for r in order]
        ref_max, ref_arg = reference_pairwise(vectors[order])
        for r, (id_, max_id, score, dup) in enumerate(out):
            if r == 0:
                assert (max_id, score, dup) == (id_, 0.0, False)
                continue
            assert max_id == ranked_ids[ref_arg[r]], (block_size, r)
            assert score == pytest.approx(ref_max[r], abs=2e-6)
            assert dup == bool(ref_max[r] >= 1 - eps)
    # Every block size gives the same ranking, max_id and decision; scores agree to float32
    # rounding (a matmul of another block shape may round a dot product differently).
    for out in results.values():
        assert [r[:2] + r[3:] for r in out] == [r[:2] + r[3:] for r in results[n]]
        np.testing.assert_allclose([r[2] for r in out], [r[2] for r in results[n]], atol=1e-6)


@pytest.mark.parametrize("which", ["hard", "easy", "random"])
def test_known_answer_planted_groups(which):
    """At eps = 0.02 exactly the planted groups collapse, each to its earliest-ranked member."""
    ids, vectors, center, groups = planted_cluster(seed=11)
    out = semdedup_cluster(ids, vectors, cos_dist_to(vectors, center), which, 0.02,
                           seed=1, cluster=0, block_size=4)
    position = {row[0]: r for r, row in enumerate(out)}
    expected = set()
    for g in groups:
        keep = min(g, key=position.__getitem__)
        expected |= set(g) - {keep}
    assert {row[0] for row in out if row[3]} == expected
    # Duplicates point at an earlier member of their own group.
    group_of = {i: k for k, g in enumerate(groups) for i in g}
    for id_, max_id, score, dup in out:
        if dup:
            assert group_of[max_id] == group_of[id_] and position[max_id] < position[id_]
            assert score >= 0.98
    # The 0.9 plant is not a duplicate; nothing outside the plants comes near the threshold.
    assert not next(r for r in out if r[0].endswith("n900"))[3]
    non_planted = [r[2] for r in out if r[0] not in group_of and not r[0].endswith("n900")]
    assert max(non_planted) < 0.95


def test_exact_copies_tie_to_earliest_and_score_one():
    ids, vectors, center, groups = planted_cluster(seed=5)
    cd = cos_dist_to(vectors, center)
    copies = groups[2]                                   # base + two exact copies
    rows = [ids.index(i) for i in copies]
    assert len({cd[r] for r in rows}) == 1               # equal distances: ranked by id
    for which in ("hard", "easy"):
        out = semdedup_cluster(ids, vectors, cd, which, 0.01, seed=0, cluster=0, block_size=3)
        ranked = [r[0] for r in out if r[0] in copies]
        assert ranked == sorted(copies)
        by_id = {r[0]: r for r in out}
        first = ranked[0]
        assert by_id[ranked[1]][1] == first and by_id[ranked[2]][1] == first   # earliest
        assert by_id[ranked[2]][3] and by_id[ranked[1]][3]
        assert by_id[ranked[2]][2] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("strip_rows", [1, 4, 13])
@pytest.mark.parametrize("block_size", [5, 45])
def test_strips_inside_a_block_change_no_bit(strip_rows, block_size, monkeypatch):
    """Block j is scored a strip of rows at a time (bounded scratch per key); the strip size
    must change neither a score's bits nor an argmax, on and off the diagonal."""
    ids, vectors, center, _ = planted_cluster(seed=9)
    ranked = vectors[rank_cluster(ids, cos_dist_to(vectors, center), "hard", 0, 0)]
    want_max, want_arg = max_sim_to_earlier(ranked, block_size)
    monkeypatch.setattr(pairwise, "STRIP_ROWS", strip_rows)
    got_max, got_arg = max_sim_to_earlier(ranked, block_size)
    np.testing.assert_array_equal(f32_bits(got_max), f32_bits(want_max))
    np.testing.assert_array_equal(got_arg, want_arg)
    ref_max, ref_arg = reference_pairwise(ranked)
    np.testing.assert_array_equal(got_arg, ref_arg)
    np.testing.assert_allclose(got_max, ref_max, atol=2e-6)


def test_max_sim_to_earlier_ties_and_edges():
    v = unit(np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]]))
    v = v.astype(np.float32)
    for bs in (1, 2, 5):
        m, a = max_sim_to_earlier(v, bs)
        np.testing.assert_array_equal(a, [-1, 0, 0, 0, 0])   # ties -> earliest-ranked
        np.testing.assert_array_equal(m, [0.0, 0.0, 1.0, 1.0, 0.0])
    m, a = max_sim_to_earlier(np.zeros((0, 4), np.float32), 8)
    assert m.shape == a.shape == (0,)
    m, a = max_sim_to_earlier(v[:1], 8)
    assert (m.tolist(), a.tolist()) == ([0.0], [-1])
    # The true max, negative when every earlier member points away.
    m, _ = max_sim_to_earlier(np.array([[1, 0], [-1, 0]], np.float32), 1)
    assert m[1] == -1.0


# ---- the >= 1 - eps boundary -------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.01, 0.05, 0.1, 0.001])
def test_duplicate_boundary_is_inclusive_in_float32(eps):
    thr = np.float32(1.0 - eps)
    below = np.nextafter(thr, np.float32(0))
    # d = 2 with u = e1: the float32 dot product is exactly the first coordinate of v.
    u = [1.0, 0.0]
    at = [thr, np.sqrt(1 - np.float64(thr) ** 2)]
    under = [below, np.sqrt(1 - np.float64(below) ** 2)]
    m, _ = max_sim_to_earlier(np.array([u, at], np.float32), 1)
    assert m[1] == thr
    assert is_duplicate(m, eps).tolist() == [False, True]
    m, _ = max_sim_to_earlier(np.array([u, under], np.float32), 1)
    assert m[1] == below and is_duplicate(m, eps).tolist() == [False, False]
    assert duplicate_threshold(eps) == thr


def test_boundary_decided_in_float32_not_float64():
    # float32(0.95) is below 0.95: a float64 comparison would call it "not a duplicate".
    s = np.float32(0.95)
    assert float(s) < 0.95
    assert is_duplicate(np.array([s]), 0.05).tolist() == [True]
    for bad in (-0.1, 1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            is_duplicate(np.array([0.5], np.float32), bad)


# ---- ranking ------------------------------------------------------------------------------

def test_ranking_ties_by_id_and_input_order_independence():
    ids = ["b", "a", "d", "c", "e"]
    cd = np.float32([0.2, 0.2, 0.1, 0.3, 0.2])
    hard = [ids[r] for r in rank_cluster(ids, cd, "hard", 0, 0)]
    easy = [ids[r] for r in rank_cluster(ids, cd, "easy", 0, 0)]
    assert hard == ["c", "a", "b", "e", "d"]
    assert easy == ["d", "a", "b", "e", "c"]
    rng = random.Random(1)
    for which in ("hard", "easy", "random"):
        want = [ids[r] for r in rank_cluster(ids, cd, which, 4, 9)]
        for _ in range(5):
            perm = list(range(len(ids)))
            rng.shuffle(perm)
            sids, scd = [ids[p] for p in perm], cd[perm]
            order = rank_cluster(sids, scd, which, 4, 9)
            assert order.dtype == np.int64
            assert [sids[r] for r in order] == want


def test_random_ranking_depends_on_seed_and_cluster():
    ids = [f"s/{i:04d}" for i in range(200)]
    cd = np.zeros(200, np.float32)
    base = rank_cluster(ids, cd, "random", 0, 0)
    assert sorted(base.tolist()) == list(range(200))
    assert not np.array_equal(base, rank_cluster(ids, cd, "random", 1, 0))
    assert not np.array_equal(base, rank_cluster(ids, cd, "random", 0, 1))
    np.testing.assert_array_equal(base, rank_cluster(ids, cd, "random", 0, 0))
    # A member's key depends only on its id: dropping members keeps the others' order.
    sub = ids[::2]
    ranked_full = [ids[r] for r in base if ids[r] in set(sub)]
    assert [sub[r] for r in rank_cluster(sub, cd[::2], "random", 0, 0)] == ranked_full


def test_ranking_errors():
    with pytest.raises(ValueError, match="which_to_keep must be one of hard, easy, random"):
        rank_cluster(["a"], np.zeros(1), "hardest", 0, 0)
    with pytest.raises(ValueError, match="unique"):
        rank_cluster(["a", "a"], np.zeros(2), "hard", 0, 0)
    with pytest.raises(ValueError, match="cos_dist"):
        rank_cluster(["a", "b"], np.zeros(3), "hard", 0, 0)
    with pytest.raises(ValueError, match="NaN"):
        rank_cluster(["a", "b"], np.array([0.1, np.nan]), "easy", 0, 0)


# ---- k-means, centroid files, assignment ---------------------------------------------------

def blobs(n_per=80, k=5, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = unit(rng.standard_normal((k, d)))
    x = np.concatenate([unit(c + 0.15 * rng.standard_normal((n_per, d))) for c in centers])
    truth = np.repeat(np.arange(k), n_per)
    return x.astype(np.float32), truth, centers


def test_kmeans_deterministic_and_recovers_groups():
    x, truth, _ = blobs()
    c1 = train_kmeans(x, 5, n_iter=10, seed=3)
    c2 = train_kmeans(x, 5, n_iter=10, seed=3)
    assert c1.dtype == np.float32 and c1.shape == (5, 16) and c1.flags.c_contiguous
    np.testing.assert_array_equal(f32_bits(c1), f32_bits(c2))
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-5)   # spherical
    labels, _, _ = assign_to_centroids(x, c1)
    for g in range(5):                                  # every true group -> one cluster
        assert len(set(labels[truth == g].tolist())) == 1
    assert len(set(labels.tolist())) == 5
    euclid = train_kmeans(x, 5, n_iter=10, seed=3, spherical=False)
    assert not np.allclose(np.linalg.norm(euclid, axis=1), 1.0, atol=1e-5)
    # faiss-cpu: use_gpu falls back to the CPU with a log line, same answer.
    np.testing.assert_array_equal(train_kmeans(x, 5, n_iter=10, seed=3, use_gpu=True), c1)


def test_kmeans_errors():
    x = np.zeros((37, 8), np.float32) + 0.1
    with pytest.raises(ValueError, match="--n-clusters 100 needs at least 100 embeddings, "
                                         "got 37: lower --n-clusters"):
        train_kmeans(x, 100)
    with pytest.raises(ValueError, match="2-d"):
        train_kmeans(np.zeros(8, np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        train_kmeans(np.full((4, 2), np.nan, np.float32), 1)


def test_centroids_save_load_roundtrip_and_assignment(tmp_path):
    x, _, _ = blobs(seed=1)
    trained = train_kmeans(x, 5, n_iter=10, seed=0)
    path = str(tmp_path / "out" / "dedup" / "centroids.npy")     # parents created
    save_centroids(path, trained)
    loaded = load_centroids(path, dim=16)
    assert loaded.dtype == np.float32 and loaded.shape == (5, 16)
    np.testing.assert_array_equal(f32_bits(loaded), f32_bits(trained))
    assert np.load(path, allow_pickle=False).dtype == np.float32   # a plain .npy
    for a, b in zip(assign_to_centroids(x, trained), assign_to_centroids(x, loaded)):
        np.testing.assert_array_equal(a, b)


def test_centroid_file_errors(tmp_path):
    p = str(tmp_path / "c.npy")
    save_centroids(p, np.ones((3, 512), np.float32))
    with pytest.raises(ValueError, match="centroids are 512-d but embeddings are 768-d"):
        load_centroids(p, dim=768)
    with pytest.raises(ValueError, match="centroids are 512-d but embeddings are 768-d"):
        assign_to_centroids(np.ones((2, 768), np.float32), load_centroids(p))
    np.save(p, np.ones((3, 4), np.int64))
    with pytest.raises(ValueError, match="dtype int64"):
        load_centroids(p)
    np.save(p, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_centroids(p)
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric .npy"):
        load_centroids(p)
    np.save(p, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="all-zero"):
        load_centroids(p)
    with pytest.raises(FileNotFoundError, match="centroids file not found"):
        load_centroids(str(tmp_path / "missing.npy"))
    # float64 centroids (e.g. scikit-learn's) are accepted and converted.
    np.save(p, np.ones((2, 4), np.float64))
    assert load_centroids(p).dtype == np.float32


def brute_force_assign(x, c):
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    cn = c64 / np.linalg.norm(c64, axis=1, keepdims=True)
    sims = x64 @ cn.T
    order = np.lexsort((np.broadcast_to(np.arange(c.shape[0]), sims.shape), -sims), axis=1)
    return order, sims


def test_assign_against_brute_force_and_chunking():
    rng = np.random.default_rng(2)
    x = unit(rng.standard_normal((301, 24))).astype(np.float32)
    c = (unit(rng.standard_normal((13, 24))) * rng.uniform(0.5, 2.0, (13, 1))).astype(np.float32)
    labels, cos_dist, l2 = assign_to_centroids(x, c)
    assert labels.dtype == np.int32 and cos_dist.dtype == np.float32 and l2.dtype == np.float32
    order, sims = brute_force_assign(x, c)
    np.testing.assert_array_equal(labels, order[:, 0])
    rows = np.arange(len(x))
    np.testing.assert_allclose(cos_dist, 1 - sims[rows, order[:, 0]], atol=1e-6)
    # l2 is to the centroid as stored (not normalised), as NeMo writes it.
    np.testing.assert_allclose(l2, np.linalg.norm(x - c[labels], axis=1), atol=1e-5)
    # Chunking never changes a bit: whole, row by row, odd chunks, tiny blocks.
    for chunk in (1, 7, 100):
        parts = [assign_to_centroids(x[s:s + chunk], c) for s in range(0, len(x), chunk)]
        for k, whole in enumerate((labels, cos_dist, l2)):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole)
    for k, whole in enumerate(assign_to_centroids(x, c, block_size=5)):
        np.testing.assert_array_equal(whole, (labels, cos_dist, l2)[k])
    # top-2: column 0 is the assignment, column 1 the runner-up.
    lab2, dist2 = assign_top2(x, c, block_size=17)
    np.testing.assert_array_equal(lab2[:, 0], labels)
    np.testing.assert_array_equal(dist2[:, 0], cos_dist)
    np.testing.assert_array_equal(lab2[:, 1], order[:, 1])
    assert (dist2[:, 1] >= dist2[:, 0]).all()
    # --border_margin's single pass gives the same bits as the two calls.
    together = assign_with_runner_up(x, c, block_size=17)
    for got, want in zip(together, (labels, cos_dist, l2, lab2, dist2)):
        np.testing.assert_array_equal(got, want)


def test_assign_ties_go_to_lowest_centroid_index():
    c = np.float32([[0, 1], [1, 0], [0, 2], [1, 0]])     # 1 == 3 in direction and length
    x = np.float32([[1, 0], [0, 1], unit([1.0, 1.0])])
    labels, cos_dist, _ = assign_to_centroids(x, c)
    assert labels.tolist() == [1, 0, 0]                  # [1,1]/sqrt2 ties all four: lowest
    lab2, dist2 = assign_top2(x, c)
    assert lab2.tolist() == [[1, 3], [0, 2], [0, 1]]
    np.testing.assert_array_equal(dist2[:, 0], cos_dist)


def test_top2_single_centroid_and_border_assignments():
    x = np.float32([[1, 0], [0, 1]])
    lab2, dist2 = assign_top2(x, np.float32([[1, 1]]))
    assert lab2[:, 1].tolist() == [-1, -1] and np.isinf(dist2[:, 1]).all()
    assert border_assignments(lab2, dist2, 10.0) == []
    labels2 = np.array([[0, 2], [1, 0], [2, 1], [3, -1]], np.int32)
    dists2 = np.float32([[0.10, 0.12], [0.10, 0.25], [0.2, 0.26], [0.1, np.inf]])
    gap = float(np.float64(dists2[2, 1]) - np.float64(dists2[2, 0]))
    assert border_assignments(labels2, dists2, 0.05) == [(0, 2)]
    assert border_assignments(labels2, dists2, gap) == [(0, 2), (2, 1)]      # inclusive
    assert border_assignments(labels2, dists2, 0.0) == []
    with pytest.raises(ValueError, match="margin"):
        border_assignments(labels2, dists2, -0.1)


# ---- the training sample ----------------------------------------------------------------

def test_sample_mask_matches_the_documented_hash_at_the_boundary():
    """The mask compares digests as bytes: a fraction equal to an id's own hash value
    leaves it out (strictly below), the next float above takes it in, for any id text."""
    def unit(i, seed=3):
        digest = hashlib.blake2b(f"sample:{seed}:{i}".encode(), digest_size=8).digest()
        return (int.from_bytes(digest, "big") >> 11) / 2**53

    ids = ["a", "shard-00001/000042", "café/ü", ""] + [f"k{i}" for i in range(300)]
    for i in ids[:6]:
        at = unit(i)
        assert not sample_mask([i], at, seed=3)[0]
        assert sample_mask([i], float(np.nextafter(at, 1.0)), seed=3)[0]
    for fraction in (1e-9, 0.25, 0.5, 0.999999):
        assert sample_mask(ids, fraction, 3).tolist() == [unit(i) < fraction for i in ids]


def test_sample_mask_stable_across_chunkings():
    ids = [f"shard-{i // 100:03d}/{i:06d}" for i in range(5000)]
    whole = sample_mask(ids, 0.1, seed=0)
    assert whole.dtype == bool and 400 < whole.sum() < 600
    for chunk in (1, 37, 999):
        parts = np.concatenate([sample_mask(ids[s:s + chunk], 0.1, seed=0)
                                for s in range(0, len(ids), chunk)])
        np.testing.assert_array_equal(parts, whole)
    shuffled = ids[::-1]
    np.testing.assert_array_equal(sample_mask(shuffled, 0.1, 0), whole[::-1])
    # Defined by the documented hash, so any tool can reproduce it.
    expect = [(int.from_bytes(hashlib.blake2b(f"sample:0:{i}".encode(), digest_size=8).digest(),
                              "big") >> 11) / 2**53 < 0.1 for i in ids[:50]]
    assert whole[:50].tolist() == expect
    assert not np.array_equal(sample_mask(ids, 0.1, seed=1), whole)
    assert (whole <= sample_mask(ids, 0.2, seed=0)).all()          # nested in the fraction
    assert not sample_mask(ids, 0.0, 0).any() and sample_mask(ids, 1.0, 0).all()
    with pytest.raises(ValueError, match="fraction"):
        sample_mask(ids, 1.5, 0)
    assert sample_fraction(1000, 100) == 0.1
    assert sample_fraction(10, 100) == 1.0 and sample_fraction(10, None) == 1.0
