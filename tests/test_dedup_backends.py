"""The torch (GPU) path of dedup against the numpy path: same labels, distances, maxima,
argmaxes and duplicates, bit for bit, on data with planted duplicates, ties and near-ties.

Every test runs the torch code on the CPU (device='cpu', backend='torch'), which is the very
code a GPU runs; the tests at the end run it on CUDA too where a GPU is visible.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from beam_curator.dedup import (
    assign_to_centroids,
    assign_with_runner_up,
    is_duplicate,
    max_sim_to_earlier,
    partial_max,
    rank_cluster,
    semdedup_cluster,
    shortlist,
    train_kmeans,
)
from beam_curator.dedup import backend as backend_mod
from beam_curator.dedup.kmeans import kmeans_engine
from beam_curator.dedup.torch_kmeans import initial_rows
from bench.dedup_plain import plain_semdedup
from bench.synthetic import make_planted_embeddings

TORCH_CPU = {"device": "cpu", "backend": "torch"}
GPU = torch.cuda.is_available()


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_same(got, want):
    """Equal arrays, float32 compared by their bits."""
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@pytest.fixture(scope="module")
def planted():
    """4,000 768-d CLIP-like rows (cosine ~0.5 within a centre) with 150 planted pairs at
    cosine 0.985-0.999, around the 1 - eps line of eps = 0.01."""
    ids, vectors, pairs = make_planted_embeddings(4000, 768, 150, seed=5, n_centers=8,
                                                  min_sim=0.985, max_sim=0.999)
    return ids, vectors, pairs


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small torch ops on a shared 2-core box: threads spinning against each other made them
    30x slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def precision():
    """Restore torch's float32 matmul precision after a test changes it."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


# ---- pairwise -----------------------------------------------------------------------------

@pytest.mark.parametrize("block_size, rows", [(1, 60), (5, 300), (64, 2000), (1000, 4000),
                                              (4096, 4000)])
def test_max_sim_to_earlier_matches_numpy(planted, block_size, rows):
    _, vectors, _ = planted
    ranked = vectors[:rows]                      # at most ~2,000 block pairs per case
    want = max_sim_to_earlier(ranked, block_size)
    assert_same(max_sim_to_earlier(ranked, block_size, **TORCH_CPU), want)


def test_partial_max_blocks_and_edges_match_numpy(planted):
    _, v, _ = planted
    for bi, bj, same in [(v[:300], v[300:700], False), (v[:500], v[:500], True),
                         (v[:0], v[:10], False), (v[:1], v[:1], True), (v[5:6], v[:0], False)]:
        assert_same(partial_max(bi, bj, same, **TORCH_CPU), partial_max(bi, bj, same))


def test_exact_copies_and_ties_go_to_the_earliest_row():
    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal((6, 32))).astype(np.float32)
    # Rows 2, 4, 6 copy row 0; row 5 copies row 1: the max ties and must name the earliest.
    v = np.concatenate([base[:2], base[:1], base[2:3], base[:1], base[1:2], base[:1]])
    got = max_sim_to_earlier(v, 3, **TORCH_CPU)
    assert_same(got, max_sim_to_earlier(v, 3))
    assert got[1][[0, 2, 4, 5, 6]].tolist() == [-1, 0, 0, 1, 0]


def test_all_identical_rows_take_the_dense_float64_path(monkeypatch):
    """A cluster of copies shortlists every earlier row: the block is scored in one float64
    product instead, with the same answer."""
    v = np.tile(unit(np.arange(1, 17, dtype=np.float64)).astype(np.float32), (300, 1))
    dense_calls = []
    real_pair_dots = shortlist._pair_dots
    monkeypatch.setattr(shortlist, "_pair_dots", lambda *a: dense_calls.append("sparse")
                        or real_pair_dots(*a))
    got = max_sim_to_earlier(v, 4096, **TORCH_CPU)
    assert dense_calls == []                           # never re-scored pair by pair
    assert_same(got, max_sim_to_earlier(v, 4096))
    assert (got[1][1:] == 0).all()


