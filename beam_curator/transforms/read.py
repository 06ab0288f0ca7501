"""Read webdataset shards: one tar per element, members streamed and grouped by `__key__`.

A shard that is truncated or not a tar at all never fails the job: the samples read before the
damage come out as usual, the sample cut in half becomes an error sample, and the shard-level
problem becomes an error record.
"""
from __future__ import annotations

import logging
import posixpath
import re
import tarfile
from typing import Iterator, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_curator.schema import IMAGE_EXTENSIONS, STAGE_READ, ErrorRecord, ShardSample, make_id

ERRORS = "errors"
_LOG = logging.getLogger(__name__)

# webdataset's rule: the key is the member path up to the first dot of its file name.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class ShardListError(ValueError):
    """--input matched nothing, or two shards share a name (ids would collide)."""


def shard_name(url: str) -> str:
    """`gs://b/x/00012.tar` -> `00012`: the first part of every id from that shard."""
    base = posixpath.basename(url.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def list_shards(pattern: str) -> List[Tuple[str, str]]:
    """Resolve --input (comma-separated globs) to sorted (shard name, url) pairs, failing fast."""
    urls = []
    for part in [p.strip() for p in pattern.split(",") if p.strip()]:
        result = FileSystems.match([part])[0]
        urls.extend(m.path for m in result.metadata_list)
    urls = sorted(set(urls))
    if not urls:
        raise ShardListError(
            f"--input {pattern!r} matches no file. Check the path and the glob (for example "
            "'data/shards/*.tar' or 'gs://bucket/shards/{00000..00099}.tar' written as a glob "
            "'gs://bucket/shards/000*.tar').")
    by_name = {}
    for url in urls:
        by_name.setdefault(shard_name(url), []).append(url)
    clashes = {n: u for n, u in by_name.items() if len(u) > 1}
    if clashes:
        name, clash = next(iter(clashes.items()))
        raise ShardListError(
            f"{len(clashes)} shard name(s) are not unique, e.g. {name!r}: {clash}. Ids are "
            "'<shard name>/<key>', so shard file names must be unique: narrow --input or "
            "rename the shards.")
    return [(shard_name(u), u) for u in urls]


def split_member_name(name: str) -> Optional[Tuple[str, str]]:
    """`a/b/0001.seg.png` -> (`a/b/0001`, `seg.png`); None when the name has no extension.

    The extension keeps its case so that curated shards reproduce the member names exactly.
    """
    match = _KEY_SUFFIX.match(name)
    if not match:
        return None
    return match.group(1), match.group(2)


def unsafe_member_reason(name: str) -> Optional[str]:
    """Absolute paths and `..` are never trusted: curated shards must be safe to extract."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return f"tar member {name!r} has an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return f"tar member {name!r} climbs out of its directory with '..'"
    return None


def _build_sample(shard: str, url: str, key: str, members: List[Tuple[str, bytes]],
                  seen_keys: set, error: Optional[str] = None) -> ShardSample:
    """Turn one key's members into a sample; the first image extension wins, the rest are sidecars."""
    sample_id = make_id(shard, key)
    if key in seen_keys:
        # A key that comes back later in the same shard would make two samples with one id.
        n = 2
        while f"{sample_id}#{n}" in seen_keys:
            n += 1
        seen_keys.add(f"{sample_id}#{n}")
        sample_id = f"{sample_id}#{n}"
        error = error or f"key {key!r} appears again later in shard {shard!r} (duplicate key)"
    seen_keys.add(key)
    fields = {}
    for ext, data in members:
        if ext in fields:
            error = error or f"member {key}.{ext} appears twice in one sample"
            continue
        fields[ext] = data
    by_lower = {e.lower(): e for e in fields}
    image_ext = next((by_lower[e] for e in IMAGE_EXTENSIONS if e in by_lower), None)
    image_bytes = fields.pop(image_ext) if image_ext else None
    if image_ext is None and error is None:
        found = ", ".join(sorted(fields)) or "nothing"
        error = f"sample has no image member (.jpg/.jpeg/.png/.webp); found: {found}"
    return ShardSample(id=sample_id, shard=shard, shard_url=url, key=key, image_ext=image_ext,
                       image_bytes=image_bytes, sidecars=fields, error=error)


def iter_shard(shard: str, url: str) -> Iterator[object]:
    """Yield ShardSample for every key in the tar and ErrorRecord for shard-level damage."""
    seen_keys: set = set()
    key, members = None, []
    try:
        with FileSystems.open(url, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue   # directories, links, devices: never data
                    unsafe = unsafe_member_reason(info.name)
                    parts = split_member_name(info.name)
                    if unsafe or parts is None:
                        yield ErrorRecord(shard=shard, stage=STAGE_READ, member=info.name,
                                          reason=unsafe or f"tar member {info.name!r} has no "
                                          "extension, so it belongs to no sample")
                        continue
                    member_key, ext = parts
                    if member_key != key and key is not None:
                        yield _build_sample(shard, url, key, members, seen_keys)
                        members = []
                    key = member_key
                    handle = tar.extractfile(info)
                    members.append((ext, handle.read() if handle else b""))
        if key is not None:
            yield _build_sample(shard, url, key, members, seen_keys)
        elif not seen_keys:
            yield ErrorRecord(shard=shard, stage=STAGE_READ, reason="shard holds no samples")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        reason = _describe_tar_error(exc, url)
        if key is not None:
            # The sample being read when the damage hit is incomplete: an error, never a guess.
            yield _build_sample(shard, url, key, members, seen_keys,
                                error=f"shard damaged while reading this sample: {reason}")
        yield ErrorRecord(shard=shard, stage=STAGE_READ, reason=reason)


def _describe_tar_error(exc: Exception, url: str) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, tarfile.ReadError) and "empty" in text.lower():
        return f"{url} is empty (no tar data)"
    if isinstance(exc, tarfile.ReadError):
        return f"{url} is not a readable tar archive ({text})"
    if isinstance(exc, (EOFError, tarfile.StreamError)):
        return f"{url} is truncated ({text})"
    return f"{url} could not be read: {type(exc).__name__}: {text}"


class ReadShardFn(beam.DoFn):
    """(shard name, url) -> samples; ErrorRecords to the `errors` output."""

    def __init__(self):
        self.samples_read = beam.metrics.Metrics.counter("curator", "samples_read")
        self.shards_read = beam.metrics.Metrics.counter("curator", "shards_read")
        self.shard_errors = beam.metrics.Metrics.counter("curator", "shard_errors")

    def process(self, shard_and_url):
        shard, url = shard_and_url
        for item in iter_shard(shard, url):
            if isinstance(item, ErrorRecord):
                self.shard_errors.inc()
                _LOG.warning("shard %s: %s", shard, item.reason)
                yield beam.pvalue.TaggedOutput(ERRORS, item)
            else:
                self.samples_read.inc()
                yield item
        self.shards_read.inc()


class ReadShardSamples(beam.PTransform):
    """PCollection of (shard name, url) -> samples, with shard-level errors tagged `errors`."""

    def expand(self, shards):
        return (shards
                | "OneShardPerWorkItem" >> beam.Reshuffle()
                | "ReadTar" >> beam.ParDo(ReadShardFn()).with_outputs(ERRORS, main="samples"))
