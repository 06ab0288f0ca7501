"""The Dataflow Flex Template (templates/), checked offline: no cloud, no Docker daemon.

(a) templates/metadata.json names exactly the `run` options of CuratorOptions (both ways, with
    the documented exclusions below); (b) each parameter's regexes accept documented good
    values and reject bad ones, and the good values are accepted by CuratorOptions too;
(c) templates/Dockerfile parses and is wired as a Flex Template image and a Beam worker image;
(d) templates/run_template.py, given the parameters as `--name=value` (as the launcher passes
    them), runs the pipeline on the local runner and writes the documented outputs;
(e) the Dataflow job is built offline with `--dry_run=True` (Beam's TestOptions: the
    DataflowRunner translates the graph into the job protos and returns before it would create
    an API client), and RunInference alone carries the `--inference_accelerator` resource hint.
Nothing may use the network: a guard turns any non-loopback connection into an error, and the
subprocess has a timeout, so a test fails instead of hanging.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "templates"
METADATA = TEMPLATES / "metadata.json"
DOCKERFILE = TEMPLATES / "Dockerfile"
RUN_TEMPLATE = TEMPLATES / "run_template.py"

# CuratorOptions that are NOT template parameters, and why. Every other option is one: a new
# option fails test_every_run_option_is_a_parameter until it is added to metadata.json or here.
EXCLUDED_OPTIONS = {
    "embeddings": "dedup command only (input of step 2)",
    "id_column": "dedup command only (column of --embeddings)",
    "embedding_column": "dedup command only (column of --embeddings)",
    "removal_ids": "remove command only (input of step 3)",
    "flink_task_output_limit_mib": "FlinkRunner's batch tasks only; Dataflow's bundles are "
                                   "small and its shuffle reads them as they come",
    "progress_interval": "progress lines of in-process local runs; nothing to print on Dataflow",
}
REQUIRED = {"input", "output", "model_dir"}

# Documented values (the README/helpText examples) that each parameter's regexes must accept...
GOOD = {
    "input": ["gs://my-bucket/shards/*.tar", "gs://laion-400m/part-0/{00000..00099}.tar",
              "gs://b-1.example/a b/x.tar"],
    "output": ["gs://my-bucket/curated-run-1", "gs://my-bucket/out/", "gs://my-bucket"],
    "model_dir": ["gs://my-bucket/models/vit-l-14", "/models", "/opt/models/vit-l-14/"],
    "overwrite": ["true", "false"],
    "max_image_pixels": ["89478485", "1", "178956970"],
    "device": ["auto", "cpu", "cuda"],
    "precision": ["auto", "fp32", "bf16", "fp16"],
    "inference_batch_size": ["64", "256", "1"],
    "min_inference_batch_size": ["1", "8", "64"],
    "large_model": ["true", "false"],
    "torch_compile": ["true", "false", "max-autotune", "reduce-overhead"],
    "forward_batch_size": ["64", "32", "1"],
    "model_copies": ["1", "2", "8"],
    "inference_accelerator": [
        "type:nvidia-l4;count:1;install-nvidia-driver",
        "type:nvidia-l4;count:1;machine_type:g2-standard-4;install-nvidia-driver",
        "type:nvidia-tesla-t4;count:2;install-nvidia-driver:5xx",
        "type:nvidia-h100-80gb;count:8",
    ],
    "aesthetic_threshold": ["5.0", "5", "4.5", "6.25", "0", "10", "10.0", ".5", "none", "off"],
    "nsfw_threshold": ["0.5", "0", "1", "1.0", "0.05", ".9", "none", "disabled"],
    "clip_score": ["true", "false"],
    "text_embeddings": ["true", "false"],
    "clip_score_threshold": ["0.28", "0.3", "-0.1", "1", "0", ".25"],
    "clip_score_keep_fraction": ["0.3", ".3", "1", "0.05", "none"],
    "caption_field": ["caption", "text"],
    "min_caption_words": ["2", "10"],
    "min_caption_chars": ["5", "1"],
    "caption_languages": ["en", "en,de,fr"],
    "min_image_side": ["200", "1"],
    "max_aspect_ratio": ["3", "3.0", "1.5"],
    "max_member_bytes": ["67108864", "1048576"],
    "dedup": ["true", "false"],
    "n_clusters": ["100", "1", "50000", "auto"],
    "kmeans_iterations": ["20", "1", "100"],
    "kmeans_seed": ["0", "42", "123456789"],
    "kmeans_sample_size": ["100000", "1", "2000000", "auto"],
    "centroids": ["gs://my-bucket/run-1/dedup/centroids.npy", "/models/centroids.npy"],
    "eps": ["0.01", "0.1", "0", "0.05", ".02"],
    "which_to_keep": ["hard", "easy", "random"],
    "pairwise_block_size": ["4096", "1", "16384"],
    "border_margin": ["0.02", "0", "2", "1.5", ".1"],
    "reference": ["gs://my-bucket/eval/embeddings", "gs://bk/old/embeddings/*.parquet"],
    "reference_eps": ["0.05", "0", ".4"],
    "reference_exact": ["true", "false"],
    "target": ["gs://my-bucket/imagenet/embeddings", "gs://bk/t/*.parquet"],
    "dedup_vector_transport": ["auto", "shuffle"],
    "dedup_device": ["auto", "cpu", "cuda"],
    "write_report": ["true", "false"],
    "verify_weights": ["true", "false"],
}
# ...and values they must reject.
BAD = {
    "input": ["", "shards/*.tar", "/data/shards/*.tar", "s3://bucket/x.tar", "gs://", "gs://b",
              "gs://bucket/x.tar\nrm -rf"],
    "output": ["", "out", "/tmp/out", "s3://bucket/out", "gs://bucket/out/*", "gs://Bucket/out"],
    "model_dir": ["", "models", "s3://bucket/models", "gs://bucket/m*", "http://x/models"],
    "overwrite": ["yes", "True ", "1", ""],
    "max_image_pixels": ["0", "-1", "1e6", "89,478,485", ""],
    "device": ["gpu", "GPU", "tpu", ""],
    "precision": ["bfloat16", "half", "fp8", ""],
    "inference_batch_size": ["0", "-8", "64.0", "many", ""],
    "min_inference_batch_size": ["0", "-1", "1.5", ""],
    "large_model": ["yes", "on", ""],
    "torch_compile": ["1", "maybe", "max_autotune", "True", ""],
    "forward_batch_size": ["0", "-1", "2.5", "all", ""],
    "model_copies": ["0", "-1", "100", "one", ""],
    "inference_accelerator": ["nvidia-l4", "type:nvidia-l4", "count:1;type:nvidia-l4",
                              "type:nvidia-l4;count:0", "type:nvidia-l4;count:1;install",
                              "type:NVIDIA-L4;count:1", "type:nvidia-l4;count:1;", ""],
    "aesthetic_threshold": ["11", "10.5", "-1", "5,0", "high", "None ", "1e1", ""],
    "nsfw_threshold": ["1.5", "2", "-0.1", "50%", "high", ""],
    "clip_score": ["yes", "1", ""],
    "text_embeddings": ["yes", "1", ""],
    "clip_score_threshold": ["high", "0.3x", ""],
    "clip_score_keep_fraction": ["0", "0.0", "1.5", "30%", ""],
    "caption_field": ["", "a b"],
    "min_caption_words": ["0", "-1", "two", ""],
    "min_caption_chars": ["0", "five", ""],
    "caption_languages": ["english", "en,", "", "en de"],
    "min_image_side": ["0", "200px", ""],
    "max_aspect_ratio": ["-3", "wide", ""],
    "max_member_bytes": ["0", "64MiB", ""],
    "dedup": ["yes", "0", ""],
    "n_clusters": ["0", "-5", "10.0", "k", ""],
    "kmeans_iterations": ["0", "2.5", ""],
    "kmeans_seed": ["-1", "1.5", "seed", ""],
    "kmeans_sample_size": ["0", "1e5", "100k", ""],
    "centroids": ["centroids.npy", "gs://b/run/centroids.pt", "s3://b/c.npy", ""],
    "eps": ["1", "1.0", "-0.01", "0,01", "1e-2", ""],
    "which_to_keep": ["HARD", "first", "farthest", ""],
    "pairwise_block_size": ["0", "4k", ""],
    "border_margin": ["2.5", "3", "-0.1", ""],
    "reference": ["", "eval/embeddings", "/data/eval", "s3://b/e", "gs://"],
    "reference_eps": ["1", "-0.1", "0,05", ""],
    "reference_exact": ["yes", "1", ""],
    "target": ["", "imagenet/embeddings", "gs://"],
    "dedup_vector_transport": ["gcs", "Shuffle", "staged", ""],
    "dedup_device": ["gpu", "CUDA", "cuda:0", ""],
    "write_report": ["no", ""],
    "verify_weights": ["no", "1", ""],
}


# ---- helpers --------------------------------------------------------------------------------

def _metadata() -> dict:
    return json.loads(METADATA.read_text())


def _params() -> dict:
    return {p["name"]: p for p in _metadata()["parameters"]}


def _option_actions() -> dict:
    from beam_curator.options import CuratorOptions

    parser = argparse.ArgumentParser()
    CuratorOptions._add_argparse_args(parser)
    return {a.dest: a for a in parser._actions if a.dest != "help"}


class NetworkBlocked(OSError):
    pass


def _guarded_connect(original):
    def connect(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0] if isinstance(address, tuple) else str(address)
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise NetworkBlocked(f"test tried the network: connect to {address!r}")
        return original(sock, address, *args)
    return connect


@pytest.fixture
def no_network(monkeypatch):
    """Any non-loopback connection raises at once (no hang, no credentials lookup)."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect(socket.socket.connect_ex))
    monkeypatch.setenv("NO_GCE_CHECK", "True")   # google-auth: skip the metadata server probe
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    yield
    socket.setdefaulttimeout(previous)


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:                                   # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _load_run_template():
    spec = importlib.util.spec_from_file_location("beam_curator_run_template", RUN_TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- (a) parameters <-> CuratorOptions --------------------------------------------------------

def test_metadata_is_a_flex_template_spec():
    meta = _metadata()
    assert meta["name"] and meta["description"]
    names = [p["name"] for p in meta["parameters"]]
    assert len(names) == len(set(names)), "duplicate parameter"
    for p in meta["parameters"]:
        assert set(p) <= {"name", "label", "helpText", "isOptional", "regexes", "paramType"}, p
        assert p["label"] and p["helpText"], p["name"]
        assert re.fullmatch(r"[a-z][a-z0-9_]*", p["name"]), (
            f"{p['name']}: the launcher passes --name=value, so use the underscore spelling")
        assert p.get("regexes"), f"{p['name']} has no regexes"


def test_every_parameter_is_a_curator_option():
    options = _option_actions()
    unknown = sorted(set(_params()) - set(options))
    assert not unknown, f"metadata.json parameters that CuratorOptions does not define: {unknown}"


def test_every_run_option_is_a_parameter():
    options = _option_actions()
    missing = sorted(set(options) - set(_params()) - set(EXCLUDED_OPTIONS))
    assert not missing, (f"run options missing from templates/metadata.json: {missing} "
                         "(add them, or to EXCLUDED_OPTIONS with the reason)")
    stale = sorted(set(EXCLUDED_OPTIONS) - set(options))
    assert not stale, f"EXCLUDED_OPTIONS names options that no longer exist: {stale}"
    assert not set(EXCLUDED_OPTIONS) & set(_params())


def test_required_and_optional_match_the_run_command():
    for name, p in _params().items():
        assert bool(p.get("isOptional", False)) == (name not in REQUIRED), name


def test_help_text_states_the_current_default():
    options = _option_actions()
    for name, p in _params().items():
        default = options[name].default
        if default is None:
            continue
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        assert f"Default: {shown}" in p["helpText"], (
            f"{name}: helpText should say 'Default: {shown}' (the CuratorOptions default)")


# Choices a template (always Dataflow) must not offer, with the reason.
NOT_ON_DATAFLOW = {"dedup_vector_transport": {"staged"}}   # needs a shared file system path


def test_choices_of_the_options_are_exactly_what_the_regex_accepts():
    options = _option_actions()
    for name, action in options.items():
        if name in _params() and action.choices:
            offered = set(action.choices) - NOT_ON_DATAFLOW.get(name, set())
            for choice in offered:
                assert _accepts(name, choice), (name, choice)
            for choice in NOT_ON_DATAFLOW.get(name, ()):
                assert not _accepts(name, choice), (name, choice)
            assert sorted(GOOD[name]) == sorted(offered), name


# ---- (b) regexes -----------------------------------------------------------------------------

def _accepts(name: str, value: str) -> bool:
    # Dataflow validates the whole value against every regex of the parameter.
    return all(re.fullmatch(rx, value) for rx in _params()[name]["regexes"])


def test_every_parameter_has_documented_examples():
    assert set(GOOD) == set(_params()) == set(BAD)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_regexes_accept_the_documented_values(name):
    for rx in _params()[name]["regexes"]:
        assert rx.startswith("^") and rx.endswith("$"), (name, rx)
        re.compile(rx)
    rejected = [v for v in GOOD[name] if not _accepts(name, v)]
    assert not rejected, f"{name} regexes reject documented values {rejected}"


@pytest.mark.parametrize("name", sorted(BAD))
def test_regexes_reject_bad_values(name):
    accepted = [v for v in BAD[name] if _accepts(name, v)]
    assert not accepted, f"{name} regexes accept bad values {accepted}"


def test_documented_values_are_valid_curator_options():
    """What the template lets through, CuratorOptions parses and validate_options accepts."""
    from beam_curator.options import curator_options, validate_options

    base = {"input": "gs://b/shards/*.tar", "output": "gs://b/out", "model_dir": "/models"}
    for name, values in GOOD.items():
        for value in values:
            args = {**base, name: value}
            opts = validate_options(curator_options([f"--{k}={v}" for k, v in args.items()]))
            got = getattr(opts, name)
            if name in ("aesthetic_threshold", "nsfw_threshold", "clip_score_keep_fraction"
                        ) and value in ("none", "off", "disabled"):
                expected = None
            elif name == "torch_compile":
                expected = {"true": "default", "false": None}.get(value, value)
            elif value == "auto" and name in ("n_clusters", "kmeans_sample_size"):
                expected = None
            elif isinstance(got, bool):
                expected = value == "true"
            elif isinstance(got, (int, float)):
                expected = type(got)(value)
            else:
                expected = value
            assert got == expected, (name, value, got)


def test_help_examples_match_the_regexes():
    for name, p in _params().items():
        for example in re.findall(r"Example: (\S+)", p["helpText"]):
            assert _accepts(name, example.rstrip(".")), (name, example)


# ---- (c) Dockerfile --------------------------------------------------------------------------

def parse_dockerfile(text: str):
    """Dockerfile -> (directives, [(INSTRUCTION, arguments, first line number)]).

    Handles parser directives (`# syntax=`), comments (also between continuation lines, as
    Docker does), blank lines, and lines continued with a trailing backslash.
    """
    directives, instructions = {}, []
    lines = text.splitlines()
    i, in_header = 0, True
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if in_header and (m := re.fullmatch(r"#\s*([a-zA-Z]+)\s*=\s*(\S+)", stripped)):
            directives[m.group(1).lower()] = m.group(2)
            i += 1
            continue
        in_header = False
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        start, parts = i + 1, []
        while True:
            piece = lines[i]
            if piece.strip().startswith("#") and parts:      # comment inside a continuation
                i += 1
                continue
            if piece.rstrip().endswith("\\"):
                parts.append(piece.rstrip()[:-1])
                i += 1
                if i >= len(lines):
                    raise ValueError(f"line {start}: continuation runs off the end")
                continue
            parts.append(piece)
            i += 1
            break
        joined = "".join(parts).strip()
        m = re.match(r"([A-Za-z]+)\s*(.*)", joined, re.S)
        if not m:
            raise ValueError(f"line {start}: not an instruction: {joined[:40]!r}")
        keyword = m.group(1).upper()
        if keyword not in {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY",
                           "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD",
                           "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}:
            raise ValueError(f"line {start}: unknown instruction {keyword}")
        instructions.append((keyword, m.group(2).strip(), start))
    return directives, instructions


def _env_pairs(args: str) -> dict:
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:                 # legacy `ENV key value`
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) for t in tokens)


