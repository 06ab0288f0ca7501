"""open_clip itself, loaded from a model dir's clip/ the way its own docs load a local model:
the reference our scores and embeddings are checked against."""
from __future__ import annotations

import os


def open_clip_model(model_dir):
    """(model in eval mode, its preprocess, its tokenizer) from MODEL_DIR/clip."""
    import open_clip

    clip_dir = os.path.join(model_dir, "clip")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "local-dir:" + clip_dir, force_quick_gelu=True, weights_only=True)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer("local-dir:" + clip_dir)
