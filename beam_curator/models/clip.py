"""Load the CLIP image encoder from a model dir's ``clip/`` open_clip local-dir.

The one trap here is the activation: OpenAI's CLIP weights were trained with QuickGELU,
open_clip's default is nn.GELU, and the wrong one still runs, just with quietly worse
embeddings. So the loader decides QuickGELU from every explicit source it has (the config's
``model_cfg.quick_gelu``, the manifest, the open_clip pretrained tag / hub repo the weights
came from), refuses contradictions and silence, and then checks the built model's
activation modules.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .layout import (
    CLIP_CONFIG_NAME,
    CLIP_SUBDIR,
    CLIP_WEIGHT_NAMES,
    MANIFEST_NAME,
    Manifest,
    ModelDirError,
    UnsafeWeightsError,
    config_image_size,
    derive_manifest,
    find_clip_weights,
    fix_hint,
    is_remote,
    read_clip_config,
)

logger = logging.getLogger(__name__)


class QuickGeluError(ModelDirError):
    """The CLIP activation (QuickGELU vs GELU) is contradictory, unknown, or not what was built."""


@dataclass
class LoadedClip:
    """An open_clip model ready for inference, with what the caller needs to feed it."""

    model: nn.Module  # eval mode, on `device`; use model.encode_image(batch)
    preprocess: Callable  # open_clip's val transform: PIL image -> (3, image_size, image_size)
    embed_dim: int
    image_size: int
    arch: str
    quick_gelu: bool
    device: torch.device
    random_weights: bool


def load_clip(clip_dir: str, device: Union[str, torch.device] = "cpu",
              manifest: Optional[Manifest] = None) -> LoadedClip:
    """Build the CLIP model of a local ``MODEL_DIR/clip`` dir (a model dir is accepted too).

    Weights load through open_clip with ``weights_only=True`` (or safetensors). Raises
    ModelDirError when files are missing, QuickGeluError when the activation cannot be
    decided safely, UnsafeWeightsError for pickles that are not plain tensors.
    """
    import open_clip

    if is_remote(clip_dir):
        raise ModelDirError(f"{clip_dir} is remote: call localize_model_dir() on the model dir first")
    clip_dir = os.path.abspath(clip_dir)
    if not os.path.isfile(os.path.join(clip_dir, CLIP_CONFIG_NAME)) and \
            os.path.isdir(os.path.join(clip_dir, CLIP_SUBDIR)):
        clip_dir = os.path.join(clip_dir, CLIP_SUBDIR)  # given the model dir itself
    # The manifest, when there is one, sits in the model dir above clip/.
    model_dir = os.path.dirname(clip_dir)
    config_path = os.path.join(clip_dir, CLIP_CONFIG_NAME)
    weights_path = find_clip_weights(clip_dir)
    if not os.path.isfile(config_path) or weights_path is None:
        raise ModelDirError(
            f"{clip_dir} is not an open_clip local dir: it needs {CLIP_CONFIG_NAME} and one of "
            f"{', '.join(CLIP_WEIGHT_NAMES)}. {fix_hint(model_dir)}"
        )
    model_cfg = read_clip_config(config_path)["model_cfg"]
    if manifest is None:
        try:
            manifest = Manifest.load(model_dir)
        except FileNotFoundError:
            manifest = derive_manifest(model_cfg)

    if manifest.embed_dim != int(model_cfg["embed_dim"]):
        raise ModelDirError(
            f"{MANIFEST_NAME} says embed_dim={manifest.embed_dim} but {config_path} says "
            f"{model_cfg['embed_dim']}: the manifest does not describe these files. {fix_hint(model_dir)}"
        )
    quick_gelu = resolve_quick_gelu(model_cfg, manifest, where=model_dir)
    device = torch.device(device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            "local-dir:" + clip_dir,
            device=device,
            # Only ever turns QuickGELU on: a config that says quick_gelu=true is never
            # overridden, and one that says false contradicted us above and raised.
            force_quick_gelu=quick_gelu,
            weights_only=True,
            require_pretrained=True,
        )
    except pickle.UnpicklingError as e:
        raise UnsafeWeightsError(
            f"refusing to load {weights_path}: it holds pickled objects other than "
            f"tensors. Use open_clip_model.safetensors. Details: {str(e).splitlines()[0]}"
        ) from e
    model.eval()
    verify_activations(model, quick_gelu)

    embed_dim = int(model_cfg["embed_dim"])
    return LoadedClip(
        model=model,
        preprocess=preprocess,
        embed_dim=embed_dim,
        image_size=config_image_size(model_cfg),
        arch=manifest.clip_arch,
        quick_gelu=quick_gelu,
        device=device,
        random_weights=manifest.random_weights,
    )


def resolve_quick_gelu(model_cfg: Mapping, manifest: Manifest, where: str = "model dir") -> bool:
    """Decide QuickGELU from every explicit claim; raise QuickGeluError if they disagree or none exists."""
    claims: List[Tuple[str, bool]] = []
    if "quick_gelu" in model_cfg:
        claims.append((f"{CLIP_SUBDIR}/{CLIP_CONFIG_NAME} model_cfg.quick_gelu", bool(model_cfg["quick_gelu"])))
    if manifest.quick_gelu is not None:
        claims.append((f"{MANIFEST_NAME} quick_gelu", manifest.quick_gelu))
    claims.extend(_provenance_claims(manifest))

    values = {value for _, value in claims}
    if len(values) > 1:
        listed = "; ".join(f"{source} = {value}" for source, value in claims)
        raise QuickGeluError(
            f"{where}: contradictory CLIP activation ({listed}). OpenAI-trained weights need "
            "QuickGELU and the wrong activation silently degrades every embedding. Fix the "
            "config or manifest so they agree with how the weights were trained, or re-create "
            f"the dir. {fix_hint(where)}"
        )
    if not values:
        raise QuickGeluError(
            f"{where}: cannot tell whether the CLIP weights use QuickGELU: "
            f"{CLIP_SUBDIR}/{CLIP_CONFIG_NAME} has no model_cfg.quick_gelu and there is no "
            f"{MANIFEST_NAME} saying where the weights came from. Add \"quick_gelu\": true to "
            "model_cfg for OpenAI weights (e.g. timm/vit_large_patch14_clip_224.openai), or "
            "\"quick_gelu\": false for weights trained with GELU (most LAION/DataComp ones)."
        )
    return values.pop()


def _provenance_claims(manifest: Manifest) -> List[Tuple[str, bool]]:
    """What open_clip's pretrained registry says about the recorded tag / hub repo."""
    import open_clip

    claims = []
    if manifest.clip_pretrained:
        cfg = open_clip.get_pretrained_cfg(manifest.clip_arch, manifest.clip_pretrained)
        if cfg:
            claims.append((
                f"open_clip pretrained tag {manifest.clip_arch}/{manifest.clip_pretrained}",
                bool(cfg.get("quick_gelu", False)),
            ))
        elif manifest.clip_pretrained.lower() == "openai":
            claims.append(("pretrained tag 'openai'", True))
    source = (manifest.clip_source or "").removeprefix("hf-hub:").strip("/")
    if source:
        for arch, tag in open_clip.list_pretrained():
            cfg = open_clip.get_pretrained_cfg(arch, tag)
            if cfg.get("hf_hub", "").strip("/") == source:
                claims.append((f"hub repo {source} (open_clip {arch}/{tag})", bool(cfg.get("quick_gelu", False))))
                break
    return claims


def verify_activations(model: nn.Module, quick_gelu: bool) -> None:
    """Check the built model's MLP activations really are the ones we decided on."""
    from open_clip.transformer import QuickGELU

    n_quick = sum(isinstance(m, QuickGELU) for m in model.modules())
    n_gelu = sum(isinstance(m, nn.GELU) for m in model.modules())
    if quick_gelu and (n_quick == 0 or n_gelu > 0):
        raise QuickGeluError(
            f"QuickGELU was required but the built model has {n_quick} QuickGELU and {n_gelu} "
            "nn.GELU modules: this open_clip architecture ignores quick_gelu. Use a standard "
            "ViT/ResNet open_clip config."
        )
    if not quick_gelu and n_quick > 0:
        raise QuickGeluError(
            f"GELU was required but the built model has {n_quick} QuickGELU modules"
        )
