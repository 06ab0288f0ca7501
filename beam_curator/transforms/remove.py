"""Rewrite shards: re-read each source tar and write the chosen samples' ORIGINAL bytes.

Decisions reach a shard by a join on the shard name (CoGroupByKey), so a worker only ever
holds the ids of the shard it is writing, never the whole removal set.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_curator.defaults import DEFAULT_MAX_MEMBER_BYTES
from beam_curator.schema import ShardSample, shard_of_id
from beam_curator.transforms.read import curated_file_name
from beam_curator.transforms.write import write_curated_shard
from beam_curator.webdataset import shard_samples


class RemoveCounts(NamedTuple):
    shard: str
    written: int
    listed: int            # removal ids naming this shard
    matched: int           # ... that are samples of it
    unmatched: Tuple[str, ...]   # a few of the others
    in_input: bool         # the shard is one of --input's


KEEP = "keep"       # the ids listed are the ones written (the one-graph `run`)
REMOVE = "remove"   # the ids listed are left out (the `remove` step, NeMo's removal ids)


class RewriteShardFn(beam.DoFn):
    """(shard, {'url': [url], 'ids': [...]}) -> (shard, samples written) after writing the tar.

    In REMOVE mode it yields RemoveCounts instead, with how many of the listed ids were
    found, so a removal list that matches nothing (ids in another form, e.g. NeMo's
    positional ones) is reported instead of passing silently.
    """

    def __init__(self, curated_dir: str, mode: str,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        assert mode in (KEEP, REMOVE)
        self._curated_dir = curated_dir
        self._mode = mode
        # The read step's limit: the rewrite must cut the shard into the same samples.
        self._max_member_bytes = max_member_bytes
        self.written = beam.metrics.Metrics.counter("curator", "curated_samples_written")
        self.unknown = beam.metrics.Metrics.counter("curator", "ids_of_unknown_shards")

    def _result(self, shard, written, ids, seen, in_input=True):
        if self._mode == KEEP:
            return shard, written
        unmatched = sorted(ids - seen)
        return RemoveCounts(shard, written, len(ids), len(ids) - len(unmatched),
                            tuple(unmatched[:5]), in_input)

    def process(self, element):
        shard, grouped = element
        urls, ids = list(grouped["url"]), set(grouped["ids"])
        if not urls:
            self.unknown.inc(len(ids))   # ids naming a shard that is not in --input
            if self._mode == REMOVE:
                yield self._result(shard, 0, ids, set(), in_input=False)
            return
        if self._mode == KEEP and not ids:
            yield shard, 0
            return
        seen = set()

        def chosen():
            for item in shard_samples(shard, urls[0], self._max_member_bytes):
                if not isinstance(item, ShardSample):
                    continue
                if item.id in ids:
                    seen.add(item.id)
                if item.error:
                    continue   # damaged samples are never curated
                if (item.id in ids) == (self._mode == KEEP):
                    yield item

        samples = chosen()
        first = next(samples, None)
        if first is None:
            for _ in samples:   # drain: the count of matched ids needs the whole shard
                pass
            yield self._result(shard, 0, ids, seen)   # nothing to write: no empty tar
            return
        path = FileSystems.join(self._curated_dir, curated_file_name(urls[0]))
        count = write_curated_shard(path, itertools.chain([first], samples))
        self.written.inc(count)
        yield self._result(shard, count, ids, seen)


class RewriteShards(beam.PTransform):
    """shards: (name, url); ids: (shard, id) -> (shard, count) after writing CURATED/<shard>.tar
    (or the source's `.tar.gz`/`.tgz` name, gzip; REMOVE mode: see RewriteShardFn for the
    extra counts)."""

    def __init__(self, curated_dir: str, mode: str,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        super().__init__()
        self._curated_dir = curated_dir
        self._mode = mode
        self._max_member_bytes = max_member_bytes

    def expand(self, pcolls):
        shards, ids = pcolls
        return ({"url": shards, "ids": ids}
                | "JoinIdsToShard" >> beam.CoGroupByKey()
                | "RewriteTar" >> beam.ParDo(RewriteShardFn(
                    self._curated_dir, self._mode, self._max_member_bytes)))


def _shard_and_id(item):
    """A SampleResult, a SampleInfo or an id string -> (shard, id)."""
    sample_id = item if isinstance(item, str) else item.id
    return shard_of_id(sample_id), sample_id


class WriteCuratedShards(beam.PTransform):
    """Samples to keep -> OUTPUT/curated/<shard>.tar with their ORIGINAL bytes and sidecars.

    Applied to the samples to keep: SampleResults with status kept (others are ignored),
    SampleInfos or ids. Each source tar is read again and its kept samples written in their
    original order, member names and bytes (image bytes never cross a shuffle: only ids do).
    A shard with nothing kept gets no tar; a `.tar.gz`/`.tgz` source gets a gzip one of the
    same name. Emits (shard, samples written).

    Args:
      output_dir: the output directory.
      shards: the (shard name, url) PCollection of `ReadWebDataset(...).shards`.
      max_member_bytes: the read step's limit (`ReadWebDataset`), so both cut shards alike.

    Example::

        read = p | ReadWebDataset("shards/*.tar")
        ...
        results | WriteCuratedShards("/tmp/out", shards=read.shards)
    """

    def __init__(self, output_dir: str, *, shards: beam.PCollection,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        super().__init__()
        self._output_dir = output_dir
        self._shards = shards
        self._max_member_bytes = max_member_bytes

    def expand(self, kept):
        from beam_curator import outputs
        from beam_curator.schema import KEPT

        ids = (kept
               | "OnlyKept" >> beam.Filter(lambda r: getattr(r, "status", KEPT) == KEPT)
               | "ByShard" >> beam.Map(_shard_and_id))
        return (self._shards, ids) | "Rewrite" >> RewriteShards(
            outputs.curated_dir(self._output_dir), KEEP, self._max_member_bytes)


class RemoveSamples(beam.PTransform):
    """Removal ids -> OUTPUT/curated/<shard>.tar holding every other sample (step 3).

    Applied to the ids to drop (strings `<shard>/<key>`, as NeMo Curator's removal-id files
    hold them). Emits RemoveCounts per shard: written, ids listed, ids that matched a sample.

    Args:
      output_dir: the output directory.
      shards: the (shard name, url) PCollection of `ReadWebDataset(...).shards`.
      max_member_bytes: a tar member larger than this is not read (its sample is not written).

    Example::

        read = p | ReadWebDataset("shards/*.tar")
        ids = p | beam.io.ReadFromParquet("dups/*.parquet", columns=["id"]) | beam.Map(
            lambda row: row["id"])
        ids | RemoveSamples("/tmp/out", shards=read.shards)
    """

    def __init__(self, output_dir: str, *, shards: beam.PCollection,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        super().__init__()
        self._output_dir = output_dir
        self._shards = shards
        self._max_member_bytes = max_member_bytes

    def expand(self, ids):
        from beam_curator import outputs

        keyed = ids | "ByShard" >> beam.Map(_shard_and_id)
        return (self._shards, keyed) | "Rewrite" >> RewriteShards(
            outputs.curated_dir(self._output_dir), REMOVE, self._max_member_bytes)


# ---- removal-id files: checked from their footers before any work ---------------------------

def removal_file_problem(path: str) -> Optional[str]:
    """Why `path` cannot be a removal-id file (a parquet file with a string `id` column), from
    its parquet footer alone; None when it can."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            schema = pq.ParquetFile(handle).schema_arrow
    except (pa.ArrowException, OSError) as exc:
        return f"{path} is not a readable parquet file ({exc})"
    if "id" not in schema.names:
        return (f"{path} has no `id` column (it has: {', '.join(schema.names) or 'none'}); "
                "removal ids are an `id` column of '<shard>/<key>' strings, as `dedup` "
                "writes them in OUTPUT/dedup/duplicates")
    kind = schema.field("id").type
    values = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(values) or pa.types.is_large_string(values)
            or pa.types.is_string_view(values)):
        return (f"{path}: its `id` column is {kind}, not strings. Ids are '<shard>/<key>' "
                "strings as `dedup` writes them; NeMo Curator's positional (integer) ids "
                "must first be mapped to those")
    return None


def with_null_ids(summary: dict, n_null: int) -> dict:
    """The remove summary, counting null ids: rows that name no sample and so remove none."""
    summary["removal_ids"]["null"] = n_null
    if n_null:
        summary["warnings"].append(
            f"{n_null:,} removal id(s) are null: they name no sample and removed nothing. "
            "A removal list with nulls is often the result of a join that did not match.")
    return summary
