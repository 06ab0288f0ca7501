"""Every path a run writes, truncates or deletes is one it made (issue 25, items 1-3).

The lock file is never written through a link or into a file with another name; the temp
sweep deletes only the atomic writer's names inside the run's own paths; an output never lies
inside, or holds, another run's output. The property tests at the end build hostile output
directories and walk the whole tree before and after, and audit every path a real `run`
writes or deletes.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from beam_curator import cli, outputs, ownership
from beam_curator.errors import OptionError
from beam_curator.options import curator_options
from tests.conftest import run_args
from tests.test_safety import finished_output, write_tar


def tree(root: Path) -> dict:
    """Everything under `root`: relative path -> bytes, link target or 'dir'."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[rel] = "dir"
            else:
                found[rel] = Path(path).read_bytes()
    return found


def claim(out, *args, command="dedup", inputs=()):
    options = curator_options(["--output", str(out), *args])
    return ownership.claim_output(options.view_as(outputs.CuratorOptions), command,
                                  list(inputs))


@pytest.fixture
def shard(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return Path(write_tar(data / "000.tar", [("k.jpg", b"input image bytes")]))


# ---- 1. the lock file -----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_a_lock_that_is_a_link_to_an_input_is_refused_and_the_input_kept(tmp_path, shard, how):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ownership.LOCK_NAME
    (lock.symlink_to if how == "symlink" else lock.hardlink_to)(shard)
    before = shard.read_bytes()
    with pytest.raises(OptionError, match="lies inside .*lock|other hard link"):
        claim(out, "--overwrite", "true", inputs=[("--input", str(shard))])
    assert shard.read_bytes() == before
    assert lock.exists()   # refused, not removed: the user decides


def test_a_dangling_lock_link_creates_nothing_outside_the_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere" / "created-by-the-run"
    target.parent.mkdir()
    (out / ownership.LOCK_NAME).symlink_to(target)
    with pytest.raises(OptionError, match="symbolic link"):
        claim(out, "--overwrite", "true")
    assert not target.exists()


@pytest.mark.parametrize("content", [b"my notes, not a record", b'{"no": "token"}', b"[1, 2]"])
def test_a_lock_file_that_holds_no_run_record_is_never_truncated(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / ownership.LOCK_NAME).write_bytes(content)
    with pytest.raises(OptionError, match="not a run record"):
        claim(out, "--overwrite", "true")
    assert (out / ownership.LOCK_NAME).read_bytes() == content


def test_a_lock_that_is_a_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / ownership.LOCK_NAME).mkdir(parents=True)
    with pytest.raises(OptionError, match="is a directory"):
        claim(out)


def test_an_empty_lock_left_by_a_launcher_killed_at_creation_is_taken(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ownership.LOCK_NAME).write_bytes(b"")
    claim(out).release(finished=True)
    assert not (out / ownership.LOCK_NAME).exists()


def test_a_busy_lock_whose_record_cannot_be_read_says_so(tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ownership.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)   # a launcher that has locked and not yet written
    try:
        with pytest.raises(ownership.OutputBusyError) as caught:
            claim(out)
    finally:
        os.close(fd)
    assert "cannot be read" in str(caught.value) and "?" not in str(caught.value)


def test_a_full_disk_at_the_lock_write_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ownership.os, "pwrite", full)
    with pytest.raises(OptionError, match="cannot be written .No space left on device"):
        claim(out)


def test_the_lock_is_checked_against_the_inputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ownership.LOCK_NAME).write_bytes(b"")
    with pytest.raises(OptionError, match="lies inside .*beam-curator.lock"):
        claim(out, inputs=[("--embeddings", str(out / ownership.LOCK_NAME))])


# ---- 2. the temp sweep -----------------------------------------------------------------------

