"""Read webdataset shards in Beam: --input resolved to shards, one tar per work item.

What a tar becomes (samples, damage, member names, grouping by key) is
`beam_curator.webdataset`; this module lists the shards and wraps the reader in a DoFn.
"""
from __future__ import annotations

import logging
import os
import posixpath
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_curator.defaults import DEFAULT_MAX_MEMBER_BYTES
from beam_curator.errors import ShardListError
from beam_curator.schema import ErrorRecord, ShardSample
from beam_curator.webdataset import shard_samples

ERRORS = "errors"
_LOG = logging.getLogger(__name__)


# What a shard's file name ends with; `--input DIR` reads all three. Compression is read from
# the bytes (tarfile's `r|*`); the name says what the curated shard is written as.
SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")
GZIP_SUFFIXES = (".tar.gz", ".tgz")


def shard_name(url: str) -> str:
    """`gs://b/x/00012.tar` -> `00012`: the first part of every id from that shard."""
    base = posixpath.basename(url.rstrip("/"))
    for suffix in SHARD_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def curated_file_name(url: str) -> str:
    """The curated shard keeps its source's file name, and so its compression: `000.tgz` ->
    `000.tgz` (gzip). Any other name -> `<shard name>.tar`."""
    base = posixpath.basename(url.rstrip("/"))
    if base.endswith(SHARD_SUFFIXES):
        return base
    return f"{shard_name(url)}.tar"


def split_globs(pattern: str) -> List[str]:
    """An option holding comma-separated globs -> the globs."""
    return [part.strip() for part in pattern.split(",") if part.strip()]


Globs = Union[str, Sequence[str], None]


def matched_sizes(pattern: str, directory_glob: Globs = None) -> Dict[str, int]:
    """Comma-separated globs -> {path: size in bytes} of the files they match, each once
    (globs may overlap); the sizes come with the listing, at no extra request.

    With `directory_glob` (e.g. "*.tar", or several), a part that names a directory stands
    for the files of that directory matching it (`--input DIR` = `--input 'DIR/*.tar'`).
    """
    found = {}
    for part in split_globs(pattern):
        parts = [part]
        if directory_glob and is_directory(part):
            globs = [directory_glob] if isinstance(directory_glob, str) else directory_glob
            parts = [FileSystems.join(part, glob) for glob in globs]
            _LOG.info("%s is a directory: reading %s", part, ", ".join(parts))
        for glob in parts:
            found.update((m.path, m.size_in_bytes)
                         for m in FileSystems.match([glob])[0].metadata_list)
    return found


def match_globs(pattern: str, directory_glob: Globs = None) -> List[str]:
    """Comma-separated globs -> the sorted paths they match (see `matched_sizes`)."""
    return sorted(matched_sizes(pattern, directory_glob))


def is_directory(path: str) -> bool:
    """A local directory, or (object stores have none) a prefix with files under it."""
    if any(c in path for c in "*?["):
        return False
    local = path[7:] if path.startswith("file://") else path
    if "://" not in local:
        return os.path.isdir(local)
    try:
        if FileSystems.match([path])[0].metadata_list:
            return False   # an object of that name
    except Exception:   # noqa: BLE001 - no object of that name
        pass
    return bool(FileSystems.match([path.rstrip("/") + "/*"])[0].metadata_list)


def shard_sizes(pattern: str, shards: List[Tuple[str, str]]) -> List[int]:
    """Bytes of each of `list_shards(pattern)`'s shards, from one listing per glob (no
    request per shard: 100,000 of them on gs:// would be minutes of stat calls)."""
    listed = matched_sizes(pattern, directory_glob=tuple("*" + s for s in SHARD_SUFFIXES))
    missing = [url for _, url in shards if url not in listed]
    if missing:   # spelled differently from the listing (list_shards keeps one spelling)
        listed.update((m.path, m.size_in_bytes) for r in FileSystems.match(missing)
                      for m in r.metadata_list)
    return [listed[url] for _, url in shards]


