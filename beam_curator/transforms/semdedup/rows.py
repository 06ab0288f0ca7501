"""Stage 1, the rows: each chunk decoded once and checked; with `check_ids`, an id read twice
fails the run before any other work.

    Chunk -> CheckRowsFn -> Chunk (`dropped` set) + InvalidRow + a tally per chunk
          -> RowTally (one global combine: valid rows, normalised rows, invalid summary)
          -> (check_ids) IdBucketsFn -> GroupByKey(hash bucket) -> repeats -> refuse
"""
from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Dict, List, NamedTuple, Tuple

import apache_beam as beam
import numpy as np

from beam_curator.errors import OptionError
from beam_curator.transforms.semdedup.config import DedupConfig
from beam_curator.transforms.semdedup.sources import Chunk, InvalidRow
from beam_curator.transforms.semdedup.vectors import VectorStore
from beam_curator.transforms.write_behind import WriteBehindDoFn

_LOG = logging.getLogger(__name__)


class CheckRowsFn(WriteBehindDoFn):
    """Chunk -> the chunk with its invalid rows `dropped`; each InvalidRow to INVALID, and
    to TALLY one (valid rows, rows normalised, InvalidSummary accumulator of its invalid
    rows) for RowTally. The first step that reads the vectors: it tells the vector store,
    which may keep them (written behind)."""

    INVALID, TALLY = "invalid", "tally"

    def __init__(self, config: DedupConfig, store: VectorStore):
        self._config = config
        self._store = store
        self._invalid = InvalidSummary()

    def process(self, chunk: Chunk):
        decoded = chunk.decode(self._config)
        invalid = self._invalid.create_accumulator()
        for row in decoded.invalid_rows():
            invalid = self._invalid.add_input(invalid, row)
            yield beam.pvalue.TaggedOutput(self.INVALID, row)
        chunk = dataclasses.replace(
            chunk, dropped=tuple(np.flatnonzero(decoded.reasons).tolist()))
        yield beam.pvalue.TaggedOutput(
            self.TALLY, (len(decoded.ids) - len(chunk.dropped), decoded.normalized, invalid))
        self._store.checked(chunk, decoded, self._writes.submit)
        yield chunk


class InvalidSummary(beam.CombineFn):
    """InvalidRow -> {count, by reason, up to MAX_EXAMPLES examples (the first by file and
    row)}: what summary.json says about the rows dedup could not use."""

    MAX_EXAMPLES = 20

    def create_accumulator(self):
        return {}, []

    def add_input(self, acc, row: InvalidRow):
        counts, examples = acc
        counts[row.reason] = counts.get(row.reason, 0) + 1
        return counts, self._first(examples + [row])

    def merge_accumulators(self, accs):
        counts, examples = {}, []
        for part_counts, part_examples in accs:
            for reason, n in part_counts.items():
                counts[reason] = counts.get(reason, 0) + n
            examples = self._first(examples + part_examples)
        return counts, examples

    def _first(self, rows):
        return sorted(rows, key=lambda r: (r.file, r.row))[:self.MAX_EXAMPLES]

    def extract_output(self, acc):
        counts, examples = acc
        return {"count": sum(counts.values()), "by_reason": dict(sorted(counts.items())),
                "examples": [r._asdict() for r in examples]}


class RowTally(beam.CombineFn):
    """CheckRowsFn's tallies -> (valid rows, rows normalised, InvalidSummary's dict): the
    three counts of the row check in one global combine (on Flink each global combine is
    a few more stages with a task per slot each, issue 30)."""

    def __init__(self):
        self._invalid = InvalidSummary()

    def create_accumulator(self):
        return 0, 0, self._invalid.create_accumulator()

    def add_input(self, acc, tally):
        return self.merge_accumulators([acc, tally])

    def merge_accumulators(self, accs):
        accs = list(accs)
        return (sum(a[0] for a in accs), sum(a[1] for a in accs),
                self._invalid.merge_accumulators([a[2] for a in accs]))

    def extract_output(self, acc):
        return acc[0], acc[1], self._invalid.extract_output(acc[2])


def input_checks(invalid: dict, normalized: int) -> dict:
    """summary.json's word on the input rows (and the log's, where some were not fine)."""
    if invalid["count"]:
        first = invalid["examples"][0]
        _LOG.warning("dedup: %d embedding row(s) left out (%s), e.g. %s row %d (id %r): "
                     "see summary.json dedup.input_checks", invalid["count"],
                     ", ".join(f"{n} {reason}" for reason, n in invalid["by_reason"].items()),
                     first["file"], first["row"], first["id"])
    if normalized:
        _LOG.warning("dedup: %d embedding(s) were not unit length and were normalised (cosine "
                     "similarity assumes unit vectors)", normalized)
    return {"invalid_rows": invalid, "normalized_rows": normalized}


# The repeated-id check groups ids by a hash bucket, packed per (chunk, bucket): elements
# and keys grow with chunks x buckets, not with ids, and one key holds about this many ids.

IDS_PER_BUCKET = 500_000


