"""Pairwise step of SemDeDup: each member's max cosine similarity to an earlier-ranked member.

Within a cluster ranked by `ranking.rank_cluster`, member r is a semantic duplicate when
`max_{q < r} cos(v_r, v_q) >= 1 - eps`; the earlier-ranked member is kept. As in SemDeDup and
NeMo Curator, r is compared with *every* earlier member, including ones that are themselves
duplicates (a chain a ~ b ~ c removes b and c).

`max_sim_to_earlier` cuts the work into square tiles of `block_size` ranked rows: tile i
against tile j (i <= j) gives, for each row of j, its best earlier row in i (`partial_max`),
folded into j's answer in place. Memory: O(STRIP_ROWS x block_size) per tile pair (tile j is
scored a strip of rows at a time) plus O(n) for the results -- never n x n. (A cluster too
large for one worker is cut into hash blocks instead, whose partials carry rank keys and ids:
`dedup.blocks`, the one scheme that crosses workers.)

Conventions (NeMo Curator's pairwise output is `id, max_id, cosine_sim_score`):
* the first-ranked member has no earlier member: max_sim 0.0 and argmax -1 here;
  `semdedup_cluster` writes max_id = its own id and score 0.0, as NeMo does (NeMo also
  writes that for a single-member cluster);
* ties in the max go to the earliest-ranked member (NeMo: torch.max's first index);
* the max is the true maximum, negative when every earlier member has negative cosine. (NeMo
  takes the max over a column whose later entries are zeroed, so it clamps such scores to
  0.0; the difference never changes a decision, since eps < 1.)

On a GPU (`device`, `backend`: see `dedup.backend`) the blocks run in torch
(`shortlist.exact_top_m`): a float32 (or TF32) matmul shortlists each row's candidates, and
the candidates are re-scored exactly as `block_similarities` scores them (float64, rounded
once to float32), so the maxima, argmaxes and decisions equal the numpy path's (up to
float64 summation order, see `dedup.shortlist`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from beam_curator.dedup._checks import as_float32_matrix, check_positive_int
from beam_curator.dedup.backend import NUMPY, Backend, resolve
from beam_curator.dedup.ranking import rank_cluster

TILE_ROWS = 4096   # rows per block of candidates
# Rows of block j scored against block i at once. A strip of 1024 x 4096 float64 scores is
# 32 MiB (+16 MiB rounded to float32), so one key's similarity scratch stays ~75 MB whatever
# its size, where a whole 4096 x 4096 tile took ~200 MB -- the largest part of an SDK
# worker's peak in the pairwise stage, and it grew with the largest cluster up to 4096 rows.
STRIP_ROWS = 1024


# ---- blocks ------------------------------------------------------------------------------

def _n_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _block_range(n: int, block_size: int, b: int) -> Tuple[int, int]:
    """Rows [start, stop) of block b when n ranked rows are cut into blocks of block_size."""
    block_size = check_positive_int(block_size, "block_size")
    if not 0 <= b < _n_blocks(n, block_size):
        raise ValueError(f"block {b} out of range for {n} rows in blocks of {block_size}")
    start = b * block_size
    return start, min(n, start + block_size)


def block_similarities(block_j: np.ndarray, block_i: np.ndarray) -> np.ndarray:
    """(len_j, len_i) dot products, rounded to float32: the only place similarities are computed.

    Rows are block j's members, so the max over candidates runs along contiguous memory.
    Accumulated in float64 and rounded once: a float32 GEMM's bits depend on the matrix
    shapes (BLAS picks kernels and summation orders by size), which would make a cluster cut
    into blocks of 7 differ from the same cluster in one block in the last bit. In float64 the
    order changes the sum by ~1e-16, far below float32's rounding, so every block size gives
    the same float32 scores (and the same decisions).
    """
    return (block_j.astype(np.float64) @ block_i.astype(np.float64).T).astype(np.float32)


def _partial_max(bi: np.ndarray, bj: np.ndarray, same_block: bool
                 ) -> Tuple[np.ndarray, np.ndarray]:
    lj = bj.shape[0]
    best = np.full(lj, -np.inf, np.float32)
    arg = np.full(lj, -1, np.int64)
    if bi.shape[0] == 0 or lj == 0:
        return best, arg
    for r0 in range(0, lj, STRIP_ROWS):
        r1 = min(lj, r0 + STRIP_ROWS)
        # On the diagonal only candidates above the strip's last row can be earlier.
        reach = r1 if same_block else bi.shape[0]
        sims = block_similarities(bj[r0:r1], bi[:reach])   # rows: block j, cols: candidates
        if same_block:   # candidate a is not earlier than member b iff a >= b
            np.putmask(sims, np.arange(reach)[None, :] >= np.arange(r0, r1)[:, None], -np.inf)
        a = np.argmax(sims, axis=1)                        # first max = earliest-ranked
        m = sims[np.arange(r1 - r0), a]
        best[r0:r1] = m
        arg[r0:r1] = np.where(m == -np.inf, -1, a)
    return best, arg


def _partial_max_torch(bi, bj, same_block: bool, device) -> Tuple[np.ndarray, np.ndarray]:
    """`_partial_max` in torch; `bi`, `bj` are numpy arrays or tensors already on `device`."""
    import torch

    from beam_curator.dedup.shortlist import exact_top_m

    rows = torch.as_tensor(bj).to(device)
    candidates = rows if same_block else torch.as_tensor(bi).to(device)
    index, score = exact_top_m(rows, candidates, candidates.double(), 1, torch.float32,
                               causal=same_block)
    return score[:, 0].cpu().numpy(), index[:, 0].cpu().numpy()


def _run_partial(choice: Backend, bi, bj, same_block: bool) -> Tuple[np.ndarray, np.ndarray]:
    if choice.name == NUMPY:
        return _partial_max(bi, bj, same_block)
    return _partial_max_torch(bi, bj, same_block, choice.device)


def partial_max(block_i_vectors: np.ndarray, block_j_vectors: np.ndarray, same_block: bool,
                device: Optional[str] = None, backend: Optional[str] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
    """For each row of block j, its max similarity to a row of block i ranked before it.

    Every row of an earlier block i ranks before every row of j; when `same_block` (i == j)
    only rows above it in the block count. Returns `(max_sim float32 (len_j,), argmax_local
    int64 (len_j,))`, argmax indexing into block i (first = earliest on ties); a row with no
    earlier row in block i (only possible when same_block) gets -inf and -1. The same answer
    on every backend (`device`, `backend`: see `dedup.backend`).
    """
    bi = as_float32_matrix(block_i_vectors, "block i vectors")
    bj = as_float32_matrix(block_j_vectors, "block j vectors")
    if bi.shape[1] != bj.shape[1]:
        raise ValueError(f"blocks have different dimensions: {bi.shape[1]} and {bj.shape[1]}")
    if same_block and bi.shape != bj.shape:
        raise ValueError("same_block=True needs the same block on both sides")
    return _run_partial(resolve(device, backend), bi, bj, bool(same_block))


# ---- combining ---------------------------------------------------------------------------

def _merge(acc_max: np.ndarray, acc_arg: np.ndarray, m: np.ndarray, a: np.ndarray) -> None:
    """Fold one partial into the accumulator in place: higher similarity wins, then the
    lower (earlier-ranked) index, so the fold does not depend on the partials' order."""
    better = (m > acc_max) | ((m == acc_max) & (a >= 0) & ((acc_arg < 0) | (a < acc_arg)))
    acc_max[better] = m[better]
    acc_arg[better] = a[better]


