"""Reruns are idempotent: the same `run` into the same directory writes the same bytes, leaves
no temporary or partial files, and a rerun that fails leaves no summary.json behind."""
from __future__ import annotations

import os

import pytest

from beam_curator.cli import run_pipeline
from beam_curator.errors import OptionError
from tests.conftest import run_args, with_option

pytestmark = pytest.mark.slow


def snapshot(out) -> dict:
    """Every file under `out`: relative path -> bytes."""
    files = {}
    for directory, _, names in os.walk(out):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, out)] = handle.read()
    return files


def temp_or_partial(out) -> list:
    found = []
    for directory, dirs, names in os.walk(out):
        for name in dirs + names:
            if name.startswith(".tmp-") or name == "_staging" or name == "summary.FAILED.json":
                found.append(os.path.relpath(os.path.join(directory, name), out))
    return found


# Default options on purpose: RunInference sizes batches adaptively and a matmul's last bits
# depend on the batch size, so this also checks that embed.py pads to fixed-shape batches.
@pytest.fixture(scope="module")
def reruns(small_dataset, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rerun")
    input_glob = os.path.join(os.path.dirname(small_dataset.shards[0]), "*.tar")
    args = run_args(input_glob=input_glob, output=str(out), model_dir=tiny_model_dir,
                    n_clusters=3, eps=0.002, aesthetic_threshold=4.9, nsfw_threshold=0.5,
                    write_report="false")
    first_summary = run_pipeline("run", args)
    first = snapshot(out)
    first_leftovers = temp_or_partial(out)
    second_summary = run_pipeline("run", args)
    second = snapshot(out)
    return dict(out=out, args=args, first=first, second=second, first_summary=first_summary,
                second_summary=second_summary, first_leftovers=first_leftovers)


def test_the_run_wrote_every_kind_of_output(reruns):
    names = set(reruns["first"])
    for prefix in ("curated/", "samples/", "embeddings/", "errors/",
                   "dedup/centroids.npy", "dedup/kmeans/", "dedup/pairwise_results/",
                   "dedup/duplicates/", "summary.json"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert reruns["first_summary"]["accounting"]["ok"] is True


def test_a_rerun_writes_byte_identical_files(reruns):
    first, second = reruns["first"], reruns["second"]
    assert sorted(first) == sorted(second)
    differ = sorted(name for name in first if first[name] != second[name])
    assert differ == [], f"these files differ between two identical runs: {differ}"
    assert reruns["first_summary"] == reruns["second_summary"]


def test_no_temporary_or_partial_files_are_left(reruns):
    assert reruns["first_leftovers"] == []
    assert temp_or_partial(reruns["out"]) == []


def test_a_different_run_into_the_same_directory_is_refused(reruns):
    from apache_beam import Pipeline

    from beam_curator.options import curator_options
    from beam_curator.pipelines import build_run

    options = curator_options(with_option(reruns["args"], "eps", "0.05"))
    with pytest.raises(OptionError, match="already holds a different run"):
        build_run(Pipeline(options=options), options)
    assert os.path.exists(reruns["out"] / "summary.json")   # refused: nothing was touched


def test_a_failed_rerun_leaves_no_summary(reruns, monkeypatch):
    """The curate step (after samples/ and embeddings/ are written, before summary.json)
    fails: no summary.json remains, and the previous one was gone before the run started."""
    import beam_curator.transforms.remove as remove

    out = reruns["out"]
    assert os.path.exists(out / "summary.json")
    summary_seen_during_run = []

    def failing_write(path, samples):
        summary_seen_during_run.append(os.path.exists(out / "summary.json"))
        raise RuntimeError("injected failure while writing a curated shard")

    monkeypatch.setattr(remove, "write_curated_shard", failing_write)
    with pytest.raises(Exception, match="injected failure"):
        run_pipeline("run", reruns["args"])
    assert summary_seen_during_run and not any(summary_seen_during_run)
    assert not os.path.exists(out / "summary.json")
    assert not os.path.exists(out / "summary.FAILED.json")
    assert not [n for n in snapshot(out) if os.path.basename(n).startswith(".tmp-")]

    # the same command again, without the failure: complete, clean, the same set of files
    monkeypatch.undo()
    summary = run_pipeline("run", reruns["args"])
    assert summary["accounting"]["ok"] is True
    assert sorted(snapshot(out)) == sorted(reruns["first"])
    assert temp_or_partial(out) == []
