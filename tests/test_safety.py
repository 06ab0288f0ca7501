"""A run owns its output: inputs are never touched, an output is never a mix of two runs, a
kept image is never lost or renamed, and summary.json is the very last file of a finished run.

Each test reproduces one way the promise broke before (issue 11). The slow ones run real
pipelines; one kills a real `python -m beam_curator run` with SIGKILL and reruns it.
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from beam_curator import cli, ownership
from beam_curator.errors import OptionError
from beam_curator.options import curator_options
from beam_curator.schema import ErrorRecord, ShardSample
from beam_curator.transforms.read import list_shards
from beam_curator.webdataset import iter_shard
from tests.conftest import REPO, cli_fails, run_args, with_option


def write_tar(path, members, pax_headers=None):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax_headers and name in pax_headers:
                info.pax_headers = pax_headers[name]
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def snapshot(out) -> dict:
    """Every file under `out`: relative path -> bytes (the run lock record aside)."""
    files = {}
    for directory, _, names in os.walk(out):
        for name in names:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, out)
            if rel != ownership.LOCK_NAME:
                files[rel] = Path(path).read_bytes()
    return files


def finished_output(out: Path, command="run", options=None):
    """A directory that looks like a finished run: a curated tar and a summary.json."""
    (out / "curated").mkdir(parents=True, exist_ok=True)
    write_tar(out / "curated" / "000.tar", [("k.jpg", b"kept image bytes")])
    (out / "summary.json").write_text(json.dumps({"command": command,
                                                  "options": options or {"eps": 0.5}}))


# ---- 1. inputs are resolved before anything is deleted, and never lie in the output -------

def test_a_glob_into_the_curated_dir_is_refused_and_nothing_is_deleted(warm, tmp_path, capsys,
                                                                       no_pipeline_run):
    og = tmp_path / "OG"
    finished_output(og)
    # The raw glob does not start with OG/curated: only the expanded paths show it.
    cli_fails(capsys, ["run"] + run_args(input_glob=str(og / "[c]urated" / "*.tar"),
                                         output=str(og), model_dir=warm, overwrite="true"),
              "lies inside", "curated", "write to another --output")
    assert (og / "curated" / "000.tar").exists() and (og / "summary.json").exists()


def test_no_summary_and_no_overwrite_still_never_rewrites_an_input(warm, tmp_path, capsys,
                                                                   no_pipeline_run):
    og = tmp_path / "OG"
    finished_output(og)
    (og / "summary.json").unlink()
    before = (og / "curated" / "000.tar").read_bytes()
    cli_fails(capsys, ["run"] + run_args(input_glob=str(og / "cur*" / "*.tar"),
                                         output=str(og), model_dir=warm), "lies inside")
    assert (og / "curated" / "000.tar").read_bytes() == before


def test_links_are_followed_both_ways(warm, tmp_path, capsys, no_pipeline_run):
    og = tmp_path / "OG"
    finished_output(og)
    # an input reached through a link that points into the output
    (tmp_path / "link").symlink_to(og / "curated")
    cli_fails(capsys, ["run"] + run_args(input_glob=str(tmp_path / "link" / "*.tar"),
                                         output=str(og), model_dir=warm, overwrite="true"),
              "lies inside")
    # an output whose curated/ is a link onto the input shards
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "000.tar", [("k.jpg", b"x")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "curated").symlink_to(data)
    cli_fails(capsys, ["run"] + run_args(input_glob=str(data / "*.tar"), output=str(out),
                                         model_dir=warm, overwrite="true"), "lies inside")
    assert (data / "000.tar").exists()
    # the removal ids are inputs too
    import pyarrow as pa
    import pyarrow.parquet as pq

    (og / "dedup" / "duplicates").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["000/k"]}), og / "dedup" / "duplicates" / "exact.parquet")
    cli_fails(capsys, ["remove", "--input", str(data / "*.tar"), "--output", str(og),
                       "--removal_ids", str(og / "dedup" / "duplicates"), "--overwrite", "true",
                       "--runner", "FnApiRunner"], "--removal_ids", "lies inside")


def test_files_the_project_writes_are_never_input(tmp_path):
    finished_output(tmp_path)
    (tmp_path / "report.html").write_text("<html></html>")
    (tmp_path / ownership.LOCK_NAME).write_text("{}")
    write_tar(tmp_path / "000.tar", [("k.jpg", b"x")])
    assert list_shards(str(tmp_path / "*")) == [("000", str(tmp_path / "000.tar"))]
    (tmp_path / "000.tar").unlink()
    with pytest.raises(Exception, match="it matched only .*summary.json"):
        list_shards(str(tmp_path / "*"))


# ---- 2. an unfinished run is cleaned by the same command, refused for another -------------

def _claim(out, *args, command="dedup"):
    options = curator_options(["--output", str(out), *args])
    return ownership.claim_output(options.view_as(ownership.outputs.CuratorOptions), command,
                                  [])


def test_an_unfinished_run_is_cleaned_by_the_same_command_and_refused_for_another(tmp_path):
    out = tmp_path / "out"
    claim = _claim(out, "--eps", "0.05")
    # what a killed run leaves: outputs, temp files, staging, and its record
    (out / "dedup" / "_staging").mkdir(parents=True)
    (out / "dedup" / "_staging" / "x.f32").write_bytes(b"x")
    (out / "dedup" / "duplicates").mkdir()
    (out / "dedup" / "duplicates" / "cluster-000001.parquet").write_bytes(b"stale")
    (out / "samples").mkdir()
    (out / "samples" / ".tmp-0123-000.parquet").write_bytes(b"half")
    (out / "summary.FAILED.json").write_text("{}")
    del claim   # the process "dies": its flock goes, its record stays
    record = json.loads((out / ownership.LOCK_NAME).read_text())
    assert record["command"] == "dedup" and record["options"]["eps"] == 0.05

    with pytest.raises(OptionError, match="an unfinished run .* other options"):
        _claim(out, "--eps", "0.01")
    assert (out / "dedup" / "duplicates" / "cluster-000001.parquet").exists()
    with pytest.raises(OptionError, match="different run|unfinished run"):
        _claim(out, "--eps", "0.05", command="remove")

    claim = _claim(out, "--eps", "0.05")   # the same run again: everything old is gone
    assert snapshot(out) == {}
    claim.release(finished=False)


def test_files_of_an_unknown_run_need_overwrite(tmp_path):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "000.parquet").write_bytes(b"from some other tool or version")
    with pytest.raises(OptionError, match="files of an unknown run.*--overwrite true"):
        _claim(out)
    claim = _claim(out, "--overwrite", "true")
    assert snapshot(out) == {}
    claim.release(finished=False)


# ---- 3. a member name that cannot be written back exactly is never a sample ----------------

@pytest.mark.parametrize("bad_name", ["a\x00b.jpg", "tab\there.jpg", "bell\x07.jpg",
                                      "new\nline.jpg", "c1\x85.jpg"])
def test_control_characters_in_member_names_are_shard_errors(tmp_path, bad_name):
    # A PAX header carries the full name (a NUL included) past ustar's 100-byte field.
    path = write_tar(tmp_path / "000.tar", [("ok.jpg", b"fine"), ("x.jpg", b"renamed?")],
                     pax_headers={"x.jpg": {"path": bad_name}})
    items = list(iter_shard("000", path))
    samples = [i for i in items if isinstance(i, ShardSample)]
    errors = [i for i in items if isinstance(i, ErrorRecord)]
    assert [s.key for s in samples] == ["ok"]
    assert len(errors) == 1 and "control characters" in errors[0].reason


def test_kept_names_survive_the_curated_writer(tmp_path):
    """Names the reader accepts come back byte for byte from the writer (long, unicode)."""
    from beam_curator.transforms.write import write_curated_shard
    from tests.conftest import tar_members

    names = ["plain.jpg", "dir/ünïcödé.jpg", "x" * 150 + ".jpg", "sp ace.jpg"]
    path = write_tar(tmp_path / "000.tar", [(n, n.encode()) for n in names])
    samples = [s for s in iter_shard("000", path) if isinstance(s, ShardSample)]
    assert [s.error for s in samples] == [None] * len(names)
    write_curated_shard(str(tmp_path / "curated.tar"), samples)
    assert [n for n, _ in tar_members(tmp_path / "curated.tar")] == names


def test_a_repeated_key_never_takes_a_real_key_s_id(tmp_path):
    path = write_tar(tmp_path / "s.tar", [("a.jpg", b"1"), ("a#2.jpg", b"2"), ("b.jpg", b"3"),
                                          ("a.jpg", b"4"), ("c.jpg", b"5"), ("a.jpg", b"6")])
    samples = [s for s in iter_shard("s", path) if isinstance(s, ShardSample)]
    by_id = {s.id: s for s in samples}
    assert list(by_id) == ["s/a", "s/a#2", "s/b", "s/a.dup2", "s/c", "s/a.dup3"]
    assert by_id["s/a#2"].error is None and by_id["s/a#2"].image_bytes == b"2"
    assert "duplicate key" in by_id["s/a.dup2"].error


# ---- 4. one run at a time per output ------------------------------------------------------

def test_a_second_claim_is_refused_while_the_first_holds_the_output(tmp_path):
    out = tmp_path / "out"
    first = _claim(out)
    with pytest.raises(ownership.OutputBusyError, match=f"pid {os.getpid()}"):
        _claim(out)
    first.release(finished=True)
    assert not (out / ownership.LOCK_NAME).exists()
    _claim(out).release(finished=True)


def test_the_report_command_waits_for_no_run_but_refuses_during_one(tmp_path, capsys):
    out = tmp_path / "out"
    claim = _claim(out)
    assert cli.main(["report", "--output", str(out)]) == 2
    assert "another run is writing" in capsys.readouterr().err
    claim.release(finished=True)


# ---- 5 and "also found": output checks before any work ------------------------------------

def test_an_output_that_cannot_be_a_directory_fails_before_any_work(warm, one_shard, tmp_path,
                                                                    capsys, no_pipeline_run):
    plain = tmp_path / "plain-file"
    plain.write_text("not a directory")
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(plain),
                                         model_dir=warm), "is a file, not a directory")
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(plain / "out"),
                                         model_dir=warm), "cannot be created")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_parent_fails_before_any_work(warm, one_shard, tmp_path, capsys,
                                                  no_pipeline_run):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(parent / "out"),
                                             model_dir=warm), "cannot be created")
    finally:
        parent.chmod(0o755)


def test_replaced_or_linked_weights_are_refused_with_the_fix(warm, one_shard, tmp_path, capsys,
                                                             no_pipeline_run):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(warm, models)
    weights = next((models / "aesthetic").iterdir())
    other = tmp_path / "other-weights"
    other.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    weights.unlink()
    weights.symlink_to(other)
    err = cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                               model_dir=str(models)),
                    "does not match the sha256", "a link to", "models download",
                    "--verify_weights false")
    assert len(err.strip().splitlines()) == 1


def test_verify_weights_false_skips_the_hash(warm, one_shard, tmp_path):
    import shutil

    import apache_beam as beam

    from beam_curator.pipelines import build_run

    models = tmp_path / "models"
    shutil.copytree(warm, models)
    weights = next((models / "nsfw").iterdir())
    weights.write_bytes(weights.read_bytes())   # same bytes: hashes match
    options = curator_options(run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                       model_dir=str(models), verify_weights="false"))
    pipeline = beam.Pipeline(options=options)
    build_run(pipeline, options).release(finished=False)
    shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)


# ---- remote outputs: a lock record with a heartbeat ---------------------------------------

class _RemoteStandIn:
    """A Beam FileSystem for `bcremote://` backed by local paths, standing in for gs://."""

    prefix = "bcremote://"

    @classmethod
    def register(cls):
        from apache_beam.io.filesystem import FileMetadata, MatchResult
        from apache_beam.io.localfilesystem import LocalFileSystem

        prefix = cls.prefix
        strip = lambda p: p[len(prefix):] if p.startswith(prefix) else p   # noqa: E731

        class PrefixedFileSystem(LocalFileSystem):
            @classmethod
            def scheme(cls):
                return "bcremote"

            def join(self, base, *paths):
                return prefix + super().join(strip(base), *paths)

            def match(self, patterns, limits=None):
                return [MatchResult(prefix + r.pattern, [
                    FileMetadata(prefix + m.path, m.size_in_bytes, m.last_updated_in_seconds)
                    for m in r.metadata_list])
                    for r in super().match([strip(p) for p in patterns], limits)]

            def create(self, path, *args, **kwargs):
                return super().create(strip(path), *args, **kwargs)

            def open(self, path, *args, **kwargs):
                return super().open(strip(path), *args, **kwargs)

            def exists(self, path):
                return super().exists(strip(path))

            def mkdirs(self, path):
                return super().mkdirs(strip(path))

            def rename(self, sources, destinations):
                return super().rename([strip(p) for p in sources],
                                      [strip(p) for p in destinations])

            def delete(self, paths):
                import shutil

                for path in map(strip, paths):
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)

        cls.keepalive = PrefixedFileSystem   # Beam holds FileSystem classes weakly
        return prefix


