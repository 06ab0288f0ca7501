"""Tests for beam_curator.models: model-dir layout, CLIP loading, score heads, random init.

Real files only: tiny random models written by init_random, the real LAION head weights
from ../shared/models when present, and hand-built weights whose scores we compute in numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beam_curator.models import layout
from beam_curator.models.check import check_model_dir
from beam_curator.models.clip import (
    QuickGeluError,
    load_clip,
    resolve_quick_gelu,
    verify_activations,
)
from beam_curator.models.download import DownloadError, DownloadSources, download
from beam_curator.models.heads import (
    AestheticHead,
    HeadDimError,
    NsfwHead,
    ScoreHeads,
    check_head_dims,
    load_aesthetic_head,
    load_heads,
    load_nsfw_head,
    load_state_dict_file,
)
from beam_curator.models.layout import (
    Manifest,
    ModelDirError,
    UnsafeWeightsError,
    localize_model_dir,
)
from beam_curator.models.random_init import (
    TINY_MODEL_CFG,
    build_random_clip,
    build_random_heads,
    clip_model_cfg,
    init_random,
)
from tests.conftest import SHARED_MODELS

REAL_AESTHETIC = SHARED_MODELS / "laion-aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
REAL_NSFW = SHARED_MODELS / "laion-nsfw" / "clip_autokeras_binary_nsfw.pth"
REAL_REFERENCE = SHARED_MODELS / "heads_reference.npz"
needs_shared_models = pytest.mark.skipif(
    not REAL_REFERENCE.exists(),
    reason=f"real LAION head weights not available: {SHARED_MODELS} is absent "
    "(only the project's dev checkout has ../shared/models)",
)

# What the hub's open_clip_config.json for timm/vit_large_patch14_clip_224.openai holds
# (the same script wrote the sibling timm/vit_base_patch32_clip_224.openai config, which
# has "quick_gelu": true in model_cfg).
HUB_VIT_L14_OPENAI_CONFIG = {
    "model_cfg": {
        "embed_dim": 768,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}
DOWNLOAD_MANIFEST = Manifest(
    clip_arch="ViT-L-14", embed_dim=768, image_size=224, random_weights=False, quick_gelu=True,
    clip_pretrained="openai", clip_source="hf-hub:timm/vit_large_patch14_clip_224.openai",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random model dir shared by read-only tests."""
    path = tmp_path_factory.mktemp("tiny") / "models"
    init_random(path, seed=0)
    return path


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    """A private copy for tests that edit the dir."""
    dest = tmp_path / "models"
    shutil.copytree(tiny_dir, dest)
    return dest


def _image_batch(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, size, size), dtype=np.float32))


def _edit_config(model_dir: Path, **model_cfg_changes) -> None:
    path = model_dir / "clip" / "open_clip_config.json"
    config = json.loads(path.read_text())
    for key, value in model_cfg_changes.items():
        if value is None:
            config["model_cfg"].pop(key, None)
        else:
            config["model_cfg"][key] = value
    path.write_text(json.dumps(config))


def _file_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- init_random + load_clip


def test_init_random_is_deterministic(tiny_dir, tmp_path):
    init_random(tmp_path / "again", seed=0)  # tiny_dir was written with seed 0 too
    init_random(tmp_path / "other", seed=1)
    a, b, c = (_file_bytes(d) for d in (tiny_dir, tmp_path / "again", tmp_path / "other"))
    assert sorted(a) == [
        "aesthetic/sac+logos+ava1-l14-linearMSE.safetensors",
        "clip/open_clip_config.json",
        "clip/open_clip_model.safetensors",
        "manifest.json",
        "nsfw/clip_autokeras_binary_nsfw.safetensors",
    ]
    assert a == b
    assert a["clip/open_clip_model.safetensors"] != c["clip/open_clip_model.safetensors"]


def test_init_random_writes_manifest_and_refuses_to_clobber(tiny_dir):
    manifest = check_model_dir(tiny_dir, verify_sha256=True)
    assert manifest.random_weights is True
    assert manifest.embed_dim == TINY_MODEL_CFG["embed_dim"] == 64
    assert manifest.image_size == 32 and manifest.quick_gelu is True
    assert all(len(sha) == 64 for sha in manifest.files.values())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        init_random(tiny_dir)


