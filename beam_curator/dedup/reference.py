"""Each candidate's best match in another set of embeddings (a --reference), no Beam.

A candidate is compared with every reference row it meets, with no rank condition: a
reference row is always "earlier" (it is never removed, like the rows of an old curated set
ranked before every new one). The similarities are the pairwise step's (`block_similarities`:
float64 products rounded once to float32, the same bits as a dedup of candidates and
references together would compute); ties go to the smallest reference id, so the answer does
not depend on how the references were split into blocks. On a torch device the shortlist
path (`dedup.shortlist`) gives the same answer.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from beam_curator.dedup.backend import NUMPY, resolve
from beam_curator.dedup.pairwise import STRIP_ROWS, TILE_ROWS, block_similarities

NO_MATCH = np.float32(-np.inf)


def sorted_by_id(references: np.ndarray, reference_ids: Sequence[str]
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """(float32 C-ordered rows, object ids) sorted by id: what `best_reference` compares
    with (ties then go to the smallest id by position). A caller that reuses one reference
    for many calls sorts it once and passes `presorted=True`."""
    order = np.argsort(np.asarray(list(reference_ids), dtype=str), kind="stable")
    return (np.ascontiguousarray(references[order], dtype=np.float32),
            np.asarray(list(reference_ids), dtype=object)[order])


def best_reference(candidates: np.ndarray, references: np.ndarray, reference_ids: Sequence[str],
                   device: Optional[str] = None, backend: Optional[str] = None,
                   presorted: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(sim float32 (n,), reference id object (n,)): each candidate's most similar reference
    row (-inf and "" where there is none); ties go to the smallest reference id (a repeated
    id is harmless: its rows tie under one name). `presorted`: references and ids come from
    `sorted_by_id` already."""
    n = candidates.shape[0]
    sim = np.full(n, NO_MATCH, np.float32)
    ids = np.full(n, "", dtype=object)
    if not n or not len(reference_ids):
        return sim, ids
    if presorted:
        sorted_ids = np.asarray(reference_ids, dtype=object)
    else:
        references, sorted_ids = sorted_by_id(references, reference_ids)
    arg = np.full(n, -1, np.int64)
    choice = resolve(device, backend)
    if choice.name != NUMPY:
        import torch

        from beam_curator.dedup.shortlist import exact_top_m

        a = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32)).to(choice.device)
        b = torch.from_numpy(references).to(choice.device)
        index, score = exact_top_m(a, b, b.double(), 1, torch.float32)
        sim, arg = score[:, 0].cpu().numpy(), index[:, 0].cpu().numpy()
    else:
        for t0 in range(0, n, STRIP_ROWS):
            t1 = min(n, t0 + STRIP_ROWS)
            for s0 in range(0, len(references), TILE_ROWS):
                s1 = min(len(references), s0 + TILE_ROWS)
                sims = block_similarities(candidates[t0:t1], references[s0:s1])
                a = np.argmax(sims, axis=1)                # first max = smallest id
                m = sims[np.arange(t1 - t0), a]
                better = m > sim[t0:t1]                    # equal: keep the earlier tile
                sim[t0:t1][better] = m[better]
                arg[t0:t1][better] = (a + s0)[better]
    found = arg >= 0
    ids[found] = sorted_ids[arg[found]]
    return sim.astype(np.float32), ids


def merge_best(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray]
               ) -> Tuple[np.ndarray, np.ndarray]:
    """The better of two best matches per candidate: higher similarity, ties to the smaller
    reference id. Order-free, so any combining tree agrees."""
    sim_a, id_a = a
    sim_b, id_b = b
    take_b = (sim_b > sim_a) | ((sim_b == sim_a) & (sim_b > NO_MATCH)
                                & (np.asarray(id_b, dtype=str) < np.asarray(id_a, dtype=str)))
    return np.where(take_b, sim_b, sim_a).astype(np.float32), np.where(take_b, id_b, id_a)
