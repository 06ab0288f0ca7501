"""The two LAION score heads that run on CLIP image embeddings, and their safe loaders.

Both modules reproduce the published state-dict key layouts exactly, so the files users
download load with ``strict=True``:

* LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor):
  ``layers.{0,2,4,6,7}.{weight,bias}``, five Linears with dropouts between and no
  activations; raw score on LAION's 1-10 scale.
* LAION CLIP-based NSFW detector, PyTorch port in NeMo Curator's layout:
  ``norm.mean``, ``norm.variance``, ``linear_1..4.{weight,bias}``; probability 0-1, 1 = NSFW.

The input dim is read from the weights, so tiny random heads for small test models work.
"""

from __future__ import annotations

import os
import pickle
from typing import Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .layout import ModelDirError, UnsafeWeightsError, fix_hint, resolve_model_files

# Hidden sizes of the published aesthetic MLP (the input size comes from the weights).
AESTHETIC_HIDDEN = (1024, 128, 64, 16)
# Hidden sizes of the published NSFW MLP.
NSFW_HIDDEN = (64, 512, 256)


class HeadDimError(ModelDirError):
    """A score head expects a different embedding size than the CLIP model produces."""


class AestheticHead(nn.Module):
    """LAION improved aesthetic predictor: L2-normalised embedding -> score on the 1-10 scale.

    There are no activations, so in eval mode the whole MLP is one affine map
    (for the real ViT-L/14 weights: ``score = w·x + 5.2366`` with ``‖w‖ ≈ 17.996``).
    """

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.input_dim = input_dim
        h1, h2, h3, h4 = AESTHETIC_HIDDEN
        # Indices must stay 0..7 to match the published keys layers.{0,2,4,6,7}.
        self.layers = nn.Sequential(
            nn.Linear(input_dim, h1),
            nn.Dropout(0.2),
            nn.Linear(h1, h2),
            nn.Dropout(0.2),
            nn.Linear(h2, h3),
            nn.Dropout(0.1),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)

    def affine(self) -> Tuple[np.ndarray, float]:
        """Compose the linears into ``(w, b)`` with score = w·x + b (float64, eval mode)."""
        w = np.eye(self.input_dim)
        b = np.zeros(self.input_dim)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                lw = layer.weight.detach().cpu().double().numpy()
                lb = layer.bias.detach().cpu().double().numpy()
                w, b = lw @ w, lw @ b + lb
        return w[0], float(b[0])


class _FeatureNormalization(nn.Module):
    """Keras ``Normalization`` as ported: ``(x - mean) / sqrt(variance)``.

    No epsilon: the port (and heads_reference.npz) divides by the plain square root; the
    smallest published variance is ~3.7e-4, so there is nothing to guard against.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.variance.sqrt()


class NsfwHead(nn.Module):
    """LAION CLIP-based NSFW detector: embedding -> probability of NSFW (0-1)."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.input_dim = input_dim
        h1, h2, h3 = NSFW_HIDDEN
        self.norm = _FeatureNormalization(input_dim)
        self.linear_1 = nn.Linear(input_dim, h1)
        self.linear_2 = nn.Linear(h1, h2)
        self.linear_3 = nn.Linear(h2, h3)
        self.linear_4 = nn.Linear(h3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x)).squeeze(-1)


# --------------------------------------------------------------------------- loading


