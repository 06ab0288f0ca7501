"""Read webdataset shards: one tar per element, members streamed and grouped by `__key__`.

Bad input never fails the job, and nothing is dropped without a record:

* a shard that is not a tar, is empty, or holds no samples -> one shard-level error record;
* a truncated shard -> the samples read before the cut come out as usual, the sample being
  read when the data ran out becomes an error sample, and the shard gets an error record;
* a corrupt tar header in the middle -> the reader skips 512-byte blocks to the next valid
  header and reads on (as GNU tar does: "Skipping to next header"). The member(s) inside the
  damaged bytes are lost; the sample read just before the damage and the first one after it
  may be missing members, so both become error samples (never a guess); the shard gets an
  error record with the byte range that was skipped;
* data after the end-of-archive marker, links, devices, names with `..` or an absolute path,
  names that are not UTF-8 -> shard-level error records naming the member, never samples;
* a key that appears again later in its shard -> the first is used, the later one becomes
  an error sample with its own id (`<shard>/<key>.dup2`, which no real key can have).
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
_BLOCK = tarfile.BLOCKSIZE

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


def split_globs(pattern: str) -> List[str]:
    """An option holding comma-separated globs -> the globs."""
    return [part.strip() for part in pattern.split(",") if part.strip()]


def match_globs(pattern: str) -> List[str]:
    """Comma-separated globs -> the sorted paths they match, each once (globs may overlap)."""
    return sorted({m.path for part in split_globs(pattern)
                   for m in FileSystems.match([part])[0].metadata_list})


def list_shards(pattern: str) -> List[Tuple[str, str]]:
    """Resolve --input (comma-separated globs) to sorted (shard name, url) pairs, failing fast.

    Files this project writes beside its outputs (summary.json, report.html, the run lock)
    are never input, whatever the glob: `--input 'DIR/*'` next to an output in DIR reads the
    shards only.
    """
    from beam_curator.outputs import OWN_FILE_NAMES
    from beam_curator.transforms.write import TMP_PREFIX

    matched = match_globs(pattern)
    own = [u for u in matched if posixpath.basename(u) in OWN_FILE_NAMES
           or posixpath.basename(u).startswith(TMP_PREFIX)]
    if own:
        _LOG.warning("--input: skipped %d file(s) that beam-curator writes itself, never "
                     "shards (e.g. %s)", len(own), own[0])
    urls = [u for u in matched if u not in set(own)]
    if not urls:
        raise ShardListError(
            f"--input {pattern!r} matches no file"
            + (f" besides beam-curator's own outputs ({', '.join(own[:3])})" if own else "")
            + ". Check the path and the glob (for example "
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


def printable_name(name: str) -> str:
    """A member name as valid UTF-8 text: bytes that are not UTF-8 shown as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PLAIN_NAME = re.compile(r"^[\x20-\x7e]{1,99}$")   # ASCII that a ustar header holds as is


def unsafe_member_reason(name: str) -> Optional[str]:
    """Absolute paths, `..`, non-UTF-8 names, control characters and any name the curated
    shard could not carry exactly are never trusted: curated shards must be safe to extract
    and must reproduce every kept member's name, and ids must be text."""
    if _CONTROL.search(name):
        return (f"tar member {ascii(name)} has control characters in its name (a NUL cuts the "
                "name short when it is written back)")
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return f"tar member {printable_name(name)!r} has an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return f"tar member {printable_name(name)!r} climbs out of its directory with '..'"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return (f"tar member name '{printable_name(name)}' is not valid UTF-8, so it cannot "
                "be a sample id")
    if not _PLAIN_NAME.match(name) and not _writes_back(name):
        return (f"tar member {name!r} would not come back with the same name from a tar "
                "written by the curated-shard writer")
    return None


def _writes_back(name: str) -> bool:
    """Whether a PAX tar (the curated-shard writer's format) stores `name` exactly."""
    import io

    buffer = io.BytesIO()
    info = tarfile.TarInfo(name)
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r") as tar:
        return [m.name for m in tar.getmembers()] == [name]


def _member_type(info: tarfile.TarInfo) -> str:
    for test, what in ((info.issym, "a symbolic link"), (info.islnk, "a hard link"),
                       (info.ischr, "a character device"), (info.isblk, "a block device"),
                       (info.isfifo, "a FIFO")):
        if test():
            return what
    return f"of tar type {info.type!r}"


# ---- watching the tar reader: damage, resync, how the archive ended ------------------------

class _TarWatch:
    """What tarfile met between two members. tarfile itself stops silently at a corrupt
    header in the middle of a stream (it takes it for the end of the archive)."""

    def __init__(self):
        self.damage_start: Optional[int] = None   # first bad header of the current gap
        self.gaps: List[Tuple[int, int]] = []     # (bad header offset, resumed at offset)
        self.end: Optional[Tuple[str, int]] = None   # ("marker" | "eof" | "cut", offset)

    @property
    def resyncing(self) -> bool:
        return self.damage_start is not None

    def pop_gaps(self) -> List[Tuple[int, int]]:
        gaps, self.gaps = self.gaps, []
        return gaps