def test_wide_shortlists_still_give_the_numpy_answer(planted, precision):
    """At precision 'medium' torch may run float32 matmuls in bf16: the shortlist bound widens
    to cover it and the re-score keeps the answer."""
    _, v, _ = planted
    precision("medium")
    assert shortlist.fast_matmul_rel_error(768) > 10 * 2.0 ** -10
    assert_same(max_sim_to_earlier(v[:1500], 512, **TORCH_CPU), max_sim_to_earlier(v[:1500], 512))


def test_near_ties_are_decided_by_the_exact_score():
    """Candidates closer than a float32 matmul can tell apart: the fast scores may order them
    either way; the float64 re-score orders them as the numpy path does."""
    rng = np.random.default_rng(3)
    # Pairwise: rows one float32 ulp apart in one coordinate; their float32 scores tie, and
    # the tie goes to the earliest row.
    rows = []
    for _ in range(40):
        a = unit(rng.standard_normal(64)).astype(np.float32)
        b = a.copy()
        k = rng.integers(64)
        b[k] = np.nextafter(b[k], np.float32(np.inf) if a[k] > 0 else np.float32(-np.inf))
        rows += [a, b, a.copy()]
    v = np.asarray(rows, dtype=np.float32)
    assert_same(max_sim_to_earlier(v, 7, **TORCH_CPU), max_sim_to_earlier(v, 7))
    # Assignment: centroid pairs whose cosines to a row differ by ~1e-8, under a float32
    # matmul's error, far above float64's; the float64 comparison decides.
    base = unit(rng.standard_normal((30, 64)))
    twin = unit(base + 1e-6 * rng.standard_normal((30, 64)))
    centroids = np.concatenate([base, twin]).astype(np.float32)
    x = unit(np.repeat(base, 10, axis=0) + 0.02 * rng.standard_normal((300, 64)))
    x = x.astype(np.float32)
    want = assign_with_runner_up(x, centroids)
    assert (np.sort(want[3] % 30, axis=1) == np.repeat(np.arange(30), 10)[:, None]).all()
    assert_same(assign_with_runner_up(x, centroids, **TORCH_CPU), want)


@pytest.mark.parametrize("which", ["hard", "easy", "random"])
def test_semdedup_cluster_same_rows(planted, which):
    ids, v, _ = planted
    cos = (1.0 - v[:900].astype(np.float64) @ unit(v[:900].sum(axis=0))).astype(np.float32)
    args = (ids[:900], v[:900], cos, which, 0.01, 4, 2)
    assert semdedup_cluster(*args, block_size=256, **TORCH_CPU) == semdedup_cluster(
        *args, block_size=256)


# ---- assignment ---------------------------------------------------------------------------

def test_assignment_matches_numpy_bit_for_bit(planted):
    _, v, _ = planted
    rng = np.random.default_rng(1)
    # Unnormalised centroids (l2 is to the centroid as stored), two identical directions.
    c = (unit(rng.standard_normal((40, 768))) * rng.uniform(0.5, 2.0, (40, 1))).astype(np.float32)
    c[7] = c[3] * 2
    want = assign_with_runner_up(v, c)
    for block_size in (None, 333):
        assert_same(assign_with_runner_up(v, c, block_size, **TORCH_CPU), want)
        assert_same(assign_to_centroids(v, c, block_size, **TORCH_CPU), want[:3])
    assert_same(assign_to_centroids(v[:200], c, 1, **TORCH_CPU), assign_to_centroids(v[:200], c))
    single = assign_with_runner_up(v[:10], c[:1], **TORCH_CPU)
    assert_same(single, assign_with_runner_up(v[:10], c[:1]))
    assert (single[3][:, 1] == -1).all() and np.isinf(single[4][:, 1]).all()


# ---- the whole SemDeDup, plain-script style -----------------------------------------------

