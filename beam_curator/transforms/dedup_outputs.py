"""dedup/'s files: kmeans/, pairwise_results/ and duplicates/ per cluster (or block of a split
cluster), and the exact copies' rows per chunk. NeMo Curator's formats (see schema.py)."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from beam_curator.schema import DUPLICATES_SCHEMA, KMEANS_SCHEMA, PAIRWISE_SCHEMA
from beam_curator.transforms.write import write_parquet


class WriteClusterOutputsFn(beam.DoFn):
    """(file key, Decisions) -> kmeans/, pairwise_results/ and duplicates/ files."""

    def __init__(self, dedup_dir: str):
        self._dir = dedup_dir

    def process(self, element):
        key, decisions = element
        m = decisions.members
        order = np.argsort(np.array(m.ids), kind="stable")
        ids = [m.ids[i] for i in order]
        kmeans = pa.table({
            "id": ids, "centroid": pa.array(np.full(len(ids), decisions.cluster, np.int32)),
            "cosine_dist_to_cent": pa.array(m.cos_dist[order], pa.float32()),
            "l2_dist_to_cent": pa.array(m.l2_dist[order], pa.float32())}, schema=KMEANS_SCHEMA)
        pairs = pa.table({
            "id": ids, "max_id": [decisions.max_ids[i] for i in order],
            "cosine_sim_score": pa.array(decisions.cosine_sim[order], pa.float32())},
            schema=PAIRWISE_SCHEMA)
        dups = pa.table({"id": [ids[k] for k, i in enumerate(order)
                                if decisions.is_duplicate[i]]}, schema=DUPLICATES_SCHEMA)
        name = f"{key}.parquet"
        # ids are unique: no dictionary pages (k files of each kind; 3,000 at 1M rows)
        for kind, table in (("kmeans", kmeans), ("pairwise_results", pairs),
                            ("duplicates", dups)):
            yield write_parquet(FileSystems.join(self._dir, kind, name), table,
                                use_dictionary=False)


def write_exact_outputs(element, dedup_dir: str):
    """(chunk, [ExactDuplicate]) -> pairwise rows (max_id = survivor, score 1.0) and removal
    ids, one file per chunk that holds copies."""
    chunk, exact = element
    exact = sorted(exact)
    ids = [e.id for e in exact]
    name = f"exact-{chunk}.parquet"
    yield write_parquet(FileSystems.join(dedup_dir, "pairwise_results", name), pa.table({
        "id": ids, "max_id": [e.survivor for e in exact],
        "cosine_sim_score": pa.array([1.0] * len(ids), pa.float32())}, schema=PAIRWISE_SCHEMA))
    yield write_parquet(FileSystems.join(dedup_dir, "duplicates", name),
                        pa.table({"id": ids}, schema=DUPLICATES_SCHEMA))