def _flags(args: str):
    tokens = shlex.split(args)
    flags = {}
    while tokens and tokens[0].startswith("--"):
        key, _, value = tokens.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, tokens


class Image:
    """What the Dockerfile puts where: ARG defaults, ENV, copies from the build context."""

    def __init__(self, text: str):
        self.directives, self.instructions = parse_dockerfile(text)
        self.args, self.env, self.copies, self.froms = {}, {}, [], []
        self.workdir = "/"
        for keyword, args, _ in self.instructions:
            if keyword == "ARG":
                name, _, default = args.partition("=")
                if name not in self.args or default:
                    self.args[name] = default.strip('"')
            elif keyword == "FROM":
                self.froms.append(self.expand(args.split()[0]))
            elif keyword == "ENV":
                self.env.update({k: self.expand(v) for k, v in _env_pairs(args).items()})
            elif keyword == "WORKDIR":
                self.workdir = os.path.join(self.workdir, self.expand(args))
            elif keyword == "COPY":
                flags, paths = _flags(args)
                *sources, dest = [self.expand(p) for p in paths]
                dest = os.path.join(self.workdir, dest)
                self.copies.append((flags.get("from"), sources, dest))

    def expand(self, value: str) -> str:
        names = {**self.args, **self.env}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                      lambda m: names.get(m.group(1) or m.group(2), m.group(0)), value)

    def context_file(self, image_path: str):
        """The build-context file that ends up at `image_path`, or None."""
        for source, sources, dest in reversed(self.copies):
            if source is not None:
                continue
            for src in sources:
                local = REPO / src
                into_dir = dest.endswith("/") or len(sources) > 1
                target = os.path.join(dest, os.path.basename(src.rstrip("/"))) if (
                    into_dir and local.is_file()) else dest.rstrip("/")
                if local.is_file() and image_path == target:
                    return local
                if local.is_dir() and image_path.startswith(target + "/"):
                    candidate = local / os.path.relpath(image_path, target)
                    if candidate.exists():
                        return candidate
        return None


