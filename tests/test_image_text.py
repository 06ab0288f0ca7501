"""The field's filters (issue 26, first part): the CLIP image-caption score, and DataComp's
basic filters (caption length, caption language, shorter side, aspect ratio) that run before
the model, one status per sample in a documented order."""
from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest

from beam_curator.captions import LanguageId, caption_of
from beam_curator.schema import (
    FILTERED_ASPECT_RATIO,
    FILTERED_CAPTION_LANGUAGE,
    FILTERED_CAPTION_LENGTH,
    FILTERED_CLIP_SCORE,
    FILTERED_IMAGE_SIZE,
    ShardSample,
)
from beam_curator.synthetic import draw_image, encode
from tests.conftest import cli_fails, parquet_rows, run_args, with_option


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def sample(key: str, image: bytes, **sidecars) -> ShardSample:
    return ShardSample(id=f"s/{key}", shard="s", shard_url="s.tar", key=key, image_ext="png",
                       image_bytes=image, sidecars=dict(sidecars))


def decode_all(samples, tiny_model_dir, **checks):
    """Run the real DecodeFn over samples: {id: (status or 'decoded', info, reason)}."""
    import apache_beam as beam

    from beam_curator.captions import parse_languages
    from beam_curator.transforms.decode import DecodeFn, SampleChecks

    checks = SampleChecks(**checks)
    fn = DecodeFn(tiny_model_dir, 10**8, None,
                  checks._replace(caption_languages=parse_languages(checks.caption_languages)))
    fn.setup()
    out = {}
    for s in samples:
        for item in fn.process(s):
            if isinstance(item, beam.pvalue.TaggedOutput):
                result = item.value
                out[s.id] = (result.status, result.info, result.reason)
            else:
                out[s.id] = ("decoded", item[0], None)
    return out


# ---- captions -------------------------------------------------------------------------------

def test_captions_come_from_txt_or_a_json_field_and_bad_ones_are_named():
    assert caption_of({"txt": b"  a dog  \n"}).text == "a dog"
    assert caption_of({"txt": b"\xff\xfe bad"}).problem.startswith("the .txt sidecar is not UTF")
    assert caption_of({"txt": b"   "}).problem == "the caption is empty"
    assert caption_of({}).problem == "no .txt sidecar"
    meta = json.dumps({"caption": "a cat", "n": 3}).encode()
    assert caption_of({"json": meta, "txt": b"ignored"}, "caption").text == "a cat"
    assert "is a int" in caption_of({"json": meta}, "n").problem
    assert caption_of({"json": b"[1]"}, "caption").text is None


def test_the_bundled_language_model_tells_english_from_french():
    identify = LanguageId()
    assert identify("a photograph of a small dog running on the beach")[0] == "en"
    language, prob = identify("une photo d'un petit chien qui court sur la plage")
    assert language == "fr" and 0.5 < prob <= 1.0
    assert identify(None) == (None, None)
    assert identify("first line\nsecond line of an english caption")[0] == "en"


# ---- the basic filters, before the model ----------------------------------------------------

