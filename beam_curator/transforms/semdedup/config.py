"""What dedup is asked to do (`DedupConfig`, built once at the composition root) and what the
data decided (`DedupPlan`, once the candidates are counted).

The config's fields carry the command line's names (`--pairwise_block_size` is
`pairwise_block_size`) and `defaults.py`'s values, and `checked()` is the one place their
values are validated: the CLI (options.py) and the public transforms both call it. Plain
values only: nothing here reads options or touches a pipeline.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from beam_curator.dedup import blocks
from beam_curator.dedup.backend import check_device
from beam_curator.defaults import DEFAULT_EPS, DEVICES, SHUFFLE, STAGED, WHICH_TO_KEEP
from beam_curator.errors import OptionError

_LOG = logging.getLogger(__name__)

__all__ = ["DedupConfig", "DedupPlan", "make_plan"]

VECTOR_TRANSPORTS = (STAGED, SHUFFLE)


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """Dedup's settings, named as on the command line (see `python -m beam_curator dedup
    --help` for each)."""

    output: str
    n_clusters: Optional[int] = None          # None: from the data (blocks.auto_n_clusters)
    eps: float = DEFAULT_EPS
    which_to_keep: str = "hard"
    centroids: Optional[str] = None           # a (k, d) .npy used instead of training
    kmeans_iterations: int = 20
    kmeans_seed: int = 0                      # also orders which_to_keep="random"
    kmeans_sample_size: Optional[int] = None  # None: sized by k (blocks.auto_sample_size)
    pairwise_block_size: int = blocks.DEFAULT_BLOCK_ROWS
    border_margin: Optional[float] = None
    vector_transport: str = SHUFFLE           # works on every runner; the CLI picks staged
    device: Optional[str] = "auto"            # where the dense math runs (dedup.backend)
    id_column: str = "id"
    embedding_column: str = "embedding"
    reference_eps: Optional[float] = None     # --reference's eps; None: eps
    reference_exact: bool = False             # every candidate against every reference row
    staging_run: Optional[str] = None         # vectors.mark_staging's token; None: unchecked

    @property
    def reference_threshold_eps(self) -> float:
        return self.eps if self.reference_eps is None else self.reference_eps

    def checked(self) -> "DedupConfig":
        """This config, or an OptionError naming the setting and a value that works."""
        if self.which_to_keep not in WHICH_TO_KEEP:
            raise OptionError(f"--which_to_keep {self.which_to_keep!r}: use one of "
                              f"{', '.join(WHICH_TO_KEEP)}.")
        if not (math.isfinite(self.eps) and 0.0 <= self.eps < 1.0):
            raise OptionError(f"--eps {self.eps} must be in [0, 1): duplicates are pairs with "
                              "cosine similarity >= 1 - eps (SemDeDup uses 0.01 … 0.1).")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise OptionError(f"--n_clusters {self.n_clusters} must be >= 1, or auto.")
        if self.kmeans_iterations < 1:
            raise OptionError(f"--kmeans_iterations {self.kmeans_iterations} must be >= 1.")
        if not 0 <= self.kmeans_seed < 2**31:   # what k-means takes (faiss: a C int)
            raise OptionError(f"--kmeans_seed {self.kmeans_seed} must be in [0, 2**31), "
                              "e.g. 0.")
        if self.kmeans_sample_size is not None and self.kmeans_sample_size < 1:
            raise OptionError(f"--kmeans_sample_size {self.kmeans_sample_size} must be >= 1, "
                              "or auto.")
        if self.pairwise_block_size < 1:
            raise OptionError(f"--pairwise_block_size {self.pairwise_block_size} must be "
                              ">= 1.")
        if self.border_margin is not None and self.which_to_keep == "random":
            raise OptionError("--border_margin needs --which_to_keep hard or easy: a random "
                              "order is drawn per cluster, so a pair seen in two clusters "
                              "could lose both members.")
        if self.border_margin is not None and not (0.0 <= self.border_margin <= 2.0):
            raise OptionError(f"--border_margin {self.border_margin} must be a cosine "
                              "distance in [0, 2] (try 0.02), or left out.")
        if self.reference_eps is not None and not (
                math.isfinite(self.reference_eps) and 0.0 <= self.reference_eps < 1.0):
            raise OptionError(f"--reference_eps {self.reference_eps} must be in [0, 1): a "
                              "candidate is a reference duplicate at cosine >= 1 - "
                              "reference_eps (DataComp's decontamination: about 0.4 for its "
                              "copy detector; for CLIP embeddings try 0.05).")
        if self.vector_transport not in VECTOR_TRANSPORTS:
            raise OptionError(f"--dedup_vector_transport {self.vector_transport!r}: use "
                              f"{' or '.join(VECTOR_TRANSPORTS)}.")
        try:
            check_device(self.device)
        except ValueError:
            raise OptionError(f"--dedup_device {self.device!r}: use one of "
                              f"{', '.join(DEVICES)} (or cuda:N).") from None
        return self

    @property
    def dedup_dir(self) -> str:
        return FileSystems.join(self.output, "dedup")   # outputs.dedup_dir, without its imports

    @property
    def staging_dir(self) -> str:
        """Scratch files (staged vectors, k-means sample files): deleted at the end."""
        return FileSystems.join(self.dedup_dir, "_staging")

    @property
    def staging_marker(self) -> str:
        """The file the launcher writes into staging_dir and every worker looks for
        (vectors.mark_staging)."""
        return FileSystems.join(self.staging_dir, f"RUN-{self.staging_run}")


@dataclasses.dataclass(frozen=True)
class DedupPlan:
    """What the data decided: written into summary.json and shown in the report."""

    n_candidates: int
    n_clusters: int
    n_clusters_from: str       # "--n_clusters", "auto (1 per 10,000 candidates)", ...
    sample_size: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_plan(n_candidates: int, config: DedupConfig) -> DedupPlan:
    if config.n_clusters is None:
        k = blocks.auto_n_clusters(n_candidates)
        source = f"auto: 1 per {blocks.ROWS_PER_CLUSTER:,} candidates"
    else:
        k, source = config.n_clusters, "--n_clusters"
    if 0 < n_candidates < k:
        _LOG.warning("only %d candidates: using %d clusters instead of --n_clusters %d",
                     n_candidates, n_candidates, k)
        k, source = n_candidates, f"--n_clusters {config.n_clusters}, lowered to the candidates"
    if config.centroids:
        source = "--centroids"
    sample = (config.kmeans_sample_size if config.kmeans_sample_size is not None
              else blocks.auto_sample_size(k))
    return DedupPlan(n_candidates=n_candidates, n_clusters=k, n_clusters_from=source,
                     sample_size=min(sample, n_candidates))