def test_the_sweep_deletes_only_the_atomic_writer_s_temp_names_where_the_run_writes(tmp_path):
    out = tmp_path / "out"
    c = claim(out)
    mine = [out / "samples" / ".tmp-0123456789ab-000.parquet",
            out / "dedup" / "kmeans" / ".tmp-ba9876543210-cluster-0.parquet",
            out / ".tmp-00000000abcd-summary.json",
            out / ".tmp-00000000abcd-report.html"]
    users = [out / ".tmp-x.parquet", out / "notes" / "deep" / ".tmp-draft.txt",
             out / "notes" / ".tmp-0123456789ab-000.parquet",   # our name, not our directory
             out / ".tmp-0123456789ab-data.parquet",            # not one of our top files
             out / "samples-old" / ".tmp-0123456789ab-x.parquet"]
    for path in mine + users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    removed = outputs.remove_temp_files(str(out))
    assert sorted(removed) == sorted(str(p) for p in mine)
    assert all(p.exists() for p in users) and not any(p.exists() for p in mine)
    c.release(finished=False)
    assert all(p.exists() for p in users)


def test_a_claim_and_a_finished_run_keep_the_user_s_tmp_files(tmp_path):
    out = tmp_path / "out"
    draft = out / "notes" / "deep" / ".tmp-draft.txt"
    draft.parent.mkdir(parents=True)
    draft.write_text("mine")
    claim(out).release(finished=False)
    ownership.finish_output(str(out), {"command": "dedup"}, None)
    assert draft.read_text() == "mine"


def test_an_input_with_a_temp_name_of_ours_at_the_top_is_refused_not_deleted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    named = out / ".tmp-0123456789ab-summary.json"
    named.write_bytes(b"an input the user named so")
    with pytest.raises(OptionError, match="temp file"):
        claim(out, inputs=[("--embeddings", str(named))])
    assert named.exists()
    plain = out / ".tmp-x.parquet"   # not a name of ours: an input like any other
    plain.write_bytes(b"embeddings")
    claim(out, inputs=[("--embeddings", str(plain))]).release(finished=True)
    assert plain.read_bytes() == b"embeddings"


def test_the_sweep_never_walks_through_a_linked_subdirectory(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".tmp-0123456789ab-x.parquet").write_bytes(b"someone else's")
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples").symlink_to(elsewhere)
    assert outputs.remove_temp_files(str(out)) == []
    assert (elsewhere / ".tmp-0123456789ab-x.parquet").exists()


# ---- paths the run owns are what it would have made ------------------------------------------

def test_an_owned_subdirectory_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.parquet").write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples").symlink_to(elsewhere)
    with pytest.raises(OptionError, match="symbolic link"):
        claim(out, "--overwrite", "true")
    assert (elsewhere / "keep.parquet").read_bytes() == b"precious"


def test_a_directory_where_a_run_writes_a_file_is_refused_not_removed(tmp_path):
    out = tmp_path / "out"
    (out / "report.html").mkdir(parents=True)
    (out / "report.html" / "index.html").write_text("the user's site")
    with pytest.raises(OptionError, match="is a directory"):
        claim(out, "--overwrite", "true")
    assert (out / "report.html" / "index.html").exists()


# ---- 3. nested outputs ---------------------------------------------------------------------

@pytest.mark.parametrize("outer_state", ["live", "unfinished", "finished"])
def test_an_output_inside_another_run_s_output_is_refused(tmp_path, outer_state):
    outer = tmp_path / "X"
    held = claim(outer)
    if outer_state == "unfinished":
        del held   # the process dies: its record stays
    elif outer_state == "finished":
        held.release(finished=True)
        finished_output(outer, command="run")
    for inner in (outer / "embeddings", outer / "notes" / "run2"):
        with pytest.raises(OptionError, match="lies inside .*X, the output of another run"):
            claim(inner, "--overwrite", "true")
        assert not inner.exists() or not any(inner.iterdir())


@pytest.mark.parametrize("inner_state", ["live", "unfinished", "finished"])
def test_an_output_holding_another_run_s_output_is_refused(tmp_path, inner_state):
    outer = tmp_path / "X"
    inner = outer / "embeddings"
    held = claim(inner)
    if inner_state == "unfinished":
        del held
    elif inner_state == "finished":
        held.release(finished=True)
        finished_output(inner, command="dedup")
    before = tree(inner)
    with pytest.raises(OptionError, match="holds the output of another run .*embeddings"):
        claim(outer, "--overwrite", "true")
    assert tree(inner) == before


def test_a_summary_json_of_another_tool_does_not_mark_a_run(tmp_path):
    (tmp_path / "X" / "stats").mkdir(parents=True)
    (tmp_path / "X" / "stats" / "summary.json").write_text('{"images": 3}')
    claim(tmp_path / "X").release(finished=True)


