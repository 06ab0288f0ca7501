"""Checking a model dir before any work: files, manifest, QuickGELU, head dims, hashes.

Its own module because it needs the CLIP and head loaders, which build on `layout`: `layout`
stays the bottom layer (paths, manifest), and nothing below imports this module.
"""
from __future__ import annotations

import logging
import os

from .clip import resolve_quick_gelu
from .heads import check_head_dims, load_heads
from .layout import (
    CLIP_CONFIG_PATH,
    MANIFEST_NAME,
    Manifest,
    ModelDirError,
    derive_manifest,
    file_sha256,
    fix_hint,
    read_clip_config,
    resolve_model_files,
)

logger = logging.getLogger(__name__)


def check_model_dir(model_dir: str, verify_sha256: bool = False) -> Manifest:
    """Fail fast unless ``model_dir`` is a complete, consistent local model directory.

    Checks files, manifest vs config, the QuickGELU decision and the heads' input dim
    against the CLIP embed dim, so a launcher can fail before any worker starts. Returns the
    manifest; for a hand-assembled directory without ``manifest.json`` one is derived from
    the CLIP config (weights treated as real, not random). ``verify_sha256`` re-hashes every
    file the manifest lists (seconds for ViT-L/14). Does not build the CLIP model.
    """
    files = resolve_model_files(model_dir)
    model_cfg = read_clip_config(files.clip_config)["model_cfg"]
    config_dim = int(model_cfg["embed_dim"])
    try:
        manifest = Manifest.load(files.root)
    except FileNotFoundError:
        manifest = derive_manifest(model_cfg, files.relpaths())
        logger.info("%s has no %s; derived %s", model_dir, MANIFEST_NAME, manifest)

    if manifest.embed_dim != config_dim:
        raise ModelDirError(
            f"{MANIFEST_NAME} says embed_dim={manifest.embed_dim} but {CLIP_CONFIG_PATH} says "
            f"{config_dim}: the manifest does not describe these files. {fix_hint(model_dir)}"
        )
    for rel in manifest.files:
        if not os.path.isfile(os.path.join(files.root, rel)):
            raise ModelDirError(f"{MANIFEST_NAME} lists {rel} but it is missing. {fix_hint(model_dir)}")
    resolve_quick_gelu(model_cfg, manifest, where=str(model_dir))
    aesthetic, nsfw = load_heads(files.root)  # a few MB: cheap enough to check up front
    check_head_dims(config_dim, aesthetic, nsfw)
    if verify_sha256:   # last: the structural errors above say more than "the hash differs"
        for rel, expected in manifest.files.items():
            path = os.path.join(files.root, rel)
            if expected is not None and file_sha256(path) != expected:
                link = (f" (a link to {os.path.realpath(path)})"
                        if os.path.islink(path) else "")
                raise ModelDirError(
                    f"{rel}{link} does not match the sha256 that {MANIFEST_NAME} records for "
                    "it: the file was corrupted or replaced, and every score would silently "
                    "change. Restore it (`python -m beam_curator models download --dir "
                    f"{model_dir} --force` for the real weights, `models init-random --dir "
                    f"{model_dir} --force` for test weights), or, if you replaced it on purpose, "
                    "pass --verify_weights false (or update manifest.json).")
    return manifest
