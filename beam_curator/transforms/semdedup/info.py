"""What the data decided, for summary.json and the report: one dict from the plan, the
centroids, the cluster sizes and the input checks (each a small PCollection)."""
from __future__ import annotations

import apache_beam as beam


class _SizeStats(beam.CombineFn):
    """(clusters, largest, clusters cut into blocks) from the cluster sizes."""

    def __init__(self, block_rows: int):
        self._block_rows = block_rows

    def create_accumulator(self):
        return (0, 0, 0)

    def add_input(self, acc, size):
        return (acc[0] + 1, max(acc[1], size), acc[2] + (size > self._block_rows))

    def merge_accumulators(self, accs):
        accs = list(accs)
        return (sum(a[0] for a in accs), max(a[1] for a in accs), sum(a[2] for a in accs))

    def extract_output(self, acc):
        return {"clusters_with_members": acc[0], "largest_cluster": acc[1],
                "clusters_split_into_blocks": acc[2]}



def dedup_info(plan, centroids, sizes, input_checks, block_rows: int) -> beam.PCollection:
    """One dict: the plan, k, pairwise_block_size, the size stats and `input_checks`."""
    k = centroids | "K" >> beam.Map(lambda c: int(c.shape[0]) if c.size else 0)
    stats = (sizes
             | "SizeValues" >> beam.Values()
             | "SizeStats" >> beam.CombineGlobally(_SizeStats(block_rows)))
    return plan | "Info" >> beam.Map(
        lambda pl, k_, st, checks: dict(pl.as_dict(), n_clusters=k_,
                                        pairwise_block_size=block_rows, **st,
                                        input_checks=checks),
        beam.pvalue.AsSingleton(k), beam.pvalue.AsSingleton(stats),
        beam.pvalue.AsSingleton(input_checks))