def test_each_basic_filter_on_hand_made_samples(tiny_model_dir):
    ok = png(128, 128)
    samples = [
        sample("small", png(199, 400), txt=b"a tall purple picture"),
        sample("side200", png(200, 601), txt=b"a tall purple picture"),
        sample("wide", png(301, 100), txt=b"a wide purple picture"),
        sample("ratio3", png(300, 100), txt=b"a wide purple picture"),
        sample("oneword", ok, txt=b"purple"),
        sample("short", ok, txt=b"a b"),
        sample("french", ok, txt="une photo violette d'un carré sur un fond uni".encode()),
        sample("empty", ok, txt=b""),
        sample("notutf8", ok, txt=b"\xff\xfe\xfa caption bytes"),
        sample("english", ok, txt=b"a purple square on a plain background"),
    ]
    out = decode_all(samples, tiny_model_dir, min_image_side=100, max_aspect_ratio=3.0,
                     min_caption_words=2, min_caption_chars=5, caption_languages="en")
    status = {k.split("/")[1]: v[0] for k, v in out.items()}
    assert status == {
        "small": "decoded",   # 199 px is above 100: only the ratio 2.01 is checked
        "side200": FILTERED_ASPECT_RATIO, "wide": FILTERED_ASPECT_RATIO, "ratio3": "decoded",
        "oneword": FILTERED_CAPTION_LENGTH, "short": FILTERED_CAPTION_LENGTH,
        "french": FILTERED_CAPTION_LANGUAGE, "empty": FILTERED_CAPTION_LENGTH,
        "notutf8": FILTERED_CAPTION_LENGTH, "english": "decoded"}
    _, wide, reason = out["s/wide"]
    assert (wide.width, wide.height) == (301, 100) and "3.010" in reason
    _, french, reason = out["s/french"]
    assert french.caption_language == "fr" and "not in --caption_languages en" in reason
    assert out["s/empty"][1].caption_words == 0 and out["s/empty"][1].caption_chars == 0
    assert out["s/short"][2] == "caption has 3 character(s) < --min_caption_chars 5"

    sized = decode_all([sample("a", png(199, 300), txt=b"x"),
                        sample("b", png(200, 300), txt=b"x")], tiny_model_dir,
                       min_image_side=200)
    assert sized["s/a"][0] == FILTERED_IMAGE_SIZE and sized["s/b"][0] == "decoded"
    assert sized["s/a"][2] == "shorter side 199 px < --min_image_side 200"


def test_the_first_failing_check_wins_in_the_documented_order(tiny_model_dir):
    # caption length < language < image size < aspect ratio
    both = [sample("x", png(10, 100), txt=b"un")]
    assert decode_all(both, tiny_model_dir, min_caption_words=2, caption_languages="en",
                      min_image_side=50, max_aspect_ratio=2)["s/x"][0] == \
        FILTERED_CAPTION_LENGTH
    assert decode_all(both, tiny_model_dir, caption_languages="de", min_image_side=50
                      )["s/x"][0] == FILTERED_CAPTION_LANGUAGE
    assert decode_all(both, tiny_model_dir, min_image_side=50, max_aspect_ratio=2
                      )["s/x"][0] == FILTERED_IMAGE_SIZE


def test_a_size_filter_never_decodes_the_pixels(tiny_model_dir):
    """The header says 150 px: the (corrupt) body is never decoded, so no error either."""
    header_only = png(150, 150)[:60]
    out = decode_all([sample("h", header_only, txt=b"x")], tiny_model_dir, min_image_side=200)
    assert out["s/h"][0] == FILTERED_IMAGE_SIZE
    assert decode_all([sample("h", header_only, txt=b"x")], tiny_model_dir)["s/h"][0] == "error"


# ---- the CLIP score ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captioned_shard(tmp_path_factory):
    from beam_curator.synthetic import SyntheticSample, write_shard

    rng = random.Random(3)
    directory = tmp_path_factory.mktemp("captioned")
    captions = ["a red square", "a photo of a dog", "une image", "", None,
                "a long caption " * 20]
    samples, expected = [], {}
    for i, caption in enumerate(captions * 2):
        image = draw_image(rng, 48)
        fields = {"png": encode(image, "png")}
        if caption is not None:
            fields["txt"] = caption.encode()
        key = f"k{i:02d}"
        samples.append(SyntheticSample(key, fields))
        expected[f"000/{key}"] = (image, caption)
    write_shard(str(directory / "000.tar"), samples)
    return directory, expected