def id_buckets(n_ids: int) -> int:
    return max(1, -(-n_ids // IDS_PER_BUCKET))


class IdBucketsFn(beam.DoFn):
    """Chunk -> (bucket, (file, ids, rows in the file)) for each hash bucket its candidate
    ids fall in: where each id was read, packed."""

    def __init__(self, config: DedupConfig):
        self._config = config

    def process(self, chunk: Chunk, n_ids: int):
        buckets = id_buckets(n_ids)
        file = chunk.file
        packs: Dict[int, Tuple[List[str], List[int]]] = {}
        for id_, (_, row) in chunk.places(self._config):
            bucket = zlib.crc32(id_.encode("utf-8")) % buckets
            ids, rows = packs.setdefault(bucket, ([], []))
            ids.append(id_)
            rows.append(row)
        for bucket, (ids, rows) in packs.items():
            yield bucket, (file, ids, rows)


def repeats_in_bucket(bucket_and_packs):
    """(bucket, packs) -> (id, (times seen, its first two places)) for each id of the bucket
    read more than once."""
    _, packs = bucket_and_packs
    first: Dict[str, Tuple[str, int]] = {}
    again: Dict[str, list] = {}
    for file, ids, rows in packs:
        for id_, row in zip(ids, rows):
            if id_ in first:
                again.setdefault(id_, [first[id_]]).append((file, row))
            else:
                first[id_] = (file, row)
    for id_, places in sorted(again.items()):
        places = sorted(places)
        yield id_, (len(places), tuple(places[:2]))


class RepeatsFn(beam.CombineFn):
    """(id, (times, places)) of repeated ids -> (how many ids, the first MAX_SHOWN)."""

    MAX_SHOWN = 3

    def create_accumulator(self):
        return 0, []

    def add_input(self, acc, repeat):
        return acc[0] + 1, sorted(acc[1] + [repeat])[:self.MAX_SHOWN]

    def merge_accumulators(self, accs):
        n, shown = 0, []
        for part_n, part_shown in accs:
            n, shown = n + part_n, sorted(shown + part_shown)[:self.MAX_SHOWN]
        return n, shown

    def extract_output(self, acc):
        return acc


def refuse_repeated_ids(repeats) -> int:
    """Fails the run when an id was read twice: one id must have one answer, and a row
    compared with its own copy would be its own duplicate. Returns 0 (nothing repeated)."""
    n, shown = repeats
    if not n:
        return 0
    id_, (times, ((file_a, row_a), (file_b, row_b))) = shown[0]
    raise OptionError(
        f"{n} id(s) appear more than once in --embeddings, e.g. {id_!r} ({times} times) at "
        f"{file_a} row {row_a} and at {file_b} row {row_b}: each sample needs one embedding. "
        "Leave out the copies (the same file under two names is read once), or give the "
        "rows distinct ids.")


class CheckedRows(NamedTuple):
    chunks: beam.PCollection      # Chunk, `dropped` set (and, with check_ids, ids unique)
    invalid: beam.PCollection     # InvalidRow: left out, counted
    input_checks: beam.PCollection  # one dict for summary.json (input_checks())
    rows: beam.PCollection        # one int: the valid rows


class CheckRows(beam.PTransform):
    """Chunk -> CheckedRows. `check_ids`: refuse an id read twice (a keyed pass over every
    id, by hash bucket); off where ids are unique by construction (`run`: shard / key)."""

    def __init__(self, config: DedupConfig, store: VectorStore, check_ids: bool):
        super().__init__()
        self._config, self._store, self._check_ids = config, store, check_ids

    def expand(self, chunks):
        config = self._config
        checked = chunks | "CheckRows" >> beam.ParDo(CheckRowsFn(config, self._store)).with_outputs(
            CheckRowsFn.INVALID, CheckRowsFn.TALLY, main="chunks")
        chunks = checked.chunks
        tally = checked[CheckRowsFn.TALLY] | "TallyRows" >> beam.CombineGlobally(RowTally())
        n_rows = tally | "CountValidRows" >> beam.Map(lambda t: t[0])
        if self._check_ids:
            repeats = (chunks
                       | "IdBuckets" >> beam.ParDo(IdBucketsFn(config),
                                                   beam.pvalue.AsSingleton(n_rows))
                       | "GroupByIdBucket" >> beam.GroupByKey()
                       | "RepeatedIds" >> beam.FlatMap(repeats_in_bucket)
                       # no default stage (issue 30): no repeats reads as the side input's 0
                       | "CountRepeats" >> beam.CombineGlobally(RepeatsFn()).without_defaults()
                       | "RefuseRepeatedIds" >> beam.Map(refuse_repeated_ids))
            # Every later step waits for the check: a failed one costs no k-means.
            chunks = chunks | "AfterIdCheck" >> beam.Map(
                lambda c, _: c, beam.pvalue.AsSingleton(repeats, default_value=0))
        summary = tally | "InputChecks" >> beam.Map(lambda t: input_checks(t[2], t[1]))
        return CheckedRows(chunks=chunks, invalid=checked[CheckRowsFn.INVALID],
                           input_checks=summary, rows=n_rows)