# Files that sit beside shards (img2dataset writes <shard>.parquet and <shard>_stats.json) and
# are clearly not tars: skipped when a glob matches them, with one warning.
NOT_TAR_SUFFIXES = (".parquet", ".json", ".jsonl", ".txt", ".csv", ".tsv", ".md", ".html",
                    ".npy", ".npz", ".log", ".yaml", ".yml", ".py", ".sh", ".arrow", ".idx",
                    ".index", ".lock", ".jpg", ".jpeg", ".png", ".webp")


def list_shards(pattern: str, output: Optional[str] = None) -> List[Tuple[str, str]]:
    """Resolve --input (comma-separated globs) to sorted (shard name, url) pairs, failing fast.

    Files this project writes beside its outputs (summary.json, report.html, the run lock)
    are never input, whatever the glob: `--input 'DIR/*'` next to an output in DIR reads the
    shards only. With `output`, matches inside the paths a run into it writes (its own
    curated/ of an earlier run, say, under `--input 'X/**.tar' --output X/out`) are skipped
    too, unless they are all the glob matched: then the claim refuses them by name.
    """
    from beam_curator.atomic import TMP_PREFIX
    from beam_curator.outputs import OWN_FILE_NAMES

    matched = _one_spelling_per_file(
        match_globs(pattern, directory_glob=tuple("*" + s for s in SHARD_SUFFIXES)))
    own = [u for u in matched if posixpath.basename(u) in OWN_FILE_NAMES
           or posixpath.basename(u).startswith(TMP_PREFIX)]
    if own:
        _LOG.warning("--input: skipped %d file(s) that beam-curator writes itself, never "
                     "shards (e.g. %s)", len(own), own[0])
    others = [u for u in matched if u not in set(own)
              and posixpath.basename(u).lower().endswith(NOT_TAR_SUFFIXES)]
    if others:
        _LOG.warning("--input: skipped %d file(s) that are not tar shards (e.g. %s; "
                     "img2dataset writes .parquet and _stats.json beside its shards). Use a "
                     "glob such as 'DIR/*.tar' to say exactly which files are shards.",
                     len(others), others[0])
    skipped = set(own) | set(others)
    urls = [u for u in matched if u not in skipped]
    if output:
        urls = _without_own_outputs(urls, output)
    if not urls:
        besides = ""
        if skipped:
            besides = (" that could be a shard (it matched only "
                       f"{', '.join(sorted(skipped)[:3])}: not tars, or beam-curator's own "
                       "files)")
        raise ShardListError(
            f"--input {pattern!r} matches no file{besides}. Check the path and the glob (for "
            "example 'data/shards/*.tar', or a directory of .tar/.tar.gz/.tgz shards; "
            "'gs://bucket/shards/{00000..00099}.tar' written as a glob "
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


def _without_own_outputs(urls: List[str], output: str) -> List[str]:
    from beam_curator.ownership import inside_owned_paths

    theirs = [u for u in urls if inside_owned_paths(u, output)]
    if not theirs or len(theirs) == len(urls):
        return urls
    _LOG.warning("--input: skipped %d file(s) inside --output %s, which this run writes "
                 "(e.g. %s): an earlier run's outputs are never its input", len(theirs),
                 output, theirs[0])
    return [u for u in urls if u not in set(theirs)]


def canonical_path(path: str) -> str:
    """One spelling per file: a local path resolved (links, `.`, `..`, repeated or trailing
    slashes), a remote one without trailing slashes."""
    local = path[7:] if path.startswith("file://") else path
    if "://" not in local:
        return os.path.realpath(local)
    return path.rstrip("/")


def _one_spelling_per_file(urls: List[str]) -> List[str]:
    """Two spellings of one file (`./a/0.tar` and `a/0.tar`, a link, overlapping globs) -> the
    first in sorted order, so the file is read once rather than refused as a name clash."""
    first: Dict[str, str] = {}
    for url in sorted(urls):
        first.setdefault(canonical_path(url), url)
    if len(first) < len(urls):
        _LOG.info("--input: %d path(s) name a file already matched; each file is read once",
                  len(urls) - len(first))
    return sorted(first.values())


class ReadShardFn(beam.DoFn):
    """(shard name, url) -> samples; ErrorRecords to the `errors` output."""

    def __init__(self, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        self._max_member_bytes = max_member_bytes
        self.samples_read = beam.metrics.Metrics.counter("curator", "samples_read")
        self.shards_read = beam.metrics.Metrics.counter("curator", "shards_read")
        self.shard_errors = beam.metrics.Metrics.counter("curator", "shard_errors")
        self.bad_json = beam.metrics.Metrics.counter("curator", "malformed_json_sidecars")

    def process(self, shard_and_url):
        shard, url = shard_and_url
        for item in shard_samples(shard, url, self._max_member_bytes):
            if isinstance(item, ErrorRecord):
                self.shard_errors.inc()
                _LOG.warning("shard %s: %s", shard, item.reason)
                yield beam.pvalue.TaggedOutput(ERRORS, item)
            else:
                self.samples_read.inc()
                if not item.error and not json_sidecar_ok(item):
                    # Sidecars are passed through verbatim, never parsed by the pipeline: a
                    # malformed .json is the dataset's business, not a reason to drop an image.
                    self.bad_json.inc()
                    _LOG.warning("sample %s: its .json sidecar is not valid JSON; it is kept "
                                 "and passed through verbatim", item.id)
                yield item
        self.shards_read.inc()


def json_sidecar_ok(sample: ShardSample) -> bool:
    """True unless the sample has a `.json` sidecar that does not parse."""
    import json

    data = sample.sidecars.get("json")
    if data is None:
        return True
    try:
        json.loads(data)
    except ValueError:   # JSONDecodeError and UnicodeDecodeError
        return False
    return True


class ReadResult(NamedTuple):
    """What `ReadWebDataset` returns.

    samples: ShardSample per webdataset sample (image bytes, sidecars; `error` set when the
        reader already knows it is unusable).
    errors: ErrorRecord per shard-level problem (damage, unsafe member names, ...).
    shards: (shard name, url) of every shard read (what `WriteCuratedShards` re-reads).
    """

    samples: beam.PCollection
    errors: beam.PCollection
    shards: beam.PCollection


class ReadWebDataset(beam.PTransform):
    """Webdataset tar shards -> ReadResult: one shard per work item, streamed.

    Members are grouped into samples by webdataset `__key__` (the member path up to the first
    dot of its file name); the first image member (.jpg/.jpeg/.png/.webp) is the image and
    the rest are sidecars, kept verbatim. Ids are `<shard file name>/<key>`. Damage never
    fails the read: see `beam_curator.webdataset`.

    Args:
      file_pattern: comma-separated globs or directories (a directory: its *.tar, *.tar.gz
        and *.tgz), local, gs:// or s3://. Resolved when the graph is built (fails fast when
        nothing matches); one file named twice is read once.
      shards: the (shard name, url) pairs when the caller has already listed them
        (`transforms.read.list_shards`); file_pattern is then ignored.
      max_member_bytes: a tar member larger than this is not read: its sample is an error.

    Example::

        import apache_beam as beam
        from beam_curator import ReadWebDataset

        with beam.Pipeline() as p:
            read = p | ReadWebDataset("shards/*.tar")
            read.samples | beam.Map(lambda s: print(s.id, s.image_ext, sorted(s.sidecars)))
    """

    def __init__(self, file_pattern: Optional[str] = None, *,
                 shards: Optional[List[Tuple[str, str]]] = None,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        super().__init__()
        self._max_member_bytes = max_member_bytes
        if shards is None and not file_pattern:
            raise ValueError("ReadWebDataset needs a file_pattern (or resolved shards)")
        self._shards = list(shards) if shards is not None else list_shards(file_pattern)

    def expand(self, pbegin):
        shards = pbegin | "ShardList" >> beam.Create(self._shards)
        read = (shards
                | "OneShardPerWorkItem" >> beam.Reshuffle()
                | "ReadTar" >> beam.ParDo(ReadShardFn(self._max_member_bytes))
                .with_outputs(ERRORS, main="samples"))
        return ReadResult(samples=read.samples, errors=read[ERRORS], shards=shards)