def _open_clip_reference(tiny_model_dir, image, caption):
    """open_clip's own encode_image / encode_text cosine, with its own preprocess."""
    import torch

    from tests.open_clip_reference import open_clip_model

    model, preprocess, tokenizer = open_clip_model(tiny_model_dir)
    with torch.no_grad():
        image_features = model.encode_image(preprocess(image.convert("RGB"))[None]).float()
        text_features = model.encode_text(tokenizer([caption])).float()
    image_features /= image_features.norm(dim=-1, keepdim=True)
    text_features /= text_features.norm(dim=-1, keepdim=True)
    return float((image_features * text_features).sum())


def test_the_clip_score_is_open_clip_s_own_cosine_and_null_without_a_caption(
        captioned_shard, tiny_model_dir, tmp_path):
    from beam_curator import cli

    directory, expected = captioned_shard
    out = tmp_path / "out"
    cli.run_pipeline("embed", run_args(input_glob=str(directory / "*.tar"), output=str(out),
                                       model_dir=tiny_model_dir, progress_interval=0,
                                       inference_batch_size=4))
    rows = {r["id"]: r for r in parquet_rows(out / "samples")}
    embeddings = {r["id"]: r for r in parquet_rows(out / "embeddings")}
    assert set(rows) == set(expected)
    for sample_id, (image, caption) in expected.items():
        score = rows[sample_id]["clip_score"]
        if not (caption or "").strip():
            assert score is None, sample_id   # no caption, or an empty one
            continue
        reference = _open_clip_reference(tiny_model_dir, image, caption.strip())
        assert score == pytest.approx(reference, abs=1e-5), sample_id
        assert embeddings[sample_id]["clip_score"] == pytest.approx(score, abs=1e-7)
    # long captions are cut at the model's context length, as open_clip's tokenizer does
    long_ids = [i for i, (_, c) in expected.items() if c and len(c) > 100]
    assert all(rows[i]["clip_score"] is not None for i in long_ids)


@pytest.mark.slow
def test_run_filters_by_clip_score_and_the_dropped_samples_cost_no_forward(
        captioned_shard, tiny_model_dir, tmp_path):
    from beam_curator import cli

    directory, expected = captioned_shard
    out = tmp_path / "out"
    summary = cli.run_pipeline("run", run_args(
        input_glob=str(directory / "*.tar"), output=str(out), model_dir=tiny_model_dir,
        progress_interval=0, aesthetic_threshold="none", nsfw_threshold="none",
        clip_score_threshold=0.0, min_caption_chars=5, dedup="false"))
    rows = {r["id"]: r for r in parquet_rows(out / "samples")}
    assert summary["accounting"]["ok"]
    for sample_id, row in rows.items():
        caption = (expected[sample_id][1] or "").strip()
        if len(caption) < 5:
            assert row["status"] == FILTERED_CAPTION_LENGTH, sample_id
        elif row["clip_score"] < 0.0:
            assert row["status"] == FILTERED_CLIP_SCORE and "clip_score" in row["reason"]
        else:
            assert row["status"] == "kept", sample_id
    embedded = {r["id"] for r in parquet_rows(out / "embeddings")}
    assert embedded == {i for i, r in rows.items() if r["status"] != FILTERED_CAPTION_LENGTH}
    counts = summary["counts"]
    assert counts[FILTERED_CAPTION_LENGTH] == sum(
        1 for _, c in expected.values() if len((c or "").strip()) < 5)


def test_the_clip_score_is_off_on_request(captioned_shard, tiny_model_dir, tmp_path):
    from beam_curator import cli

    directory, _ = captioned_shard
    out = tmp_path / "out"
    cli.run_pipeline("embed", run_args(input_glob=str(directory / "*.tar"), output=str(out),
                                       model_dir=tiny_model_dir, progress_interval=0,
                                       clip_score="false"))
    assert all(r["clip_score"] is None for r in parquet_rows(out / "samples"))