def test_loaded_clip_embeds_like_the_model_in_memory(tiny_dir):
    in_memory, _ = build_random_clip("tiny", seed=0)
    first = load_clip(tiny_dir / "clip")
    second = load_clip(tiny_dir)  # the model dir itself is accepted too
    batch = _image_batch()
    with torch.no_grad():
        expected = in_memory.encode_image(batch)
        runs = [first.model.encode_image(batch), first.model.encode_image(batch), second.model.encode_image(batch)]
    for got in runs:
        assert torch.equal(got, expected)
    assert not first.model.training
    assert (first.embed_dim, first.image_size, first.arch) == (64, 32, "beam-curator-tiny-vit")
    assert first.quick_gelu and first.random_weights
    assert expected.shape == (4, 64)


def test_preprocess_is_open_clip_val_transform(tiny_dir):
    loaded = load_clip(tiny_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    x = loaded.preprocess(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert loaded.preprocess(image).equal(x)  # no random augmentation


def test_manifestless_dir_still_loads(tiny_copy):
    (tiny_copy / "manifest.json").unlink()
    manifest = check_model_dir(tiny_copy)
    assert manifest.derived and manifest.random_weights is False
    assert manifest.embed_dim == 64 and manifest.quick_gelu is True
    loaded = load_clip(tiny_copy)
    assert loaded.quick_gelu and not loaded.random_weights


def test_manifest_round_trip(tmp_path):
    DOWNLOAD_MANIFEST.save(tmp_path)
    assert Manifest.load(tmp_path) == DOWNLOAD_MANIFEST
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format_version"] == 1 and data["random_weights"] is False


def test_real_architectures_are_offered_with_quick_gelu():
    cfg = clip_model_cfg("ViT-B-32")
    assert cfg["quick_gelu"] is True and cfg["embed_dim"] == 512
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        clip_model_cfg("ViT-Nope-99")


# --------------------------------------------------------------------------- QuickGELU


def _activation_counts(model):
    from open_clip.transformer import QuickGELU

    mods = list(model.modules())
    return sum(isinstance(m, QuickGELU) for m in mods), sum(isinstance(m, torch.nn.GELU) for m in mods)


def test_quick_gelu_config_builds_quick_gelu_activations(tiny_dir):
    n_quick, n_gelu = _activation_counts(load_clip(tiny_dir).model)
    assert n_quick == 3 and n_gelu == 0  # 2 vision blocks + 1 text block


def test_gelu_config_builds_gelu(tiny_copy):
    (tiny_copy / "manifest.json").unlink()  # hand-assembled GELU weights
    _edit_config(tiny_copy, quick_gelu=False)
    loaded = load_clip(tiny_copy)
    assert not loaded.quick_gelu
    assert _activation_counts(loaded.model) == (0, 3)


def test_config_contradicting_manifest_raises(tiny_copy):
    _edit_config(tiny_copy, quick_gelu=False)  # manifest says quick_gelu true
    with pytest.raises(QuickGeluError, match="contradictory"):
        check_model_dir(tiny_copy)  # caught before any model is built
    with pytest.raises(QuickGeluError, match="contradictory") as info:
        load_clip(tiny_copy)
    assert "model_cfg.quick_gelu = False" in str(info.value)
    assert "manifest.json quick_gelu = True" in str(info.value)


def test_config_contradicting_pretrained_tag_raises():
    gelu_cfg = dict(HUB_VIT_L14_OPENAI_CONFIG["model_cfg"], quick_gelu=False)
    manifest = Manifest(clip_arch="ViT-L-14", embed_dim=768, image_size=224, random_weights=False,
                        clip_pretrained="openai")
    with pytest.raises(QuickGeluError, match="ViT-L-14/openai = True"):
        resolve_quick_gelu(gelu_cfg, manifest)
    hub_only = Manifest(clip_arch="custom", embed_dim=768, image_size=224, random_weights=False,
                        clip_source="hf-hub:timm/vit_large_patch14_clip_224.openai")
    with pytest.raises(QuickGeluError, match="hub repo timm/vit_large_patch14_clip_224.openai"):
        resolve_quick_gelu(gelu_cfg, hub_only)


def test_real_hub_layout_resolves_to_quick_gelu():
    model_cfg = HUB_VIT_L14_OPENAI_CONFIG["model_cfg"]
    assert resolve_quick_gelu(model_cfg, DOWNLOAD_MANIFEST) is True
    # Hand-assembled from the hub (no manifest): the config alone decides.
    derived = layout.derive_manifest(model_cfg)
    assert derived.clip_arch == "ViT-L-14"
    assert resolve_quick_gelu(model_cfg, derived) is True
    # An older config without the key still gets QuickGELU from the download's provenance.
    without_key = {k: v for k, v in model_cfg.items() if k != "quick_gelu"}
    assert resolve_quick_gelu(without_key, DOWNLOAD_MANIFEST) is True


def test_silent_config_without_provenance_raises(tiny_copy):
    (tiny_copy / "manifest.json").unlink()
    _edit_config(tiny_copy, quick_gelu=None)
    with pytest.raises(QuickGeluError, match='Add "quick_gelu": true'):
        load_clip(tiny_copy)


def test_missing_key_with_openai_provenance_forces_quick_gelu(tiny_copy):
    _edit_config(tiny_copy, quick_gelu=None)  # manifest still says quick_gelu true
    assert _activation_counts(load_clip(tiny_copy).model) == (3, 0)


def test_verify_activations_catches_a_gelu_model():
    from open_clip.model import CLIP

    gelu_model = CLIP(**dict(TINY_MODEL_CFG, quick_gelu=False))
    with pytest.raises(QuickGeluError, match="QuickGELU was required"):
        verify_activations(gelu_model, quick_gelu=True)
    verify_activations(gelu_model, quick_gelu=False)


# --------------------------------------------------------------------------- heads on hand-set weights


def _np_aesthetic(state, x):
    h = x
    for i in (0, 2, 4, 6, 7):  # no activations between the linears
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return h[:, 0]


def _np_nsfw_logit(state, x):
    h = (x - state["norm.mean"]) / np.sqrt(state["norm.variance"])
    for i in (1, 2, 3):
        h = np.maximum(h @ state[f"linear_{i}.weight"].T + state[f"linear_{i}.bias"], 0.0)
    return (h @ state["linear_4.weight"].T + state["linear_4.bias"])[:, 0]


def _np_nsfw(state, x):
    return 1.0 / (1.0 + np.exp(-_np_nsfw_logit(state, x)))


def _set_weights(head, rng, scale):
    state = {}
    for name, tensor in head.state_dict().items():
        values = rng.standard_normal(tuple(tensor.shape)) * scale / np.sqrt(tensor.shape[-1])
        state[name] = values
    state = {k: v.astype(np.float32).astype(np.float64) for k, v in state.items()}
    head.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()})
    return state