def test_remote_outputs_are_locked_by_a_fresh_record_only(tmp_path, monkeypatch):
    prefix = _RemoteStandIn.register()
    out = tmp_path / "remote-out"
    remote = prefix + str(out)
    monkeypatch.setattr(ownership, "HEARTBEAT_S", 0.2)
    first = _claim(remote)
    record = json.loads((out / ownership.LOCK_NAME).read_text())
    # the heartbeat thread refreshes the record
    _wait_for(lambda: json.loads((out / ownership.LOCK_NAME).read_text())["heartbeat"]
              > record["heartbeat"], 10, "a heartbeat")
    with pytest.raises(ownership.OutputBusyError, match="heartbeat"):
        _claim(remote)
    first.hand_to_job()          # e.g. the launcher died, or handed the output to a job
    with pytest.raises(OptionError, match="submitted|another run"):
        _claim(remote)

    # A dead launcher: its record stops beating and goes stale after STALE_S.
    stale = dict(record, heartbeat=time.time() - ownership.STALE_S - 1, handed_to_job=False)
    (out / ownership.LOCK_NAME).write_text(json.dumps(stale))
    second = _claim(remote)      # same command and options: cleaned and taken over
    second.release(finished=True)
    assert not (out / ownership.LOCK_NAME).exists()


