"""The composition root: options -> the public transforms -> the four graphs.

`build_run`, `build_embed`, `build_dedup` and `build_remove` validate what they need (failing
fast with the fix), claim --output (beam_curator.ownership), and compose the same public
transforms a Python user composes (`beam_curator.__init__`); the CLI, the flex template and the
tests all call these. Only this module and the CLI read command-line options.
"""
from __future__ import annotations

import logging
import shutil
from typing import List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_curator import outputs
from beam_curator.captions import parse_languages
from beam_curator.errors import OptionError
from beam_curator.flink_tasks import (
    GuardTaskOutput,
    output_bytes_per_sample,
    tasks_for_embeddings,
    tasks_for_shards,
)
from beam_curator.options import (
    CuratorOptions,
    given_parallelism,
    is_flink_batch,
    resolve_vector_transport,
    size_flink_tasks,
    validate_options,
)
from beam_curator.ownership import OutputClaim, claim_output, finish_output, inputs_of
from beam_curator.schema import KEPT, REJECTED_SCHEMA, SampleResult
from beam_curator.transforms.decode import DecodeImages, SampleChecks
from beam_curator.transforms.filters import FilterByScores
from beam_curator.transforms.read import (
    ReadResult,
    ReadWebDataset,
    list_shards,
    match_globs,
    shard_sizes,
    split_globs,
)
from beam_curator.transforms.remove import RemoveSamples, WriteCuratedShards
from beam_curator.transforms.scores import ScoreImages
from beam_curator.transforms.summary import WriteSummary
from beam_curator.transforms.write import (
    WriteEmbeddings,
    WriteErrors,
    WriteParquetByShard,
    WriteSamples,
)

_LOG = logging.getLogger(__name__)


class Front(NamedTuple):
    """What the embed half of the graph hands on."""

    read: ReadResult
    samples_read: beam.PCollection    # singleton count
    rejected: beam.PCollection        # SampleResult: error / filtered_*
    passed: beam.PCollection          # (SampleInfo, embedding) that passed the filters;
    #                                   (SampleInfo, None) with --clip_score_keep_fraction
    embeddings_written: beam.PCollection
    # --clip_score_keep_fraction: one dict (threshold, scored, passed, ...), and the one
    # float that dedup holds the embeddings rows to; None without it.
    clip_info: Optional[beam.PCollection] = None
    min_clip_score: Optional[beam.PCollection] = None
    # --text_embeddings: one dict (rows, files), once text_embeddings/ is written.
    text_info: Optional[beam.PCollection] = None


def dedup_kwargs(options) -> dict:
    """The dedup transforms' keywords from the command line (checked already, by
    validate_options, with the transforms' own rule: `DedupConfig.checked`)."""
    opts = options.view_as(CuratorOptions)
    return dict(n_clusters=opts.n_clusters, eps=opts.eps, which_to_keep=opts.which_to_keep,
                  centroids=opts.centroids, kmeans_iterations=opts.kmeans_iterations,
                  kmeans_seed=opts.kmeans_seed, kmeans_sample_size=opts.kmeans_sample_size,
                  pairwise_block_size=opts.pairwise_block_size,
                  border_margin=opts.border_margin,
                  vector_transport=resolve_vector_transport(options), device=opts.dedup_device,
                  reference=opts.reference, reference_eps=opts.reference_eps,
                  reference_exact=opts.reference_exact, target=opts.target)


def _other_sets(opts: CuratorOptions, dim: int) -> List[Tuple[str, str]]:
    """--reference and --target resolved and checked (files, dimension, the exact mode's
    size) before the output is claimed; their files, as inputs the output must not touch."""
    from beam_curator.transforms.dedup import OtherSets
    from beam_curator.transforms.semdedup import DedupConfig
    from beam_curator.transforms.semdedup.sources import resolve_embeddings

    if not opts.reference and not opts.target and not opts.reference_exact:
        return []
    config = DedupConfig(output=opts.output, id_column=opts.id_column,
                         embedding_column=opts.embedding_column,
                         reference_exact=opts.reference_exact)
    OtherSets(config, opts.reference, opts.target).check_dim(dim)
    inputs = []
    for flag, pattern in (("--reference", opts.reference), ("--target", opts.target)):
        if pattern:
            files, pairs = resolve_embeddings(pattern)
            inputs += inputs_of(flag, files + [path for pair in pairs for path in pair])
    return inputs