def test_plain_semdedup_same_duplicates_on_both_backends(planted):
    ids, v, pairs = planted
    centroids = train_kmeans(v, 8, n_iter=10, seed=0)
    numpy_run = plain_semdedup(v, ids, 8, 10, 0.01, "hard", 0, None, block_size=512,
                               centroids=centroids)
    torch_run = plain_semdedup(v, ids, 8, 10, 0.01, "hard", 0, None, block_size=512,
                               centroids=centroids, **TORCH_CPU)
    assert torch_run.duplicates == numpy_run.duplicates
    for name in ("labels", "cosine_dist", "l2_dist", "max_row", "cosine_sim_score",
                 "is_duplicate"):
        np.testing.assert_array_equal(getattr(torch_run, name), getattr(numpy_run, name))
    # Exactly the planted pairs at or above the line lose a member (those k-means kept
    # together); the data has plenty on both sides of the line.
    a, b = pairs[:, 0], pairs[:, 1]
    cos = np.sum(v[a].astype(np.float64) * v[b], axis=1).astype(np.float32)
    expected = (numpy_run.labels[a] == numpy_run.labels[b]) & is_duplicate(cos, 0.01)
    np.testing.assert_array_equal(numpy_run.is_duplicate[pairs].any(axis=1), expected)
    assert 40 < expected.sum() < len(pairs) - 40
    assert len(numpy_run.duplicates) == expected.sum()
    # Decisions follow the float32 scores exactly, on both sides.
    np.testing.assert_array_equal(torch_run.is_duplicate,
                                  is_duplicate(torch_run.cosine_sim_score, 0.01)
                                  & (torch_run.max_row != np.arange(len(ids))))


# ---- k-means ------------------------------------------------------------------------------

def blobs(n_per=60, k=5, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = unit(rng.standard_normal((k, d)))
    x = np.concatenate([unit(c + 0.15 * rng.standard_normal((n_per, d))) for c in centers])
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_torch_kmeans_deterministic_unit_and_as_good_as_faiss():
    x, truth = blobs()
    c1 = train_kmeans(x, 10, n_iter=20, seed=3, backend="torch")
    c2 = train_kmeans(x, 10, n_iter=20, seed=3, backend="torch")
    assert c1.dtype == np.float32 and c1.shape == (10, 16) and c1.flags.c_contiguous
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-6)
    assert not np.array_equal(train_kmeans(x, 10, n_iter=20, seed=4, backend="torch"), c1)
    # Twice as many centroids as groups: every cluster lies inside one group, all are used,
    # and the mean cosine to the centroid is faiss's (both start from random rows).
    labels, cos_dist, _ = assign_to_centroids(x, c1)
    assert all(len(set(truth[labels == j].tolist())) == 1 for j in range(10))
    assert len(set(labels.tolist())) == 10
    faiss_dist = assign_to_centroids(x, train_kmeans(x, 10, n_iter=20, seed=3))[1]
    assert abs(cos_dist.mean() - faiss_dist.mean()) < 0.01


def test_torch_kmeans_restarts_empty_clusters():
    """Many copies: clusters started on copies of one point end empty and restart at the
    worst-served rows, so every centroid ends up used and distinct."""
    rng = np.random.default_rng(2)
    points = unit(rng.standard_normal((4, 8))).astype(np.float32)
    x = np.concatenate([np.repeat(points[:1], 30, axis=0), points[1:]])
    c = train_kmeans(x, 4, n_iter=5, seed=0, backend="torch")
    assert np.isfinite(c).all()
    assert len({tuple(row) for row in c.round(5).tolist()}) == 4
    assert sorted(set(assign_to_centroids(x, c)[0].tolist())) == [0, 1, 2, 3]


def test_initial_rows_are_the_documented_hash():
    """The initial pick is splitmix64 of (seed, row), not a library's random stream: any
    tool can reproduce it (here in plain Python integers)."""
    mask = (1 << 64) - 1

    def splitmix64(x):
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    for n, k, seed in [(10, 3, 0), (10, 3, 1), (500, 40, 12345)]:
        keys = [splitmix64(row ^ splitmix64(seed)) for row in range(n)]
        assert initial_rows(n, k, seed).tolist() == sorted(range(n), key=keys.__getitem__)[:k]
    assert sorted(initial_rows(1000, 1000, 7).tolist()) == list(range(1000))