def _finish(acc_max: np.ndarray, acc_arg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    none = acc_arg < 0
    acc_max[none] = 0.0   # no earlier member: score 0, like NeMo's first member
    return acc_max, acc_arg


def max_sim_to_earlier(vectors_ranked: np.ndarray, block_size: int = TILE_ROWS,
                       device: Optional[str] = None, backend: Optional[str] = None
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """For each ranked row r: max over q < r of cos(v_r, v_q), and that q.

    Vectors are L2-normalised (cosine = dot product) and in ranked order. Returns
    `(max_sim float32 (n,), argmax int64 (n,))`; row 0 gets 0.0 and -1. Same calls, same
    bits as combining every `partial_max` of `block_pairs(n, block_size)`, on every backend.
    """
    v = as_float32_matrix(vectors_ranked, "ranked vectors")
    block_size = check_positive_int(block_size, "block_size")
    choice = resolve(device, backend)
    if choice.name != NUMPY and v.shape[0]:
        import torch

        v = torch.from_numpy(v).to(choice.device)   # moved once, sliced into blocks there
    n = v.shape[0]
    max_sim = np.empty(n, dtype=np.float32)
    argmax = np.empty(n, dtype=np.int64)
    for j in range(_n_blocks(n, block_size)):
        j0, j1 = _block_range(n, block_size, j)
        acc_max = np.full(j1 - j0, -np.inf, np.float32)
        acc_arg = np.full(j1 - j0, -1, np.int64)
        for i in range(j + 1):
            i0, i1 = _block_range(n, block_size, i)
            m, a = _run_partial(choice, v[i0:i1], v[j0:j1], i == j)   # v is checked
            _merge(acc_max, acc_arg, m, np.where(a >= 0, a + i0, -1))
        max_sim[j0:j1], argmax[j0:j1] = _finish(acc_max, acc_arg)
    return max_sim, argmax


# ---- the decision ------------------------------------------------------------------------

def duplicate_threshold(eps: float) -> np.float32:
    """The float32 score at and above which a member is a duplicate: float32(1 - eps)."""
    eps = float(eps)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    return np.float32(1.0 - eps)


def is_duplicate(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """`max_sim >= 1 - eps`, inclusive, decided in float32.

    Scores are float32 dot products and are stored as float32, so the threshold is the
    float32 nearest to 1 - eps (computed in float64 first) and a score equal to it is a
    duplicate. A filter on the written parquet with numpy (`scores >= 1 - eps`, float32
    array vs Python float) decides the same. NeMo Curator's pyarrow filter compares in
    float64 instead; the two differ only for a score within half a float32 ulp (~3e-8) of
    1 - eps when float32(1 - eps) < 1 - eps (eps = 0.05, say).
    """
    thr = duplicate_threshold(eps)
    return np.asarray(max_sim, dtype=np.float32) >= thr


def semdedup_cluster(ids: Sequence[str], vectors: np.ndarray, cos_dist: np.ndarray,
                     which_to_keep: str, eps: float, seed: int, cluster: int,
                     block_size: int = TILE_ROWS, device: Optional[str] = None,
                     backend: Optional[str] = None
                     ) -> List[Tuple[str, str, float, bool]]:
    """Dedup one cluster that fits in memory: rank, pairwise, decide.

    `ids`, `vectors` (L2-normalised) and `cos_dist` (to the cluster's centroid) are aligned,
    in any order. Returns `(id, max_id, cosine_sim_score, is_dup)` per member in ranked order;
    the first-ranked member gets `(id, id, 0.0, False)`.
    """
    n = len(ids)
    v = as_float32_matrix(vectors, "embeddings")
    if v.shape[0] != n:
        raise ValueError(f"{n} ids but {v.shape[0]} vectors")
    duplicate_threshold(eps)  # validate before the expensive part
    if n == 0:
        return []
    order = rank_cluster(ids, cos_dist, which_to_keep, seed, cluster)
    ranked_ids = [ids[r] for r in order]
    max_sim, argmax = max_sim_to_earlier(v[order], block_size, device, backend)
    dup = is_duplicate(max_sim, eps)
    out = []
    for id_, s, a, d in zip(ranked_ids, max_sim.tolist(), argmax.tolist(), dup.tolist()):
        if a < 0:   # the first-ranked member: nothing earlier
            out.append((id_, id_, 0.0, False))
        else:
            out.append((id_, ranked_ids[a], s, bool(d)))
    return out
