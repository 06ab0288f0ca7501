"""A corpus of bad input, each kind inside otherwise good shards, with the expected outcome.

`make_corpus(dir)` writes one file per kind into `dir` (shards `NN_<kind>.tar`, plus a stray
non-tar file) and returns a `Corpus` that says, for every kind, which samples exist and how
each must end (`kept`, or `error` with a substring of the reason) and which shard-level error
records must appear. The expectations are written here, from what the generator put into the
bytes, never from what the pipeline reports: the sample count is counted independently.

Decisions the expectations encode (see tests/test_bad_input.py):

* decodable images in any mode (CMYK, 16-bit, palette, alpha, animated = first frame, EXIF
  orientation applied, non-ASCII key) are processed and kept;
* a malformed or missing `.json` sidecar is not an image problem: the sample is kept and the
  sidecar passed through verbatim (the reader counts malformed ones in the
  `malformed_json_sidecars` metric and logs a warning);
* a corrupt tar header in the middle: tarfile alone would stop there silently, taking it for
  the end of the archive. The reader skips to the next valid header (as GNU tar does) and
  reads on; the member(s) in the skipped bytes are lost, the samples just before and just
  after the damage are errors (they may be missing members), the rest are kept, and a
  shard-level error gives the skipped byte range;
* unsafe (`..`, absolute), non-UTF-8, extension-less and non-regular (link) members are
  shard-level errors naming the member, never samples, never written anywhere.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import struct
import tarfile
import zlib
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

# The run over the corpus uses this pixel cap (so a 200 x 200 PNG is "too large").
MAX_IMAGE_PIXELS = 10_000
KEPT, ERROR = "kept", "error"


@dataclasses.dataclass
class Expect:
    """How one sample must end."""

    id: str
    status: str                       # kept | error
    reason: Optional[str] = None      # substring of the reason (error)
    stage: Optional[str] = None       # read | decode (error)
    members: Optional[Dict[str, bytes]] = None   # kept: the exact members a curated shard holds
    size: Optional[tuple] = None      # kept: (width, height) after EXIF orientation


@dataclasses.dataclass
class ShardErrorExpect:
    """A shard-level error record (id null): the shard, a reason substring, the member."""

    shard: str
    reason: str
    member: Optional[str] = None


@dataclasses.dataclass
class Case:
    kind: str
    description: str
    shard: str
    samples: List[Expect] = dataclasses.field(default_factory=list)
    shard_errors: List[ShardErrorExpect] = dataclasses.field(default_factory=list)
    # member names that must never reach a curated shard (unsafe paths)
    forbidden_members: List[str] = dataclasses.field(default_factory=list)

    @property
    def bad(self) -> List[Expect]:
        return [s for s in self.samples if s.status == ERROR]

    @property
    def good(self) -> List[Expect]:
        return [s for s in self.samples if s.status == KEPT]


@dataclasses.dataclass
class Corpus:
    directory: str
    input_glob: str
    cases: Dict[str, Case]

    @property
    def n_samples(self) -> int:
        return sum(len(c.samples) for c in self.cases.values())

    @property
    def expected(self) -> Dict[str, Expect]:
        return {s.id: s for c in self.cases.values() for s in c.samples}


# ---- image bytes ----------------------------------------------------------------------------

def _noise(rng: random.Random, size=(48, 48), mode="RGB") -> Image.Image:
    channels = {"RGB": 3, "CMYK": 4, "RGBA": 4}[mode]
    return Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * channels))


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def jpeg(rng, size=(48, 48)) -> bytes:
    return _save(_noise(rng, size), "JPEG", quality=90)


def png(rng, size=(48, 48)) -> bytes:
    return _save(_noise(rng, size), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid-looking PNG header that claims 10^10 pixels, in a few dozen bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


# ---- tar building ---------------------------------------------------------------------------

class ShardBuilder:
    """Members in order, written with tarfile; records each header's byte offset."""

    def __init__(self, fmt=tarfile.PAX_FORMAT):
        self.fmt = fmt
        self.members: List[tuple] = []   # (name, data, tar type, linkname)

    def add(self, name: str, data: bytes = b"", kind=tarfile.REGTYPE, linkname: str = ""):
        self.members.append((name, data, kind, linkname))

    def build(self) -> tuple:
        """-> (tar bytes, {member index: header offset})."""
        buffer = io.BytesIO()
        offsets = {}
        with tarfile.open(fileobj=buffer, mode="w", format=self.fmt, encoding="utf-8",
                          errors="surrogateescape") as tar:
            for index, (name, data, kind, linkname) in enumerate(self.members):
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = linkname
                info.size = len(data) if kind == tarfile.REGTYPE else 0
                info.mtime = 1_700_000_000
                info.mode = 0o644
                offsets[index] = tar.offset
                tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return buffer.getvalue(), offsets


