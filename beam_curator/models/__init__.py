"""Model weights: the on-disk model dir, CLIP loading, the LAION score heads, random/demo weights.

Heavy imports (torch, open_clip) happen when these names are first used from their modules;
importing the package itself stays cheap for the CLI.
"""

from .layout import (
    Manifest,
    ModelDirError,
    UnsafeWeightsError,
    localize_model_dir,
)

__all__ = [
    "Manifest",
    "ModelDirError",
    "UnsafeWeightsError",
    "check_model_dir",
    "localize_model_dir",
    "LoadedClip",
    "QuickGeluError",
    "load_clip",
    "AestheticHead",
    "NsfwHead",
    "ScoreHeads",
    "HeadDimError",
    "load_heads",
    "check_head_dims",
    "init_random",
    "download",
    "DownloadError",
]

_LAZY = {
    "check_model_dir": "check",
    "LoadedClip": "clip",
    "QuickGeluError": "clip",
    "load_clip": "clip",
    "AestheticHead": "heads",
    "NsfwHead": "heads",
    "ScoreHeads": "heads",
    "HeadDimError": "heads",
    "load_heads": "heads",
    "check_head_dims": "heads",
    "init_random": "random_init",
    "download": "download",
    "DownloadError": "download",
}


def __getattr__(name):
    # Lazy so `import beam_curator.models` does not pull in torch for `--help`.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