class _WatchedTarInfo(tarfile.TarInfo):
    """Records header errors; on a corrupt header after a good one, turns on tarfile's
    block-by-block skipping (`ignore_zeros`) until the next valid header."""

    @classmethod
    def fromtarfile(cls, tar):
        watch = tar.__dict__.setdefault("_curator_watch", _TarWatch())
        start = tar.offset
        try:
            info = super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            if not watch.resyncing:
                watch.end = ("marker", start)
            raise
        except tarfile.InvalidHeaderError:
            if start > 0 and not watch.resyncing:   # at 0 it is no tar at all: tarfile raises
                watch.damage_start = start
                tar.ignore_zeros = True
            raise
        except tarfile.EmptyHeaderError:
            watch.end = ("eof", start)
            raise
        except tarfile.TruncatedHeaderError:
            watch.end = ("cut", start)
            raise
        if watch.resyncing:
            watch.gaps.append((watch.damage_start, start))
            watch.damage_start = None
            tar.ignore_zeros = False   # the real end-of-archive marker ends reading again
        return info


def _trailing_data(tar: tarfile.TarFile) -> int:
    """Bytes that are not zero padding after the end-of-archive marker (0 when clean)."""
    found = 0
    while True:
        chunk = tar.fileobj.read(1 << 16)
        if not chunk:
            return found
        if found or chunk.strip(b"\0"):
            found += len(chunk)


# ---- samples ----------------------------------------------------------------------------

def _build_sample(shard: str, url: str, key: str, members: List[Tuple[str, bytes]],
                  used_ids: dict, error: Optional[str] = None) -> ShardSample:
    """Turn one key's members into a sample; the first image extension wins, the rest are sidecars."""
    sample_id = make_id(shard, key)
    if sample_id in used_ids:
        # A key that comes back later in the same shard would make two samples with one id.
        # The repeat's id ends in `.dupN`: a real key never has a dot in its last path part
        # (the file name's first dot starts the extension), so it cannot take a real id.
        n = 2
        while repeat_id(sample_id, n) in used_ids:
            n += 1
        error = error or (f"key {key!r} appears again later in shard {shard!r} (duplicate "
                          f"key): its first occurrence is {sample_id!r}, this one is "
                          f"{repeat_id(sample_id, n)}")
        sample_id = repeat_id(sample_id, n)
    used_ids[sample_id] = key
    fields = {}
    for ext, data in members:
        if ext in fields:
            error = error or f"member {key}.{ext} appears twice in one sample"
            continue
        fields[ext] = data
    by_lower = {}
    for ext in fields:
        by_lower.setdefault(ext.lower(), ext)
    image_ext = next((by_lower[e] for e in IMAGE_EXTENSIONS if e in by_lower), None)
    image_bytes = fields.pop(image_ext) if image_ext else None
    if image_ext is None and error is None:
        found = ", ".join(sorted(fields)) or "nothing"
        error = f"sample has no image member (.jpg/.jpeg/.png/.webp); found: {found}"
    return ShardSample(id=sample_id, shard=shard, shard_url=url, key=key, image_ext=image_ext,
                       image_bytes=image_bytes, sidecars=fields, error=error)


def repeat_id(sample_id: str, n: int) -> str:
    """The id of the n-th occurrence (n >= 2) of a key in one shard."""
    return f"{sample_id}.dup{n}"


def iter_shard(shard: str, url: str) -> Iterator[object]:
    """Yield ShardSample for every key in the tar and ErrorRecord for shard-level damage.

    Deterministic: reading the same bytes twice gives the same samples, ids and errors (the
    curated shards are written by reading the source again).
    """
    used_ids: dict = {}   # id -> the key it was given to
    key, members, key_error = None, [], None
    carry_error = None   # for the first sample after a damaged region
    n_samples = 0

    def flush():
        nonlocal n_samples
        n_samples += 1
        return _build_sample(shard, url, key, members, used_ids, key_error)

    try:
        with FileSystems.open(url, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
            with tarfile.open(fileobj=raw, mode="r|*", tarinfo=_WatchedTarInfo,
                              encoding="utf-8", errors="surrogateescape") as tar:
                watch = tar.__dict__.setdefault("_curator_watch", _TarWatch())
                for info in tar:
                    for start, resume in watch.pop_gaps():
                        yield ErrorRecord(shard=shard, stage=STAGE_READ, reason=(
                            f"{url}: corrupt tar header at byte {start}; skipped "
                            f"{resume - start} bytes to the next valid header at byte "
                            f"{resume} and read on. The member(s) in those bytes are lost; "
                            "the samples just before and just after them are marked error"))
                        where = f"corrupt tar header at byte {start}, resumed at byte {resume}"
                        if key is not None:
                            key_error = key_error or (
                                f"shard damaged right after this sample's members ({where}): "
                                "it may be missing members")
                        carry_error = (f"shard damaged right before this sample's members "
                                       f"({where}): it may be missing members")
                    if info.isdir():
                        continue   # directories carry no data
                    if not info.isfile():
                        yield ErrorRecord(shard=shard, stage=STAGE_READ,
                                          member=printable_name(info.name), reason=(
                                              f"tar member {printable_name(info.name)!r} is "
                                              f"{_member_type(info)}: only regular files are "
                                              "read"))
                        continue
                    unsafe = unsafe_member_reason(info.name)
                    parts = split_member_name(info.name)
                    if unsafe or parts is None:
                        yield ErrorRecord(shard=shard, stage=STAGE_READ,
                                          member=printable_name(info.name),
                                          reason=unsafe or f"tar member {info.name!r} has no "
                                          "extension, so it belongs to no sample")
                        continue
                    member_key, ext = parts
                    if member_key != key:
                        if key is not None:
                            yield flush()
                        key, members, key_error, carry_error = member_key, [], carry_error, None
                    elif carry_error:
                        # The damage fell between two members of this same sample.
                        key_error, carry_error = key_error or carry_error, None
                    handle = tar.extractfile(info)
                    members.append((ext, handle.read() if handle else b""))
                tail = watch.end
                if watch.resyncing:
                    if key is not None:
                        key_error = key_error or (
                            f"shard damaged right after this sample's members (corrupt tar "
                            f"header at byte {watch.damage_start}): it may be missing members")
                    end_error = (f"{url}: corrupt tar header at byte {watch.damage_start} and "
                                 "no valid header after it: the rest of the shard is "
                                 f"unreadable; {n_samples + (key is not None)} sample(s) "
                                 "before it were read, the last of them is marked error")
                elif tail and tail[0] in ("eof", "cut") and tail[1] > 0:
                    if key is not None:
                        key_error = key_error or (
                            f"shard is truncated right after this sample's members (it ends "
                            f"at byte {tail[1]} without the tar end-of-archive marker): it "
                            "may be missing members")
                    end_error = (f"{url} is truncated: it ends at byte {tail[1]} without the "
                                 "tar end-of-archive marker; the last sample read is marked "
                                 "error")
                elif tail and tail[0] == "marker":
                    extra = _trailing_data(tar)
                    end_error = (f"{url}: {extra} bytes of data after the tar end-of-archive "
                                 f"marker at byte {tail[1]} were not read (concatenated tars "
                                 "or appended junk)") if extra else None
                else:
                    end_error = None
        if key is not None:
            yield flush()
        elif n_samples == 0:
            yield ErrorRecord(shard=shard, stage=STAGE_READ, reason=end_error or (
                f"{url}: shard holds no samples"))
            return
        if end_error:
            yield ErrorRecord(shard=shard, stage=STAGE_READ, reason=end_error)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        reason = _describe_tar_error(exc, url, n_samples, key is not None)
        if key is not None:
            # The sample being read when the damage hit is incomplete: an error, never a guess.
            key_error = f"shard damaged while reading this sample: {reason}"
            yield flush()
        yield ErrorRecord(shard=shard, stage=STAGE_READ, reason=reason)


def _describe_tar_error(exc: Exception, url: str, n_complete: int, in_progress: bool) -> str:
    text = str(exc) or type(exc).__name__
    started = n_complete or in_progress
    if not started and isinstance(exc, tarfile.ReadError) and "empty" in text.lower():
        return f"{url} is empty (no tar data)"
    if not started and isinstance(exc, tarfile.ReadError):
        return f"{url} is not a readable tar archive ({text})"
    after = ""
    if started:
        after = (f"; reading stopped there: {n_complete} complete sample(s) before it were "
                 "read" + (", the sample being read is marked error" if in_progress else ""))
    if isinstance(exc, (EOFError, tarfile.StreamError)) or "unexpected end" in text:
        return f"{url} is truncated ({text}){after}"
    if isinstance(exc, tarfile.ReadError):
        return f"{url} is damaged ({text}){after}"
    return f"{url} could not be read: {type(exc).__name__}: {text}{after}"


class ReadShardFn(beam.DoFn):
    """(shard name, url) -> samples; ErrorRecords to the `errors` output."""

    def __init__(self):
        self.samples_read = beam.metrics.Metrics.counter("curator", "samples_read")
        self.shards_read = beam.metrics.Metrics.counter("curator", "shards_read")
        self.shard_errors = beam.metrics.Metrics.counter("curator", "shard_errors")
        self.bad_json = beam.metrics.Metrics.counter("curator", "malformed_json_sidecars")

    def process(self, shard_and_url):
        shard, url = shard_and_url
        for item in iter_shard(shard, url):
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


class ReadShardSamples(beam.PTransform):
    """PCollection of (shard name, url) -> samples, with shard-level errors tagged `errors`."""

    def expand(self, shards):
        return (shards
                | "OneShardPerWorkItem" >> beam.Reshuffle()
                | "ReadTar" >> beam.ParDo(ReadShardFn()).with_outputs(ERRORS, main="samples"))
