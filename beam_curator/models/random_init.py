"""Write a model dir with random weights, in exactly the layout real weights use.

For demos, tests and CI without network: ``init_random(dir)`` gives a tiny open_clip ViT
(a few MB, milliseconds per batch on CPU) plus aesthetic and NSFW heads of its embedding
size, in the published key layouts. ``arch`` may also name a real open_clip architecture
("ViT-B-32", "ViT-L-14", ...) for benchmarks that need real-sized compute.

Everything is seeded and written with safetensors / sorted JSON, so the same
``(arch, seed)`` gives byte-identical files.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional, Tuple

import torch
from torch import nn

from beam_curator.atomic import write_atomically

from .heads import AestheticHead, NsfwHead
from .layout import (
    AESTHETIC_STEM,
    AESTHETIC_SUBDIR,
    ALL_LAYOUT_PATHS,
    CLIP_CONFIG_PATH,
    CLIP_WEIGHT_PATHS,
    NSFW_STEM,
    NSFW_SUBDIR,
    Manifest,
    atomic_write_bytes,
    config_image_size,
    file_sha256,
    preprocess_cfg_of,
)

TINY_ARCH = "tiny"
TINY_ARCH_NAME = "beam-curator-tiny-vit"

# A ViT small enough for unit tests (~1.7M params, most of them the text vocabulary):
# 32x32 images in 8x8 patches (16 tokens), 2 blocks of width 64, 64-dim embeddings.
# The text tower keeps the real tokenizer's vocabulary so open_clip's tokenizer works.
# quick_gelu mirrors the OpenAI layout the real model uses.
TINY_MODEL_CFG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

# OpenAI CLIP's normalisation, as in the hub's open_clip_config.json for the .openai weights.
PREPROCESS_CFG = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

# Random aesthetic scores centre on the middle of LAION's 1-10 scale, with the same
# spread-setting norm ‖w‖ as the real predictor, so demo thresholds behave plausibly.
RANDOM_AESTHETIC_BIAS = 5.0
RANDOM_AESTHETIC_W_NORM = 18.0
RANDOM_NSFW_LOGIT_MEAN = -2.0
RANDOM_NSFW_LOGIT_STD = 1.6


def clip_model_cfg(arch: str = TINY_ARCH, embed_dim: Optional[int] = None) -> dict:
    """The open_clip ``model_cfg`` for ``arch`` ("tiny" or a built-in open_clip name).
    ``embed_dim`` (tiny only) widens its embeddings: tests of what large vectors do to a
    pipeline (Flink's task output limit) without a large model's compute."""
    if embed_dim is not None and arch != TINY_ARCH:
        raise ValueError(f"embed_dim is only for the tiny architecture, not {arch!r}")
    if arch == TINY_ARCH:
        cfg = copy.deepcopy(TINY_MODEL_CFG)
        if embed_dim is not None:
            cfg["embed_dim"] = int(embed_dim)
        return cfg
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown CLIP architecture {arch!r}: use 'tiny' or one of open_clip.list_models()")
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if cfg.get("custom_text") or "multimodal_cfg" in cfg or "hf_model_name" in text \
            or "timm_model_name" in vision:
        # Those towers come from timm / transformers and would fetch weights or tokenizers.
        raise ValueError(f"{arch!r} is not a plain open_clip CLIP architecture; pick e.g. ViT-B-32 or ViT-L-14")
    cfg = copy.deepcopy(cfg)
    cfg["quick_gelu"] = True  # mirror the OpenAI layout the real weights use
    return cfg


def arch_name(arch: str) -> str:
    return TINY_ARCH_NAME if arch == TINY_ARCH else arch


def build_random_clip(arch: str = TINY_ARCH, seed: int = 0, embed_dim: Optional[int] = None
                      ) -> Tuple[nn.Module, dict]:
    """The random-weight CLIP model (eval mode) and its ``open_clip_config.json`` content."""
    from open_clip.model import CLIP

    model_cfg = clip_model_cfg(arch, embed_dim)
    # fork_rng: seed deterministically without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**model_cfg)
    return model.eval(), {"model_cfg": model_cfg, "preprocess_cfg": dict(PREPROCESS_CFG)}


def build_random_heads(embed_dim: int, seed: int = 0, probe: Optional[torch.Tensor] = None
                       ) -> Tuple[AestheticHead, NsfwHead]:
    """Random heads in the published layouts, taking ``embed_dim``-dim embeddings.

    ``probe``: embeddings the random CLIP gives to a few drawn images; the NSFW head is
    calibrated on them so that a demo flags some images (see calibrate_random_nsfw).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        aesthetic = AestheticHead(embed_dim)
        nsfw = NsfwHead(embed_dim)  # norm: mean 0, variance 1 (its defaults)
    linears = [m for m in aesthetic.layers if isinstance(m, nn.Linear)]
    with torch.no_grad():
        # Zero inner biases and put the centre in the last one: composed bias is exactly 5.0.
        for layer in linears:
            layer.bias.zero_()
        linears[-1].bias.fill_(RANDOM_AESTHETIC_BIAS)
        w, _ = aesthetic.affine()
        norm = float((w ** 2).sum() ** 0.5)
        if norm > 0:  # scale the last layer so the composed ‖w‖ matches the real head's
            linears[-1].weight.mul_(RANDOM_AESTHETIC_W_NORM / norm)
        calibrate_random_nsfw(nsfw, embed_dim, seed, probe)
    return aesthetic.eval(), nsfw.eval()


def _probe_embeddings(model: nn.Module, open_clip_config: dict, seed: int,
                      n: int = 16) -> torch.Tensor:
    """The random CLIP's embeddings of `n` drawn images (shapes on a background)."""
    import random

    from open_clip.transform import PreprocessCfg, image_transform_v2

    from beam_curator.synthetic import draw_image

    preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg_of(open_clip_config)),
                                    is_train=False)
    rng = random.Random(seed)
    batch = torch.stack([preprocess(draw_image(rng, 64)) for _ in range(n)])
    with torch.no_grad():
        features = model.encode_image(batch).float()
    return torch.nn.functional.normalize(features, dim=1)


