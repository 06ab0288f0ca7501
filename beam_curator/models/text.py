"""The CLIP text side: the caption tokenizer of a model dir, and caption embeddings.

The tokenizer is the one open_clip builds for the same model (its byte-pair vocabulary ships
inside the open_clip wheel), with the context length of the model's `text_cfg`: it is made
from `clip/open_clip_config.json` alone, so decode workers tokenize without the weights.
Models whose config names a Hugging Face tokenizer (`hf_tokenizer_name`) need the tokenizer
files, which no hub can deliver here: they are refused with the reason.
"""
from __future__ import annotations

import json

from beam_curator.models.layout import CLIP_CONFIG_PATH, ModelDirError

DEFAULT_CONTEXT_LENGTH = 77   # OpenAI CLIP's, and open_clip's default


def text_config(model_dir: str) -> dict:
    from apache_beam.io.filesystems import FileSystems

    path = FileSystems.join(model_dir, CLIP_CONFIG_PATH)
    with FileSystems.open(path) as handle:
        config = json.loads(handle.read().decode("utf-8"))
    return dict((config.get("model_cfg") or {}).get("text_cfg") or {})


def caption_tokenizer(model_dir: str):
    """A callable: list of captions -> int64 tensor (n, context_length), open_clip's own."""
    from open_clip.tokenizer import SimpleTokenizer

    cfg = text_config(model_dir)
    if cfg.get("hf_tokenizer_name"):
        raise ModelDirError(
            f"{model_dir}: the CLIP text tower uses the Hugging Face tokenizer "
            f"{cfg['hf_tokenizer_name']!r}, whose files are not in the model dir; the CLIP "
            "score supports open_clip's own tokenizer (OpenAI and LAION ViT models). Pass "
            "--clip_score false to embed images only.")
    return SimpleTokenizer(context_length=int(cfg.get("context_length",
                                                      DEFAULT_CONTEXT_LENGTH)),
                           **dict(cfg.get("tokenizer_kwargs") or {}))


def encode_tokens(model, tokens, device: str):
    """int64 (n, context_length) tokens -> (n, d) float32 L2-normalised caption embeddings,
    on the device. On CUDA this only queues work."""
    import torch

    with torch.inference_mode():
        features = model.encode_text(tokens.to(device, non_blocking=True)).float()
        return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
