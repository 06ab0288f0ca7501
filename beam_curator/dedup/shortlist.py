"""Exact best inner products on a torch device: a fast shortlist, then a float64 re-score.

The numpy path computes every similarity it compares in float64 (pairwise: a float64 matrix
product rounded once to float32; assignment: float64 row-by-row dot products), which makes its
answers independent of block shapes. A GPU is fast in float32 (and faster in TF32, which a
torch user may switch on for the whole process), slow in float64 on many cards (an L4 runs
float64 at 1/64 of its float32 rate). So the torch path:

1. computes all similarities with torch's float32 matmul (TF32 or bf16 if the process allows
   it: the error bound below covers whatever `torch.get_float32_matmul_precision()` permits);
2. shortlists, per row, every column whose fast score is within twice that bound of the
   m-th best fast score -- the true best m are always on the shortlist;
3. re-scores the shortlist in float64 (`sum(a * b)` of the float32 rows cast to float64),
   rounds to the caller's score dtype (float32 for pairwise, float64 for assignment), and
   picks the best m, ties to the lowest column, as the numpy code does.

When a block's shortlist is long (many near-identical vectors), the whole block is scored by
one float64 matrix product instead; the answer is the same.

Equality with numpy: the same float64 values up to the order of the float64 summation, which
moves a sum by ~1e-16. A float32 score can therefore differ in its last bit only when its
float64 value lies within ~1e-16 of a float32 rounding boundary (about one score in 10^8-10^9),
and a decision only when, in addition, that score is the float32 neighbour of 1 - eps. The
numpy path already carries the same caveat between block shapes.
"""
from __future__ import annotations

from typing import Tuple

_PAIR_CHUNK = 8192            # candidate pairs re-scored per step (2 x 48 MiB at d = 768)
_DENSE_PER_ROW = 8            # more candidates per row than this: score the block in float64
_DENSE_SLACK = 4096
_SAFETY = 2.0                 # the bound below is a worst case already; doubled anyway


def fast_matmul_rel_error(d: int) -> float:
    """Bound on |fast a.b - exact a.b| / (|a| |b|) for torch's float32 matmul of length d.

    Operands may be rounded to TF32 (10-bit mantissa; truncation assumed) or, at precision
    'medium', to bf16 (7 bits); each product is then exact in the fp32 accumulator, and the
    d-term fp32 sum adds at most d * 2^-24 relative to sum |a_i b_i| <= |a| |b|.
    """
    import torch

    operand = 2.0 ** -7 if torch.get_float32_matmul_precision() == "medium" else 2.0 ** -10
    return _SAFETY * (2.0 * operand + operand * operand + d * 2.0 ** -24)


def _pair_dots(a, b64, rows, cols):
    """float64 a[rows[p]] . b64[cols[p]] for every pair p, in bounded scratch blocks."""
    import torch

    out = torch.empty(rows.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, rows.shape[0], _PAIR_CHUNK):
        stop = start + _PAIR_CHUNK
        out[start:stop] = (a[rows[start:stop]].double() * b64[cols[start:stop]]).sum(dim=1)
    return out


def exact_top_m(a, b, b64, m: int, score_dtype, causal: bool = False, limit=None) -> Tuple:
    """For each row of `a` (na, d) float32: its best m columns of `b` (nb, d) float32.

    `b64` is `b` in float64 (the caller keeps it when it reuses `b`). With `causal` (a == b,
    a diagonal block), row r may only pick columns q < r; with `limit` (int64 (na,)), row r
    only columns q < limit[r] (rank-sorted blocks of one cluster: `dedup.blocks`). Returns
    `(index (na, m) int64, score (na, m) score_dtype)`, best first, ties to the lowest
    column; -1 and -inf where a row has fewer than m columns to pick from. All tensors stay
    on a's device.
    """
    import torch

    na, d = a.shape
    nb = b.shape[0]
    index = torch.full((na, m), -1, dtype=torch.int64, device=a.device)
    score = torch.full((na, m), float("-inf"), dtype=score_dtype, device=a.device)
    m_eff = min(m, nb)
    if na == 0 or m_eff == 0:
        return index, score

    fast = a @ b.T                                              # (na, nb) float32
    excluded = None
    if causal:
        excluded = torch.ones(na, nb, dtype=torch.bool, device=a.device).triu_()
    elif limit is not None:
        columns = torch.arange(nb, device=a.device)
        excluded = columns[None, :] >= limit.to(a.device)[:, None]
    if excluded is not None:
        fast.masked_fill_(excluded, float("-inf"))
    kth = fast.max(dim=1).values if m_eff == 1 else fast.topk(m_eff, dim=1).values[:, -1]
    # |fast - exact| <= rel * |a_r| |b_q|; a candidate's and the m-th best's errors add up,
    # and rounding the exact score to float32 may tie values up to one ulp apart.
    scale = a.norm(dim=1) * b.norm(dim=1).max()
    margin = (2.0 * fast_matmul_rel_error(d) + 2.0 ** -22) * scale + 1e-30
    shortlist = fast >= (kth - margin)[:, None]
    if excluded is not None:   # rows with nothing earlier have kth = -inf: keep them empty
        shortlist &= ~excluded
    del fast

    n_candidates = int(shortlist.sum())
    if n_candidates > _DENSE_PER_ROW * na + _DENSE_SLACK:
        exact = (a.double() @ b64.T).to(score_dtype)
        if excluded is not None:
            exact.masked_fill_(excluded, float("-inf"))
    else:
        rows, cols = shortlist.nonzero(as_tuple=True)
        exact = torch.full((na, nb), float("-inf"), dtype=score_dtype, device=a.device)
        exact[rows, cols] = _pair_dots(a, b64, rows, cols).to(score_dtype)
    del shortlist

    for t in range(m_eff):
        best = exact.argmax(dim=1)                              # the first maximum
        value = exact.gather(1, best[:, None])[:, 0]
        found = value > float("-inf")
        index[:, t] = torch.where(found, best, torch.full_like(best, -1))
        score[:, t] = value
        if t + 1 < m_eff:
            exact.scatter_(1, best[:, None], float("-inf"))
    return index, score