def test_aesthetic_head_matches_hand_computed_scores():
    rng = np.random.default_rng(1)
    head = AestheticHead(input_dim=8).eval()
    state = _set_weights(head, rng, scale=1.0)
    x = rng.standard_normal((5, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    heads = ScoreHeads(head, NsfwHead(8))
    aesthetic, _ = heads.score(x.astype(np.float32))
    assert aesthetic.dtype == np.float32 and aesthetic.shape == (5,)
    np.testing.assert_allclose(aesthetic, _np_aesthetic(state, x.astype(np.float32)), rtol=0, atol=1e-5)


def test_aesthetic_head_simple_path_by_hand():
    head = AestheticHead(input_dim=2).eval()
    with torch.no_grad():
        for layer in head.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        # One path through the net: score = 3 * (2*x0 - x1) + 5
        head.layers[0].weight[0] = torch.tensor([2.0, -1.0])
        head.layers[2].weight[0, 0] = 1.0
        head.layers[4].weight[0, 0] = 1.0
        head.layers[6].weight[0, 0] = 3.0
        head.layers[7].weight[0, 0] = 1.0
        head.layers[7].bias[0] = 5.0
    x = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    assert torch.allclose(head(x), torch.tensor([3 * (1.2 - 0.8) + 5, 3 * 2.0 + 5]))
    w, b = head.affine()
    np.testing.assert_allclose(w, [6.0, -3.0])
    assert b == pytest.approx(5.0)


def test_nsfw_head_matches_hand_computed_scores():
    rng = np.random.default_rng(2)
    head = NsfwHead(input_dim=6).eval()
    state = _set_weights(head, rng, scale=2.0)
    state["norm.variance"] = np.abs(state["norm.variance"]) + 0.5
    x = rng.standard_normal((7, 6)).astype(np.float32)
    # Centre the logits so the cases span the sigmoid rather than sit in one tail.
    state["linear_4.bias"] = state["linear_4.bias"] - np.median(_np_nsfw_logit(state, x.astype(np.float64)))
    head.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()})
    _, nsfw = ScoreHeads(AestheticHead(6), head).score(x)
    expected = _np_nsfw(state, x.astype(np.float64))
    np.testing.assert_allclose(nsfw, expected, rtol=0, atol=1e-6)
    assert expected.min() < 0.3 and expected.max() > 0.7  # the cases span the sigmoid