def _check_model_dir(opts: CuratorOptions):
    from beam_curator.models import check_model_dir, localize_model_dir

    # A gs:// (or any remote) --model_dir is copied once into the local model cache to be
    # checked here; the workers copy it into theirs when they load the model. The weights
    # are hashed against manifest.json once per run, here on the launching machine.
    manifest = check_model_dir(localize_model_dir(opts.model_dir),
                               verify_sha256=opts.verify_weights)
    if manifest.random_weights:
        _LOG.warning("MODEL WEIGHTS ARE RANDOM (%s): embeddings and scores are meaningless "
                     "except for testing the pipeline.", opts.model_dir)
    return manifest


def sample_checks(opts: CuratorOptions) -> SampleChecks:
    """The filters that run before the model, from the command line."""
    return SampleChecks(min_caption_words=opts.min_caption_words,
                        min_caption_chars=opts.min_caption_chars,
                        caption_languages=parse_languages(opts.caption_languages),
                        min_image_side=opts.min_image_side,
                        max_aspect_ratio=opts.max_aspect_ratio,
                        caption_field=opts.caption_field)


def _flink_tasks_for_shards(options, opts: CuratorOptions, manifest, shard_list
                            ) -> Optional[GuardTaskOutput]:
    """On Flink's batch runner: tasks sized for the shards (before anything is claimed),
    and the guard that fails a task the estimate did not foresee (flink_tasks). `options`:
    the pipeline's own (Beam's Pipeline holds a copy of the options it was made with)."""
    if not is_flink_batch(options):
        return None
    limit_mib = opts.flink_task_output_limit_mib
    sized = tasks_for_shards(shard_list, shard_sizes(opts.input, shard_list),
                             manifest.embed_dim, opts.text_embeddings, limit_mib)
    if sized is not None:
        size_flink_tasks(options, sized.need, sized.why)
    return GuardTaskOutput(output_bytes_per_sample(manifest.embed_dim, opts.text_embeddings),
                           limit=limit_mib << 20, parallelism=given_parallelism(options))


def build_front(p: beam.Pipeline, opts: CuratorOptions, shard_list,
                task_guard: Optional[GuardTaskOutput] = None) -> Front:
    """read -> decode -> RunInference -> scores -> thresholds, and write embeddings/.
    `task_guard`: a GuardTaskOutput on the embedded samples (Flink's batch runner)."""
    # Imported here: apache_beam.ml (RunInference) costs seconds of imports that the `dedup`
    # and `remove` commands do not need.
    from beam_curator.transforms.embed import EmbedImages

    read = p | "Read" >> ReadWebDataset(shards=shard_list,
                                        max_member_bytes=opts.max_member_bytes)
    samples_read = read.samples | "CountRead" >> beam.combiners.Count.Globally()
    decoded = read.samples | "Decode" >> DecodeImages(
        opts.model_dir, max_image_pixels=opts.max_image_pixels, checks=sample_checks(opts),
        tokenize=opts.clip_score)
    embedded = decoded.decoded | "Embed" >> EmbedImages(
        opts.model_dir, device=opts.device, precision=opts.precision,
        inference_batch_size=opts.inference_batch_size,
        min_inference_batch_size=opts.min_inference_batch_size,
        forward_batch_size=opts.forward_batch_size, large_model=opts.large_model,
        model_copies=opts.model_copies, torch_compile=opts.torch_compile,
        accelerator=opts.inference_accelerator, clip_score=opts.clip_score,
        text_embeddings=opts.text_embeddings)
    text_info = None
    if opts.text_embeddings:
        from beam_curator.transforms.text_embeddings import WriteTextEmbeddings

        text_info = embedded.text | "WriteTextEmbeddings" >> WriteTextEmbeddings(opts.output)
        embedded = embedded.embedded
    scored = embedded | "Score" >> ScoreImages(opts.model_dir)
    if task_guard is not None:
        # every output of the embedding stage fans out from here
        scored = scored | "GuardTaskOutput" >> task_guard
    split = scored | "Filter" >> FilterByScores(
        aesthetic_threshold=opts.aesthetic_threshold, nsfw_threshold=opts.nsfw_threshold,
        clip_score_threshold=opts.clip_score_threshold)
    embeddings_written = ((split.passed, split.filtered)
                          | "AllEmbeddings" >> beam.Flatten()
                          | "WriteEmbeddings" >> WriteEmbeddings(opts.output))
    rejected = [decoded.errors,
                split.filtered | "DropVectors" >> beam.MapTuple(lambda result, _: result)]
    passed, clip_info, min_clip_score = split.passed, None, None
    if opts.clip_score_keep_fraction is not None:
        passed, clip_info, min_clip_score, filtered = _keep_top_clip_score(
            scored, split.passed, opts.clip_score_keep_fraction)
        rejected.append(filtered)
    return Front(read=read, samples_read=samples_read,
                 rejected=tuple(rejected) | "Rejected" >> beam.Flatten(), passed=passed,
                 embeddings_written=embeddings_written, clip_info=clip_info,
                 min_clip_score=min_clip_score, text_info=text_info)


