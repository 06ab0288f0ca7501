"""Rewrite shards: re-read each source tar and write the chosen samples' ORIGINAL bytes.

Decisions reach a shard by a join on the shard name (CoGroupByKey), so a worker only ever
holds the ids of the shard it is writing, never the whole removal set.
"""
from __future__ import annotations

import itertools

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_curator.schema import ShardSample
from beam_curator.transforms.read import iter_shard
from beam_curator.transforms.write import write_curated_shard

KEEP = "keep"       # the ids listed are the ones written (the one-graph `run`)
REMOVE = "remove"   # the ids listed are left out (the `remove` step, NeMo's removal ids)


class RewriteShardFn(beam.DoFn):
    """(shard, {'url': [url], 'ids': [...]}) -> (shard, samples written) after writing the tar."""

    def __init__(self, curated_dir: str, mode: str):
        assert mode in (KEEP, REMOVE)
        self._curated_dir = curated_dir
        self._mode = mode
        self.written = beam.metrics.Metrics.counter("curator", "curated_samples_written")
        self.unknown = beam.metrics.Metrics.counter("curator", "ids_of_unknown_shards")

    def process(self, element):
        shard, grouped = element
        urls, ids = list(grouped["url"]), set(grouped["ids"])
        if not urls:
            self.unknown.inc(len(ids))   # ids naming a shard that is not in --input
            return
        if self._mode == KEEP and not ids:
            yield shard, 0
            return

        def chosen():
            for item in iter_shard(shard, urls[0]):
                if not isinstance(item, ShardSample) or item.error:
                    continue   # damaged samples and shard errors are never curated
                if (item.id in ids) == (self._mode == KEEP):
                    yield item

        samples = chosen()
        first = next(samples, None)
        if first is None:
            yield shard, 0   # nothing to write: no empty tar
            return
        path = FileSystems.join(self._curated_dir, f"{shard}.tar")
        count = write_curated_shard(path, itertools.chain([first], samples))
        self.written.inc(count)
        yield shard, count


class RewriteShards(beam.PTransform):
    """shards: (name, url); ids: (shard, id) -> (shard, count) after writing CURATED/<shard>.tar."""

    def __init__(self, curated_dir: str, mode: str):
        super().__init__()
        self._curated_dir = curated_dir
        self._mode = mode

    def expand(self, pcolls):
        shards, ids = pcolls
        return ({"url": shards, "ids": ids}
                | "JoinIdsToShard" >> beam.CoGroupByKey()
                | "RewriteTar" >> beam.ParDo(RewriteShardFn(self._curated_dir, self._mode)))
