"""The centroid model: k-means training, the hash-based training sample, .npy save / load.

Spherical k-means (`spherical=True`, the default) re-normalises the centroids after every
iteration and assigns by inner product. That is k-means for the cosine geometry that CLIP
embeddings live in: the embeddings are L2-normalised, dedup assigns each one to the centroid of
highest cosine (`assign.assign_to_centroids`) and ranks members by cosine distance to it, so
training with the same similarity keeps training and assignment consistent. (NeMo Curator trains
Euclidean k-means with cuML and assigns by L2; on unit-norm centroids both rules pick the same
centroid.)
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import numpy as np

from beam_curator.dedup._checks import as_float32_matrix, check_positive_int
from beam_curator.dedup.backend import FAISS, TORCH, check_device, resolve_device
from beam_curator.dedup.torch_kmeans import train_spherical_kmeans

_LOG = logging.getLogger(__name__)

# faiss warns below this many training points per centroid; we log it once, in our words.
_FEW_POINTS_PER_CENTROID = 39


def train_kmeans(vectors: np.ndarray, n_clusters: int, n_iter: int = 20, seed: int = 0,
                 spherical: bool = True, use_gpu: bool = False, device: Optional[str] = None,
                 backend: Optional[str] = None) -> np.ndarray:
    """Train k-means on `vectors` (n, d) and return the (n_clusters, d) float32 centroids.

    Deterministic for a given input (row order included), seed, backend and machine. Callers
    sort the training sample by id first, so the result does not depend on how the sample was
    read. Every row given is used: the sample size is the caller's choice (`sample_mask`).

    Where it runs (`dedup.backend`): `backend` "faiss" (faiss-cpu, or faiss-gpu on a GPU) or
    "torch" (`torch_kmeans`, spherical only); None picks faiss when it is installed and can
    use the device (faiss-gpu on a GPU), torch otherwise, and says so once in the log.
    `use_gpu=True` is the older spelling of device="cuda" with faiss: without a GPU faiss
    sees, it trains on the CPU with a warning. The backends start from different initial
    centroids, so their centroids differ; each writes and reuses centroids.npy the same way.
    """
    x = as_float32_matrix(vectors, "training embeddings")
    k = check_positive_int(n_clusters, "n_clusters")
    n_iter = check_positive_int(n_iter, "n_iter")
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    n = x.shape[0]
    if n < k:
        raise ValueError(f"--n-clusters {k} needs at least {k} embeddings, got {n}: "
                         f"lower --n-clusters")
    if n < k * _FEW_POINTS_PER_CENTROID:
        _LOG.warning("k-means: %d training embeddings for %d centroids (%.1f per centroid); "
                     "centroids will be noisy below ~%d per centroid", n, k, n / k,
                     _FEW_POINTS_PER_CENTROID)

    engine, where = kmeans_engine(device, backend, use_gpu)
    if engine == TORCH:
        if not spherical:
            raise ValueError("the torch k-means is spherical only (the k-means dedup uses); "
                             "use backend='faiss' for Euclidean k-means")
        centroids = train_spherical_kmeans(x, k, n_iter, int(seed), where)
    else:
        centroids = _train_faiss(x, k, n_iter, int(seed), spherical, gpu=where != "cpu")
    if not np.isfinite(centroids).all():  # should not happen; never write a poisoned model
        raise RuntimeError("k-means produced non-finite centroids")
    return centroids.copy()


def kmeans_engine(device: Optional[str] = None, backend: Optional[str] = None,
                  use_gpu: bool = False) -> Tuple[str, str]:
    """(FAISS or TORCH, "cpu" or the torch device) that `train_kmeans` will train with."""
    if backend not in (None, FAISS, TORCH):
        raise ValueError(f"k-means backend must be None, 'faiss' or 'torch'; got {backend!r}")
    if use_gpu and device is None:
        device, backend = "cuda", backend or FAISS
    requested = check_device(device)
    if backend == TORCH:
        return TORCH, resolve_device(requested)
    faiss = _faiss_or_none()
    if backend == FAISS:
        if faiss is None:
            raise ImportError("k-means backend 'faiss' needs faiss-cpu or faiss-gpu installed")
        if requested != "cpu" and _faiss_gpus(faiss) == 0:
            _log_once(logging.WARNING, "k-means: a GPU was asked for but faiss sees none "
                      "(faiss-cpu installed, or no GPU); training on the CPU")
            return FAISS, "cpu"
        return FAISS, "cpu" if requested == "cpu" else "cuda"
    where = resolve_device(requested)
    if faiss is not None and (where == "cpu" or _faiss_gpus(faiss) > 0):
        return FAISS, where
    _log_once(logging.INFO if where != "cpu" else logging.WARNING,
              f"k-means: {'faiss is not installed' if faiss is None else 'faiss sees no GPU'}"
              f"; training with torch on {where}")
    return TORCH, where


def _train_faiss(x: np.ndarray, k: int, n_iter: int, seed: int, spherical: bool, gpu: bool
                 ) -> np.ndarray:
    """faiss seeds its initial pick of centroids from `seed` and sums each centroid in row
    order; it is told not to subsample again (every row given is used)."""
    faiss = _faiss_or_none()

    n, d = x.shape
    km = faiss.Kmeans(
        d, k, niter=n_iter, seed=seed, spherical=bool(spherical), gpu=gpu, verbose=False,
        # Use all rows given (no second, hidden subsample) and don't let faiss print its own
        # warning about few points per centroid (train_kmeans logs it instead).
        max_points_per_centroid=max(1, math.ceil(n / k)),
        min_points_per_centroid=1,
    )
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k, d)


def _faiss_or_none():
    # faiss's loader tries its AVX512 and AVX2 builds first and logs each miss at INFO ("Could
    # not load library with AVX2 support") even when the build it then loads works: quiet.
    loader = logging.getLogger("faiss.loader")
    loader.setLevel(max(loader.level, logging.WARNING))
    try:
        import faiss  # imported here: the rest of the package (and Beam workers) may not need it
    except ImportError:
        return None
    return faiss


def _faiss_gpus(faiss) -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@lru_cache(maxsize=None)   # once per process and message
def _log_once(level: int, message: str) -> None:
    _LOG.log(level, message)


# ---- the training sample -----------------------------------------------------------------

def _digest_limit(fraction: float) -> bytes:
    """The 8 bytes that a digest is below iff its unit value (`sample_mask`: top 53 bits /
    2**53) is below `fraction` (< 1).

    top53 / 2**53 < f  <=>  top53 < f * 2**53 (exact: a power-of-two scaling)  <=>
    top53 < ceil(f * 2**53)  <=>  digest < ceil(f * 2**53) << 11, and equal-length bytes
    compare as big-endian numbers."""
    return (math.ceil(fraction * 2.0**53) << 11).to_bytes(8, "big")


def sample_mask(ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Which rows belong to the k-means training sample, decided per id.

    A row is sampled iff blake2b("sample:{seed}:{id}") (8 bytes, big-endian, top 53 bits
    / 2**53) is below `fraction`. It depends on nothing but the id, so the same ids are
    sampled whatever the chunking, bundle order or runner; a larger fraction samples a
    superset.
    """
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"sample fraction must be in [0, 1], got {fraction}")
    if fraction == 1.0:
        return np.ones(len(ids), dtype=bool)
    # The documented test in bytes (`_digest_limit`): ~2x faster than the float, and at
    # 1B rows every id of the dataset goes through here once.
    limit = _digest_limit(fraction)
    seeded = hashlib.blake2b(f"sample:{seed}:".encode("utf-8"), digest_size=8)
    mask = np.empty(len(ids), dtype=bool)
    for row, id_ in enumerate(ids):
        h = seeded.copy()
        h.update(id_.encode("utf-8"))
        mask[row] = h.digest() < limit
    return mask