def _keep_top_clip_score(scored, passed, fraction: float):
    """DataComp's keep-top-fraction: the threshold over every scored sample, applied to the
    samples that passed the other filters. Their embeddings are already written (with
    passed_filters true): what waits for the threshold is SampleInfo only, and dedup holds
    the written rows to the same threshold (`min_clip_score`)."""
    from beam_curator.transforms.filters import KeepTopClipScore

    pool = scored | "PoolScores" >> beam.MapTuple(lambda info, _: info.clip_score)
    top = (passed
           | "CandidateInfos" >> beam.MapTuple(lambda info, _: info)
           | "KeepTopClipScore" >> KeepTopClipScore(fraction, pool=pool))
    n_passed = top.passed | "CountKeptByScore" >> beam.combiners.Count.Globally()
    clip_info = top.threshold | "ClipScoreInfo" >> beam.Map(
        lambda t, n: dict(t, passed=n), beam.pvalue.AsSingleton(n_passed))
    # Nothing scored: no row can reach a threshold (every candidate was filtered).
    min_clip_score = top.threshold | "MinClipScore" >> beam.Map(
        lambda t: t["threshold"] if t["threshold"] is not None else float("inf"))
    return (top.passed | "NoVectors" >> beam.Map(lambda info: (info, None)),
            clip_info, min_clip_score, top.filtered)


def _write_results(results, front: Front, opts: CuratorOptions, claim: OutputClaim, *,
                   curated: bool, extra: dict, more_written=(), dedup_info=None):
    """samples/, errors/, curated/ (optional) and finally summary.json."""
    samples_written = results | "WriteSamples" >> WriteSamples(opts.output)
    errors_written = ((results, front.read.errors)
                      | "ResultsAndShardErrors" >> beam.Flatten()
                      | "WriteErrors" >> WriteErrors(opts.output))
    curated_counts = None
    if curated:
        curated_counts = results | "Curate" >> WriteCuratedShards(
            opts.output, shards=front.read.shards, max_member_bytes=opts.max_member_bytes)
    written = [samples_written, errors_written, front.embeddings_written, *more_written]
    return results | "Summary" >> WriteSummary(
        opts.output, extra, samples_read=front.samples_read,
        shard_errors=front.read.errors, curated_counts=curated_counts, written=written,
        claim_token=claim.token, report=curated and opts.write_report, dedup_info=dedup_info,
        clip_info=front.clip_info, text_info=front.text_info)


def _run_extra(opts: CuratorOptions, manifest, command: str) -> dict:
    return {"command": command,
            "model_dir": opts.model_dir,
            "random_weights": manifest.random_weights,
            "options": outputs.recorded_options(opts)}