# ---- one output, however it is spelled -------------------------------------------------------

def test_a_trailing_slash_or_dot_is_the_same_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = claim("d", "--eps", "0.05")
    first.release(finished=True)
    options = outputs.recorded_options(
        curator_options(["--output", "d", "--eps", "0.05"]).view_as(outputs.CuratorOptions))
    (tmp_path / "d" / "summary.json").write_text(json.dumps({"command": "dedup",
                                                             "options": options}))
    for spelling in ("d/", "./d", str(tmp_path / "d")):
        claim(spelling, "--eps", "0.05").release(finished=False)
        (tmp_path / "d" / "summary.json").write_text(json.dumps({"command": "dedup",
                                                                 "options": options}))
    with pytest.raises(OptionError, match="--overwrite true"):
        claim("d/", "--eps", "0.06")


# ---- the property: a hostile output never costs a byte outside what the run owns ------------

def _owned_rel(rel: str) -> bool:
    top = rel.split(os.sep, 1)[0]
    return (top in outputs.SUBDIRS or top in outputs.OWN_FILE_NAMES
            or outputs.is_own_top_level_temp(top))


HOSTILE = {
    "lock-symlink-to-input": lambda out, data: (out / ownership.LOCK_NAME).symlink_to(
        data / "000.tar"),
    "lock-hardlink-to-input": lambda out, data: (out / ownership.LOCK_NAME).hardlink_to(
        data / "000.tar"),
    "lock-dangling": lambda out, data: (out / ownership.LOCK_NAME).symlink_to(
        data / "new-file"),
    "lock-user-file": lambda out, data: (out / ownership.LOCK_NAME).write_text("mine"),
    "subdir-link-to-inputs": lambda out, data: (out / "curated").symlink_to(data),
    "top-file-link-to-input": lambda out, data: (out / "report.html").symlink_to(
        data / "000.tar"),
    "user-tmp-files": lambda out, data: [
        (out / "notes" / "deep").mkdir(parents=True),
        (out / "notes" / "deep" / ".tmp-draft.txt").write_text("draft"),
        (out / ".tmp-x.parquet").write_text("user")],
    "nested-finished-run": lambda out, data: finished_output(out / "embeddings" / "inner",
                                                             command="dedup"),
    "inside-a-finished-run": lambda out, data: finished_output(out.parent, command="run"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_no_claim_changes_a_byte_outside_the_paths_the_run_owns(tmp_path, name):
    """Claim (with --overwrite) and release into each hostile layout: everything outside
    the run's owned paths, inputs above all, is exactly as before; refused or not."""
    root = tmp_path / "root"
    data, out = root / "data", root / "runs" / "out"
    data.mkdir(parents=True)
    out.mkdir(parents=True)
    write_tar(data / "000.tar", [("k.jpg", b"input image bytes")])
    HOSTILE[name](out, data)
    before = tree(root)
    inputs = [("--input", str(data / "000.tar"))]
    try:
        claim(out, "--overwrite", "true", command="run", inputs=inputs).release(finished=True)
        refused = False
    except OptionError:
        refused = True
    after = tree(root)
    out_rel = os.path.relpath(out, root)
    kept = {rel: v for rel, v in before.items()
            if not (rel.startswith(out_rel + os.sep)
                    and _owned_rel(os.path.relpath(root / rel, out)))}
    assert refused == (name != "user-tmp-files"), name
    if refused:
        assert after == before, name
    else:
        assert {rel: after.get(rel) for rel in kept} == kept, name
    assert after[os.path.join("data", "000.tar")] == before[os.path.join("data", "000.tar")]
    assert not (data / "new-file").exists()


@pytest.mark.slow
def test_every_path_a_real_run_writes_or_deletes_is_its_own(small_dataset, tiny_model_dir,
                                                            tmp_path, monkeypatch):
    """A real `run`, then its rerun, with every write, rename and delete recorded: each one
    lies in the run's owned paths (or outside both --output and the inputs: Beam's own temp
    dir), never at an input, never in a neighbouring run's output, never through a link."""
    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(small_dataset.shards[0]), data)
    neighbour = tmp_path / "runs" / "neighbour"
    finished_output(neighbour, command="run")
    out = tmp_path / "runs" / "out"
    (out / "notes" / "deep").mkdir(parents=True)
    (out / "notes" / "deep" / ".tmp-draft.txt").write_text("draft")
    args = run_args(input_glob=str(data / "*.tar"), output=str(out), model_dir=tiny_model_dir,
                    n_clusters=2, progress_interval=0)

    touched = []
    real_open, real_rename, real_unlink, real_rmtree = (
        open, os.rename, os.unlink, shutil.rmtree)
    import builtins

    def audited_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            touched.append(("write", os.fspath(file)))
        return real_open(file, mode, *a, **k)

    def audited_rename(src, dst, *a, **k):
        touched.append(("rename-from", os.fspath(src)))
        touched.append(("rename-to", os.fspath(dst)))
        return real_rename(src, dst, *a, **k)

    def audited_unlink(path, *a, **k):
        touched.append(("delete", os.fspath(path)))
        return real_unlink(path, *a, **k)

    def audited_rmtree(path, *a, **k):
        touched.append(("delete", os.fspath(path)))
        return real_rmtree(path, *a, **k)

    real_os_open = os.open

    def audited_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            touched.append(("write", os.fspath(path)))
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(builtins, "open", audited_open)
    monkeypatch.setattr(io, "open", audited_open)
    monkeypatch.setattr(os, "open", audited_os_open)
    monkeypatch.setattr(os, "rename", audited_rename)
    monkeypatch.setattr(os, "unlink", audited_unlink)
    monkeypatch.setattr(os, "remove", audited_unlink)
    monkeypatch.setattr(shutil, "rmtree", audited_rmtree)
    inputs_before = tree(data)
    neighbour_before = tree(neighbour)
    cli.run_pipeline("run", args)
    cli.run_pipeline("run", args)   # the rerun replaces the first run's files
    monkeypatch.undo()

    assert tree(data) == inputs_before and tree(neighbour) == neighbour_before
    assert (out / "notes" / "deep" / ".tmp-draft.txt").read_text() == "draft"
    real_out, real_data, real_neighbour = (os.path.realpath(p) for p in (out, data, neighbour))
    inside_out = [(what, p) for what, p in touched
                  if ownership._inside(os.path.realpath(os.path.abspath(p)), real_out)]
    assert any(what == "write" for what, _ in inside_out)   # the audit saw the writers
    for what, path in touched:
        real = os.path.realpath(os.path.abspath(path))
        assert not ownership._inside(real, real_data), (what, path)
        assert not ownership._inside(real, real_neighbour), (what, path)
        if ownership._inside(real, real_out):
            rel = os.path.relpath(real, real_out)
            assert rel != "." and _owned_rel(rel), (what, path)
            # never through a link: the path as written is the path it reaches
            assert os.path.realpath(os.path.dirname(os.path.abspath(path))) == \
                os.path.dirname(real), (what, path)


def test_the_report_command_refuses_an_output_that_is_not_a_run_s(tmp_path, capsys):
    out = tmp_path / "dedup-out"
    finished_output(out, command="dedup")
    assert cli.main(["report", "--output", str(out)]) == 2
    assert "holds the output of `dedup`" in capsys.readouterr().err
    assert not (out / "report.html").exists()


def test_a_recursive_glob_never_reads_this_run_s_own_earlier_outputs(tmp_path):
    from beam_curator.transforms.read import list_shards

    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "000.tar", [("k.jpg", b"x")])
    (tmp_path / "out" / "curated").mkdir(parents=True)
    write_tar(tmp_path / "out" / "curated" / "000.tar", [("k.jpg", b"x")])
    pattern = str(tmp_path / "**.tar")
    assert [u for _, u in list_shards(pattern, str(tmp_path / "out"))] == [
        str(tmp_path / "data" / "000.tar")]
    # a glob of nothing but the output's files stays as it is: the claim refuses it by name
    only = str(tmp_path / "out" / "curated" / "*.tar")
    assert len(list_shards(only, str(tmp_path / "out"))) == 1
    with pytest.raises(OptionError, match="lies inside"):
        ownership.check_inputs_outside_output(
            [("--input", u) for _, u in list_shards(only, str(tmp_path / "out"))],
            str(tmp_path / "out"))
