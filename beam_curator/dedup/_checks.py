"""Input checks shared by the dedup modules: fail early with a message that names the problem."""
from __future__ import annotations

import numpy as np


def as_float32_matrix(x, name: str, check_finite: bool = True) -> np.ndarray:
    """`x` as a C-contiguous (n, d) float32 array (no copy when it already is one)."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (n, d) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must hold floats, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    # NaN/inf would silently poison argmax and k-means; one pass over the data is cheap next
    # to the matmuls that follow.
    if check_finite and arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def as_float_vector(x, name: str, n: int) -> np.ndarray:
    """`x` as a finite 1-d float array of length n (dtype kept)."""
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_dims_match(centroids: np.ndarray, vectors: np.ndarray) -> None:
    if centroids.shape[1] != vectors.shape[1]:
        raise ValueError(
            f"centroids are {centroids.shape[1]}-d but embeddings are {vectors.shape[1]}-d"
        )