def test_nsfw_normalisation_by_hand():
    head = NsfwHead(input_dim=2).eval()
    with torch.no_grad():
        head.norm.mean.copy_(torch.tensor([1.0, -1.0]))
        head.norm.variance.copy_(torch.tensor([4.0, 0.25]))
    normed = head.norm(torch.tensor([[3.0, 0.0]]))
    assert torch.allclose(normed, torch.tensor([[1.0, 2.0]]))  # (3-1)/2, (0+1)/0.5


def test_heads_round_trip_through_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    aesthetic, nsfw = build_random_heads(16, seed=5)
    torch.save(aesthetic.state_dict(), tmp_path / "a.pth")
    save_file(nsfw.state_dict(), str(tmp_path / "n.safetensors"))
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    before = ScoreHeads(aesthetic, nsfw).score(x)
    after = ScoreHeads(load_aesthetic_head(tmp_path / "a.pth"), load_nsfw_head(tmp_path / "n.safetensors")).score(x)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_random_aesthetic_head_centres_on_five():
    aesthetic, _ = build_random_heads(64, seed=0)
    w, b = aesthetic.affine()
    assert b == pytest.approx(5.0) and np.linalg.norm(w) == pytest.approx(18.0)


def test_score_rejects_wrong_width(tiny_dir):
    heads = ScoreHeads.from_model_dir(tiny_dir, clip_embed_dim=64)
    with pytest.raises(ValueError, match=r"shape \(n, 64\)"):
        heads.score(np.zeros((2, 768), np.float32))


# --------------------------------------------------------------------------- real head weights


