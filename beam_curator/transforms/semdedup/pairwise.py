"""Stage 6, pairwise: inside each key, every member against every earlier-ranked member of
its cluster (SemDeDup's keep rule, `dedup.ranking` and `dedup.pairwise`).

A `BinKey` holds whole clusters: each is ranked and compared in one pass. A `BlockPairKey`
holds two blocks of a cut cluster: it emits a `BlockPartial` per block (each member's best
earlier member seen there), and the partials of one `BlockKey` are combined (order-free:
`blocks.merge_partials`) into that block's answer, exactly what one pass would give.

With --reference, the reference rows routed to a key (`Part.reference`) are compared with its
candidates too (`dedup.reference.best_reference`: every reference row counts as earlier), in
the same bins and block pairs, so a candidate meets every reference row of its cluster once;
with --reference_exact, every candidate meets every reference row instead (`ReferenceSet`,
loaded once per worker), on the diagonal of its block.

    (key, [(block, Members)]) -> PairwiseFn -> (file, Decisions)            bins
                                            -> (BlockKey, BlockPartial)     block pairs
                                               -> CombinePerKey -> (file, Decisions)
"""
from __future__ import annotations

from typing import Optional

import apache_beam as beam
import numpy as np

from beam_curator.dedup import blocks
from beam_curator.dedup.pairwise import is_duplicate, max_sim_to_earlier
from beam_curator.dedup.ranking import rank_order, rank_primary
from beam_curator.dedup.reference import NO_MATCH, best_reference, sorted_by_id
from beam_curator.transforms.semdedup.config import DedupConfig
from beam_curator.transforms.semdedup.records import (
    BinKey,
    BlockKey,
    BlockPartial,
    Decisions,
    Members,
    ReferenceMatches,
    cluster_file,
    pairwise_key,
    wire_key,
    without_vectors,
)
from beam_curator.transforms.semdedup.vectors import VectorStore


def decide(cluster: int, members: Members, max_sim: np.ndarray, has_earlier: np.ndarray,
           max_ids, eps: float, reference: Optional[ReferenceMatches] = None,
           reference_eps: Optional[float] = None) -> Decisions:
    """SemDeDup's rule on each member's best earlier-ranked similarity. The first-ranked
    (nothing earlier): its own id and 0.0, as NeMo writes. With `reference`, a member whose
    best reference similarity is >= 1 - reference_eps is a reference duplicate too."""
    sims = np.where(has_earlier, max_sim, np.float32(0.0)).astype(np.float32)
    dup = is_duplicate(sims, eps) & has_earlier
    max_ids = tuple(m if h else own for own, m, h in zip(members.ids, max_ids,
                                                         has_earlier.tolist()))
    ref_dup = None
    if reference is not None:
        ref_dup = is_duplicate(reference.sim, reference_eps) & (reference.sim > NO_MATCH)
    return Decisions(cluster, without_vectors(members), max_ids, sims, dup, reference, ref_dup)


class ReferenceSet:
    """--reference_exact: every reference row, loaded once per worker from its files (the
    reference is small by contract: an evaluation set; `check_reference_exact` bounds it)."""

    def __init__(self, files, config: DedupConfig):
        self._files, self._config = tuple(files), config
        self._loaded = None

    def rows(self, dim: int):
        """(ids, float32 (n, dim) unit vectors) of its valid rows, sorted by id once here
        (`dedup.reference.sorted_by_id`), not again for every key compared with them."""
        if self._loaded is None:
            ids, parts = [], []
            for file in self._files:
                for chunk in file.chunks(dim, self._config):
                    decoded = chunk.decode(self._config)
                    valid = np.flatnonzero(decoded.reasons == 0)
                    ids += [decoded.ids[r] for r in valid.tolist()]
                    parts.append(decoded.vectors[valid])
            vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
            vectors, sorted_ids = sorted_by_id(vectors, ids)
            self._loaded = (sorted_ids, vectors)
        return self._loaded