@pytest.mark.parametrize("flag, value, fragment", [
    ("clip_score_threshold", "1.5", "not a cosine"),
    ("caption_languages", "english", "ISO 639"),
    ("max_aspect_ratio", "0.5", "must be >= 1"),
    ("min_image_side", "0", "must be >= 1"),
])
def test_bad_filter_values_fail_fast(warm, one_shard, tmp_path, capsys, no_pipeline_run,
                                     flag, value, fragment):
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                         model_dir=warm, **{flag: value}), fragment)


def test_the_score_does_not_depend_on_the_batch(tiny_model_dir):
    """Fixed-size text forwards: a caption's score is the same alone or in a full batch."""
    import torch

    from beam_curator.models.text import caption_tokenizer
    from beam_curator.transforms.decode import ImageAndText
    from beam_curator.transforms.embed import OpenClipModelHandler

    handler = OpenClipModelHandler(tiny_model_dir, device="cpu", max_batch_size=8,
                                   clip_score=True)
    model = handler.load_model()
    tokens = caption_tokenizer(tiny_model_dir)(["a red square"])[0]
    rng = np.random.default_rng(0)
    pixels = [torch.from_numpy(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
              for _ in range(8)]
    alone = handler.run_inference([ImageAndText(pixels[0], tokens)], model)[0].inference[1]
    full = handler.run_inference([ImageAndText(p, tokens if i == 0 else None)
                                  for i, p in enumerate(pixels)], model)
    assert full[0].inference[1] == alone
    assert all(r.inference[1] is None for r in full[1:])


# ---- keep the top fraction of the pool ------------------------------------------------------

def _threshold_of(scores, fraction, parts=4):
    from beam_curator.transforms.filters import KeepFractionThresholdFn

    fn = KeepFractionThresholdFn(fraction)
    accs = []
    for part in np.array_split(np.asarray(scores, dtype=np.float32), parts):
        acc = fn.create_accumulator()
        for score in part.tolist():
            acc = fn.add_input(acc, score)
        accs.append(acc)
    return fn.extract_output(fn.merge_accumulators(accs))


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 5000])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 1.0, 0.01])
def test_the_keep_fraction_threshold_is_numpy_s_quantile_on_small_pools(n, fraction):
    scores = np.random.default_rng(n).normal(0.25, 0.05, n).astype(np.float32)
    out = _threshold_of(scores, fraction)
    assert out["exact"] and out["scored"] == n
    assert out["threshold"] == float(np.quantile(scores, 1 - fraction, method="lower"))


def test_the_keep_fraction_threshold_stays_within_its_bound_on_a_large_pool():
    from beam_curator.transforms.filters import EXACT_SCORES, QUANTILE_EPSILON, QUANTILES

    n = 3 * EXACT_SCORES
    scores = np.random.default_rng(0).normal(0.25, 0.05, n).astype(np.float32)
    out = _threshold_of(scores, 0.3, parts=7)
    assert not out["exact"] and out["scored"] == n
    below = int((np.sort(scores) < out["threshold"]).sum())
    assert abs(below - 0.7 * (n - 1)) <= (QUANTILE_EPSILON + 1.0 / (QUANTILES - 1)) * n
    assert _threshold_of([], 0.3) == {"threshold": None, "scored": 0, "exact": True}


@pytest.fixture(scope="module")
def keep_top_run(captioned_shard, tiny_model_dir, tmp_path_factory):
    from beam_curator import cli

    directory, _ = captioned_shard
    out = tmp_path_factory.mktemp("keep-top") / "out"
    args = run_args(input_glob=str(directory / "*.tar"), output=str(out),
                    model_dir=tiny_model_dir, progress_interval=0, aesthetic_threshold="none",
                    nsfw_threshold="none", clip_score_keep_fraction=0.5, n_clusters=2,
                    eps=0.5)
    return out, args, cli.run_pipeline("run", args)


