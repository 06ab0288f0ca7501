"""Pipeline builders: build_run, build_embed, build_dedup, build_remove.

Each takes a Beam pipeline and the options, validates what it needs (failing fast with the
fix), and adds its transforms; the CLI, the flex template and the tests all call these.
`run` = the embed front half + dedup + rewrite, in one graph; the three steps reuse the very
same transforms, so they give the same answer.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from typing import List, NamedTuple, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_curator import outputs
from beam_curator.options import CuratorOptions, OptionError, validate_options
from beam_curator.ownership import OutputClaim, claim_output, finish_output, inputs_of
from beam_curator.schema import (EMBEDDINGS_SCHEMA, ERROR, ERRORS_SCHEMA, KEPT, REJECTED_SCHEMA,
                                 SAMPLES_SCHEMA, ErrorRecord, SampleResult, shard_of_id)
from beam_curator.transforms.decode import DecodeImages
from beam_curator.transforms.filters import ApplyThresholds
from beam_curator.transforms.read import (ReadShardSamples, list_shards, match_globs,
                                          split_globs)
from beam_curator.transforms.remove import KEEP, REMOVE, RewriteShards
from beam_curator.transforms.scores import ScoreImages
from beam_curator.transforms.summary import WriteSummary
from beam_curator.transforms.write import WriteParquetByShard

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Front:
    """What the embed half of the graph hands on."""

    shards: beam.PCollection          # (shard name, url)
    samples_read: beam.PCollection    # singleton count
    shard_errors: beam.PCollection    # ErrorRecord (not tied to one sample)
    rejected: beam.PCollection        # SampleResult: error / filtered_*
    passed: beam.PCollection          # (SampleInfo, embedding) that passed the filters
    embeddings_written: beam.PCollection


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


def build_front(p: beam.Pipeline, opts: CuratorOptions, shard_list) -> Front:
    """read -> decode -> RunInference -> scores -> thresholds, and write embeddings/."""
    # Imported here: apache_beam.ml (RunInference) costs seconds of imports that the `dedup`
    # and `remove` commands do not need.
    from beam_curator.transforms.embed import EmbedImages, OpenClipModelHandler

    handler = OpenClipModelHandler(
        opts.model_dir, device=opts.device, precision=opts.precision,
        min_batch_size=opts.min_inference_batch_size, max_batch_size=opts.inference_batch_size,
        forward_batch_size=opts.forward_batch_size, large_model=opts.large_model,
        model_copies=opts.model_copies, compile_mode=opts.torch_compile)

    shards = p | "ShardList" >> beam.Create(shard_list)
    read = shards | "Read" >> ReadShardSamples()
    samples_read = read.samples | "CountRead" >> beam.combiners.Count.Globally()
    decoded = read.samples | "Decode" >> DecodeImages(opts.model_dir, opts.max_image_pixels)
    embedded = decoded.decoded | "Embed" >> EmbedImages(handler, opts.inference_accelerator)
    scored = embedded | "Score" >> ScoreImages(opts.model_dir)
    split = scored | "Filter" >> ApplyThresholds(opts.aesthetic_threshold, opts.nsfw_threshold)

    embedding_rows = (
        (split.kept | "PassedRows" >> beam.MapTuple(
            lambda info, emb: (info.shard, _embedding_row(info, emb, True))),
         split.filtered | "FilteredRows" >> beam.MapTuple(
             lambda result, emb: (result.info.shard, _embedding_row(result.info, emb, False))))
        | "AllEmbeddings" >> beam.Flatten())
    embeddings_written = embedding_rows | "WriteEmbeddings" >> WriteParquetByShard(
        outputs.embeddings_dir(opts.output), EMBEDDINGS_SCHEMA, vector_column="embedding")

    rejected = ((decoded.errors,
                 split.filtered | "DropVectors" >> beam.MapTuple(lambda result, _: result))
                | "Rejected" >> beam.Flatten())
    return Front(shards=shards, samples_read=samples_read, shard_errors=read.errors,
                 rejected=rejected, passed=split.kept, embeddings_written=embeddings_written)


def _embedding_row(info, embedding, passed: bool) -> dict:
    return {"id": info.id, "embedding": embedding, "content_hash": info.content_hash,
            "passed_filters": passed}


def _write_results(results, front: Front, opts: CuratorOptions, claim: OutputClaim, *,
                   curated: bool, extra: dict, more_written=(), dedup_info=None):
    """samples/, errors/, curated/ (optional) and finally summary.json."""
    samples_written = (results
                       | "SampleRows" >> beam.Map(lambda r: (r.info.shard, r.to_row()))
                       | "WriteSamples" >> WriteParquetByShard(
                           outputs.samples_dir(opts.output), SAMPLES_SCHEMA))
    error_rows = ((results
                   | "ErrorSamples" >> beam.Filter(lambda r: r.status == ERROR)
                   | "ErrorSampleRows" >> beam.Map(lambda r: ErrorRecord(
                       id=r.id, shard=r.info.shard, stage=r.stage or "", reason=r.reason or "",
                       member=(f"{r.info.key}.{r.info.image_ext}" if r.info.image_ext else None)
                   ).to_row()),
                   front.shard_errors | "ShardErrorRows" >> beam.Map(lambda e: e.to_row()))
                  | "AllErrors" >> beam.Flatten())
    errors_written = (error_rows
                      | "ErrorsByShard" >> beam.Map(lambda row: (row["shard"], row))
                      | "WriteErrors" >> WriteParquetByShard(
                          outputs.errors_dir(opts.output), ERRORS_SCHEMA,
                          sort_key=_error_order))

    curated_counts = None
    if curated:
        kept_ids = (results
                    | "Kept" >> beam.Filter(lambda r: r.status == KEPT)
                    | "KeptByShard" >> beam.Map(lambda r: (r.info.shard, r.id)))
        curated_counts = (front.shards, kept_ids) | "Curate" >> RewriteShards(
            outputs.curated_dir(opts.output), KEEP)
    written = [samples_written, errors_written, front.embeddings_written, *more_written]
    return results | "Summary" >> WriteSummary(
        opts.output, extra, samples_read=front.samples_read,
        shard_errors=front.shard_errors, curated_counts=curated_counts, written=written,
        claim_token=claim.token, report=curated and opts.write_report, dedup_info=dedup_info)


def _error_order(row: dict) -> tuple:
    return (row["id"] or "", row["member"] or "", row["reason"])


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
    shard_list = list_shards(opts.input)
    claim = _claim_for_shards(opts, "embed", shard_list)
    front = build_front(p, opts, shard_list)
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
    shard_list = list_shards(opts.input)
    claim = _claim_for_shards(opts, "run", shard_list)
    front = build_front(p, opts, shard_list)
    more_written, dedup_info = [], None
    if opts.dedup:
        from beam_curator.transforms.semdedup import Deduplicate, DedupConfig

        candidates = front.passed | "CandidateInfos" >> beam.Keys()
        dedup = candidates | "Dedup" >> Deduplicate(
            DedupConfig.from_options(options), manifest.embed_dim, front.embeddings_written)
        deduped, more_written, dedup_info = dedup.decisions, [dedup.written], dedup.info
    else:
        deduped = front.passed | "NoDedup" >> beam.MapTuple(
            lambda info, _: SampleResult(info=info, status=KEPT))
    results = (front.rejected, deduped) | "AllResults" >> beam.Flatten()
    _write_results(results, front, opts, claim, curated=True,
                   extra=_run_extra(opts, manifest, "run"), more_written=more_written,
                   dedup_info=dedup_info)
    return claim


def build_dedup(p: beam.Pipeline, options) -> OutputClaim:
    """Step 2: semantic dedup of an embeddings parquet -> OUTPUT/dedup/."""
    from beam_curator.transforms.dedup_data import resolve_embeddings
    from beam_curator.transforms.semdedup import DedupConfig, DedupFromEmbeddings

    opts = validate_options(options, needs=("embeddings", "output"))
    files, npy_pairs = resolve_embeddings(opts.embeddings)
    if not files and not npy_pairs:
        raise OptionError(
            f"--embeddings {opts.embeddings!r} matches no file. Point it at embeddings "
            "parquet files (e.g. 'OUTPUT/embeddings/*.parquet' of an `embed` run, or their "
            "directory) or at a clip-retrieval output directory (img_emb/ + metadata/).")
    inputs = files + [path for pair in npy_pairs for path in pair]
    claim = claim_output(opts, "dedup", inputs_of("--embeddings", inputs)
                         + _centroids_input(opts))
    p | "Dedup" >> DedupFromEmbeddings(files, DedupConfig.from_options(options),
                                       outputs.recorded_options(opts), claim.token,
                                       npy_pairs=tuple(npy_pairs))
    return claim


def _removal_files(opts: CuratorOptions) -> List[str]:
    files = []
    for directory in split_globs(opts.removal_ids):
        pattern = FileSystems.join(directory, "*.parquet")
        matched = match_globs(pattern)
        if not matched:
            raise OptionError(
                f"--removal_ids: no parquet file matches {pattern}. Point it at a directory "
                "of parquet files with an `id` column, e.g. OUTPUT/dedup/duplicates (and "
                "OUTPUT/rejected from `embed`), comma-separated.")
        files += matched
    return sorted(set(files))


def build_remove(p: beam.Pipeline, options) -> OutputClaim:
    """Step 3: rewrite the shards without the removal ids -> OUTPUT/curated/."""
    opts = validate_options(options, needs=("input", "output", "removal_ids"))
    shard_list = list_shards(opts.input)
    removal_files = _removal_files(opts)
    claim = _claim_for_shards(opts, "remove", shard_list,
                              more=inputs_of("--removal_ids", removal_files))
    shards = p | "ShardList" >> beam.Create(shard_list)
    ids = (p
           | "RemovalFiles" >> beam.Create(removal_files)
           | "ReadRemovalIds" >> beam.io.ReadAllFromParquet(columns=["id"])
           | "ByShard" >> beam.Map(lambda row: (shard_of_id(row["id"]), row["id"])))
    counts = (shards, ids) | "Rewrite" >> RewriteShards(outputs.curated_dir(opts.output), REMOVE)
    out, recorded, token = opts.output, outputs.recorded_options(opts), claim.token
    (counts
     | "Total" >> beam.combiners.ToList()
     | "WriteRemoveSummary" >> beam.Map(
         lambda rows: finish_output(out, outputs.remove_summary(rows, recorded), token)))
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