class _CaseWriter:
    """Builds one case's shard and its expectations together."""

    def __init__(self, corpus_dir: str, index: int, kind: str, description: str, rng,
                 fmt=tarfile.PAX_FORMAT):
        self.shard = f"{index:02d}_{kind}"
        self.path = os.path.join(corpus_dir, self.shard + ".tar")
        self.case = Case(kind=kind, description=description, shard=self.shard)
        self.builder = ShardBuilder(fmt)
        self.rng = rng
        self._n_good = 0

    def id(self, key: str) -> str:
        return f"{self.shard}/{key}"

    def good(self, key: Optional[str] = None, *, expect: bool = True) -> str:
        """A plain good sample: image + caption + json; expected kept (unless told not)."""
        key = key or f"good{self._n_good:02d}"
        self._n_good += 1
        ext, data = ("jpg", jpeg(self.rng)) if self._n_good % 2 else ("png", png(self.rng))
        members = {f"{key}.{ext}": data, f"{key}.txt": f"caption of {key}".encode(),
                   f"{key}.json": json.dumps({"key": key, "source": "corpus"}).encode()}
        for name, payload in members.items():
            self.builder.add(name, payload)
        if expect:
            self.case.samples.append(Expect(self.id(key), KEPT, members=members))
        return key

    def sample(self, key: str, members: Dict[str, bytes], status: str, reason=None,
               stage=None, size=None):
        for name, payload in members.items():
            self.builder.add(name, payload)
        self.case.samples.append(Expect(self.id(key), status, reason=reason, stage=stage,
                                        members=members if status == KEPT else None,
                                        size=size))

    def image_case(self, key, ext, data, status, reason=None, size=None, extra=None):
        """good, good, <the case>, good, good: one image-level case inside a good shard."""
        self.good()
        self.good()
        members = {f"{key}.{ext}": data, f"{key}.txt": f"caption of {key}".encode()}
        members.update(extra or {})
        self.sample(key, members, status, reason, stage="decode" if status == ERROR else None,
                    size=size)
        self.good()
        self.good()

    def shard_error(self, reason: str, member: Optional[str] = None):
        self.case.shard_errors.append(ShardErrorExpect(self.shard, reason, member))

    def write(self, data: Optional[bytes] = None) -> Case:
        if data is None:
            data, _ = self.builder.build()
        with open(self.path, "wb") as handle:
            handle.write(data)
        return self.case


# ---- the kinds ------------------------------------------------------------------------------