def _centroids_input(opts: CuratorOptions) -> List[Tuple[str, str]]:
    if not opts.centroids:
        return []
    if not FileSystems.exists(opts.centroids):
        raise OptionError(
            f"--centroids {opts.centroids} does not exist. Point it at a centroids .npy "
            "(e.g. OUTPUT/dedup/centroids.npy of an earlier run), or leave it out to train "
            "them.")
    return [("--centroids", opts.centroids)]


def _claim_for_shards(opts: CuratorOptions, command: str, shard_list, more=()) -> OutputClaim:
    """Inputs are resolved before --output is touched: a typo keeps the previous output."""
    inputs = inputs_of("--input", [url for _, url in shard_list]) + list(more)
    if command in ("run", "embed"):
        inputs += [("--model_dir", opts.model_dir)] + _centroids_input(opts)
    return claim_output(opts, command, inputs)


def build_embed(p: beam.Pipeline, options) -> OutputClaim:
    """Step 1: embeddings + scores + statuses; `rejected/` lists what step 3 must drop."""
    opts = validate_options(options, needs=("input", "output", "model_dir"))
    manifest = _check_model_dir(opts)
    shard_list = list_shards(opts.input, opts.output)
    task_guard = _flink_tasks_for_shards(p.options, opts, manifest, shard_list)
    claim = _claim_for_shards(opts, "embed", shard_list)
    front = build_front(p, opts, shard_list, task_guard)
    passed = front.passed | "Candidates" >> beam.MapTuple(
        lambda info, _: SampleResult(info=info, status=KEPT))
    results = (front.rejected, passed) | "AllResults" >> beam.Flatten()
    rejected_written = (front.rejected
                        | "RejectedRows" >> beam.Map(
                            lambda r: (r.info.shard, {"id": r.id, "status": r.status}))
                        | "WriteRejected" >> WriteParquetByShard(
                            outputs.rejected_dir(opts.output), REJECTED_SCHEMA))
    _write_results(results, front, opts, claim, curated=False,
                   extra=_run_extra(opts, manifest, "embed"), more_written=[rejected_written])
    return claim


def build_run(p: beam.Pipeline, options) -> OutputClaim:
    """The one-graph flow: embed -> filter -> dedup -> curated shards, samples, summary."""
    opts = validate_options(options, needs=("input", "output", "model_dir"))
    manifest = _check_model_dir(opts)
    shard_list = list_shards(opts.input, opts.output)
    others = _other_sets(opts, manifest.embed_dim) if opts.dedup else []
    task_guard = _flink_tasks_for_shards(p.options, opts, manifest, shard_list)
    claim = _claim_for_shards(opts, "run", shard_list, others)
    front = build_front(p, opts, shard_list, task_guard)
    more_written, dedup_info = [], None
    if opts.dedup:
        from beam_curator.transforms.dedup import Deduplicate

        # The vectors are in embeddings/ already: dedup reads them there, and is given ids.
        dedup = front.passed | "Candidates" >> beam.Keys() | "Dedup" >> Deduplicate(
            opts.output, embeddings_written=front.embeddings_written,
            min_clip_score=front.min_clip_score, **dedup_kwargs(options))
        deduped, more_written, dedup_info = dedup.results, [dedup.written], dedup.info
    else:
        deduped = front.passed | "NoDedup" >> beam.MapTuple(
            lambda info, _: SampleResult(info=info, status=KEPT))
    results = (front.rejected, deduped) | "AllResults" >> beam.Flatten()
    _write_results(results, front, opts, claim, curated=True,
                   extra=_run_extra(opts, manifest, "run"), more_written=more_written,
                   dedup_info=dedup_info)
    return claim


