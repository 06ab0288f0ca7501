"""Bad input never crashes a run, nothing is lost, bad options fail fast naming the fix.

One `run` over the whole corpus of tests/bad_inputs.py (filters and dedup off, so every valid
sample must end `kept`), then a table-driven check per kind. The option tests call the CLI or
the builders and never reach the pipeline.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import shutil
import tarfile
import time

import apache_beam as beam
import pytest

from beam_curator import cli
from beam_curator.options import curator_options
from tests.bad_inputs import ERROR, KEPT, KINDS, MAX_IMAGE_PIXELS, make_corpus
from tests.conftest import FAST_S, cli_fails, parquet_rows, run_args, tar_members

# ---- the corpus run -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_run(tiny_model_dir, tmp_path_factory):
    corpus = make_corpus(str(tmp_path_factory.mktemp("bad-corpus")))
    out = tmp_path_factory.mktemp("bad-run")
    started = time.monotonic()
    summary = cli.run_pipeline("run", run_args(
        input_glob=corpus.input_glob, output=str(out), model_dir=tiny_model_dir,
        nsfw_threshold="none", aesthetic_threshold="none", dedup="false",
        max_image_pixels=MAX_IMAGE_PIXELS, write_report="false"))
    elapsed = time.monotonic() - started
    samples = {r["id"]: r for r in parquet_rows(out / "samples")}
    errors = parquet_rows(out / "errors")
    return corpus, out, summary, samples, errors, elapsed


@pytest.mark.slow
def test_the_run_finishes_and_accounting_is_exact(corpus_run):
    corpus, out, summary, samples, _, _ = corpus_run
    expected = corpus.expected
    assert summary["accounting"]["ok"] is True
    # input = the samples the corpus really has (counted by the generator) = sum of statuses
    assert summary["samples_read"] == corpus.n_samples == len(expected)
    assert summary["total_statuses"] == sum(summary["counts"].values()) == corpus.n_samples
    assert set(samples) == set(expected)
    wanted = collections.Counter(e.status for e in expected.values())
    assert {k: v for k, v in summary["counts"].items() if v} == dict(wanted)
    assert summary["curated_samples_written"] == wanted[KEPT]
    assert os.path.exists(out / "summary.json")
    assert not os.path.exists(out / "summary.FAILED.json")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_ends_as_expected(corpus_run, kind):
    corpus, out, summary, samples, errors, _ = corpus_run
    case = corpus.cases[kind]
    error_rows = {r["id"]: r for r in errors if r["id"]}

    # every sample of the shard: the bad ones are errors naming the cause, the rest are kept
    for exp in case.samples:
        row = samples[exp.id]
        assert row["status"] == exp.status, (exp.id, row["status"], row["reason"])
        if exp.status == ERROR:
            assert exp.reason in row["reason"], (exp.id, row["reason"])
            assert row["stage"] == exp.stage, (exp.id, row["stage"])
            assert exp.reason in error_rows[exp.id]["reason"]
            assert error_rows[exp.id]["shard"] == case.shard
        else:
            assert row["reason"] is None and exp.id not in error_rows
            if exp.size:
                assert (row["width"], row["height"]) == exp.size, exp.id
    per_shard = collections.Counter(e.status for e in case.samples)
    assert summary["per_shard"].get(case.shard, {}) == dict(per_shard)

    # shard-level errors: in summary.json and in errors.parquet (id null), exactly these
    got = [e for e in summary["shard_errors"] if e["shard"] == case.shard]
    assert len(got) == len(case.shard_errors), got
    for want in case.shard_errors:
        assert any(want.reason in e["reason"] and e["member"] == want.member for e in got), (
            want, got)
    rows = [r for r in errors if r["id"] is None and r["shard"] == case.shard]
    assert sorted((r["member"] or "", r["reason"]) for r in rows) == sorted(
        (e["member"] or "", e["reason"]) for e in got)
    assert all(r["stage"] == "read" for r in rows)

    # the curated shard: exactly the kept samples' members, byte-identical to the source
    curated = out / "curated" / f"{case.shard}.tar"
    want_members = {}
    for exp in case.good:
        want_members.update(exp.members)
    if not want_members:
        assert not curated.exists()
        return
    members = tar_members(curated)
    names = [n for n, _ in members]
    assert len(names) == len(set(names)), "a member name repeats in a curated shard"
    assert dict(members) == want_members
    for forbidden in case.forbidden_members:
        assert forbidden not in names


@pytest.mark.slow
def test_errors_parquet_says_what_happened(corpus_run):
    corpus, _, summary, samples, errors, _ = corpus_run
    sample_errors = sorted(r["id"] for r in errors if r["id"])
    assert sample_errors == sorted(i for i, r in samples.items() if r["status"] == ERROR)
    assert all(r["reason"] and r["stage"] in ("read", "decode") for r in errors)
    shard_level = [r for r in errors if r["id"] is None]
    assert len(shard_level) == len(summary["shard_errors"]) == sum(
        len(c.shard_errors) for c in corpus.cases.values())
    # a decode error names the member it is about
    for row in errors:
        if row["id"] and samples[row["id"]]["stage"] == "decode":
            assert row["member"] and row["member"].startswith(samples[row["id"]]["key"] + ".")


@pytest.mark.slow
def test_unsafe_members_are_never_written(corpus_run):
    corpus, out, _, _, errors, _ = corpus_run
    case = corpus.cases["unsafe_members"]
    named = {r["member"] for r in errors if r["shard"] == case.shard and r["member"]}
    assert set(case.forbidden_members) <= named   # each is an error naming the member
    for path in glob.glob(str(out / "curated" / "*.tar")):
        for name, _ in tar_members(path):
            assert not name.startswith("/") and ".." not in name.split("/"), (path, name)
    everything = [os.path.relpath(os.path.join(d, f), out)
                  for d, _, files in os.walk(out) for f in files]
    assert not [p for p in everything if "escape" in p or "abs.jpg" in p or "up.txt" in p]
    parent = os.path.dirname(str(out))
    assert not os.path.exists(os.path.join(parent, "escape.jpg"))
    assert not os.path.exists(os.path.join(parent, "up.txt"))


@pytest.mark.slow
def test_malformed_json_sidecar_is_kept_verbatim(corpus_run):
    corpus, out, _, samples, _, _ = corpus_run
    case = corpus.cases["json_sidecar"]
    members = dict(tar_members(out / "curated" / f"{case.shard}.tar"))
    assert members["badjson.json"] == b'{"key": "badjson", "broken": [1, 2'
    assert members["binjson.json"] == b"\xff\xfe\x00not json"
    assert "nojson.json" not in members
    assert samples[f"{case.shard}/badjson"]["status"] == KEPT


@pytest.mark.slow
def test_no_temporary_files_are_left(corpus_run):
    _, out, _, _, _, elapsed = corpus_run
    leftovers = [os.path.join(d, f) for d, dirs, files in os.walk(out)
                 for f in files + dirs if f.startswith(".tmp-") or f == "_staging"]
    assert leftovers == []
    assert elapsed < 120, f"the corpus run took {elapsed:.0f} s"


# ---- bad options fail fast, before any pipeline work ------------------------------------------

def test_no_file_matches_input(warm, tmp_path, capsys, no_pipeline_run):
    cli_fails(capsys, ["run"] + run_args(input_glob=str(tmp_path / "nope" / "*.tar"),
                                         output=str(tmp_path / "out"), model_dir=warm),
              "matches no file", "Check the path and the glob")
    assert not (tmp_path / "out").exists()


def test_missing_model_dir(one_shard, tmp_path, capsys, no_pipeline_run):
    cli_fails(capsys, ["run", "--input", one_shard, "--output", str(tmp_path / "o"),
                       "--runner", "FnApiRunner"], "--model_dir is required")
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                         model_dir=str(tmp_path / "no-such-models")),
              "does not exist", "models init-random")


def test_incomplete_model_dir(warm, one_shard, tmp_path, capsys, no_pipeline_run):
    models = tmp_path / "models"
    shutil.copytree(warm, models)
    shutil.rmtree(models / "nsfw")
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                         model_dir=str(models)),
              "incomplete", "nsfw/", "models init-random")


def test_clip_dim_differs_from_the_heads(warm, one_shard, tmp_path, capsys, no_pipeline_run):
    from beam_curator.models.layout import AESTHETIC_PATHS, NSFW_PATHS, Manifest
    from beam_curator.models.random_init import build_random_heads, write_safetensors

    models = tmp_path / "models"
    shutil.copytree(warm, models)
    embed_dim = Manifest.load(str(models)).embed_dim
    aesthetic, nsfw = build_random_heads(embed_dim * 2, seed=3)
    for rel, head in ((AESTHETIC_PATHS[1], aesthetic), (NSFW_PATHS[1], nsfw)):
        assert (models / rel).exists()
        write_safetensors(head, str(models / rel))
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                         model_dir=str(models)),
              f"embeds to {embed_dim} dims", f"expects {embed_dim * 2}", "init-random")


@pytest.mark.parametrize("option, value, fix", [
    ("eps", "1.5", "must be in [0, 1)"),
    ("eps", "-0.1", "must be in [0, 1)"),
    ("nsfw_threshold", "1.2", "use a value in [0, 1]"),
    ("aesthetic_threshold", "-1", "use a value in [0, 10]"),
    ("aesthetic_threshold", "nan", "use a value in [0, 10]"),
    ("max_image_pixels", "0", "must be >= 1"),
])
def test_values_out_of_range(warm, one_shard, tmp_path, capsys, no_pipeline_run, option,
                             value, fix):
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                         model_dir=warm, **{option: value}), fix, f"--{option}")


def test_a_value_that_is_no_number(warm, one_shard, tmp_path, capsys, no_pipeline_run):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run"] + run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                    model_dir=warm, eps="abc"))
    assert exit_info.value.code == 2
    assert "--eps: invalid float value: 'abc'" in capsys.readouterr().err


def _finished_run(out, command="embed", options=None):
    """A directory that looks like a finished run of another command."""
    for sub in ("samples", "curated"):
        os.makedirs(out / sub, exist_ok=True)
    (out / "samples" / "old.parquet").write_bytes(b"old")
    (out / "curated" / "old.tar").write_bytes(b"old")
    (out / "summary.json").write_text(json.dumps({"command": command,
                                                  "options": options or {"eps": 0.5}}))


def test_output_holding_a_different_run(warm, one_shard, tmp_path, capsys, no_pipeline_run):
    out = tmp_path / "out"
    _finished_run(out)
    args = run_args(input_glob=one_shard, output=str(out), model_dir=warm)
    cli_fails(capsys, ["run"] + args, "already holds a different run", "--overwrite true")
    assert (out / "summary.json").exists() and (out / "curated" / "old.tar").exists()

    # --overwrite true: the builder accepts it and clears the old run before anything runs
    from beam_curator.pipelines import build_run

    options = curator_options(args + ["--overwrite", "true"])
    started = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    build_run(pipeline, options)
    assert time.monotonic() - started < FAST_S
    shutil.rmtree(pipeline.local_tempdir)   # built, never run: Beam would leave it
    assert not (out / "summary.json").exists()
    assert not (out / "curated").exists() and not (out / "samples").exists()


def test_unreadable_summary_counts_as_a_different_run(warm, one_shard, tmp_path, capsys,
                                                      no_pipeline_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{ not json")
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(out), model_dir=warm),
              "already holds a different run", "--overwrite true")


def test_a_typo_in_input_keeps_the_previous_output(warm, tmp_path, capsys, no_pipeline_run):
    out = tmp_path / "out"
    _finished_run(out, command="run")
    cli_fails(capsys, ["run"] + run_args(input_glob=str(tmp_path / "typo*.tar"), output=str(out),
                                         model_dir=warm, overwrite="true"), "matches no file")
    assert (out / "summary.json").exists() and (out / "curated" / "old.tar").exists()


def test_inputs_inside_the_output_are_refused(warm, tmp_path, capsys, no_pipeline_run):
    out = tmp_path / "out"
    (out / "curated").mkdir(parents=True)
    with tarfile.open(out / "curated" / "000.tar", "w"):
        pass
    cli_fails(capsys, ["run"] + run_args(input_glob=str(out / "curated" / "*.tar"),
                                         output=str(out), model_dir=warm),
              "lies inside", "write to another --output")
    assert (out / "curated" / "000.tar").exists()


def test_missing_centroids_file(warm, one_shard, tmp_path, capsys, no_pipeline_run):
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                         model_dir=warm, centroids=str(tmp_path / "c.npy")),
              "--centroids", "does not exist")


