"""What dedup is asked to do (DedupConfig) and what the data decided (DedupPlan).

Plain values only: the config is built from keywords by the public transforms or from the
command line by the composition root (`pipelines.dedup_config`); nothing here reads options.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from beam_curator import outputs
from beam_curator.dedup import blocks
from beam_curator.defaults import SHUFFLE, STAGED

_LOG = logging.getLogger(__name__)

__all__ = ["DedupConfig", "DedupPlan", "make_plan", "STAGED", "SHUFFLE"]


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    output: str
    n_clusters: Optional[int] = None          # None: from the data (blocks.auto_n_clusters)
    kmeans_iterations: int = 20
    seed: int = 0
    sample_size: Optional[int] = None         # None: sized by k (blocks.auto_sample_size)
    centroids_path: Optional[str] = None
    eps: float = 0.01
    which_to_keep: str = "hard"
    block_rows: int = blocks.DEFAULT_BLOCK_ROWS
    border_margin: Optional[float] = None
    transport: str = STAGED
    id_column: str = "id"
    embedding_column: str = "embedding"
    device: Optional[str] = None              # where the dense math runs (dedup.backend)

    @property
    def dedup_dir(self) -> str:
        return outputs.dedup_dir(self.output)

    @property
    def staging_dir(self) -> str:
        return FileSystems.join(self.dedup_dir, "_staging")


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
    if config.centroids_path:
        source = "--centroids"
    sample = (config.sample_size if config.sample_size is not None
              else blocks.auto_sample_size(k))
    return DedupPlan(n_candidates=n_candidates, n_clusters=k, n_clusters_from=source,
                     sample_size=min(sample, n_candidates))