def build_dedup(p: beam.Pipeline, options) -> OutputClaim:
    """Step 2: semantic dedup of embeddings -> OUTPUT/dedup/ and summary.json."""
    from beam_curator.transforms.dedup import DeduplicateEmbeddings, dedup_summary
    from beam_curator.transforms.semdedup import DedupConfig
    from beam_curator.transforms.semdedup.sources import (
        check_embedding_sources,
        resolve_embeddings_sized,
    )

    opts = validate_options(options, needs=("embeddings", "output"))
    files, npy_pairs, input_bytes = resolve_embeddings_sized(opts.embeddings)
    if not files and not npy_pairs:
        raise OptionError(
            f"--embeddings {opts.embeddings!r} matches no file. Point it at embeddings "
            "parquet files (e.g. 'OUTPUT/embeddings/*.parquet' of an `embed` run, or their "
            "directory) or at a clip-retrieval output directory (img_emb/ + metadata/).")
    # p.options: Beam's Pipeline holds a copy of the options it was made with
    size_flink_tasks(p.options, *tasks_for_embeddings(input_bytes, "--embeddings"))
    # Columns, types, the dim and --centroids: refused before --output is touched.
    dim, _ = check_embedding_sources(files, npy_pairs, DedupConfig(
        output=opts.output, id_column=opts.id_column, embedding_column=opts.embedding_column,
        centroids=opts.centroids))
    if opts.clip_score_threshold is not None and npy_pairs:
        raise OptionError("--clip_score_threshold holds dedup's candidates to the clip_score "
                          "column of embeddings parquet files; clip-retrieval's img_emb/ has "
                          "none: leave the threshold out.")
    min_clip_score = _embed_keep_fraction_threshold(files, opts.clip_score_threshold)
    inputs = files + [path for pair in npy_pairs for path in pair]
    claim = claim_output(opts, "dedup", inputs_of("--embeddings", inputs)
                         + _centroids_input(opts) + _other_sets(opts, dim))
    dedup = p | "Dedup" >> DeduplicateEmbeddings(
        opts.embeddings, opts.output, id_column=opts.id_column,
        embedding_column=opts.embedding_column, resolved=(files, npy_pairs), with_rows=False,
        min_clip_score=min_clip_score, **dedup_kwargs(options))
    counts = dedup_summary(dedup.counts, dedup.info)
    out, token = opts.output, claim.token
    summary = {"command": "dedup", "options": outputs.recorded_options(opts), "eps": opts.eps,
               "which_to_keep": opts.which_to_keep}
    (counts
     | "WriteDedupSummary" >> beam.Map(
         lambda c, _: finish_output(out, dict(summary, **c), token),
         beam.pvalue.AsSingleton(dedup.written)))
    return claim


def _embed_keep_fraction_threshold(files: List[str], given: Optional[float]) -> Optional[float]:
    """The CLIP-score threshold dedup holds its candidates to: --clip_score_threshold when
    given; else the keep-top-fraction threshold of the `embed` run(s) whose embeddings/ these
    files are (their summary.json), so that the three-step flow dedups the pool `run` would.
    Two embed runs with different thresholds are refused: say which one holds."""
    import json
    import posixpath

    found = {}
    for run_dir in sorted({posixpath.dirname(posixpath.dirname(f)) for f in files}):
        path = outputs.summary_file(run_dir)
        try:
            with FileSystems.open(path) as handle:
                summary = json.loads(handle.read())
        except (IOError, OSError, ValueError):
            continue
        threshold = (summary.get("clip_score") or {}).get("threshold")
        if summary.get("command") == "embed" and (summary.get("clip_score") or {}).get(
                "keep_fraction") is not None:
            found[run_dir] = float("inf") if threshold is None else float(threshold)
    if given is not None:
        if found and set(found.values()) != {given}:
            _LOG.warning("--clip_score_threshold %s differs from the keep-fraction threshold "
                         "of the embed run(s) %s: dedup uses %s", given, found, given)
        return given
    if len(set(found.values())) > 1:
        raise OptionError(
            f"the embed runs of --embeddings kept different top fractions by CLIP score "
            f"(thresholds {found}): pass --clip_score_threshold to say which one holds.")
    if found:
        threshold = next(iter(found.values()))
        _LOG.info("dedup: candidates are the rows with clip_score >= %s, the keep-fraction "
                  "threshold of embed run %s", threshold, next(iter(found)))
        return threshold
    return None