def make_corpus(directory: str, seed: int = 7) -> Corpus:
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    cases: Dict[str, Case] = {}
    counter = iter(range(100))

    def case(kind, description, **kwargs) -> _CaseWriter:
        return _CaseWriter(directory, next(counter), kind, description, rng, **kwargs)

    def done(writer: _CaseWriter, data: Optional[bytes] = None):
        cases[writer.case.kind] = writer.write(data)

    # 1. truncated tar: the file stops inside the image of the third sample.
    w = case("truncated_tar", "the shard file stops in the middle of a member's data")
    w.good()
    w.good()
    w.builder.add("cut.png", png(rng, (64, 64)))
    w.builder.add("cut.txt", b"caption of cut")
    w.good(expect=False)
    data, offsets = w.builder.build()
    cut_at = offsets[6] + 512 + 700   # header of cut.png, then 700 bytes of its data
    w.case.samples.append(Expect(w.id("cut"), ERROR, reason="truncated", stage="read"))
    w.shard_error("truncated")
    done(w, data[:cut_at])

    # 2. corrupt tar header in the middle: the header block of `victim.jpg` is garbage.
    w = case("corrupt_header_middle", "a tar header in the middle of the shard is garbage")
    w.good()
    before = w.good(expect=False)
    w.builder.add("victim.jpg", jpeg(rng))
    w.builder.add("victim.txt", b"caption of victim")
    w.builder.add("victim.json", b'{"key": "victim"}')
    after = [w.good(), w.good()]
    data, offsets = w.builder.build()
    data = bytearray(data)
    bad = offsets[6]
    data[bad:bad + 512] = bytes(rng.randrange(1, 256) for _ in range(512))
    w.case.samples[1:1] = [
        Expect(w.id(before), ERROR, reason="damaged right after this sample", stage="read"),
        Expect(w.id("victim"), ERROR, reason="damaged right before this sample", stage="read")]
    assert [s.id for s in w.case.samples][3:] == [w.id(k) for k in after]
    w.shard_error(f"corrupt tar header at byte {bad}")
    done(w, bytes(data))

    # 3. corrupt header of the last sample: nothing valid after it.
    w = case("corrupt_header_tail", "the header of the shard's last member is garbage")
    w.good()
    last_good = w.good(expect=False)
    w.builder.add("lost.jpg", jpeg(rng))
    data, offsets = w.builder.build()
    data = bytearray(data)
    data[offsets[6]:offsets[6] + 512] = bytes(rng.randrange(1, 256) for _ in range(512))
    w.case.samples.append(Expect(w.id(last_good), ERROR, reason="damaged right after",
                                 stage="read"))
    w.shard_error("the rest of the shard is unreadable")
    done(w, bytes(data))

    # 4.-7. image bytes that are no usable image
    w = case("zero_byte_image", "an image member of 0 bytes")
    w.image_case("empty", "jpg", b"", ERROR, "empty (0 bytes)")
    done(w)
    w = case("text_as_jpg", "a text file named .jpg")
    w.image_case("text", "jpg", b"Hello! I am a caption, not a JPEG.\n" * 3, ERROR,
                 "not a recognisable image")
    done(w)
    w = case("truncated_jpeg", "a JPEG cut in half")
    full = jpeg(rng, (64, 64))
    w.image_case("halfjpeg", "jpg", full[: len(full) // 2], ERROR, "corrupt or truncated")
    done(w)
    w = case("png_over_pixel_cap", f"a 200x200 PNG, above --max_image_pixels {MAX_IMAGE_PIXELS}")
    w.image_case("big", "png", png(rng, (200, 200)), ERROR, "above --max_image_pixels")
    done(w)
    w = case("png_bomb", "a PNG header claiming 100000 x 100000 pixels in a few dozen bytes")
    w.image_case("bomb", "png", bomb_png(), ERROR, "bomb")
    done(w)
    w = case("extreme_aspect_ratio", "a 2000x2 strip: few pixels, but resizing its short side "
             "to the model input would be huge")
    w.image_case("strip", "png", png(rng, (2000, 2)), ERROR, "extreme aspect ratio")
    done(w)

    # 8.-13. unusual but valid images: processed and kept
    w = case("cmyk_jpeg", "a CMYK JPEG")
    w.image_case("cmyk", "jpg", _save(_noise(rng, mode="CMYK"), "JPEG"), KEPT, size=(48, 48))
    done(w)
    w = case("png_16bit", "a 16-bit greyscale PNG")
    sixteen = Image.fromarray(np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 28)
    w.image_case("deep", "png", _save(sixteen, "PNG"), KEPT, size=(48, 48))
    done(w)
    w = case("palette_alpha_png", "palette PNG, palette PNG with transparency, RGBA PNG")
    w.good()
    palette = _noise(rng).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    w.sample("palette", {"palette.png": _save(palette, "PNG")}, KEPT, size=(48, 48))
    w.sample("palette_trns", {"palette_trns.png": _save(palette, "PNG", transparency=3)}, KEPT,
             size=(48, 48))
    w.sample("rgba", {"rgba.png": _save(_noise(rng, mode="RGBA"), "PNG")}, KEPT, size=(48, 48))
    w.good()
    done(w)
    w = case("animated", "an animated PNG (APNG) and an animated WebP: the first frame is used")
    w.good()
    frames = [_noise(rng) for _ in range(3)]
    w.sample("apng", {"apng.png": _save(frames[0], "PNG", save_all=True,
                                        append_images=frames[1:], duration=80, loop=0)},
             KEPT, size=(48, 48))
    w.sample("awebp", {"awebp.webp": _save(frames[0], "WEBP", save_all=True,
                                           append_images=frames[1:], duration=80, loop=0,
                                           lossless=True)}, KEPT, size=(48, 48))
    w.good()
    done(w)
    w = case("exif_rotated_jpeg", "a 40x20 JPEG whose EXIF says: rotate 90 degrees")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _save(_noise(rng, (40, 20)), "JPEG", exif=exif)
    w.image_case("rotated", "jpg", rotated, KEPT, size=(20, 40))
    done(w)
    w = case("non_ascii_key", "keys with non-ASCII characters (UTF-8 names, PAX headers)")
    w.good()
    w.sample("снимок_ü_日本", {"снимок_ü_日本.jpg": jpeg(rng),
                              "снимок_ü_日本.txt": "légende".encode()}, KEPT, size=(48, 48))
    w.sample("dir/ключ", {"dir/ключ.png": png(rng)}, KEPT, size=(48, 48))
    w.good()
    done(w)

    # 14.-16. sample-level structure problems
    w = case("sidecars_only", "a sample with a caption and json but no image")
    w.good()
    w.good()
    w.sample("noimage", {"noimage.txt": b"caption without image", "noimage.json": b"{}"}, ERROR,
             "no image member", stage="read")
    w.good()
    done(w)
    w = case("duplicate_keys", "a key that appears again later, and one member twice in a row")
    w.good()
    first = {"dup.jpg": jpeg(rng), "dup.txt": b"first dup"}
    w.sample("dup", first, KEPT, size=(48, 48))
    w.good()
    w.sample("dup.dup2", {}, ERROR, "duplicate key", stage="read")
    w.builder.add("dup.jpg", jpeg(rng))
    w.builder.add("dup.txt", b"second dup")
    w.good()
    w.sample("twice", {}, ERROR, "appears twice", stage="read")
    w.builder.add("twice.jpg", jpeg(rng))
    w.builder.add("twice.jpg", jpeg(rng))
    w.good()
    done(w)
    w = case("json_sidecar", "a missing .json sidecar and a malformed one: kept, verbatim")
    w.good()
    w.sample("nojson", {"nojson.jpg": jpeg(rng), "nojson.txt": b"no json here"}, KEPT,
             size=(48, 48))
    w.sample("badjson", {"badjson.jpg": jpeg(rng), "badjson.txt": b"bad json",
                         "badjson.json": b'{"key": "badjson", "broken": [1, 2'}, KEPT,
             size=(48, 48))
    w.sample("binjson", {"binjson.png": png(rng), "binjson.json": b"\xff\xfe\x00not json"},
             KEPT, size=(48, 48))
    w.good()
    done(w)

    # 17.-19. members that are never samples
    w = case("unsafe_members", "members named ../x, /abs/x, a symlink, a name without extension")
    w.good()
    w.builder.add("../escape.jpg", jpeg(rng))
    w.builder.add("/etc/abs.jpg", jpeg(rng))
    w.builder.add("a/../../up.txt", b"climb")
    w.builder.add("link.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
    w.builder.add("README", b"no extension")
    w.good()
    for member, reason in (("../escape.jpg", ".."), ("/etc/abs.jpg", "absolute path"),
                           ("a/../../up.txt", ".."), ("link.jpg", "symbolic link"),
                           ("README", "no extension")):
        w.shard_error(reason, member)
    w.case.forbidden_members = ["../escape.jpg", "/etc/abs.jpg", "a/../../up.txt", "link.jpg",
                                "README"]
    done(w)
    w = case("non_utf8_name", "a member name in latin-1 bytes (not UTF-8)", fmt=tarfile.GNU_FORMAT)
    w.good()
    w.builder.add("caf\udce9.jpg", jpeg(rng))   # the byte 0xE9: written as is
    w.good()
    w.shard_error("not valid UTF-8", "caf\\xe9.jpg")
    done(w)

    # 20.-23. files that hold no samples at all, and junk after the end of a good tar
    w = case("empty_tar", "a valid tar with no members")
    w.shard_error("holds no samples")
    done(w)
    w = case("zero_byte_tar", "a .tar file of 0 bytes")
    w.shard_error("is empty")
    done(w, b"")
    w = case("garbage_tar", "random bytes named .tar")
    w.shard_error("not a readable tar archive")
    done(w, b"\x00garbage" + bytes(rng.randrange(256) for _ in range(3000)))
    w = case("trailing_junk", "a good tar followed by junk after its end-of-archive marker")
    w.good()
    w.good()
    data, _ = w.builder.build()
    w.shard_error("after the tar end-of-archive marker")
    done(w, data + b"junk after the end" * 40)

    # a file matched by the glob that is not a tar at all (the run uses DIR/*)
    stray = Case(kind="not_a_tar",
                 description="a file of unknown type matched by the --input glob (names that "
                             "are clearly not tars, such as .txt, are skipped)",
                 shard="zz_notes.dat")
    stray.shard_errors.append(ShardErrorExpect("zz_notes.dat", "not a readable tar archive"))
    with open(os.path.join(directory, "zz_notes.dat"), "w") as handle:
        handle.write("These shards were scraped on a Tuesday.\n" * 20)
    cases[stray.kind] = stray

    return Corpus(directory=directory, input_glob=os.path.join(directory, "*"), cases=cases)


KINDS = ["truncated_tar", "corrupt_header_middle", "corrupt_header_tail", "zero_byte_image",
         "text_as_jpg", "truncated_jpeg", "png_over_pixel_cap", "png_bomb",
         "extreme_aspect_ratio", "cmyk_jpeg", "png_16bit", "palette_alpha_png", "animated",
         "exif_rotated_jpeg", "non_ascii_key", "sidecars_only", "duplicate_keys",
         "json_sidecar", "unsafe_members", "non_utf8_name", "empty_tar", "zero_byte_tar",
         "garbage_tar", "trailing_junk", "not_a_tar"]