def test_kmeans_engine_choices():
    x, _ = blobs()
    assert kmeans_engine() == ("faiss", "cpu")
    assert kmeans_engine(backend="torch") == ("torch", "cpu")
    assert kmeans_engine(device="cpu", backend="faiss") == ("faiss", "cpu")
    with pytest.raises(ValueError, match="spherical only"):
        train_kmeans(x, 5, spherical=False, backend="torch")
    with pytest.raises(ValueError, match="backend must be"):
        train_kmeans(x, 5, backend="cuml")
    with pytest.raises(ValueError, match="device must be one of"):
        train_kmeans(x, 5, device="gpu")


# ---- choosing the device ------------------------------------------------------------------

@pytest.mark.skipif(GPU, reason="checks the behaviour where no GPU is visible")
def test_cuda_without_a_gpu_falls_back_to_the_cpu_with_a_warning(planted, caplog):
    _, v, _ = planted
    backend_mod._log_no_gpu.cache_clear()
    with caplog.at_level(logging.INFO, logger="beam_curator.dedup"):
        got = max_sim_to_earlier(v[:200], 64, device="cuda")
        again = assign_to_centroids(v[:50], v[:4], device="cuda")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1                                     # once per process
    assert "'cuda' was asked for but no CUDA device is visible" in warnings[0].getMessage()
    assert "on the CPU instead" in warnings[0].getMessage()
    assert_same(got, max_sim_to_earlier(v[:200], 64))
    assert_same(again, assign_to_centroids(v[:50], v[:4]))
    assert backend_mod.resolve("cuda") == backend_mod.Backend("numpy", "cpu")
    assert backend_mod.resolve("auto") == backend_mod.Backend("numpy", "cpu")
    assert backend_mod.resolve("cuda", "torch") == backend_mod.Backend("torch", "cpu")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="beam_curator.dedup"):
        assert kmeans_engine(device="cuda") == ("faiss", "cpu")   # the fallback: CPU faiss


def test_device_and_backend_errors():
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda or cuda:N"):
        partial_max(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), True,
                    device="tpu")
    with pytest.raises(ValueError, match="backend must be None, 'numpy' or 'torch'"):
        assign_to_centroids(np.ones((2, 2), np.float32), np.ones((1, 2), np.float32),
                            backend="cupy")
    assert backend_mod.resolve(None) == backend_mod.Backend("numpy", "cpu")
    assert backend_mod.resolve("cpu", "torch") == backend_mod.Backend("torch", "cpu")
    assert backend_mod.check_device("cuda:1") == "cuda:1"


# ---- on a real GPU, where one is visible ---------------------------------------------------

@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_cuda_matches_numpy(planted):
    ids, v, _ = planted
    c = train_kmeans(v, 8, n_iter=10, seed=0)
    assert_same(assign_with_runner_up(v, c, device="cuda"), assign_with_runner_up(v, c))
    for block_size in (64, 4096):
        assert_same(max_sim_to_earlier(v, block_size, device="cuda"),
                    max_sim_to_earlier(v, block_size))
    order = rank_cluster(ids, assign_to_centroids(v, c)[1], "hard", 0, 0)
    assert_same(max_sim_to_earlier(v[order], 1000, device="cuda"),
                max_sim_to_earlier(v[order], 1000))


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_cuda_torch_kmeans_equals_cpu_torch_kmeans():
    x, _ = blobs(n_per=400, d=64)
    on_gpu = train_kmeans(x, 5, n_iter=10, seed=1, device="cuda", backend="torch")
    on_cpu = train_kmeans(x, 5, n_iter=10, seed=1, device="cpu", backend="torch")
    np.testing.assert_array_max_ulp(on_gpu, on_cpu, maxulp=1)


def test_auto_on_a_box_without_gpu_device_files_does_not_import_torch():
    import glob
    import os
    import subprocess
    import sys

    gpu_files = (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")
                 or os.path.exists("/dev/dxg"))
    if gpu_files or not sys.platform.startswith("linux"):
        pytest.skip("this box has GPU device files (or is not Linux): torch is asked")
    code = ("import sys; from beam_curator.dedup.backend import resolve_device; "
            "print(resolve_device('auto'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["cpu", "False"]   # each worker process would import it (~4 s, ~500 MB)