class PairwiseFn(beam.DoFn):
    """One key's Parts -> (file, Decisions) per cluster of a bin; for a block pair, a
    (BlockKey, BlockPartial) per block to the PARTIALS output."""

    PARTIALS = "partials"

    def __init__(self, config: DedupConfig, store: VectorStore,
                 reference_set: Optional[ReferenceSet] = None):
        self._config = config
        self._store = store
        self._reference_set = reference_set
        self.key_rows = beam.metrics.Metrics.distribution("curator", "dedup_rows_per_key")
        self.similarities = beam.metrics.Metrics.counter("curator",
                                                         "dedup_pairwise_similarities")

    def process(self, element):
        key, parts = element
        key = pairwise_key(key)
        candidates = [p for p in parts if not p.reference]
        references = [p for p in parts if p.reference]
        if not candidates:
            pass   # only reference rows here: nothing to answer for
        elif isinstance(key, BinKey):
            yield from self._whole_clusters(candidates, references)
        else:
            yield from self._block_pair(key, candidates, references)

    def _ranked(self, cluster: int, members: Members):
        """(members in rank order, their vectors, their primary rank keys)."""
        primary = rank_primary(members.ids, members.cos_dist, self._config.which_to_keep,
                               self._config.kmeans_seed, cluster)
        order = rank_order(members.ids, primary)
        ranked = members.take(order)
        return ranked, self._store.read(ranked), primary[order]

    def _best_reference(self, vectors: np.ndarray, references: Optional[Members]
                        ) -> Optional[ReferenceMatches]:
        """The members' best reference rows: among `references` (the same cluster or
        block), or with --reference_exact among all of them; None without --reference."""
        presorted = self._reference_set is not None
        if presorted:
            ids, reference_vectors = self._reference_set.rows(vectors.shape[1])
        elif references is not None:
            ids, reference_vectors = references.ids, self._store.read(references)
        else:
            return None
        self.similarities.inc(len(vectors) * len(ids))
        return ReferenceMatches(*best_reference(vectors, reference_vectors, ids,
                                                device=self._config.device,
                                                presorted=presorted))

    def _whole_clusters(self, candidates, references):
        """A bin: each of its clusters in one pass, as `max_sim_to_earlier` defines it."""
        config = self._config
        members = self._store.with_vectors(Members.concat([p.members for p in candidates]))
        by_cluster = {}
        if references:
            refs = self._store.with_vectors(Members.concat([p.members for p in references]))
            by_cluster = dict(refs.by_cluster())
        self.key_rows.update(len(members) + sum(len(m) for m in by_cluster.values()))
        with_reference = bool(references) or self._reference_set is not None
        for cluster, group in members.by_cluster():
            ranked, vectors, _ = self._ranked(cluster, group)
            self.similarities.inc(len(ranked) * (len(ranked) - 1) // 2)
            max_sim, argmax = max_sim_to_earlier(vectors, device=config.device)
            max_ids = [ranked.ids[a] if a >= 0 else None for a in argmax.tolist()]
            reference = None
            if with_reference:
                reference = self._best_reference(vectors, by_cluster.get(cluster)) or \
                    ReferenceMatches(np.full(len(ranked), NO_MATCH, np.float32),
                                     np.full(len(ranked), "", dtype=object))
            yield cluster_file(cluster), decide(cluster, ranked, max_sim, argmax >= 0, max_ids,
                                                config.eps, reference,
                                                config.reference_threshold_eps)

    def _block_pair(self, key, candidates, references):
        ranked = {b: self._ranked(key.cluster, Members.concat(ms))
                  for b, ms in _by_block(candidates).items()}
        refs = {b: Members.concat(ms) for b, ms in _by_block(references).items()}
        sizes = [len(r[0]) for r in ranked.values()]
        self.key_rows.update(sum(sizes) + sum(len(m) for m in refs.values()))
        device = self._config.device
        exact = self._reference_set is not None
        if key.lo == key.hi:
            self.similarities.inc(sizes[0] * (sizes[0] - 1) // 2)
            members, vectors, primary = ranked[key.lo]
            sim, source_primary, source_id = blocks.diagonal_partial(
                vectors, members.ids, primary, device=device)
            reference = self._best_reference(vectors, refs.get(key.lo)) if (
                exact or key.lo in refs) else None
            yield beam.pvalue.TaggedOutput(self.PARTIALS, (
                wire_key(BlockKey(key.cluster, key.n_blocks, key.lo)),
                BlockPartial(without_vectors(members), sim, source_primary, source_id,
                             reference)))
            return
        if len(sizes) == 2:   # similarities computed: n_a x n_b between two blocks
            self.similarities.inc(sizes[0] * sizes[1])
        for target, source in ((key.hi, key.lo), (key.lo, key.hi)):
            if target not in ranked:
                continue   # no candidates in the target block: nothing to answer
            t_members, t_vectors, t_primary = ranked[target]
            reference = None if exact else (
                self._best_reference(t_vectors, refs[source]) if source in refs else None)
            if source in ranked:
                s_members, s_vectors, s_primary = ranked[source]
                sim, source_primary, source_id = blocks.cross_partial(
                    t_vectors, t_primary, t_members.ids, s_vectors, s_primary, s_members.ids,
                    device=device)
            elif reference is not None:   # only reference rows there: no earlier member
                sim = np.full(len(t_members), NO_MATCH, np.float32)
                source_primary, source_id = t_primary, np.asarray(t_members.ids, dtype=object)
            else:
                continue   # an empty block: nothing to compare
            yield beam.pvalue.TaggedOutput(self.PARTIALS, (
                wire_key(BlockKey(key.cluster, key.n_blocks, target)),
                BlockPartial(None, sim, source_primary, source_id, reference)))


def _by_block(parts):
    by_block = {}
    for part in parts:
        by_block.setdefault(part.block, []).append(part.members)
    return by_block


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


def _block_decisions(element, config: DedupConfig, with_reference: bool):
    wire, partial = element
    key = BlockKey(*wire)
    has = partial.sim > -np.inf
    reference = partial.reference
    if with_reference and reference is None:   # no reference row met in any block pair
        n = len(partial.members)
        reference = ReferenceMatches(np.full(n, NO_MATCH, np.float32),
                                     np.full(n, "", dtype=object))
    return cluster_file(key.cluster, key.n_blocks, key.block), decide(
        key.cluster, partial.members, partial.sim, has, list(partial.source_id), config.eps,
        reference, config.reference_threshold_eps)


class Pairwise(beam.PTransform):
    """The pairwise GroupByKey's groups -> (file, Decisions) per cluster or block.
    `with_reference`: a --reference is compared (every Decisions then has `reference`);
    `reference_set`: with --reference_exact, all of it, on every worker."""

    def __init__(self, config: DedupConfig, store: VectorStore, with_reference: bool = False,
                 reference_set: Optional[ReferenceSet] = None):
        super().__init__()
        self._config, self._store = config, store
        self._with_reference, self._reference_set = with_reference, reference_set

    def expand(self, groups):
        pairwise = groups | "Pairwise" >> beam.ParDo(
            PairwiseFn(self._config, self._store, self._reference_set)).with_outputs(
                PairwiseFn.PARTIALS, main="decisions")
        blocks_decided = (pairwise[PairwiseFn.PARTIALS]
                          | "CombinePartials" >> beam.CombinePerKey(CombineBlockPartialsFn())
                          | "BlockDecisions" >> beam.Map(_block_decisions, self._config,
                                                         self._with_reference))
        return (pairwise.decisions, blocks_decided) | "AllDecisions" >> beam.Flatten()
