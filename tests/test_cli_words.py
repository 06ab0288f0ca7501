"""Every word on the command line counts (issue 25, item 7): a word no option takes, an
option given twice, and a full disk's wall of Beam logs are each caught before they mislead.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from beam_curator.errors import OptionError
from beam_curator.options import curator_options
from tests.conftest import REPO, cli_fails, run_args


def _run_argv(warm, tmp_path, *extra):
    return ["run", "--output", str(tmp_path / "o"), "--model_dir", warm,
            "--runner", "FnApiRunner", *extra]


# ---- words no option takes ----------------------------------------------------------------

def test_a_shell_expanded_glob_is_an_error_naming_the_fix(warm, tmp_path, capsys,
                                                         no_pipeline_run):
    shards = [str(tmp_path / "shards" / f"{i:03d}.tar") for i in range(3)]
    err = cli_fails(capsys, _run_argv(warm, tmp_path, "--input", *shards),
                    f"unexpected word '{shards[1]}' after --input {shards[0]}",
                    "shell expanded an unquoted glob",
                    f"quote it ('{tmp_path / 'shards' / '*.tar'}')",
                    "join the files with commas")
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_a_single_dash_option_is_an_error_naming_the_two_dash_one(warm, one_shard, tmp_path,
                                                                 capsys, no_pipeline_run):
    cli_fails(capsys, _run_argv(warm, tmp_path, "--input", one_shard, "-n_clusters", "3"),
              "unknown option -n_clusters", "did you mean --n_clusters?")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("words, fragments", [
    (["--eps", "0.05", "0.01"], ["unexpected word '0.01' after --eps 0.05",
                                  "takes one value"]),
    (["--save_main_session", "true"], ["unexpected word 'true'", "takes no value"]),
    (["stray"], ["unexpected word 'stray'"]),
    (["-nclusters", "3"], ["unknown option -nclusters", "did you mean --n_clusters?"]),
    (["-q"], ["unknown option -q", "two dashes"]),
    (["--output", "out/a", "out/b"], ["unexpected word 'out/b'", "unquoted glob",
                                      "--output takes one path"]),
], ids=["after-a-value", "after-a-flag", "alone", "one-dash-typo", "one-dash", "output"])
def test_every_other_stray_word_is_named(words, fragments):
    with pytest.raises(OptionError) as raised:
        curator_options(["--input", "s/*.tar", *words])
    for fragment in fragments:
        assert fragment in str(raised.value), (fragment, str(raised.value))


def test_job_server_flags_keep_their_values_and_beam_flags_still_parse():
    """Runners that forward unknown flags read `--flag value` as Beam does (the next word is
    the value unless it starts with '-'); valueless and repeatable Beam flags still work."""
    for runner in ("FlinkRunner", "PortableRunner", "SparkRunner"):
        options = curator_options([
            "--runner", runner, "--flink_conf_dir", "/etc/flink", "--max_bundle_time_mills",
            "100", "--some_java_switch", "--checkpointing_interval=5", "--input", "a.tar"])
        forwarded = options.get_all_options(retain_unknown_options=True)
        assert forwarded["flink_conf_dir"] == "/etc/flink"
        assert forwarded["max_bundle_time_mills"] == "100"
    with pytest.raises(OptionError, match="unexpected word '200' after "
                                          "--max_bundle_time_mills 100"):
        curator_options(["--runner", "FlinkRunner", "--max_bundle_time_mills", "100", "200"])
    options = curator_options([
        "--save_main_session", "--sdk_location", "container", "--eps", "-0.5",
        "--experiments", "a", "--experiments=b", "--labels", "k=v", "--labels", "j=w",
        "--files_to_stage", "x.whl", "--files_to_stage", "y.whl",
        "--dataflow_service_options", "p", "--dataflow_service_options", "q",
        "--model_dir", "m", "--model-dir=m"])   # the same value twice drops nothing
    all_options = options.get_all_options()
    assert all_options["experiments"] == ["a", "b"]
    assert all_options["labels"] == ["k=v", "j=w"]
    assert all_options["files_to_stage"] == ["x.whl", "y.whl"]
    assert all_options["save_main_session"] is True and all_options["eps"] == -0.5


# ---- an option given twice ------------------------------------------------------------------

@pytest.mark.parametrize("words, named", [
    (["--eps", "0.5", "--eps", "0.01"], "--eps is given twice: --eps 0.5 and --eps 0.01"),
    (["--model_dir", "m", "--model-dir", "n"],
     "--model_dir is given twice: --model_dir m and --model-dir n"),
    (["--eps=0.5", "--eps", "0.01"], "--eps is given twice: --eps 0.5 and --eps 0.01"),
    (["--runner", "FnApiRunner", "--runner=DirectRunner"],
     "--runner is given twice: --runner FnApiRunner and --runner DirectRunner"),
], ids=["same-spelling", "hyphen-twin", "equals", "beam-option"])
def test_an_option_given_twice_names_both_values(words, named):
    with pytest.raises(OptionError) as raised:
        curator_options(words)
    assert named in str(raised.value)


def test_a_repeated_option_fails_the_cli_before_any_work(warm, one_shard, tmp_path, capsys,
                                                        no_pipeline_run):
    cli_fails(capsys, ["run"] + run_args(input_glob=one_shard, output=str(tmp_path / "o"),
                                         model_dir=warm, eps=0.5) + ["--eps", "0.01"],
              "--eps is given twice: --eps 0.5 and --eps 0.01")
    assert not (tmp_path / "o").exists()


# ---- a full disk is one line, an unexpected failure keeps Beam's log -------------------------

# A real `python -m beam_curator` process (pytest's log capture would hide what a user sees)
# whose pipeline is one bundle that fails the given way, as a write to a full disk does.
FAILING_RUN = textwrap.dedent("""
    import errno, os, sys
    import apache_beam as beam
    from beam_curator import cli, pipelines

    class Claim:
        def release(self, finished):
            pass

    def fail(_):
        if sys.argv[1] == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), sys.argv[2] + "/dedup/x")
        raise RuntimeError("an unexpected bug")

    def build(command, options):
        pipeline = beam.Pipeline(options=options)
        pipeline | beam.Create([1]) | beam.Map(fail)
        return pipeline, Claim()

    pipelines.build_pipeline = build
    sys.exit(cli.main(["dedup", "--embeddings", "e", "--output", sys.argv[2],
                       "--runner", "FnApiRunner"]))
""")


@pytest.mark.parametrize("how", ["full", "bug"])
def test_a_full_disk_is_one_line_and_an_unexpected_failure_keeps_beams_log(tmp_path, how):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", FAILING_RUN, how, str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    if how == "full":
        assert proc.returncode == 2, err
        lines = [line for line in err.splitlines() if not line.startswith("INFO ")]
        assert len(lines) == 1 and lines[0].startswith("error:"), err
        assert "no space left on device while writing" in lines[0]
    else:
        assert proc.returncode == 1, err
        assert "ERROR apache_beam" in err and "an unexpected bug [while running" in err
        assert "Traceback" in err and "error:" not in err