def calibrate_random_nsfw(nsfw: NsfwHead, embed_dim: int, seed: int,
                          probe: Optional[torch.Tensor] = None) -> None:
    """Spread the random NSFW head's scores so a demo flags a few images, not none or all.

    A random CLIP maps every image to nearly the same direction, so the head is calibrated on
    the spread of `probe` (that CLIP's embeddings of drawn images; random unit vectors when
    absent): after normalising by the probe's own mean and variance, the last layer is scaled
    so the logit has std RANDOM_NSFW_LOGIT_STD around RANDOM_NSFW_LOGIT_MEAN (~10 % >= 0.5).
    """
    if probe is None:
        generator = torch.Generator().manual_seed(seed + 1)
        probe = torch.nn.functional.normalize(torch.randn(512, embed_dim, generator=generator),
                                              dim=1)
    probe = probe.float()
    nsfw.norm.mean.copy_(probe.mean(dim=0))
    nsfw.norm.variance.copy_(probe.var(dim=0).clamp_min(1e-12))
    x = nsfw.norm(probe)
    for layer in (nsfw.linear_1, nsfw.linear_2, nsfw.linear_3):
        x = torch.relu(layer(x))
    logits = nsfw.linear_4(x).squeeze(-1)
    scale = RANDOM_NSFW_LOGIT_STD / float(logits.std().clamp_min(1e-12))
    nsfw.linear_4.weight.mul_(scale)
    nsfw.linear_4.bias.copy_((nsfw.linear_4.bias - logits.mean()) * scale + RANDOM_NSFW_LOGIT_MEAN)


def write_safetensors(module: nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    # Streams to disk: ViT-L/14 is 1.7 GB, no need to hold a second copy as bytes.
    write_atomically(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
                     pass_path=True)


def init_random(model_dir: str, arch: str = TINY_ARCH, seed: int = 0, overwrite: bool = False,
                embed_dim: Optional[int] = None) -> Manifest:
    """Write a complete random-weight model dir and return its manifest.

    ``embed_dim`` (tiny only) sets the embedding width (default 64).
    Refuses a dir that already holds model files unless ``overwrite`` (then every layout file
    is replaced, including the other weight formats, so nothing stale is left to load).
    """
    model_dir = os.fspath(model_dir)
    existing = [p for p in ALL_LAYOUT_PATHS if os.path.exists(os.path.join(model_dir, p))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{model_dir} already holds model files ({', '.join(existing)}); pass overwrite=True "
            "(CLI: --force) to replace them"
        )
    for rel in existing:
        os.unlink(os.path.join(model_dir, rel))

    model, open_clip_config = build_random_clip(arch, seed, embed_dim)
    model_cfg = open_clip_config["model_cfg"]
    embed_dim = int(model_cfg["embed_dim"])
    # Distinct seeds per part so the heads do not depend on the CLIP's parameter count.
    aesthetic, nsfw = build_random_heads(embed_dim, seed=seed + 1,
                                         probe=_probe_embeddings(model, open_clip_config, seed))

    written = {
        CLIP_CONFIG_PATH: lambda p: atomic_write_bytes(
            p, (json.dumps(open_clip_config, indent=2, sort_keys=True) + "\n").encode()),
        CLIP_WEIGHT_PATHS[0]: lambda p: write_safetensors(model, p),
        f"{AESTHETIC_SUBDIR}/{AESTHETIC_STEM}.safetensors": lambda p: write_safetensors(aesthetic, p),
        f"{NSFW_SUBDIR}/{NSFW_STEM}.safetensors": lambda p: write_safetensors(nsfw, p),
    }
    for rel, write in written.items():
        write(os.path.join(model_dir, rel))

    manifest = Manifest(
        clip_arch=arch_name(arch),
        embed_dim=embed_dim,
        image_size=config_image_size(model_cfg),
        random_weights=True,
        quick_gelu=True,
        clip_pretrained=None,
        clip_source=f"random (seed={seed})",
        files={rel: file_sha256(os.path.join(model_dir, rel)) for rel in written},
    )
    manifest.save(model_dir)
    return manifest
