"""Synthetic data for the benchmarks: CLIP-like embeddings with planted near-duplicates (dedup),
and photo-like JPEG shards (`textured_jpeg`, `write_jpeg_shards`: decode and embed throughput).

Rows are unit vectors scattered around random centre directions (cosine to a same-centre
neighbour ~0.5, far below any dedup threshold); `n_dups` disjoint pairs are then planted by
overwriting one row of each pair with a unit vector at cosine in [min_sim, max_sim] from the
other. With the defaults every planted pair is a duplicate at `DEFAULT_EPS` and no other pair
comes near (for d >= ~64), so the expected answer is known: one member of each pair removed.

Built in float32 chunks: 1M x 768 needs the 3 GB of the result plus ~100 MB of scratch.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

DEFAULT_EPS = 0.01          # NeMo Curator's default eps_to_extract
_CHUNK_ROWS = 16384
_CENTER_WEIGHT = 1.0        # |centre part| = |noise part|: same-centre cosine ~0.5


def synthetic_ids(n: int) -> List[str]:
    """Ids in the project's `<shard>/<key>` form, 10k samples per pseudo-shard."""
    return [f"synth-{i // 10000:05d}/{i:09d}" for i in range(n)]


def make_planted_embeddings(n: int, d: int, n_dups: int, seed: int, n_centers: int = 0,
                            min_sim: float = 0.995, max_sim: float = 0.999
                            ) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """Return `(ids, vectors (n, d) float32 L2-normalised, planted_pairs (n_dups, 2) int64)`.

    `planted_pairs[p] = (source_row, planted_row)`: the planted row was built from the source at
    a cosine drawn uniformly in [min_sim, max_sim]. The rows of all pairs are distinct, so no
    chains. `n_centers` defaults to one per 1000 rows. Deterministic for the arguments.
    """
    if 2 * n_dups > n:
        raise ValueError(f"{n_dups} planted pairs need at least {2 * n_dups} rows, got {n}")
    if not 0.0 < min_sim <= max_sim < 1.0:
        raise ValueError("need 0 < min_sim <= max_sim < 1")
    rng = np.random.default_rng(seed)
    n_centers = n_centers or max(1, n // 1000)
    centers = rng.standard_normal((n_centers, d), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    centers *= _CENTER_WEIGHT

    vectors = np.empty((n, d), dtype=np.float32)
    noise_scale = np.float32(1.0 / np.sqrt(d))   # a standard normal row has norm ~sqrt(d)
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(n, start + _CHUNK_ROWS)
        block = rng.standard_normal((stop - start, d), dtype=np.float32)
        block *= noise_scale
        block += centers[rng.integers(0, n_centers, stop - start)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vectors[start:stop] = block

    rows = rng.choice(n, size=2 * n_dups, replace=False).astype(np.int64)
    pairs = np.stack([rows[:n_dups], rows[n_dups:]], axis=1)
    for start in range(0, n_dups, _CHUNK_ROWS):
        src, dst = pairs[start:start + _CHUNK_ROWS, 0], pairs[start:start + _CHUNK_ROWS, 1]
        u = vectors[src].astype(np.float64)
        g = rng.standard_normal(u.shape)
        g -= np.sum(g * u, axis=1, keepdims=True) * u          # orthogonal to u ...
        g /= np.linalg.norm(g, axis=1, keepdims=True)          # ... and unit
        cos = rng.uniform(min_sim, max_sim, size=(len(src), 1))
        vectors[dst] = (cos * u + np.sqrt(1.0 - cos * cos) * g).astype(np.float32)
    return synthetic_ids(n), vectors, pairs


def textured_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90,
                  gray: bool = False, subsampling: int = 2) -> bytes:
    """A JPEG with about the entropy of a photo (smooth colour fields, blotches, grain), so
    decoding it costs what a real one of that size costs (flat shapes decode much faster).
    A 512 x 512 one is ~90 kB at quality 90."""
    import io

    from PIL import Image

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    fields = np.stack([np.sin(6 * x + rng.uniform(0, 6)), np.cos(5 * y + rng.uniform(0, 6)),
                       2 * x * y - 1], axis=-1) * 100 + 128
    blotches = np.kron(rng.standard_normal((height // 16 + 1, width // 16 + 1, 3)),
                       np.ones((16, 16, 1)))[:height, :width] * 25
    grain = rng.standard_normal((height, width, 3)) * 12
    image = Image.fromarray(np.clip(fields + blotches + grain, 0, 255).astype(np.uint8))
    if gray:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return buffer.getvalue()


def write_jpeg_shards(directory: str, n_shards: int, per_shard: int, size: int, seed: int = 0,
                      distinct: int = 64) -> List[str]:
    """Webdataset shards of `size` x `size` photo-like JPEGs (+ a .txt caption each), for
    throughput benchmarks: `distinct` images are drawn and reused under new keys (decoding
    costs the same; embedding does not deduplicate). Returns the tar paths, in order."""
    import os

    from beam_curator.synthetic import SyntheticSample, write_shard

    rng = np.random.default_rng(seed)
    pool = [textured_jpeg(rng, size, size) for _ in range(distinct)]
    os.makedirs(directory, exist_ok=True)
    paths = []
    for s in range(n_shards):
        samples = [SyntheticSample(key=f"{s:05d}{i:05d}", members={
            "jpg": pool[(s * per_shard + i) % distinct], "txt": f"image {s}-{i}".encode()})
            for i in range(per_shard)]
        paths.append(os.path.join(directory, f"bench-{s:05d}.tar"))
        write_shard(paths[-1], samples)
    return paths