def _removal_files(opts: CuratorOptions) -> List[str]:
    """--removal_ids (parquet files, globs or directories of them, comma-separated) -> the
    files, each checked from its footer so that a wrong list fails before any work."""
    from concurrent.futures import ThreadPoolExecutor

    from beam_curator.transforms.read import is_directory
    from beam_curator.transforms.remove import removal_file_problem

    files = []
    for part in split_globs(opts.removal_ids):
        pattern = FileSystems.join(part, "*.parquet") if is_directory(part) else part
        matched = match_globs(pattern)
        if not matched:
            raise OptionError(
                f"--removal_ids: no parquet file matches {pattern}. Point it at parquet files "
                "with an `id` column or a directory of them, e.g. OUTPUT/dedup/duplicates "
                "(and OUTPUT/rejected from `embed`), comma-separated.")
        files += matched
    files = sorted(set(files))
    with ThreadPoolExecutor(max_workers=16) as pool:   # one footer read each (gs://: latency)
        problems = [p for p in pool.map(removal_file_problem, files) if p]
    if problems:
        raise OptionError(f"--removal_ids: {problems[0]}"
                          + (f" ({len(problems) - 1} more file(s) too)" if len(problems) > 1
                             else ""))
    return files


def build_remove(p: beam.Pipeline, options) -> OutputClaim:
    """Step 3: rewrite the shards without the removal ids -> OUTPUT/curated/."""
    from beam_curator.transforms.remove import with_null_ids

    opts = validate_options(options, needs=("input", "output", "removal_ids"))
    shard_list = list_shards(opts.input, opts.output)
    removal_files = _removal_files(opts)
    claim = _claim_for_shards(opts, "remove", shard_list,
                              more=inputs_of("--removal_ids", removal_files))
    read_shards = p | "ShardList" >> beam.Create(shard_list)
    ids = (p
           | "RemovalFiles" >> beam.Create(removal_files)
           | "ReadRemovalIds" >> beam.io.ReadAllFromParquet(columns=["id"])
           | "Ids" >> beam.Map(lambda row: row["id"]))
    # A null id names no sample: counted in the summary, never a traceback.
    null_ids = (ids
                | "NullIds" >> beam.Filter(lambda i: i is None)
                | "CountNullIds" >> beam.combiners.Count.Globally())
    counts = (ids
              | "NonNullIds" >> beam.Filter(lambda i: i is not None)
              | "Remove" >> RemoveSamples(opts.output, shards=read_shards,
                                          max_member_bytes=opts.max_member_bytes))
    out, recorded, token = opts.output, outputs.recorded_options(opts), claim.token
    (counts
     | "Total" >> beam.combiners.ToList()   # one RemoveCounts per shard: O(shards)
     | "WriteRemoveSummary" >> beam.Map(
         lambda rows, n_null: finish_output(
             out, with_null_ids(outputs.remove_summary(rows, recorded), n_null), token),
         beam.pvalue.AsSingleton(null_ids)))
    return claim


BUILDERS = {"run": build_run, "embed": build_embed, "dedup": build_dedup,
            "remove": build_remove}


class PreparedRun(NamedTuple):
    """A built pipeline and its hold on --output (release it when the pipeline has ended)."""

    pipeline: beam.Pipeline
    claim: OutputClaim


def build_pipeline(command: str, options) -> PreparedRun:
    """A new pipeline with the `command` graph built on it, ready to run.

    Beam makes a local temp dir per Pipeline and removes it only in run(); a graph that fails
    to build (a bad option, no matching input) would leave one in /tmp per failed command.
    """
    from beam_curator.options import check_job_endpoint

    check_job_endpoint(options)
    pipeline = beam.Pipeline(options=options)
    try:
        claim = BUILDERS[command](pipeline, options)
    except BaseException:
        shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)
        raise
    return PreparedRun(pipeline, claim)