@pytest.fixture(scope="module")
def image() -> Image:
    return Image(DOCKERFILE.read_text())


def test_dockerfile_parses(image):
    keywords = [k for k, _, _ in image.instructions]
    assert keywords.count("FROM") == 1, "one image serves as launcher and worker"
    assert keywords[-1] == "ENTRYPOINT"
    assert image.directives.get("syntax", "").startswith("docker/dockerfile:"), (
        "RUN --mount needs BuildKit's Dockerfile frontend")


def test_parser_handles_continuations_and_comments():
    text = ("# syntax=docker/dockerfile:1\n# a comment\nARG A=1\n\nRUN echo a \\\n"
            "    # a comment inside\n    && echo b\nENV X=1 \\\n    Y=\"two words\"\n"
            'ENTRYPOINT ["/x"]\n')
    directives, inst = parse_dockerfile(text)
    assert directives == {"syntax": "docker/dockerfile:1"}
    assert [k for k, _, _ in inst] == ["ARG", "RUN", "ENV", "ENTRYPOINT"]
    assert inst[1][1] == "echo a     && echo b" and inst[1][2] == 5
    assert _env_pairs(inst[2][1]) == {"X": "1", "Y": "two words"}
    with pytest.raises(ValueError):
        parse_dockerfile("RUN echo \\\n")


