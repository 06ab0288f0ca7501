"""A small synthetic webdataset for the demo, the tests and the benchmarks.

Images are drawn here (coloured shapes on noise, 32–64 px), so nothing is downloaded. The
dataset plants what a curation run must find: exact duplicates (the same bytes under another
key and shard), near duplicates (the same picture re-encoded), and corrupt images.
"""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from PIL import Image, ImageDraw


def draw_image(rng: random.Random, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size),
                      tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 5)):
        box = (sorted(rng.randrange(size) for _ in range(2)),
               sorted(rng.randrange(size) for _ in range(2)))
        xy = [box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(xy, fill=colour)
    return image


def encode(image: Image.Image, ext: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@dataclass
class SyntheticSample:
    key: str
    members: Dict[str, bytes]      # extension -> bytes, in tar order


@dataclass
class SyntheticDataset:
    shards: List[str] = field(default_factory=list)          # tar paths
    exact_duplicates: Dict[str, str] = field(default_factory=dict)   # copy id -> original id
    near_duplicates: Dict[str, str] = field(default_factory=dict)    # re-encoded id -> original
    corrupt: List[str] = field(default_factory=list)                  # ids of corrupt images
    n_samples: int = 0


def write_shard(path: str, samples: List[SyntheticSample]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.members.items():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def make_dataset(directory: str, n_shards: int = 3, per_shard: int = 100, seed: int = 0,
                 size: int = 48, n_exact: int = 6, n_near: int = 6, n_corrupt: int = 1,
                 extensions=("jpg", "png", "webp")) -> SyntheticDataset:
    """Write `n_shards` tars of `per_shard` samples each into `directory`."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    dataset = SyntheticDataset()
    shards: List[List[SyntheticSample]] = []
    originals: List[tuple] = []   # (id, ext, image, bytes)
    for s in range(n_shards):
        shard = f"{s:05d}"
        samples = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            ext = extensions[(s * per_shard + i) % len(extensions)]
            image = draw_image(rng, size)
            data = encode(image, ext)
            caption = f"a synthetic picture number {i} of shard {s}"
            meta = {"key": key, "source": "beam-curator synthetic", "width": size,
                    "height": size}
            samples.append(SyntheticSample(key, {ext: data, "txt": caption.encode(),
                                                 "json": json.dumps(meta).encode()}))
            originals.append((f"{shard}/{key}", ext, image, data))
        shards.append(samples)

    # Plant duplicates by overwriting later samples, so every count stays as asked.
    slots = [(s, i) for s in range(n_shards) for i in range(per_shard)]
    rng.shuffle(slots)
    sources = originals[: max(1, len(originals) // 4)]
    # Small datasets plant what fits: every planted copy needs its own non-source slot.
    free = len(originals) - len(sources)
    n_exact = min(n_exact, free)
    n_near = min(n_near, free - n_exact)
    n_corrupt = min(n_corrupt, free - n_exact - n_near)
    take = iter(slots)

    def next_slot():
        while True:
            s, i = next(take)
            target_id = f"{s:05d}/{shards[s][i].key}"
            if target_id not in {o[0] for o in sources}:
                return s, i, target_id

    for n in range(n_exact):
        src_id, ext, _, data = sources[n % len(sources)]
        s, i, target_id = next_slot()
        members = shards[s][i].members
        members.clear()
        members.update({ext: data, "txt": b"an exact copy", "json": b"{}"})
        dataset.exact_duplicates[target_id] = src_id
    for n in range(n_near):
        src_id, _, image, _ = sources[-1 - n % len(sources)]
        s, i, target_id = next_slot()
        members = shards[s][i].members
        members.clear()
        members.update({"jpg": encode(image, "jpg", quality=70), "txt": b"a re-encoded copy"})
        dataset.near_duplicates[target_id] = src_id
    for _ in range(n_corrupt):
        s, i, target_id = next_slot()
        members = shards[s][i].members
        ext = next(e for e in members if e in ("jpg", "png", "webp"))
        members[ext] = members[ext][: max(8, len(members[ext]) // 3)]   # truncated image
        dataset.corrupt.append(target_id)

    for s, samples in enumerate(shards):
        path = os.path.join(directory, f"{s:05d}.tar")
        write_shard(path, samples)
        dataset.shards.append(path)
        dataset.n_samples += len(samples)
    return dataset


def main(argv: Optional[List[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a small synthetic webdataset.")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ds = make_dataset(args.dir, n_shards=args.shards, per_shard=args.per_shard, seed=args.seed)
    print(f"wrote {ds.n_samples} samples in {len(ds.shards)} shards to {args.dir} "
          f"({len(ds.exact_duplicates)} exact duplicates, {len(ds.near_duplicates)} near "
          f"duplicates, {len(ds.corrupt)} corrupt)")
