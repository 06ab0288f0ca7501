"""Stage 8, outputs: each cluster's (or block's) kmeans/, pairwise_results/ and duplicates/
files, written where its decisions are made (no further shuffle of rows), in NeMo Curator's
formats (schema.py); then, once every dedup output is written, the scratch files go.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from beam_curator.schema import (
    DUPLICATES_SCHEMA,
    KMEANS_SCHEMA,
    PAIRWISE_SCHEMA,
    REFERENCE_DUPLICATES_SCHEMA,
    TARGET_FILTERED_SCHEMA,
)
from beam_curator.transforms.semdedup.vectors import VectorStore
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
        removed = decisions.is_duplicate
        tables = [("kmeans", kmeans), ("pairwise_results", pairs)]
        if decisions.reference is not None:   # --reference: the candidates too close to it
            matched = decisions.is_reference_duplicate[order]
            removed = removed | decisions.is_reference_duplicate
            tables.append(("reference_duplicates", pa.table({
                "id": [i for i, hit in zip(ids, matched.tolist()) if hit],
                "reference_id": [r for r, hit in zip(decisions.reference.ids[order].tolist(),
                                                     matched.tolist()) if hit],
                "cosine_sim_score": pa.array(decisions.reference.sim[order][matched],
                                             pa.float32())},
                schema=REFERENCE_DUPLICATES_SCHEMA)))
        tables.append(("duplicates", pa.table(
            {"id": [ids[k] for k, i in enumerate(order) if removed[i]]},
            schema=DUPLICATES_SCHEMA)))
        name = f"{key}.parquet"
        # ids are unique: no dictionary pages (k files of each kind; 3,000 at 1M rows)
        for kind, table in tables:
            yield write_parquet(FileSystems.join(self._dir, kind, name), table,
                                use_dictionary=False)


def write_target_filtered(element, dedup_dir: str):
    """(chunk name, ids, home clusters) of candidates outside --target's clusters ->
    target_filtered/ (id, centroid) and their removal ids in duplicates/, one file per
    chunk."""
    chunk, ids, clusters = element
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    ids = [ids[i] for i in order.tolist()]
    name = f"target-{chunk}.parquet"
    yield write_parquet(FileSystems.join(dedup_dir, "target_filtered", name), pa.table({
        "id": ids, "centroid": pa.array(np.asarray(clusters)[order], pa.int32())},
        schema=TARGET_FILTERED_SCHEMA))
    yield write_parquet(FileSystems.join(dedup_dir, "duplicates", name),
                        pa.table({"id": ids}, schema=DUPLICATES_SCHEMA))


def discard_scratch_after(store: VectorStore, written: list) -> beam.PCollection:
    """Delete the vector store's scratch files once every PCollection of `written` is
    complete (a side input orders it); returns a one-element PCollection: all done."""
    def cleanup(_, done):
        store.discard_all()
        return 1

    # One count over all of them, not one each: every global combine is ~5 more stages on
    # Flink (issue 30); without defaults, so no extra stage injects a 0 (the side input's
    # default does, for a run that wrote nothing).
    done = ([w | f"Written{i}" >> beam.Map(lambda _: 1) for i, w in enumerate(written)]
            | "AllWritten" >> beam.Flatten()
            | "CountWritten" >> beam.CombineGlobally(sum).without_defaults())
    return (written[0].pipeline
            | "CleanupOnce" >> beam.Create([None])
            | "DeleteStaging" >> beam.Map(cleanup,
                                          beam.pvalue.AsSingleton(done, default_value=0)))