def sample_fraction(n_total: int, sample_size: Optional[int]) -> float:
    """The `sample_mask` fraction that draws about `sample_size` of `n_total` rows (all if None)."""
    if sample_size is None or n_total <= 0:
        return 1.0
    if sample_size < 1:
        raise ValueError(f"sample size must be a positive integer, got {sample_size!r}")
    return min(1.0, sample_size / n_total)


# ---- the centroid file -------------------------------------------------------------------

def validate_centroids(centroids, dim: Optional[int] = None) -> np.ndarray:
    """Check a centroid matrix and return it as C-contiguous float32 (k, d).

    Float64/float16 centroids (e.g. from scikit-learn) are accepted and converted; anything
    that is not a finite 2-d float matrix with non-zero rows is refused.
    """
    arr = np.asarray(centroids)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"centroids must be a float32 (k, d) array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"centroids must be a (k, d) array with k, d >= 1, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("centroids contain NaN or infinite values")
    if not (np.linalg.norm(arr, axis=1) > 0).all():
        # cosine to a zero centroid is undefined
        raise ValueError("centroids contain an all-zero row")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"centroids are {arr.shape[1]}-d but embeddings are {dim}-d")
    return arr


def save_centroids(path: str, centroids: np.ndarray) -> None:
    """Write the (k, d) float32 centroids as .npy to a local path or any Beam FileSystems URL."""
    from beam_curator.atomic import write_atomically

    arr = validate_centroids(centroids)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    # A temp name, then a rename: never written through whatever sits at `path`. The temp
    # name ends in .npy, so Beam compresses nothing (a plain np.load must read the file).
    write_atomically(path, lambda f: f.write(buf.getvalue()))


def load_centroids(path: str, dim: Optional[int] = None) -> np.ndarray:
    """Read centroids written by `save_centroids` (or any (k, d) float .npy, e.g. NeMo's
    kmeans_centroids.npy); with `dim`, also check they match the embeddings' dimension."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(path):
        raise FileNotFoundError(f"centroids file not found: {path}")
    with FileSystems.open(path, mime_type="application/octet-stream",
                          compression_type=CompressionTypes.UNCOMPRESSED) as f:
        data = f.read()  # small (k x d floats); a seekable buffer suits np.load everywhere
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:  # pickled objects, empty or not an .npy
        raise ValueError(f"{path} is not a plain numeric .npy centroid file: {e}") from e
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ValueError(f"{path} is not a single .npy array")
    try:
        return validate_centroids(arr, dim)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