def test_workers_run_with_the_pinned_malloc_threshold(image):
    """The same environment the Flink worker pool gives its workers (worker_pool.py)."""
    from beam_curator.worker_pool import WORKER_MALLOC_ENV

    assert WORKER_MALLOC_ENV and {k: image.env.get(k) for k in WORKER_MALLOC_ENV} == \
        WORKER_MALLOC_ENV


def test_base_image_has_cuda(image):
    (base,) = image.froms
    pattern = r"nvidia/cuda:12\.\d+(\.\d+)?-(cudnn\d*-)?runtime-ubuntu\d+\.\d+"
    assert re.fullmatch(pattern, base), base
    assert "cu12" in image.expand("${TORCH_INDEX_URL}"), "torch CUDA wheels for the CUDA 12 base"


def test_python_beam_and_launcher_versions_agree(image):
    import apache_beam

    py = image.args["PYTHON_VERSION"]
    assert py == "3.11"
    beam_copy = [c for c in image.copies if c[0] and c[0].startswith("apache/beam_python")]
    assert beam_copy == [(f"apache/beam_python{py}_sdk:{apache_beam.__version__}",
                          ["/opt/apache/beam"], "/opt/apache/beam")], beam_copy
    assert image.args["BEAM_VERSION"] == apache_beam.__version__
    pin = _pyproject()["project"]["dependencies"]
    assert any(d.startswith("apache-beam") and apache_beam.__version__.rsplit(".", 1)[0] in d
               for d in pin), pin
    launcher = [c for c in image.copies if c[0] and "template-launcher-base" in c[0]]
    path = "/opt/google/dataflow/python_template_launcher"
    assert launcher == [(launcher[0][0], [path], path)], launcher
    assert launcher[0][0].startswith(
        f"gcr.io/dataflow-templates-base/python{py.replace('.', '')}-template-launcher-base")