@needs_shared_models
def test_real_heads_give_reference_scores():
    reference = np.load(REAL_REFERENCE)
    heads = ScoreHeads(load_aesthetic_head(REAL_AESTHETIC), load_nsfw_head(REAL_NSFW))
    assert heads.input_dim == 768
    aesthetic, nsfw = heads.score(reference["embeddings"])
    np.testing.assert_allclose(aesthetic, reference["aesthetic_score"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(nsfw, reference["nsfw_score"], rtol=0, atol=1e-4)


@needs_shared_models
def test_real_aesthetic_head_is_one_affine_map():
    head = load_aesthetic_head(REAL_AESTHETIC)
    w, b = head.affine()
    assert b == pytest.approx(5.2366, abs=1e-4)
    assert np.linalg.norm(w) == pytest.approx(17.996, abs=1e-3)
    x = np.load(REAL_REFERENCE)["embeddings"].astype(np.float64)
    np.testing.assert_allclose(x @ w + b, np.load(REAL_REFERENCE)["aesthetic_score"], atol=1e-9)


@needs_shared_models
def test_real_head_files_load_from_a_model_dir(tiny_copy):
    for name in ("aesthetic/sac+logos+ava1-l14-linearMSE.safetensors", "nsfw/clip_autokeras_binary_nsfw.safetensors"):
        (tiny_copy / name).unlink()
    shutil.copy(REAL_AESTHETIC, tiny_copy / "aesthetic")
    shutil.copy(REAL_NSFW, tiny_copy / "nsfw")
    (tiny_copy / "manifest.json").unlink()
    _, nsfw = load_heads(tiny_copy)
    assert nsfw.input_dim == 768
    # ...and they do not fit the 64-d tiny CLIP:
    with pytest.raises(HeadDimError, match="embeds to 64 dims but the aesthetic head expects 768"):
        ScoreHeads.from_model_dir(tiny_copy, clip_embed_dim=load_clip(tiny_copy).embed_dim)


# --------------------------------------------------------------------------- never unpickle


class _WritesMarkerWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_head_loading_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save({"layers.0.weight": torch.zeros(2, 2), "payload": _WritesMarkerWhenUnpickled(marker)}, evil)
    with pytest.raises(UnsafeWeightsError, match="refusing to load"):
        load_aesthetic_head(evil)
    with pytest.raises(UnsafeWeightsError):
        load_state_dict_file(evil)
    assert not marker.exists()


def test_clip_loading_refuses_pickled_objects(tiny_copy, tmp_path):
    marker = tmp_path / "pwned"
    (tiny_copy / "clip" / "open_clip_model.safetensors").unlink()
    torch.save({"payload": _WritesMarkerWhenUnpickled(marker)}, tiny_copy / "clip" / "open_clip_pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="refusing to load"):
        load_clip(tiny_copy)
    assert not marker.exists()


# --------------------------------------------------------------------------- check_model_dir


def test_empty_dir_names_missing_files_and_the_fix(tmp_path):
    with pytest.raises(ModelDirError) as info:
        check_model_dir(tmp_path)
    message = str(info.value)
    assert "clip/open_clip_config.json" in message
    assert "aesthetic/sac+logos+ava1-l14-linearMSE.pth" in message
    assert "nsfw/clip_autokeras_binary_nsfw.pth" in message
    assert f"python -m beam_curator models init-random --dir {tmp_path}" in message
    assert "models download" in message


def test_nonexistent_dir_raises(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist.*init-random"):
        check_model_dir(tmp_path / "nope")


def test_incomplete_dir_names_the_missing_head(tiny_copy):
    (tiny_copy / "nsfw" / "clip_autokeras_binary_nsfw.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"incomplete: missing nsfw/clip_autokeras_binary_nsfw\.pth"):
        check_model_dir(tiny_copy)
    with pytest.raises(ModelDirError, match="missing nsfw/"):
        load_heads(tiny_copy)


def test_two_formats_of_one_head_are_ambiguous(tiny_copy):
    shutil.copy(tiny_copy / "nsfw" / "clip_autokeras_binary_nsfw.safetensors",
                tiny_copy / "nsfw" / "clip_autokeras_binary_nsfw.pth")
    with pytest.raises(ModelDirError, match="keep exactly one"):
        check_model_dir(tiny_copy)


def test_corrupt_file_fails_sha256_check(tiny_copy):
    path = tiny_copy / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    check_model_dir(tiny_copy)  # cheap check passes
    with pytest.raises(ModelDirError, match="does not match the sha256"):
        check_model_dir(tiny_copy, verify_sha256=True)


def test_manifest_disagreeing_with_config_raises(tiny_copy):
    data = json.loads((tiny_copy / "manifest.json").read_text())
    data["embed_dim"] = 768
    (tiny_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelDirError, match="embed_dim=768"):
        check_model_dir(tiny_copy)


def test_dim_mismatch_between_clip_and_heads(tiny_copy):
    from safetensors.torch import save_file

    aesthetic, nsfw = build_random_heads(768, seed=0)
    save_file(aesthetic.state_dict(), str(tiny_copy / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors"))
    save_file(nsfw.state_dict(), str(tiny_copy / "nsfw" / "clip_autokeras_binary_nsfw.safetensors"))
    with pytest.raises(HeadDimError, match="the CLIP model embeds to 64 dims but the aesthetic head expects 768"):
        check_model_dir(tiny_copy)
    clip = load_clip(tiny_copy)
    with pytest.raises(HeadDimError, match="the CLIP model embeds to 64 dims but the aesthetic head expects 768"):
        ScoreHeads.from_model_dir(tiny_copy, clip_embed_dim=clip.embed_dim)
    with pytest.raises(HeadDimError, match="NSFW head expects 768"):
        check_head_dims(64, nsfw=nsfw)
    assert issubclass(HeadDimError, ModelDirError)


# --------------------------------------------------------------------------- remote dirs


def _register_test_filesystem():
    """A real Beam FileSystem for scheme bctestfs:// backed by local paths (stands in for gs://)."""
    from apache_beam.io.filesystem import FileMetadata, MatchResult
    from apache_beam.io.localfilesystem import LocalFileSystem

    prefix = "bctestfs://"

    class PrefixedLocalFileSystem(LocalFileSystem):
        @classmethod
        def scheme(cls):
            return "bctestfs"

        def match(self, patterns, limits=None):
            results = super().match([p[len(prefix):] for p in patterns], limits)
            return [
                MatchResult(prefix + r.pattern,
                            [FileMetadata(prefix + m.path, m.size_in_bytes, m.last_updated_in_seconds)
                             for m in r.metadata_list])
                for r in results
            ]

        def open(self, path, *args, **kwargs):
            return super().open(path[len(prefix):], *args, **kwargs)

    # Beam finds FileSystem subclasses through weak references: keep the class alive, or
    # garbage collection unregisters the scheme depending on which tests ran before.
    return prefix, PrefixedLocalFileSystem


_TEST_FS_PREFIX, _TEST_FS_CLASS = _register_test_filesystem()


def test_localize_copies_remote_dirs_once(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    remote = _TEST_FS_PREFIX + str(tiny_dir)
    local = localize_model_dir(remote, cache_dir=str(cache))
    assert Path(local).parent == cache
    assert _file_bytes(Path(local)) == _file_bytes(tiny_dir)
    stamp = os.stat(Path(local) / "clip" / "open_clip_model.safetensors").st_mtime_ns
    assert localize_model_dir(remote, cache_dir=str(cache)) == local
    assert os.stat(Path(local) / "clip" / "open_clip_model.safetensors").st_mtime_ns == stamp
    assert check_model_dir(local, verify_sha256=True).random_weights
    assert [p.name for p in cache.iterdir()] == [Path(local).name]  # no partial dirs left


def test_a_remote_model_dir_runs_end_to_end(tiny_dir, small_dataset, tmp_path, monkeypatch):
    """--model_dir on a remote filesystem (gs:// in production): the graph-build check and
    every worker use a local copy from the model cache."""
    from beam_curator import cli
    from tests.conftest import run_args

    cache = tmp_path / "model-cache"
    monkeypatch.setenv("BEAM_CURATOR_MODEL_CACHE", str(cache))
    out = tmp_path / "out"
    shards = os.path.join(os.path.dirname(small_dataset.shards[0]), "*.tar")
    summary = cli.run_pipeline("embed", run_args(
        input_glob=shards, output=str(out), model_dir=_TEST_FS_PREFIX + str(tiny_dir),
        progress_interval=0))
    assert summary["samples_read"] == small_dataset.n_samples
    assert summary["model_dir"].startswith(_TEST_FS_PREFIX) and summary["random_weights"]
    assert len(list(cache.iterdir())) == 1                   # copied once, then reused


def test_localize_returns_local_paths_unchanged(tiny_dir):
    assert localize_model_dir(str(tiny_dir)) == str(tiny_dir)


def test_remote_paths_must_be_localized_first():
    assert layout.is_remote("gs://bucket/models") and layout.is_remote("s3://bucket/m")
    assert not layout.is_remote("/tmp/models") and not layout.is_remote("file:///tmp/models")
    with pytest.raises(ModelDirError, match="localize_model_dir"):
        check_model_dir("gs://some-bucket/models")
    with pytest.raises(ModelDirError, match="localize_model_dir"):
        load_clip("gs://some-bucket/models/clip")


# --------------------------------------------------------------------------- download without network


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed: connections are refused


def test_download_without_network_fails_fast_and_clearly(tmp_path):
    dead = f"http://127.0.0.1:{_closed_port()}"
    sources = DownloadSources(hf_endpoint=dead, aesthetic_url=dead + "/a.pth", nsfw_zip_url=dead + "/n.zip")
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download(tmp_path / "models", sources=sources, timeout=2)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "could not fetch 3 of 3" in message
    assert "timm/vit_large_patch14_clip_224.openai" in message
    assert "aesthetic/sac+logos+ava1-l14-linearMSE.pth" in message
    assert "nsfw/clip_autokeras_binary_nsfw.pth" in message
    assert "place the files by hand" in message and "init-random" in message
    assert not (tmp_path / "models" / "manifest.json").exists()
