"""Stage 2, exact copies: identical image bytes (same `content_hash`) -> the smallest id
survives; the copies leave the semantic pass and get their own rows in dedup/.

    Chunk -> (hash, (id, chunk)) -> GroupByKey(hash) -> ExactDuplicate
          -> joined to the chunk they were read from, by its name (never a broadcast)
          -> pairwise_results/exact-<chunk>.parquet, duplicates/exact-<chunk>.parquet
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from beam_curator.schema import DUPLICATES_SCHEMA, PAIRWISE_SCHEMA
from beam_curator.transforms.semdedup.config import DedupConfig
from beam_curator.transforms.semdedup.records import ExactDuplicate
from beam_curator.transforms.semdedup.sources import Chunk
from beam_curator.transforms.write import write_parquet


class HashPairsFn(beam.DoFn):
    """Chunk -> (content hash, (id, chunk name)) of its candidate rows (no vectors read)."""

    def __init__(self, config: DedupConfig):
        self._config = config

    def process(self, chunk: Chunk):
        for id_, digest in chunk.ids(self._config, with_hash=True):
            yield (digest or id_), (id_, chunk.name)


def _exact_duplicates(element):
    """(hash, [(id, chunk)]) -> ExactDuplicate for all but the smallest id."""
    _, members = element
    members = sorted(members)
    survivor = members[0][0]
    if len(members) > 1:   # the live progress line shows it (progress.FIELDS)
        beam.metrics.Metrics.counter("curator", "exact_duplicates").inc(len(members) - 1)
    for dup_id, chunk in members[1:]:
        yield ExactDuplicate(dup_id, survivor, chunk)


def _with_exclusions(element) -> Chunk:
    _, grouped = element
    (chunk,) = grouped["chunk"]
    return dataclasses.replace(chunk, excluded=frozenset(grouped["excluded"]))


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


class ExactOutputs(NamedTuple):
    chunks: beam.PCollection      # Chunk with `excluded` set: the semantic candidates
    exact: beam.PCollection       # ExactDuplicate
    written: beam.PCollection     # paths of the exact copies' files


class ExactCopies(beam.PTransform):
    """Chunk -> ExactOutputs. `has_hash` False (no content_hash column): no copies."""

    def __init__(self, config: DedupConfig, has_hash: bool):
        super().__init__()
        self._config, self._has_hash = config, has_hash

    def expand(self, chunks):
        if self._has_hash:
            exact = (chunks
                     | "HashPairs" >> beam.ParDo(HashPairsFn(self._config))
                     | "GroupByHash" >> beam.GroupByKey()
                     | "ExactDuplicates" >> beam.FlatMap(_exact_duplicates))
        else:
            exact = chunks.pipeline | "NoHashes" >> beam.Create([])
        chunks = ({"chunk": chunks | "ByName" >> beam.Map(lambda c: (c.name, c)),
                   "excluded": exact | "CopyByChunk" >> beam.Map(lambda e: (e.chunk, e.id))}
                  | "JoinCopiesToChunks" >> beam.CoGroupByKey()
                  | "WithExclusions" >> beam.Map(_with_exclusions))
        written = (exact
                   | "ExactByChunk" >> beam.Map(lambda e: (e.chunk, e))
                   | "GroupExactByChunk" >> beam.GroupByKey()
                   | "WriteExact" >> beam.FlatMap(write_exact_outputs, self._config.dedup_dir))
        return ExactOutputs(chunks=chunks, exact=exact, written=written)