# ---- real pipelines --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def safety_args(small_dataset, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "out"
    input_glob = os.path.join(os.path.dirname(small_dataset.shards[0]), "*.tar")
    args = run_args(input_glob=input_glob, output=str(out), model_dir=tiny_model_dir,
                    n_clusters=3, eps=0.002, aesthetic_threshold=4.9, nsfw_threshold=0.5,
                    progress_interval=0)
    return out, args


@pytest.fixture(scope="module")
def clean_run(safety_args):
    out, args = safety_args
    summary = cli.run_pipeline("run", args)
    return out, args, summary, snapshot(out)


@pytest.mark.slow
def test_summary_json_is_the_last_file_and_the_report_comes_before_it(clean_run):
    out, _, summary, files = clean_run
    assert summary["accounting"]["ok"] and "report.html" in files
    assert not (out / ownership.LOCK_NAME).exists()   # a finished run leaves no record
    mtimes = {rel: os.stat(out / rel).st_mtime_ns for rel in files}
    assert max(mtimes, key=mtimes.get) == "summary.json"


@pytest.mark.slow
def test_a_failing_report_leaves_no_summary(clean_run, monkeypatch):
    import beam_curator.report as report

    out, args, _, _ = clean_run

    def broken(*a, **k):
        raise RuntimeError("injected report failure")

    monkeypatch.setattr(report, "write_report", broken)
    with pytest.raises(Exception, match="injected report failure"):
        cli.run_pipeline("run", args)
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    record = json.loads((out / ownership.LOCK_NAME).read_text())
    assert record["command"] == "run"   # the unfinished run is known by its record


