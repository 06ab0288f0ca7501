"""What the data decided, for summary.json and the report: one dict from the plan, the
centroids, the cluster sizes and the input checks (each a small PCollection)."""
from __future__ import annotations

import apache_beam as beam
import numpy as np


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



def dedup_info(plan, centroids, sizes, input_checks, block_rows: int,
               others=None) -> beam.PCollection:
    """One dict: the plan, k, pairwise_block_size, the size stats and `input_checks` (and
    `others`: {key: a one-dict PCollection}, e.g. reference / target, under their keys)."""
    k = centroids | "K" >> beam.Map(lambda c: int(c.shape[0]) if c.size else 0)
    size_stats = _SizeStats(block_rows)
    stats = (sizes   # no default stage (issue 30): no clusters reads as the empty stats
             | "SizeValues" >> beam.Values()
             | "SizeStats" >> beam.CombineGlobally(size_stats).without_defaults())
    others = others or {}
    names = sorted(others)
    return plan | "Info" >> beam.Map(
        lambda pl, k_, st, checks, *more: dict(pl.as_dict(), n_clusters=k_,
                                               pairwise_block_size=block_rows, **st,
                                               input_checks=checks, **dict(zip(names, more))),
        beam.pvalue.AsSingleton(k), beam.pvalue.AsSingleton(
            stats, default_value=size_stats.extract_output(size_stats.create_accumulator())),
        beam.pvalue.AsSingleton(input_checks),
        *[beam.pvalue.AsSingleton(others[name]) for name in names])


class ReferenceStats(beam.CombineFn):
    """Decisions -> what summary.json and the report say about the --reference matches:
    how many candidates are reference duplicates, the TOP highest-cosine matches, and a
    histogram of each candidate's best reference cosine over [threshold - SPAN, 1] (the
    candidates that met no reference row, or one further away, are counted below it)."""

    TOP, BINS, SPAN = 20, 40, 0.2

    def __init__(self, threshold: float):
        self._threshold = float(threshold)
        self._low = max(-1.0, self._threshold - self.SPAN)

    def create_accumulator(self):
        return 0, 0, [0] * self.BINS, 0, []

    def add_input(self, acc, decisions):
        met, dups, bins, below, top = acc
        ref = decisions.reference
        if ref is None:
            return acc
        seen = ref.sim > np.float32(-np.inf)
        met += int(np.count_nonzero(seen))
        dups += int(np.count_nonzero(decisions.is_reference_duplicate))
        sims = ref.sim[seen].astype(np.float64)
        inside = sims >= self._low
        below += int(np.count_nonzero(~inside))
        width = (1.0 - self._low) / self.BINS
        where = np.minimum(((sims[inside] - self._low) / width).astype(np.int64), self.BINS - 1)
        bins = (np.asarray(bins) + np.bincount(where, minlength=self.BINS)).tolist()
        best = np.argsort(-ref.sim, kind="stable")[:self.TOP]
        ids = decisions.members.ids
        top = self._top(top + [(float(ref.sim[i]), ids[i], ref.ids[i])
                               for i in best.tolist() if seen[i]])
        return met, dups, bins, below, top

    def _top(self, rows):
        return sorted(rows, key=lambda r: (-r[0], r[1]))[:self.TOP]

    def merge_accumulators(self, accs):
        met, dups, bins, below, top = self.create_accumulator()
        for a_met, a_dups, a_bins, a_below, a_top in accs:
            met, dups, below = met + a_met, dups + a_dups, below + a_below
            bins = [x + y for x, y in zip(bins, a_bins)]
            top = self._top(top + a_top)
        return met, dups, bins, below, top

    def extract_output(self, acc):
        met, dups, bins, below, top = acc
        width = (1.0 - self._low) / self.BINS
        return {"threshold": self._threshold, "reference_duplicates": dups,
                "candidates_that_met_a_reference_row": met,
                "best_cosine_histogram": {
                    "low": self._low, "high": 1.0, "bin_width": width, "counts": bins,
                    "below_low": below},
                "top_matches": [{"id": i, "reference_id": r, "cosine_sim": s}
                                for s, i, r in top]}


def reference_info(decisions, reference_checks, threshold: float, exact: bool,
                   eps: float) -> beam.PCollection:
    """One dict for summary.json's dedup.reference."""
    stats = decisions | "ReferenceStats" >> beam.CombineGlobally(ReferenceStats(threshold))
    return stats | "ReferenceInfo" >> beam.Map(
        lambda st, checks: dict(st, reference_eps=eps, exact=exact,
                                rows=checks["rows"], input_checks=checks["input_checks"]),
        beam.pvalue.AsSingleton(reference_checks))


def target_info(target_clusters, filtered, target_checks, plan) -> beam.PCollection:
    """One dict for summary.json's dedup.target: clusters touched, candidates filtered and
    kept (those in the touched clusters: the semantic pass's candidates)."""
    n_clusters = target_clusters | "CountTargetClusters" >> beam.combiners.Count.Globally()
    n_filtered = (filtered
                  | "FilteredSizes" >> beam.Map(lambda e: len(e[1]))
                  | "CountTargetFiltered" >> beam.CombineGlobally(sum))
    return n_clusters | "TargetInfo" >> beam.Map(
        lambda n, f, checks, pl: {"clusters_touched": n, "filtered_target": f,
                                  "candidates_kept": pl.n_candidates - f,
                                  "rows": checks["rows"], "input_checks": checks["input_checks"]},
        beam.pvalue.AsSingleton(n_filtered), beam.pvalue.AsSingleton(target_checks),
        beam.pvalue.AsSingleton(plan))
