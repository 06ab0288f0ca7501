"""On-disk layout of a model directory, its manifest, and fail-fast checks.

A model directory holds everything the pipeline scores with::

    MODEL_DIR/
      manifest.json                                   what is here (written by init-random / download)
      clip/open_clip_config.json                      {"model_cfg": {...}, "preprocess_cfg": {...}}
      clip/open_clip_model.safetensors                (or open_clip_pytorch_model.bin)
      aesthetic/sac+logos+ava1-l14-linearMSE.pth      (or .safetensors, same keys)
      nsfw/clip_autokeras_binary_nsfw.pth             (or .safetensors, same keys)

`clip/` is an open_clip ``local-dir`` exactly as the Hugging Face hub stores
``timm/vit_large_patch14_clip_224.openai``, so a hub snapshot can be dropped in as is.
Model directories may live on GCS/S3: `localize_model_dir` copies them to a local cache
first, because torch and open_clip only read local files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Mapping, Optional

from beam_curator.atomic import write_atomically

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"

CLIP_SUBDIR = "clip"
CLIP_CONFIG_NAME = "open_clip_config.json"
# In open_clip's own preference order: it picks the first one present.
CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

AESTHETIC_SUBDIR = "aesthetic"
AESTHETIC_STEM = "sac+logos+ava1-l14-linearMSE"
NSFW_SUBDIR = "nsfw"
NSFW_STEM = "clip_autokeras_binary_nsfw"
# The published files are .pth; .safetensors with the same keys is accepted (and is what
# init-random writes, because it is byte-deterministic and cannot carry code).
HEAD_SUFFIXES = (".pth", ".safetensors")

# Paths relative to MODEL_DIR, as recorded in the manifest.
CLIP_CONFIG_PATH = f"{CLIP_SUBDIR}/{CLIP_CONFIG_NAME}"
CLIP_WEIGHT_PATHS = tuple(f"{CLIP_SUBDIR}/{name}" for name in CLIP_WEIGHT_NAMES)
AESTHETIC_PATHS = tuple(f"{AESTHETIC_SUBDIR}/{AESTHETIC_STEM}{s}" for s in HEAD_SUFFIXES)
NSFW_PATHS = tuple(f"{NSFW_SUBDIR}/{NSFW_STEM}{s}" for s in HEAD_SUFFIXES)
ALL_LAYOUT_PATHS = (MANIFEST_NAME, CLIP_CONFIG_PATH) + CLIP_WEIGHT_PATHS + AESTHETIC_PATHS + NSFW_PATHS

LAYOUT_HELP = f"""\
Expected layout of a model directory:
  MODEL_DIR/{CLIP_CONFIG_PATH}
  MODEL_DIR/{CLIP_WEIGHT_PATHS[0]}   (or {CLIP_WEIGHT_NAMES[1]})
  MODEL_DIR/{AESTHETIC_PATHS[0]}   (or {AESTHETIC_STEM}.safetensors)
  MODEL_DIR/{NSFW_PATHS[0]}   (or {NSFW_STEM}.safetensors)
  MODEL_DIR/{MANIFEST_NAME}   (optional; written by `models init-random` / `models download`)"""


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or inconsistent; the message names the fix."""


class UnsafeWeightsError(ModelDirError):
    """A weights file would need arbitrary unpickling to load; we refuse it."""


