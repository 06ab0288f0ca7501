"""A cluster cut into hash blocks gives, bit for bit, the one-pass answer (dedup/blocks.py)."""
from __future__ import annotations

import numpy as np
import pytest

from beam_curator.dedup import blocks, ranking
from beam_curator.dedup.pairwise import max_sim_to_earlier
from beam_curator.dedup.ranking import rank_cluster


def _cluster(n=700, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v[100:150] = v[0:50] + rng.normal(scale=0.01, size=(50, dim)).astype(np.float32)
    v[200:210] = v[0:10]                                   # exact ties in similarity
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"id{rng.integers(1e9)}-{i}" for i in range(n)]
    cos = rng.random(n).astype(np.float32)
    cos[300:320] = cos[0]                                  # ties in the rank key
    return ids, v, cos


def _one_pass(ids, v, cos, which, cluster):
    order = rank_cluster(ids, cos, which, 0, cluster)
    sim, arg = max_sim_to_earlier(v[order], 64)
    return {ids[order[r]]: (sim[r], ids[order[arg[r]]] if arg[r] >= 0 else None)
            for r in range(len(ids))}


def _blocked(ids, v, cos, which, cluster, nb, backend=None):
    primary = ranking.rank_primary(ids, cos, which, 0, cluster)
    block = blocks.block_of(ids, nb, cluster)
    ranked = {}
    for b in range(nb):
        rows = np.flatnonzero(block == b)
        ranked[b] = rows[ranking.rank_order([ids[r] for r in rows], primary[rows])]
    answer = {}
    for b, rows in ranked.items():
        b_ids = [ids[r] for r in rows]
        best = blocks.diagonal_partial(v[rows], b_ids, primary[rows], backend=backend)
        for a, other in ranked.items():
            if a != b:   # what the block pair {a, b} computes for the members of b
                best = blocks.merge_partials(best, blocks.cross_partial(
                    v[rows], primary[rows], b_ids, v[other], primary[other],
                    [ids[r] for r in other], backend=backend))
        for k, id_ in enumerate(b_ids):
            found = best[0][k] > -np.inf
            answer[id_] = (best[0][k] if found else np.float32(0.0),
                           best[2][k] if found else None)
    return answer


@pytest.mark.parametrize("which", ["hard", "easy", "random"])
@pytest.mark.parametrize("nb", [1, 2, 5])
@pytest.mark.parametrize("backend", ["numpy", "torch"])   # torch: the GPU code, on the CPU
def test_hash_blocks_give_the_one_pass_answer_bit_for_bit(which, nb, backend, monkeypatch):
    monkeypatch.setattr(blocks, "TILE_ROWS", 37)   # tiles inside a block pair, too
    monkeypatch.setattr(blocks, "STRIP_ROWS", 11)  # and target strips inside a tile
    ids, v, cos = _cluster()
    want = _one_pass(ids, v, cos, which, cluster=7)
    got = _blocked(ids, v, cos, which, cluster=7, nb=nb, backend=backend)
    assert got.keys() == want.keys()
    differ = [i for i in ids if got[i][0] != want[i][0] or got[i][1] != want[i][1]]
    assert differ == []


def test_merge_is_order_free():
    ids, v, cos = _cluster()
    ids, v, cos = ids[:120], v[:120], cos[:120]
    primary = ranking.rank_primary(ids, cos, "hard", 0, 1)
    rows = np.arange(40)
    rows = rows[ranking.rank_order([ids[r] for r in rows], primary[rows])]
    t_ids = [ids[r] for r in rows]
    parts = [blocks.diagonal_partial(v[rows], t_ids, primary[rows])]
    for other in (np.arange(40, 80), np.arange(80, 120)):
        other = other[ranking.rank_order([ids[r] for r in other], primary[other])]
        parts.append(blocks.cross_partial(v[rows], primary[rows], t_ids, v[other],
                                          primary[other], [ids[r] for r in other]))
    forward = blocks.merge_partials(blocks.merge_partials(parts[0], parts[1]), parts[2])
    backward = blocks.merge_partials(parts[2], blocks.merge_partials(parts[1], parts[0]))
    for a, b in zip(forward, backward):
        assert list(a) == list(b)


def test_blocks_spread_a_cluster_and_stay_near_the_bound():
    ids = [f"s/{i:07d}" for i in range(50_000)]
    nb = blocks.n_blocks(len(ids), 16_384)
    sizes = np.bincount(blocks.block_of(ids, nb, cluster=3), minlength=nb)
    assert nb == 4 and sizes.min() > 0
    assert sizes.max() <= 1.05 * len(ids) / nb     # hashing: within a few % of even
    # every member takes part in nb block pairs, every pair once
    assert sorted({k for b in range(nb) for k in blocks.pair_keys(b, nb)}) == [
        (i, j) for i in range(nb) for j in range(i, nb)]


def test_plan_defaults_follow_the_data():
    assert blocks.auto_n_clusters(25) == 1
    assert blocks.auto_n_clusters(1_000_000) == 100
    assert blocks.auto_n_clusters(1_000_000_000) == 100_000
    assert blocks.auto_sample_size(100) == 6_400   # sized by k, not by N


def test_the_plan_says_what_was_chosen():
    from beam_curator.transforms.semdedup.config import DedupConfig, make_plan

    auto = make_plan(2_500_000, DedupConfig(output="o"))
    assert (auto.n_clusters, auto.sample_size) == (250, 16_000)
    assert auto.n_clusters_from.startswith("auto")
    given = make_plan(2_500_000, DedupConfig(output="o", n_clusters=100, kmeans_sample_size=5000))
    assert (given.n_clusters, given.sample_size, given.n_clusters_from) == (
        100, 5000, "--n_clusters")
    lowered = make_plan(25, DedupConfig(output="o", n_clusters=100))
    assert lowered.n_clusters == 25 and "lowered" in lowered.n_clusters_from
