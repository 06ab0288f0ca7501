"""Webdataset tar shards -> samples: member names, damage, grouping by `__key__`. No Beam here.

Bad input never fails the job, and nothing is dropped without a record:

* a shard that is not a tar, is empty, or holds no samples -> one shard-level error record;
* a truncated shard -> the samples read before the cut come out as usual, the sample being
  read when the data ran out becomes an error sample, and the shard gets an error record;
* a corrupt tar header in the middle -> the reader skips 512-byte blocks to the next valid
  header and reads on (as GNU tar does: "Skipping to next header"). The member(s) inside the
  damaged bytes are lost; the sample read just before the damage and the first one after it
  may be missing members, so both become error samples (never a guess); the shard gets an
  error record with the byte range that was skipped;
* data after the end-of-archive marker, links, devices, names with `..`, an absolute path,
  control characters, names that are not UTF-8 or that a tar could not carry back exactly
  -> shard-level error records naming the member, never samples;
* members of one key are read as one sample when they are next to each other, as webdataset
  writes them (`webdataset.TarWriter`, `tar --sort=name`). A shard whose members are
  scattered (GNU `tar cf` without `--sort=name` stores files in directory order) is noticed
  in its first `GROUPING_WINDOW` samples (or `GROUPING_WINDOW_BYTES` of them) and then read
  again grouping members by key across the whole shard (memory: that one shard); scattering
  noticed later, and a key that really appears twice, make the later occurrence an error
  sample with its own id (`<shard>/<key>.dup2`, which no real key can have) and a reason
  that names the fix;
* a member larger than `max_member_bytes` -> its sample is an error sample; its bytes are
  skipped over in the stream, never held in memory.

What a key is (webdataset's `__key__`): the member path up to the first dot of its file name,
kept exactly as the tar stores it (so `./a.jpg` has key `./a`, and case matters: `A` and `a`
are two keys). A file name that starts with a dot (`.hidden.jpg`, macOS's `._a.jpg`) has an
empty key and belongs to no sample (a shard-level error). Two keys of one shard that name one
file once extracted (equal after dropping `.` and empty path parts and Unicode NFC
normalization: `./a` and `a`, NFD and NFC spellings of `café`) cannot both be samples: the
later one is an error sample with its own id and a reason that names the first.

`shard_samples` is the one entry point: the read step and the curated-shard rewrite both use
it, so a shard is cut into the same samples both times.
"""
from __future__ import annotations

import collections
import re
import tarfile
import unicodedata
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_curator.defaults import DEFAULT_MAX_MEMBER_BYTES
from beam_curator.schema import (
    IMAGE_EXTENSIONS,
    STAGE_READ,
    ErrorRecord,
    ShardSample,
    make_id,
)

# Samples held back at the start of a shard before any is emitted: scattered members are
# almost always noticed within them, and the shard is then read again grouped by key.
GROUPING_WINDOW = 256
# ... or fewer, once their bytes reach this: the window bounds memory, not only a count.
GROUPING_WINDOW_BYTES = 256 << 20

# webdataset's rule: the key is the member path up to the first dot of its file name.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class MembersNotGrouped(Exception):
    """A key came back after other keys: the shard is not grouped by key."""


# ---- member names -----------------------------------------------------------------------

def split_member_name(name: str) -> Optional[Tuple[str, str]]:
    """`a/b/0001.seg.png` -> (`a/b/0001`, `seg.png`); None when the name has no extension.

    The extension keeps its case so that curated shards reproduce the member names exactly.
    """
    match = _KEY_SUFFIX.match(name)
    if not match:
        return None
    return match.group(1), match.group(2)


def no_key_reason(name: str) -> str:
    """Why a member name that `split_member_name` rejects belongs to no sample."""
    file_name = name.rsplit("/", 1)[-1]
    if file_name.startswith("."):
        return (f"tar member {name!r} has a file name that starts with a dot: its key (the "
                "name up to the first dot) would be empty, so it belongs to no sample (macOS "
                "tar adds such '._' files unless COPYFILE_DISABLE=1)")
    return f"tar member {name!r} has no extension, so it belongs to no sample"


def canonical_key(key: str) -> str:
    """The path a key extracts to: `.` and empty parts dropped, Unicode NFC (the form macOS
    file systems store). Two keys with one canonical form overwrite each other on disk."""
    parts = [p for p in key.split("/") if p not in ("", ".")]
    return unicodedata.normalize("NFC", "/".join(parts))


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

def repeat_id(sample_id: str, n: int) -> str:
    """The id of the n-th occurrence (n >= 2) of a key in one shard."""
    return f"{sample_id}.dup{n}"