def fix_hint(model_dir: str) -> str:
    """The one-line remedy appended to every model-dir error."""
    return (
        f"Fix: run `python -m beam_curator models init-random --dir {model_dir}` for a tiny "
        f"random-weight demo model, or `python -m beam_curator models download --dir {model_dir}` "
        "with network access, or place the files by hand.\n" + LAYOUT_HELP
    )


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """What a model directory holds. Saved as ``manifest.json``.

    ``files`` maps each weight/config path (relative to the model dir) to its sha256, or to
    None where the manifest was derived from a hand-assembled directory and nothing was hashed.
    ``quick_gelu`` is the activation the CLIP weights were trained with (None: not recorded).
    """

    clip_arch: str
    embed_dim: int
    image_size: int
    random_weights: bool
    quick_gelu: Optional[bool] = None
    clip_pretrained: Optional[str] = None  # open_clip pretrained tag, e.g. "openai"
    clip_source: Optional[str] = None  # where the CLIP weights came from, e.g. "hf-hub:timm/..."
    files: Mapping[str, Optional[str]] = field(default_factory=dict)
    derived: bool = False  # True: no manifest.json, fields derived from the files

    FORMAT_VERSION: ClassVar[int] = 1
    _REQUIRED: ClassVar[tuple] = ("clip_arch", "embed_dim", "image_size", "random_weights")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("derived")
        data["files"] = dict(sorted(self.files.items()))
        data["format_version"] = self.FORMAT_VERSION
        return data

    @classmethod
    def from_json(cls, data: Mapping, source: str = MANIFEST_NAME) -> "Manifest":
        missing = [k for k in cls._REQUIRED if k not in data]
        if missing:
            raise ModelDirError(f"{source} lacks required keys {missing}")
        version = data.get("format_version", cls.FORMAT_VERSION)
        if version > cls.FORMAT_VERSION:
            raise ModelDirError(
                f"{source} has format_version {version}; this beam-curator reads up to "
                f"{cls.FORMAT_VERSION}: upgrade beam-curator"
            )
        return cls(
            clip_arch=str(data["clip_arch"]),
            embed_dim=int(data["embed_dim"]),
            image_size=int(data["image_size"]),
            random_weights=bool(data["random_weights"]),
            quick_gelu=None if data.get("quick_gelu") is None else bool(data["quick_gelu"]),
            clip_pretrained=data.get("clip_pretrained"),
            clip_source=data.get("clip_source"),
            files=dict(data.get("files") or {}),
        )

    def save(self, model_dir: str) -> str:
        """Write ``manifest.json`` (sorted keys, so identical manifests are identical bytes)."""
        path = os.path.join(model_dir, MANIFEST_NAME)
        atomic_write_bytes(path, (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode())
        return path

    @classmethod
    def load(cls, model_dir: str) -> "Manifest":
        """Read ``manifest.json``; raises FileNotFoundError when there is none."""
        path = os.path.join(model_dir, MANIFEST_NAME)
        with open(path, "rb") as f:
            try:
                data = json.loads(f.read())
            except json.JSONDecodeError as e:
                raise ModelDirError(f"{path} is not valid JSON ({e}). {fix_hint(model_dir)}") from e
        return cls.from_json(data, source=path)


# --------------------------------------------------------------------------- resolved files


@dataclass(frozen=True)
class ModelFiles:
    """Absolute paths of the files a model directory provides (one per role)."""

    root: str
    clip_dir: str
    clip_config: str
    clip_weights: str
    aesthetic: str
    nsfw: str

    def relpaths(self) -> list:
        return [
            os.path.relpath(p, self.root)
            for p in (self.clip_config, self.clip_weights, self.aesthetic, self.nsfw)
        ]


def find_clip_weights(clip_dir: str) -> Optional[str]:
    """The CLIP weights file open_clip will load from ``clip_dir`` (first in its preference order)."""
    return _first_existing(clip_dir, CLIP_WEIGHT_NAMES)


def resolve_model_files(model_dir: str) -> ModelFiles:
    """Find each role's file in a *local* model dir; raise ModelDirError naming all that is missing."""
    root = os.path.abspath(_strip_file_scheme(model_dir))
    if is_remote(model_dir):
        raise ModelDirError(
            f"{model_dir} is remote: call localize_model_dir() first to get a local copy"
        )
    if not os.path.isdir(root):
        raise ModelDirError(f"model dir {model_dir} does not exist. {fix_hint(model_dir)}")

    missing = []
    clip_config = os.path.join(root, CLIP_CONFIG_PATH)
    if not os.path.isfile(clip_config):
        missing.append(CLIP_CONFIG_PATH)
    # Several CLIP weight files may coexist (the hub ships both); open_clip takes the first.
    clip_weights = _first_existing(root, CLIP_WEIGHT_PATHS)
    if clip_weights is None:
        missing.append(" or ".join(CLIP_WEIGHT_PATHS))
    heads = {}
    for role, candidates in (("aesthetic", AESTHETIC_PATHS), ("nsfw", NSFW_PATHS)):
        present = [c for c in candidates if os.path.isfile(os.path.join(root, c))]
        if not present:
            missing.append(" or ".join(candidates))
        elif len(present) > 1:
            # Two formats of one head could hold different weights: refuse to guess.
            raise ModelDirError(
                f"model dir {model_dir} has both {present[0]} and {present[1]}; "
                "keep exactly one of them"
            )
        else:
            heads[role] = os.path.join(root, present[0])
    if missing:
        raise ModelDirError(
            f"model dir {model_dir} is incomplete: missing {', '.join(missing)}. {fix_hint(model_dir)}"
        )
    return ModelFiles(
        root=root,
        clip_dir=os.path.join(root, CLIP_SUBDIR),
        clip_config=clip_config,
        clip_weights=clip_weights,
        aesthetic=heads["aesthetic"],
        nsfw=heads["nsfw"],
    )


def preprocess_cfg_of(open_clip_config: dict) -> dict:
    """The `preprocess_cfg` of an open_clip_config.json, with `size` defaulting to the
    vision tower's image size as open_clip does."""
    model_cfg = open_clip_config.get("model_cfg", open_clip_config)
    cfg = dict(open_clip_config.get("preprocess_cfg") or {})
    cfg.setdefault("size", model_cfg.get("vision_cfg", {}).get("image_size", 224))
    return cfg


def read_clip_config(config_path: str) -> dict:
    """Parse ``open_clip_config.json`` and check the keys we rely on."""
    try:
        with open(config_path, "rb") as f:
            config = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{config_path} is not valid JSON ({e})") from e
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or "embed_dim" not in model_cfg or "vision_cfg" not in model_cfg:
        raise ModelDirError(
            f"{config_path} is not an open_clip config: expected "
            '{"model_cfg": {"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}, "preprocess_cfg": {...}}'
        )
    return config


def config_image_size(model_cfg: Mapping) -> int:
    """The square input size of the vision tower (open_clip allows an int or [h, w])."""
    size = model_cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ModelDirError(f"non-square CLIP image_size {size} is not supported")
        size = size[0]
    return int(size)


def derive_manifest(model_cfg: Mapping, relpaths=()) -> Manifest:
    """A manifest for a directory assembled by hand: what the files themselves say."""
    qg = model_cfg.get("quick_gelu")
    return Manifest(
        clip_arch=builtin_arch_name(model_cfg) or "custom",
        embed_dim=int(model_cfg["embed_dim"]),
        image_size=config_image_size(model_cfg),
        random_weights=False,
        quick_gelu=None if qg is None else bool(qg),
        files={rel: None for rel in relpaths},
        derived=True,
    )


def builtin_arch_name(model_cfg: Mapping) -> Optional[str]:
    """The open_clip built-in architecture with this config (ignoring quick_gelu), if any."""
    import open_clip  # heavy import, only needed here

    def strip(cfg):
        return {k: v for k, v in cfg.items() if k != "quick_gelu"}

    target = strip(model_cfg)
    matches = [
        name
        for name in open_clip.list_models()
        if strip(open_clip.get_model_config(name) or {}) == target
    ]
    # Prefer "ViT-L-14" over "ViT-L-14-quickgelu": quick_gelu is tracked separately.
    matches.sort(key=lambda n: (n.endswith("-quickgelu"), n))
    return matches[0] if matches else None


# --------------------------------------------------------------------------- files & hashing


def file_sha256(path: str, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_existing(root: str, relpaths) -> Optional[str]:
    for rel in relpaths:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            return path
    return None


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` so readers never see half a file (`beam_curator.atomic`)."""
    write_atomically(path, lambda stream: stream.write(data))


# --------------------------------------------------------------------------- remote dirs


_SCHEME = re.compile(r"^[a-zA-Z][-a-zA-Z0-9+.]*://")


def is_remote(path: str) -> bool:
    """True for gs://, s3:// and other non-local Beam filesystems."""
    # Same rule as Beam's FileSystems.get_scheme, without importing Beam for local paths.
    match = _SCHEME.match(str(path))
    return bool(match) and match.group(0) != "file://"


def _strip_file_scheme(path: str) -> str:
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def default_cache_dir() -> str:
    return os.environ.get(
        "BEAM_CURATOR_MODEL_CACHE", os.path.join(Path.home(), ".cache", "beam_curator", "models")
    )


def localize_model_dir(model_dir: str, cache_dir: Optional[str] = None) -> str:
    """Return a local path holding ``model_dir``'s files.

    Local paths come back unchanged. Remote ones (gs://, s3://, ...) are copied once into
    ``cache_dir`` (default ``$BEAM_CURATOR_MODEL_CACHE`` or ~/.cache/beam_curator/models) via
    Beam's FileSystems, so Dataflow workers can load them. The cache key covers the remote
    listing (paths and sizes), so a changed remote dir is fetched again. Safe to call from
    several processes at once: each copies into a private temp dir and renames it into place.
    """
    if not is_remote(model_dir):
        return _strip_file_scheme(model_dir)

    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    base = str(model_dir).rstrip("/")
    listing = sorted(
        (m.path, m.size_in_bytes)
        for m in FileSystems.match([FileSystems.join(base, "**")])[0].metadata_list
    )
    if not listing:
        raise ModelDirError(f"model dir {model_dir} is empty or does not exist. {fix_hint(model_dir)}")

    key = hashlib.sha256(json.dumps([base, listing]).encode()).hexdigest()[:16]
    cache_root = cache_dir or default_cache_dir()
    dest = os.path.join(cache_root, f"{base.rsplit('/', 1)[-1]}-{key}")
    if os.path.isdir(dest):  # only ever created by an atomic rename of a complete copy
        return dest

    os.makedirs(cache_root, exist_ok=True)
    partial = tempfile.mkdtemp(dir=cache_root, prefix=".partial-")
    try:
        for remote_path, _size in listing:
            rel = remote_path[len(base):].lstrip("/")
            if not rel or ".." in rel.split("/"):
                continue
            local_path = os.path.join(partial, *rel.split("/"))
            os.makedirs(os.path.dirname(local_path), exist_ok=True)
            # UNCOMPRESSED: Beam would otherwise gunzip files by extension.
            with FileSystems.open(remote_path, compression_type=CompressionTypes.UNCOMPRESSED) as src, \
                    open(local_path, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        try:
            os.rename(partial, dest)
            logger.info("copied model dir %s to %s", model_dir, dest)
        except OSError:
            if not os.path.isdir(dest):
                raise
            # Another process finished the same copy first; theirs is as good as ours.
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest
