"""Stage 6, pairwise: inside each key, every member against every earlier-ranked member of
its cluster (SemDeDup's keep rule, `dedup.ranking` and `dedup.pairwise`).

A `BinKey` holds whole clusters: each is ranked and compared in one pass. A `BlockPairKey`
holds two blocks of a cut cluster: it emits a `BlockPartial` per block (each member's best
earlier member seen there), and the partials of one `BlockKey` are combined (order-free:
`blocks.merge_partials`) into that block's answer, exactly what one pass would give.

    (key, [(block, Members)]) -> PairwiseFn -> (file, Decisions)            bins
                                            -> (BlockKey, BlockPartial)     block pairs
                                               -> CombinePerKey -> (file, Decisions)
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from beam_curator.dedup import blocks
from beam_curator.dedup.pairwise import is_duplicate, max_sim_to_earlier
from beam_curator.dedup.ranking import rank_order, rank_primary
from beam_curator.transforms.semdedup.config import DedupConfig
from beam_curator.transforms.semdedup.records import (
    BinKey,
    BlockKey,
    BlockPartial,
    Decisions,
    Members,
    cluster_file,
    without_vectors,
)
from beam_curator.transforms.semdedup.vectors import VectorStore


def decide(cluster: int, members: Members, max_sim: np.ndarray, has_earlier: np.ndarray,
           max_ids, eps: float) -> Decisions:
    """SemDeDup's rule on each member's best earlier-ranked similarity. The first-ranked
    (nothing earlier): its own id and 0.0, as NeMo writes."""
    sims = np.where(has_earlier, max_sim, np.float32(0.0)).astype(np.float32)
    dup = is_duplicate(sims, eps) & has_earlier
    max_ids = tuple(m if h else own for own, m, h in zip(members.ids, max_ids,
                                                         has_earlier.tolist()))
    return Decisions(cluster, without_vectors(members), max_ids, sims, dup)


class PairwiseFn(beam.DoFn):
    """One key's members -> (file, Decisions) per cluster of a bin; for a block pair, a
    (BlockKey, BlockPartial) per block to the PARTIALS output."""

    PARTIALS = "partials"

    def __init__(self, config: DedupConfig, store: VectorStore):
        self._config = config
        self._store = store
        self.key_rows = beam.metrics.Metrics.distribution("curator", "dedup_rows_per_key")
        self.similarities = beam.metrics.Metrics.counter("curator",
                                                         "dedup_pairwise_similarities")

    def process(self, element):
        key, parts = element
        if isinstance(key, BinKey):
            yield from self._whole_clusters(parts)
        else:
            yield from self._block_pair(key, parts)

    def _ranked(self, cluster: int, members: Members):
        """(members in rank order, their vectors, their primary rank keys)."""
        primary = rank_primary(members.ids, members.cos_dist, self._config.which_to_keep,
                               self._config.kmeans_seed, cluster)
        order = rank_order(members.ids, primary)
        ranked = members.take(order)
        return ranked, self._store.read(ranked), primary[order]

    def _whole_clusters(self, parts):
        """A bin: each of its clusters in one pass, as `max_sim_to_earlier` defines it."""
        members = self._store.with_vectors(Members.concat([m for _, m in parts]))
        self.key_rows.update(len(members))
        for cluster, group in members.by_cluster():
            ranked, vectors, _ = self._ranked(cluster, group)
            self.similarities.inc(len(ranked) * (len(ranked) - 1) // 2)
            max_sim, argmax = max_sim_to_earlier(vectors, device=self._config.device)
            max_ids = [ranked.ids[a] if a >= 0 else None for a in argmax.tolist()]
            yield cluster_file(cluster), decide(cluster, ranked, max_sim, argmax >= 0,
                                                max_ids, self._config.eps)

    def _block_pair(self, key, parts):
        by_block = {}
        for b, members in parts:
            by_block.setdefault(b, []).append(members)
        ranked = {b: self._ranked(key.cluster, Members.concat(ms))
                  for b, ms in by_block.items()}
        sizes = [len(r[0]) for r in ranked.values()]
        self.key_rows.update(sum(sizes))
        # similarities computed: n(n-1)/2 on a diagonal, n_a x n_b between two blocks
        self.similarities.inc(sizes[0] * (sizes[0] - 1) // 2 if len(sizes) == 1 else
                              sizes[0] * sizes[1])
        device = self._config.device
        if key.lo == key.hi:
            members, vectors, primary = ranked[key.lo]
            sim, source_primary, source_id = blocks.diagonal_partial(
                vectors, members.ids, primary, device=device)
            yield beam.pvalue.TaggedOutput(self.PARTIALS, (
                BlockKey(key.cluster, key.n_blocks, key.lo),
                BlockPartial(without_vectors(members), sim, source_primary, source_id)))
            return
        for target, source in ((key.hi, key.lo), (key.lo, key.hi)):
            if target not in ranked or source not in ranked:
                continue   # an empty block: nothing to compare
            t_members, t_vectors, t_primary = ranked[target]
            s_members, s_vectors, s_primary = ranked[source]
            sim, source_primary, source_id = blocks.cross_partial(
                t_vectors, t_primary, t_members.ids, s_vectors, s_primary, s_members.ids,
                device=device)
            yield beam.pvalue.TaggedOutput(self.PARTIALS, (
                BlockKey(key.cluster, key.n_blocks, target),
                BlockPartial(None, sim, source_primary, source_id)))


class CombineBlockPartialsFn(beam.CombineFn):
    """Per member, the best of its block's partials: order-free, so runners may combine
    partials before the shuffle and a key never holds more than one block's arrays."""

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, partial):
        return partial if accumulator is None else accumulator.merged(partial)

    def merge_accumulators(self, accumulators):
        result = None
        for acc in accumulators:
            if acc is not None:
                result = acc if result is None else result.merged(acc)
        return result

    def extract_output(self, accumulator):
        return accumulator


def _block_decisions(element, eps: float):
    key, partial = element
    has = partial.sim > -np.inf
    return cluster_file(key.cluster, key.n_blocks, key.block), decide(
        key.cluster, partial.members, partial.sim, has, list(partial.source_id), eps)


class Pairwise(beam.PTransform):
    """The pairwise GroupByKey's groups -> (file, Decisions) per cluster or block."""

    def __init__(self, config: DedupConfig, store: VectorStore):
        super().__init__()
        self._config, self._store = config, store

    def expand(self, groups):
        pairwise = groups | "Pairwise" >> beam.ParDo(
            PairwiseFn(self._config, self._store)).with_outputs(PairwiseFn.PARTIALS,
                                                                main="decisions")
        blocks_decided = (pairwise[PairwiseFn.PARTIALS]
                          | "CombinePartials" >> beam.CombinePerKey(CombineBlockPartialsFn())
                          | "BlockDecisions" >> beam.Map(_block_decisions, self._config.eps))
        return (pairwise.decisions, blocks_decided) | "AllDecisions" >> beam.Flatten()