def _no_image_reason(key: str, fields: Dict[str, bytes]) -> str:
    found = ", ".join(sorted(fields)) or "nothing"
    dotted = sorted(ext for ext in fields
                    if "." in ext and ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    if dotted:
        # webdataset.TarWriter writes a key with dots as `photo.2023.01.jpg`, which every
        # webdataset reader (ours too) splits at the FIRST dot of the file name.
        return (f"sample has no image member: {key}.{dotted[0]} has dots in its key, and the "
                f"webdataset rule (the key ends at the first dot of the file name) reads it "
                f"as key {key!r} with extension {dotted[0]!r}. Rename the members so keys "
                f"have no dots (e.g. {key}_{dotted[0].rsplit('.', 1)[0].replace('.', '_')}."
                f"{dotted[0].rsplit('.', 1)[1]}); found: {found}")
    return f"sample has no image member (.jpg/.jpeg/.png/.webp); found: {found}"


class _Assembler:
    """Members -> samples, in the order keys first appear.

    Contiguous (the default): a sample is complete when the next key starts, so nothing is
    held. `whole_shard`: members are gathered by key until the shard ends (a scattered
    shard); a member whose extension its key already has starts a second occurrence of the
    key (a key really written twice), which becomes its own error sample as it would in a
    sorted shard.
    """

    def __init__(self, shard: str, url: str, whole_shard: bool,
                 abort_on_repeat: Callable[[], bool]):
        self.shard, self.url = shard, url
        self._whole_shard = whole_shard
        self._abort_on_repeat = abort_on_repeat
        self.key: Optional[str] = None           # the key of the latest member
        # key -> occurrences, each a list of (extension, bytes)
        self._members: "collections.OrderedDict[str, List[List[Tuple[str, bytes]]]]" = \
            collections.OrderedDict()
        self._errors: Dict[str, str] = {}
        self._used_ids: Dict[str, str] = {}      # id -> the key it was given to
        self._extensions: Dict[str, set] = {}    # key -> extensions of its samples so far
        self._spellings: Dict[str, str] = {}     # canonical key -> the first key that has it
        self.n_samples = 0

    @property
    def in_progress(self) -> bool:
        return self.key is not None and self.key in self._members

    @property
    def n_read(self) -> int:
        """Samples read so far, complete or not."""
        return self.n_samples + sum(len(o) for o in self._members.values())

    def begin(self, key: str) -> List[ShardSample]:
        """The next member belongs to `key`: returns the samples this completes. Called
        before the member's data is read, so damage inside it is blamed on `key`."""
        done = []
        if key != self.key and not self._whole_shard and self.key is not None:
            done = self._flush(self.key)
        self.key = key
        occurrences = self._members.setdefault(key, [])
        if not occurrences:   # a sample even if its first member's data never arrives
            occurrences.append([])
        return done

    def add(self, ext: str, data: bytes) -> None:
        """A member of the current key."""
        occurrences = self._members[self.key]
        if self._whole_shard:
            free = next((o for o in occurrences if ext not in {e for e, _ in o}), None)
            if free is None:
                free = []
                occurrences.append(free)
            free.append((ext, data))
        else:
            occurrences[0].append((ext, data))

    def error(self, key: Optional[str], reason: str) -> None:
        """Mark a key's sample as an error (the first reason wins)."""
        if key is not None:
            self._errors.setdefault(key, reason)

    def finish(self) -> List[ShardSample]:
        done = []
        for key in list(self._members):
            done += self._flush(key)
        return done

    def _flush(self, key: str) -> List[ShardSample]:
        error = self._errors.pop(key, None)
        done = []
        for members in self._members.pop(key):
            self.n_samples += 1
            done.append(self._build(key, members, error))
        return done

    def _spelling_error(self, key: str) -> Optional[str]:
        """A key that extracts to the path of an earlier, differently spelled key."""
        first = self._spellings.setdefault(canonical_key(key), key)
        if first == key:
            return None
        return (f"key {ascii(key)} names the same file as key {ascii(first)} of shard "
                f"{self.shard!r} once extracted (keys are compared without '.' or empty path "
                "parts, in Unicode NFC): the two would overwrite each other. Rename one, or "
                "spell every key one way")

    def _build(self, key: str, members: List[Tuple[str, bytes]],
               error: Optional[str]) -> ShardSample:
        """The first image extension wins, the rest are sidecars."""
        shard = self.shard
        sample_id = make_id(shard, key)
        extensions = {ext for ext, _ in members}
        if sample_id in self._used_ids:
            if extensions - self._extensions[key] and self._abort_on_repeat():
                # New extensions for a key seen before: members scattered, not a repeat.
                raise MembersNotGrouped(key)
            # A key that comes back later in the same shard would make two samples with one
            # id. The repeat's id ends in `.dupN`: a real key never has a dot in its last
            # path part (the file name's first dot starts the extension).
            n = 2
            while repeat_id(sample_id, n) in self._used_ids:
                n += 1
            error = error or (
                f"key {key!r} appears again later in shard {shard!r} (duplicate key): its first "
                f"occurrence "
                f"is {sample_id!r}, this one is {repeat_id(sample_id, n)}. A webdataset keeps "
                "the members of a sample next to each other and each key once; a shard "
                "written by `tar cf` without `--sort=name` scatters them. Rewrite the shard "
                "with `tar --sort=name -cf` (or webdataset.TarWriter); if the key really is "
                "in the shard twice, rename one")
            sample_id = repeat_id(sample_id, n)
        self._used_ids[sample_id] = key
        self._extensions.setdefault(key, set()).update(extensions)
        error = error or self._spelling_error(key)
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
            error = _no_image_reason(key, fields)
        return ShardSample(id=sample_id, shard=shard, shard_url=self.url, key=key,
                           image_ext=image_ext, image_bytes=image_bytes, sidecars=fields,
                           error=error)


def shard_samples(shard: str, url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
                  ) -> Iterator[object]:
    """ShardSample for every key of a shard and ErrorRecord for shard-level damage.

    Deterministic: the same bytes give the same samples, ids and errors (the curated shards
    are written by reading the source again). The first GROUPING_WINDOW samples are held
    back: if the members turn out to be scattered within them, the shard is read again and
    grouped by key across the whole shard. A member over `max_member_bytes` is not read: its
    sample becomes an error sample.
    """
    held: List[object] = []
    held_bytes = 0
    released = False

    def abort_on_repeat() -> bool:
        return not released

    try:
        for item in iter_shard(shard, url, abort_on_repeat=abort_on_repeat,
                               max_member_bytes=max_member_bytes):
            if released:
                yield item
                continue
            held.append(item)
            held_bytes += _sample_bytes(item)
            if (sum(isinstance(i, ShardSample) for i in held) > GROUPING_WINDOW
                    or held_bytes >= GROUPING_WINDOW_BYTES):
                released = True
                yield from held
                held = []
    except MembersNotGrouped:
        yield from iter_shard(shard, url, whole_shard=True, max_member_bytes=max_member_bytes)
        return
    yield from held


def _sample_bytes(item: object) -> int:
    if not isinstance(item, ShardSample):
        return 0
    return len(item.image_bytes or b"") + sum(len(v) for v in item.sidecars.values())


def iter_shard(shard: str, url: str, whole_shard: bool = False,
               abort_on_repeat: Callable[[], bool] = lambda: False,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[object]:
    """One streaming pass over a tar: samples (contiguous keys, or grouped over the whole
    shard) and shard-level ErrorRecords. `abort_on_repeat()` true when a key comes back:
    raise MembersNotGrouped instead of making the repeat an error sample."""
    samples = _Assembler(shard, url, whole_shard, abort_on_repeat)
    carry_error = None   # for the first sample after a damaged region

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
                        samples.error(samples.key, (
                            f"shard damaged right after this sample's members ({where}): "
                            "it may be missing members"))
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
                                          reason=unsafe or no_key_reason(info.name))
                        continue
                    member_key, ext = parts
                    if carry_error:
                        # The damage fell before this member: its sample may miss members.
                        samples.error(member_key, carry_error)
                        carry_error = None
                    yield from samples.begin(member_key)
                    if info.size > max_member_bytes:
                        # Not read: tarfile streams past the data when the next header is
                        # asked for, so memory stays flat whatever the header claims.
                        samples.error(member_key, _oversized_reason(info, max_member_bytes))
                        samples.add(ext, b"")
                        continue
                    handle = tar.extractfile(info)
                    samples.add(ext, handle.read() if handle else b"")
                tail = watch.end
                if watch.resyncing:
                    samples.error(samples.key, (
                        f"shard damaged right after this sample's members (corrupt tar "
                        f"header at byte {watch.damage_start}): it may be missing members"))
                    end_error = (f"{url}: corrupt tar header at byte {watch.damage_start} and "
                                 "no valid header after it: the rest of the shard is "
                                 f"unreadable; {samples.n_read} "
                                 "sample(s) before it were read, the last of them is marked "
                                 "error")
                elif tail and tail[0] in ("eof", "cut") and tail[1] > 0:
                    samples.error(samples.key, (
                        f"shard is truncated right after this sample's members (it ends "
                        f"at byte {tail[1]} without the tar end-of-archive marker): it "
                        "may be missing members"))
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
        read_any = samples.key is not None
        yield from samples.finish()
        if not read_any:
            yield ErrorRecord(shard=shard, stage=STAGE_READ, reason=end_error or (
                f"{url}: shard holds no samples"))
            return
        if end_error:
            yield ErrorRecord(shard=shard, stage=STAGE_READ, reason=end_error)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        in_progress = samples.in_progress
        reason = _describe_tar_error(exc, url, samples.n_read - in_progress, in_progress)
        # The sample being read when the damage hit is incomplete: an error, never a guess.
        samples.error(samples.key, f"shard damaged while reading this sample: {reason}")
        yield from samples.finish()
        yield ErrorRecord(shard=shard, stage=STAGE_READ, reason=reason)


def _oversized_reason(info: tarfile.TarInfo, limit: int) -> str:
    return (f"tar member {info.name!r} is {info.size:,} bytes, over --max_member_bytes "
            f"({limit:,}): not read. Raise --max_member_bytes if such members are real")


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
