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


# A caption runs through the text tower cut to the smallest of these lengths that holds its
# tokens (the context length when none does). Each forward holds captions of one length only,
# so a caption's forward has a shape of its own, whatever its neighbours: its score does not
# depend on how Beam batched it. Most web captions fit in 32 of ViT-L/14's 77 positions.
TOKEN_BUCKETS = (8, 16, 32, 48, 64)


def token_bucket(tokens, context_length: int) -> int:
    """The forward length for one caption's tokens (zeros after its end-of-text token)."""
    used = int((tokens != 0).sum())
    return next((b for b in TOKEN_BUCKETS if used <= b < context_length), context_length)


def _cuts_exactly(model) -> bool:
    """Whether cutting a caption's padding changes nothing: open_clip's CLIP text tower is
    causal (a position sees only those before it) and pools at the end-of-text token, which
    lies inside the cut; other towers (pooling the last position, or no causal mask) run at
    the full context length."""
    import open_clip

    return (isinstance(model, open_clip.CLIP) and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) in ("argmax", "eos"))


def encode_tokens(model, tokens, device: str, length: int = 0):
    """int64 (n, context_length) tokens -> (n, d) float32 L2-normalised caption embeddings,
    on the device; with `length`, the tower runs on the first `length` positions only (see
    TOKEN_BUCKETS), which equals the full forward for open_clip's CLIP. On CUDA this only
    queues work."""
    import torch

    with torch.inference_mode():
        tokens = tokens.to(device, non_blocking=True)
        if length and length < tokens.shape[1] and _cuts_exactly(model):
            features = _encode_prefix(model, tokens[:, :length]).float()
        else:
            features = model.encode_text(tokens).float()
        return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _encode_prefix(model, tokens):
    """open_clip's CLIP.encode_text on a prefix of the positions: the same steps, with the
    positional embedding and the causal mask cut to the prefix (encode_text itself adds the
    whole positional table, so it takes only full-length tokens)."""
    from open_clip.transformer import text_global_pool
    from torch import nn

    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type,
                         eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = (model.text_projection(x) if isinstance(model.text_projection, nn.Linear)
             else x @ model.text_projection)
    return x