@pytest.mark.slow
def test_run_keeps_the_top_fraction_of_the_whole_pool(keep_top_run):
    out, _, summary = keep_top_run
    rows = parquet_rows(out / "samples")
    scores = np.array([r["clip_score"] for r in rows if r["clip_score"] is not None],
                      dtype=np.float32)
    info = summary["clip_score"]
    assert info["scored"] == len(scores) and info["keep_fraction"] == 0.5 and info["exact"]
    assert info["threshold"] == float(np.quantile(scores, 0.5, method="lower"))
    for row in rows:
        above = row["clip_score"] is not None and row["clip_score"] >= info["threshold"]
        assert (row["status"] == FILTERED_CLIP_SCORE) == (not above), row
    assert info["passed"] == sum(1 for r in rows if r["status"] != FILTERED_CLIP_SCORE)
    # dedup saw exactly the samples above the threshold
    decided = {r["id"] for r in parquet_rows(out / "dedup" / "kmeans")}
    exact = {r["id"] for r in rows if r["status"] == "exact_duplicate"}
    assert decided | exact == {r["id"] for r in rows if r["status"] != FILTERED_CLIP_SCORE}
    assert summary["accounting"]["ok"]


@pytest.mark.slow
def test_the_three_steps_keep_the_same_top_fraction_as_run(keep_top_run, tmp_path):
    """embed (its summary names the threshold) -> dedup (which reads that threshold from the
    embed run's summary.json, with no option) -> remove gives run's curated samples; and an
    explicit --clip_score_threshold T decides the same."""
    from beam_curator import cli

    out, args, summary = keep_top_run
    e, d, r = tmp_path / "E", tmp_path / "D", tmp_path / "R"
    embedded = cli.run_pipeline("embed", with_option(args, "output", str(e)))
    threshold = embedded["clip_score"]["threshold"]
    assert threshold == summary["clip_score"]["threshold"]
    dedup_args = ["--embeddings", str(e / "embeddings"), "--n_clusters", "2", "--eps", "0.5",
                  "--runner", "FnApiRunner", "--progress_interval", "0"]
    cli.run_pipeline("dedup", dedup_args + ["--output", str(d)])
    explicit = tmp_path / "D2"
    cli.run_pipeline("dedup", dedup_args + ["--output", str(explicit),
                                            "--clip_score_threshold", repr(threshold)])
    assert sorted(parquet_rows(d / "dedup" / "kmeans"), key=lambda r: r["id"]) == sorted(
        parquet_rows(explicit / "dedup" / "kmeans"), key=lambda r: r["id"])
    cli.run_pipeline("remove", ["--input", args[args.index("--input") + 1], "--output", str(r),
                                "--removal_ids", f"{e / 'rejected'},{d / 'dedup' / 'duplicates'}",
                                "--runner", "FnApiRunner", "--progress_interval", "0"])
    from tests.conftest import tar_members

    def curated(root):
        return sorted(m for t in sorted((root / "curated").glob("*.tar"))
                      for m, _ in tar_members(t))

    assert curated(r) == curated(out) and curated(out)


def test_a_caption_cut_to_its_length_bucket_encodes_as_the_full_context(tiny_model_dir):
    """The text tower runs on a caption's length bucket only: causal attention and pooling at
    the end-of-text token make that the full forward's answer."""
    from beam_curator.models import load_clip
    from beam_curator.models.text import caption_tokenizer, encode_tokens, token_bucket

    model = load_clip(os.path.join(tiny_model_dir, "clip")).model
    tokens = caption_tokenizer(tiny_model_dir)(["a dog", "a red square on a plain field",
                                                "word " * 40])
    full = encode_tokens(model, tokens, "cpu")
    for row in range(len(tokens)):
        length = token_bucket(tokens[row], tokens.shape[1])
        cut = encode_tokens(model, tokens[row:row + 1], "cpu", length)
        assert np.allclose(cut.numpy(), full[row:row + 1].numpy(), atol=1e-6), length
    assert [token_bucket(t, tokens.shape[1]) for t in tokens] == [8, 16, 16]
