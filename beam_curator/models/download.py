"""Fetch the real weights into a model dir (needs network; everything else works offline).

* CLIP ViT-L/14, OpenAI weights, from the Hugging Face hub repo
  ``timm/vit_large_patch14_clip_224.openai`` (open_clip_config.json + open_clip_model.safetensors).
* LAION improved aesthetic predictor ``sac+logos+ava1-l14-linearMSE.pth`` from
  christophschuhmann/improved-aesthetic-predictor on GitHub.
* LAION CLIP-based NSFW detector, PyTorch port: ``clip_autokeras_binary_nsfw.pth`` inside the
  zip that NeMo Curator downloads from LAION-AI/CLIP-based-NSFW-Detector's GitHub files.

The two heads are checked against their published sha256. Without network the call fails
fast with a DownloadError that names what could not be fetched and how to place it by hand.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Callable, List, Optional

from beam_curator.atomic import write_atomically

from .layout import (
    AESTHETIC_PATHS,
    ALL_LAYOUT_PATHS,
    CLIP_CONFIG_NAME,
    CLIP_CONFIG_PATH,
    CLIP_SUBDIR,
    CLIP_WEIGHT_NAMES,
    CLIP_WEIGHT_PATHS,
    LAYOUT_HELP,
    NSFW_PATHS,
    NSFW_STEM,
    Manifest,
    config_image_size,
    file_sha256,
    read_clip_config,
)

logger = logging.getLogger(__name__)

AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
NSFW_SHA256 = "16914bb77739553a819864dd8146f03f8a5c3fe7af93cc68b2e96dcdb9cc81f9"


@dataclass(frozen=True)
class DownloadSources:
    """Where each part comes from; overridable for mirrors (and for tests)."""

    clip_repo: str = "timm/vit_large_patch14_clip_224.openai"
    clip_revision: Optional[str] = None  # a hub commit, to pin the CLIP files
    hf_endpoint: Optional[str] = None  # None: huggingface_hub's default (or $HF_ENDPOINT)
    aesthetic_url: str = (
        "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
        "sac%2Blogos%2Bava1-l14-linearMSE.pth"
    )
    nsfw_zip_url: str = (
        "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/files/10250461/clip_autokeras_binary_nsfw.zip"
    )


# What the real CLIP is, for the manifest: the loader checks QuickGELU against these.
CLIP_ARCH = "ViT-L-14"
CLIP_PRETRAINED = "openai"


class DownloadError(RuntimeError):
    """One or more parts could not be fetched; the message says which and what to do."""


def download(model_dir: str, sources: DownloadSources = DownloadSources(), timeout: float = 60.0,
             overwrite: bool = False) -> Manifest:
    """Download the real CLIP ViT-L/14 and both LAION heads into ``model_dir``; return the manifest.

    Parts that are already present with the right sha256 are kept. All parts are attempted
    before failing, so one error message lists everything that is missing.
    """
    model_dir = os.fspath(model_dir)
    if overwrite:
        for rel in ALL_LAYOUT_PATHS:
            path = os.path.join(model_dir, rel)
            if os.path.exists(path):
                os.unlink(path)
    os.makedirs(model_dir, exist_ok=True)

    steps: List[tuple] = [
        ("CLIP ViT-L/14 (hub repo " + sources.clip_repo + ")",
         lambda: _fetch_clip(model_dir, sources, timeout),
         f"{CLIP_CONFIG_PATH} and {CLIP_WEIGHT_PATHS[0]} from https://huggingface.co/{sources.clip_repo}"),
        ("LAION aesthetic predictor (" + sources.aesthetic_url + ")",
         lambda: _fetch_aesthetic(model_dir, sources, timeout),
         f"{AESTHETIC_PATHS[0]} from {sources.aesthetic_url} (sha256 {AESTHETIC_SHA256})"),
        ("LAION NSFW detector (" + sources.nsfw_zip_url + ")",
         lambda: _fetch_nsfw(model_dir, sources, timeout),
         f"{NSFW_PATHS[0]} extracted from {sources.nsfw_zip_url} (sha256 {NSFW_SHA256})"),
    ]
    failures = []
    for what, fetch, by_hand in steps:
        try:
            fetch()
        except Exception as e:  # collect all, report together
            logger.warning("could not fetch %s: %s", what, e)
            failures.append((what, e, by_hand))
    if failures:
        lines = [f"could not fetch {len(failures)} of {len(steps)} model parts into {model_dir}:"]
        for what, e, _ in failures:
            lines.append(f"  - {what}: {type(e).__name__}: {e}")
        lines.append("Without network, place the files by hand:")
        lines.extend(f"  - {by_hand}" for _, _, by_hand in failures)
        lines.append(LAYOUT_HELP)
        lines.append(
            f"or run `python -m beam_curator models init-random --dir {model_dir}` for a tiny "
            "random-weight demo model."
        )
        raise DownloadError("\n".join(lines))

    return _write_manifest(model_dir, sources)


def _write_manifest(model_dir: str, sources: DownloadSources) -> Manifest:
    model_cfg = read_clip_config(os.path.join(model_dir, CLIP_CONFIG_PATH))["model_cfg"]
    relpaths = [CLIP_CONFIG_PATH, CLIP_WEIGHT_PATHS[0], AESTHETIC_PATHS[0], NSFW_PATHS[0]]
    manifest = Manifest(
        clip_arch=CLIP_ARCH,
        embed_dim=int(model_cfg["embed_dim"]),
        image_size=config_image_size(model_cfg),
        random_weights=False,
        quick_gelu=True,  # OpenAI weights were trained with QuickGELU
        clip_pretrained=CLIP_PRETRAINED,
        clip_source="hf-hub:" + sources.clip_repo,
        files={rel: file_sha256(os.path.join(model_dir, rel)) for rel in relpaths},
    )
    manifest.save(model_dir)
    return manifest


# --------------------------------------------------------------------------- parts


def _fetch_clip(model_dir: str, sources: DownloadSources, timeout: float) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise DownloadError(
            "huggingface_hub is not installed: pip install 'beam-curator[download]'"
        ) from e
    clip_dir = os.path.join(model_dir, CLIP_SUBDIR)
    wanted = (CLIP_CONFIG_NAME, CLIP_WEIGHT_NAMES[0])
    if all(os.path.isfile(os.path.join(clip_dir, name)) for name in wanted):
        return  # files are only ever moved into place whole; overwrite=True refetches
    # huggingface_hub retries unreachable hosts with backoff for ~25 s; one probe fails fast.
    from huggingface_hub import constants

    _check_reachable(sources.hf_endpoint or constants.ENDPOINT, timeout)
    os.makedirs(clip_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=clip_dir, prefix=".download-") as tmp:
        for name in wanted:
            fetched = hf_hub_download(
                sources.clip_repo, name, revision=sources.clip_revision, local_dir=tmp,
                endpoint=sources.hf_endpoint, etag_timeout=timeout,
            )
            os.replace(fetched, os.path.join(clip_dir, name))
    read_clip_config(os.path.join(clip_dir, CLIP_CONFIG_NAME))  # fail now, not at load time


def _fetch_aesthetic(model_dir: str, sources: DownloadSources, timeout: float) -> None:
    dest = os.path.join(model_dir, AESTHETIC_PATHS[0])
    if _has_sha256(dest, AESTHETIC_SHA256):
        return
    data = _http_get(sources.aesthetic_url, timeout)
    _write_verified(dest, lambda f: f.write(data), AESTHETIC_SHA256)


def _fetch_nsfw(model_dir: str, sources: DownloadSources, timeout: float) -> None:
    dest = os.path.join(model_dir, NSFW_PATHS[0])
    if _has_sha256(dest, NSFW_SHA256):
        return
    data = _http_get(sources.nsfw_zip_url, timeout)
    member = f"{NSFW_STEM}.pth"
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        # Extract the one file we want by its basename: never trust paths inside a zip.
        names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == member]
        if not names:
            raise DownloadError(f"{sources.nsfw_zip_url} has no {member} (members: {archive.namelist()[:10]})")
        with archive.open(names[0]) as src:
            _write_verified(dest, lambda f: shutil.copyfileobj(src, f), NSFW_SHA256)


def _http_get(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "beam-curator"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _check_reachable(url: str, timeout: float) -> None:
    """Raise DownloadError unless something answers HTTP at ``url`` (any status will do)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered; whether the repo needs auth is for huggingface_hub to handle
    except OSError as e:
        raise DownloadError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from e


def _has_sha256(path: str, sha256: str) -> bool:
    return os.path.isfile(path) and file_sha256(path) == sha256


def _write_verified(dest: str, write: Callable, sha256: str) -> None:
    """Write to a temp file, and only move it into place if its sha256 is the published one."""
    def write_and_check(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
        actual = file_sha256(tmp)
        if actual != sha256:
            raise DownloadError(f"sha256 mismatch for {os.path.basename(dest)}: got {actual}, expected {sha256}")

    write_atomically(dest, write_and_check, pass_path=True)