@pytest.mark.slow
@pytest.mark.parametrize("full_at, named", [
    ("/dedup/kmeans/", "/dedup/kmeans/"),
    ("-00000-00000.f32", "/dedup/_staging/chunk-00000-00000.f32"),
    ("-00000-00000.by-cluster.f32", "/dedup/_staging/chunk-00000-00000.by-cluster.f32")],
    ids=["outputs", "staged-by-sampling", "staged-by-assign"])
def test_a_full_disk_is_one_line_and_leaves_no_staging(clean_run, monkeypatch, capsys,
                                                       full_at, named):
    """ENOSPC while dedup writes its outputs (dedup/_staging exists then), or while the
    sampling or the assign step stages a chunk's vectors on its write-behind thread (the
    error reaches the user the same way: the bundle fails before it commits)."""
    from apache_beam.io.filesystems import FileSystems

    out, args, _, _ = clean_run
    real_create = FileSystems.create
    staging_seen = []

    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def create(path, *a, **k):
        if full_at in path:
            staging_seen.append(os.path.isdir(out / "dedup" / "_staging"))
            return FullDisk()
        return real_create(path, *a, **k)

    monkeypatch.setattr(FileSystems, "create", staticmethod(create))
    code = cli.main(["run"] + args)
    err = capsys.readouterr().err
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert "no space left on device while writing" in error_lines[0]
    assert named in error_lines[0] and "MiB free there now" in error_lines[0]
    assert "Traceback" not in err
    assert staging_seen and staging_seen[0]
    assert not (out / "dedup" / "_staging").exists()
    assert not [f for f in snapshot(out) if os.path.basename(f).startswith(".tmp-")]
    assert not (out / "summary.json").exists()


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_matches_a_clean_run(clean_run, capsys, tmp_path):
    """A real `python -m beam_curator run` killed with SIGKILL while it embeds: the lock
    dies with it, a second run meanwhile is refused, another command afterwards is refused,
    and the same command afterwards writes exactly the clean run's bytes."""
    out, args, _, clean_files = clean_run
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = open(tmp_path / "killed-run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "beam_curator", "run", *args], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        lock = out / ownership.LOCK_NAME

        def running():
            assert proc.poll() is None, (tmp_path / "killed-run.log").read_text()[-3000:]
            try:
                return json.loads(lock.read_text()).get("pid") == proc.pid
            except (OSError, ValueError):
                return False

        _wait_for(running, 120, "the subprocess to claim --output")
        # a second run into the same output while the first runs: refused, nothing touched
        cli_fails(capsys, ["run"] + args, "another run is writing", f"pid {proc.pid}")
        _wait_for(lambda: running() and any((out / "embeddings").glob("*.parquet")), 120,
                  "the first embeddings")
        assert not (out / "summary.json").exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    assert json.loads((out / ownership.LOCK_NAME).read_text())["pid"] == proc.pid

    # another run into the unfinished output: refused, its files are left alone
    left = snapshot(out)
    cli_fails(capsys, ["run"] + with_option(args, "eps", "0.05"), "an unfinished run",
              "--overwrite true")
    assert snapshot(out) == left
    # the same command: replaces everything, byte for byte what a clean run writes
    summary = cli.run_pipeline("run", args)
    assert summary["accounting"]["ok"]
    again = snapshot(out)
    assert sorted(again) == sorted(clean_files)
    assert [f for f in clean_files if clean_files[f] != again[f]] == []