def load_state_dict_file(path: str) -> dict:
    """Read a flat ``{name: tensor}`` file without ever running pickled code.

    ``.safetensors`` cannot hold code at all; ``.pth``/``.bin`` go through
    ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers and
    refuses anything else. CUDA-saved tensors (the aesthetic file) land on the CPU.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeWeightsError(
                f"refusing to load {path}: it holds pickled objects other than tensors, and "
                "loading it would run arbitrary code. Use the published weights file (or convert "
                f"it to .safetensors). Details: {str(e).splitlines()[0]}"
            ) from e
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelDirError(f"{path} is not a flat state dict of tensors")
    return dict(state)


def _head_from_state_dict(cls, state: Mapping, first_weight_key: str, path: str) -> nn.Module:
    if first_weight_key not in state:
        raise ModelDirError(
            f"{path} is not in the published {cls.__name__} layout: no key {first_weight_key!r} "
            f"(found {sorted(state)[:6]})"
        )
    head = cls(input_dim=int(state[first_weight_key].shape[1]))
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelDirError(f"{path} does not match the published {cls.__name__} layout: {e}") from e
    return head.eval()


def load_aesthetic_head(path: str) -> AestheticHead:
    return _head_from_state_dict(AestheticHead, load_state_dict_file(path), "layers.0.weight", path)


def load_nsfw_head(path: str) -> NsfwHead:
    return _head_from_state_dict(NsfwHead, load_state_dict_file(path), "linear_1.weight", path)


def load_heads(model_dir: str) -> Tuple[AestheticHead, NsfwHead]:
    """Load both heads of a local model dir (eval mode, CPU); they must share an input dim."""
    files = resolve_model_files(model_dir)
    aesthetic = load_aesthetic_head(files.aesthetic)
    nsfw = load_nsfw_head(files.nsfw)
    if aesthetic.input_dim != nsfw.input_dim:
        raise HeadDimError(
            f"the aesthetic head expects {aesthetic.input_dim}-dim embeddings but the NSFW head "
            f"expects {nsfw.input_dim}: both must be trained on the same CLIP model. {fix_hint(model_dir)}"
        )
    return aesthetic, nsfw


def check_head_dims(clip_embed_dim: int, aesthetic: Optional[nn.Module] = None,
                    nsfw: Optional[nn.Module] = None) -> None:
    """Raise HeadDimError unless each given head takes ``clip_embed_dim``-dim embeddings."""
    for name, head in (("aesthetic", aesthetic), ("NSFW", nsfw)):
        if head is not None and head.input_dim != clip_embed_dim:
            raise HeadDimError(
                f"the CLIP model embeds to {clip_embed_dim} dims but the {name} head expects "
                f"{head.input_dim}: the heads only make sense on embeddings of the CLIP model they "
                "were trained on (the LAION heads: ViT-L/14, 768 dims). Use a model dir whose "
                "clip/ and heads belong together (`models download`, or `models init-random` "
                "for a matching random set)."
            )


class ScoreHeads:
    """Both heads together: ``score(embeddings) -> (aesthetic, nsfw)`` as float32 arrays,
    computed in float64 so that a sample's score does not depend on its batch."""

    def __init__(self, aesthetic: AestheticHead, nsfw: NsfwHead,
                 device: Union[str, torch.device] = "cpu"):
        if aesthetic.input_dim != nsfw.input_dim:
            raise HeadDimError(
                f"aesthetic head expects {aesthetic.input_dim} dims, NSFW head {nsfw.input_dim}"
            )
        self.device = torch.device(device)
        # float64: a float32 matmul's last bits depend on the batch shape, and Beam batches
        # adaptively; in float64 every batching rounds to the same float32 scores (reruns
        # stay byte-identical). The heads are small, so the cost is negligible.
        self.aesthetic = aesthetic.to(self.device, torch.float64).eval()
        self.nsfw = nsfw.to(self.device, torch.float64).eval()

    @classmethod
    def from_model_dir(cls, model_dir: str, device: Union[str, torch.device] = "cpu",
                       clip_embed_dim: Optional[int] = None) -> "ScoreHeads":
        aesthetic, nsfw = load_heads(model_dir)
        if clip_embed_dim is not None:
            check_head_dims(clip_embed_dim, aesthetic, nsfw)
        return cls(aesthetic, nsfw, device=device)

    @property
    def input_dim(self) -> int:
        return self.aesthetic.input_dim

    def score(self, embeddings: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Score L2-normalised embeddings of shape (n, d); returns two float32 arrays of shape (n,)."""
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected embeddings of shape (n, {self.input_dim}), got {x.shape}")
        batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(self.device)
        with torch.no_grad():
            aesthetic = self.aesthetic(batch)
            nsfw = self.nsfw(batch)
        return (aesthetic.float().cpu().numpy(), nsfw.float().cpu().numpy())