def test_entrypoint_is_beam_boot(image):
    (entry,) = [a for k, a, _ in image.instructions if k == "ENTRYPOINT"]
    assert json.loads(entry) == ["/opt/apache/beam/boot"]
    assert image.env.get("RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT") == "1", (
        "without it Beam's boot makes a fresh venv at worker start and loses the packages")


def test_flex_template_files_exist_in_the_image(image):
    py_file = image.env["FLEX_TEMPLATE_PYTHON_PY_FILE"]
    assert image.context_file(py_file) == RUN_TEMPLATE, py_file
    setup_file = image.env["FLEX_TEMPLATE_PYTHON_SETUP_FILE"]
    assert image.context_file(setup_file) == REPO / "setup.py", setup_file
    # Every COPY from the build context names something that exists in the repository.
    for source, sources, _ in image.copies:
        if source is None:
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    # The project install uses an extra that pyproject.toml defines.
    runs = " ".join(a for k, a, _ in image.instructions if k == "RUN")
    extras = _pyproject()["project"]["optional-dependencies"]
    for extra in re.findall(r'"/template\[(\w+)\]"', runs):
        assert extra in extras, extra
    assert "/template[gpu]" in runs


def test_model_weights_can_be_baked_in(image):
    assert "MODEL_DIR_SOURCE" in image.args and image.args["MODEL_DIR_SOURCE"] in ("", '""')
    runs = [a for k, a, _ in image.instructions if k == "RUN" and "MODEL_DIR_SOURCE" in a]
    assert runs and "/models" in runs[0] and "check_model_dir" in runs[0]
    params = _params()
    assert re.fullmatch(params["model_dir"]["regexes"][0], "/models")


