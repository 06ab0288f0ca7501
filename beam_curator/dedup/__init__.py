"""The pure algorithms of semantic dedup (SemDeDup), with no Beam in them.

The Beam transforms in `beam_curator.transforms.semdedup` are plumbing around these functions:

* `kmeans`   – train / save / load the centroid model, hash-based training sample;
* `assign`   – nearest centroid of each embedding (blocked, chunking-independent);
* `ranking`  – the order inside one cluster that decides which member is kept;
* `pairwise` – max cosine similarity to any earlier-ranked member, in one pass;
* `blocks`   – the same answer for a cluster cut into hash blocks, from per-block-pair
               partials that combine in any order (how a large cluster is spread out).

Every function is deterministic for its inputs; ties are broken by id or by lowest index.
The dense math runs on numpy (the CPU reference) or torch on a GPU, with the same decisions:
`backend` says how a `device=` / `backend=` keyword is resolved.
"""
from beam_curator.dedup.assign import (
                                      assign_to_centroids,
                                      assign_top2,
                                      assign_with_runner_up,
                                      border_assignments,
)
from beam_curator.dedup.kmeans import (
                                      load_centroids,
                                      sample_fraction,
                                      sample_mask,
                                      save_centroids,
                                      train_kmeans,
                                      validate_centroids,
)
from beam_curator.dedup.pairwise import (
                                      TILE_ROWS,
                                      duplicate_threshold,
                                      is_duplicate,
                                      max_sim_to_earlier,
                                      partial_max,
                                      semdedup_cluster,
)
from beam_curator.dedup.ranking import WHICH_TO_KEEP, rank_cluster

__all__ = [
    "TILE_ROWS",
    "WHICH_TO_KEEP",
    "assign_to_centroids",
    "assign_top2",
    "assign_with_runner_up",
    "border_assignments",
    "duplicate_threshold",
    "is_duplicate",
    "load_centroids",
    "max_sim_to_earlier",
    "partial_max",
    "rank_cluster",
    "sample_fraction",
    "sample_mask",
    "save_centroids",
    "semdedup_cluster",
    "train_kmeans",
    "validate_centroids",
]