# ---- (d) the template entry point on the local runner ----------------------------------------

GUARD = """
import runpy, socket, sys
_connect = socket.socket.connect
def _guard(sock, address, *args):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
            "127.0.0.1", "::1", "localhost"):
        raise OSError("template run tried the network: %r" % (address,))
    return _connect(sock, address, *args)
socket.socket.connect = socket.socket.connect_ex = _guard
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def template_run(tmp_path_factory):
    """Start run_template.py on the local runner in the background; tests wait for it."""
    from beam_curator.models import init_random
    from beam_curator.synthetic import make_dataset

    work = tmp_path_factory.mktemp("template_run")
    dataset = make_dataset(str(work / "shards"), n_shards=2, per_shard=20)
    init_random(str(work / "models"))
    params = {"input": f"{work / 'shards'}/*.tar", "output": str(work / "out"),
              "model_dir": str(work / "models"), "nsfw_threshold": "none", "n_clusters": "4",
              "write_report": "false"}
    assert set(params) <= set(_params())
    argv = [f"--{k}={v}" for k, v in params.items()] + ["--runner=FnApiRunner"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "NO_GCE_CHECK": "True"}
    proc = subprocess.Popen([sys.executable, "-c", GUARD, str(RUN_TEMPLATE), *argv], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    yield proc, work, dataset
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_template_run_early(request):
    """Start the subprocess before the in-process tests, so that the two overlap."""
    if any(item.name == "test_run_template_on_the_local_runner" for item in
           request.session.items):
        request.getfixturevalue("template_run")


def test_run_template_on_the_local_runner(template_run):
    proc, work, dataset = template_run
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"run_template.py did not finish in 300 s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    assert "run finished" in output
    out = work / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accounting"]["ok"] and summary["samples_read"] == dataset.n_samples == 40
    assert sum(summary["counts"].values()) == 40
    assert summary["counts"]["filtered_nsfw"] == 0            # --nsfw_threshold none
    assert summary["counts"]["error"] == len(dataset.corrupt)
    assert summary["options"]["n_clusters"] == 4 and summary["options"]["nsfw_threshold"] is None
    assert sorted(p.name for p in (out / "curated").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert sorted(p.name for p in (out / "samples").glob("*.parquet")) == [
        "00000.parquet", "00001.parquet"]
    assert list((out / "embeddings").glob("*.parquet"))
    assert list((out / "errors").glob("*.parquet"))   # one file per shard with errors
    assert (out / "dedup" / "centroids.npy").exists()
    for sub in ("kmeans", "pairwise_results", "duplicates"):
        assert list((out / "dedup" / sub).glob("*.parquet")), sub
    assert not (out / "report.html").exists()                 # --write_report false


def test_launcher_without_runner_means_dataflow():
    run_template = _load_run_template()
    assert "--runner=DataflowRunner" in run_template.template_argv(
        ["--input=gs://b/x.tar", "--template_location=gs://b/staging/job_object"])
    assert run_template.template_argv(["--input=x"]) == ["--input=x"]
    assert run_template.template_argv(["--runner=FnApiRunner", "--template_location=/t"]) == [
        "--runner=FnApiRunner", "--template_location=/t"]


# ---- (e) the Dataflow job, built offline ----------------------------------------------------

ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"
IMAGE_URL = "us-central1-docker.pkg.dev/offline-project/curator/beam-curator:test"


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    from beam_curator.models import init_random
    from beam_curator.synthetic import make_dataset

    work = tmp_path_factory.mktemp("dataflow_dry_run")
    make_dataset(str(work / "shards"), n_shards=2, per_shard=4, n_exact=1, n_near=1)
    init_random(str(work / "models"))
    return work


def test_dataflow_job_builds_offline_with_the_accelerator_on_runinference(tiny_inputs,
                                                                          no_network):
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.dataflow.internal import apiclient

    work = tiny_inputs
    argv = [
        # the template parameters, as the launcher passes them
        f"--input={work / 'shards'}/*.tar", f"--output={work / 'out'}",
        f"--model_dir={work / 'models'}", f"--inference_accelerator={ACCELERATOR}",
        "--large_model=true", "--n_clusters=4", "--write_report=false",
        # what the launcher and `gcloud dataflow flex-template run` add
        "--runner=DataflowRunner", "--dry_run=True", "--project=offline-project",
        "--region=us-central1", "--temp_location=gs://offline-bucket/tmp",
        "--staging_location=gs://offline-bucket/staging", "--job_name=curator-offline",
        f"--sdk_container_image={IMAGE_URL}", "--disk_size_gb=100",
        "--machine_type=n2-standard-8",
    ]
    run_template = _load_run_template()
    options, result = run_template.launch(argv)
    assert run_template.submits_only(options)
    job = result.job                                   # apiclient.Job: nothing was submitted
    proto = job.proto_pipeline
    envs = proto.components.environments
    transforms = proto.components.transforms
    hint = "beam:resources:accelerator:v1"

    inference = [t for t in transforms.values() if t.unique_name.startswith("Embed/RunInference")]
    assert inference and any(t.spec.urn == "beam:transform:pardo:v1" for t in inference)
    for t in inference:
        assert envs[t.environment_id].resource_hints[hint] == ACCELERATOR.encode(), t.unique_name
    hinted = {t.unique_name for t in transforms.values()
              if t.environment_id and hint in envs[t.environment_id].resource_hints}
    assert hinted == {t.unique_name for t in inference}, (
        "only RunInference may ask for the GPU: " + ", ".join(sorted(hinted - {
            t.unique_name for t in inference})))
    decode = [t for t in transforms.values() if t.unique_name.startswith("Decode/")
              and t.spec.urn == "beam:transform:pardo:v1"]
    assert decode and not envs[decode[0].environment_id].resource_hints

    # Every environment runs our image (launcher image == worker image).
    for env_id, env in envs.items():
        assert env.urn == "beam:env:docker:v1"
        assert IMAGE_URL.encode() in env.payload, env_id

    # The Dataflow Environment the service would get, built from the same job, offline.
    environment = apiclient.Environment(
        packages=[], options=job.options, environment_version="8",
        proto_pipeline_staged_url="gs://offline-bucket/staging/pipeline.pb",
        proto_pipeline=proto).proto
    (pool,) = environment.worker_pools
    assert pool.machine_type == "n2-standard-8" and pool.disk_size_gb == 100
    images = {c.container_image for c in pool.sdk_harness_container_images}
    assert images == {IMAGE_URL}
    assert len(pool.sdk_harness_container_images) >= 2   # default env + the GPU env
    assert "use_multiple_sdk_containers" in list(environment.experiments)
    assert not list(environment.service_options), "right fitting: no worker_accelerator"

    # The whole-pool alternative (README): worker_accelerator as a Dataflow service option,
    # passed as the `dataflow_service_options` template parameter, ends up in the job.
    gpu_pool = PipelineOptions(argv + [
        "--dataflow_service_options=worker_accelerator=" + ACCELERATOR,
        "--experiments=no_use_multiple_sdk_containers", "--machine_type=g2-standard-4"])
    environment = apiclient.Environment(
        packages=[], options=gpu_pool, environment_version="8",
        proto_pipeline_staged_url="gs://offline-bucket/staging/pipeline.pb",
        proto_pipeline=proto).proto
    assert list(environment.service_options) == ["worker_accelerator=" + ACCELERATOR]
    assert "no_use_multiple_sdk_containers" in list(environment.experiments)
    assert "use_multiple_sdk_containers" not in list(environment.experiments)
    assert environment.worker_pools[0].machine_type == "g2-standard-4"


def test_network_guard_works(no_network):
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("203.0.113.1", 443), timeout=1)
