"""beam-curator: curate webdataset image datasets with Apache Beam.

One PTransform per curation stage, composable like Beam's own (`RunInference`,
`ReadFromParquet`); the command line builds its graphs from these same transforms::

    import apache_beam as beam
    from beam_curator import (DecodeImages, Deduplicate, EmbedImages, FilterByScores,
                              ReadWebDataset, SampleChecks, ScoreImages, WriteCuratedShards,
                              WriteSamples)

    with beam.Pipeline() as p:
        read = p | ReadWebDataset("shards/*.tar")
        decoded = read.samples | DecodeImages(
            "models/", checks=SampleChecks(min_image_side=200, min_caption_words=2),
            tokenize=True)
        scored = (decoded.decoded | EmbedImages("models/", clip_score=True)
                  | ScoreImages("models/"))
        split = scored | FilterByScores(aesthetic_threshold=5.0, nsfw_threshold=0.5,
                                        clip_score_threshold=0.28)
        dedup = split.passed | Deduplicate("out/")
        dedup.results | WriteSamples("out/")
        dedup.results | WriteCuratedShards("out/", shards=read.shards)

Elements are the documented records of `beam_curator.schema`: ShardSample (read), SampleInfo
(decode onwards, with its scores), SampleResult (a sample's final status), ErrorRecord (a
shard-level problem) and DedupDecision. The README's "Use from Python" has more.

Importing the package is cheap: the transforms load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    # stages
    "ReadWebDataset", "DecodeImages", "EmbedImages", "OpenClipModelHandler", "ScoreImages",
    "FilterByScores", "Deduplicate", "DeduplicateEmbeddings", "WriteCuratedShards",
    "RemoveSamples", "WriteSamples", "WriteErrors", "WriteEmbeddings", "WriteTextEmbeddings",
    # configuration of stages, and what multi-part stages return
    "SampleChecks", "ReadResult", "DecodeResult", "EmbedResult", "FilterResult", "DedupResult",
    # records and statuses
    "ShardSample", "SampleInfo", "SampleResult", "ErrorRecord", "DedupDecision", "STATUSES",
    "KEPT", "FILTERED_AESTHETIC", "FILTERED_NSFW", "EXACT_DUPLICATE", "SEMANTIC_DUPLICATE",
    "ERROR", "FILTERED_CAPTION_LENGTH", "FILTERED_CAPTION_LANGUAGE", "FILTERED_IMAGE_SIZE",
    "FILTERED_ASPECT_RATIO", "FILTERED_CLIP_SCORE", "FILTERED_TARGET", "REFERENCE_DUPLICATE",
]

_WHERE = {
    "ReadWebDataset": "transforms.read", "ReadResult": "transforms.read",
    "DecodeImages": "transforms.decode", "DecodeResult": "transforms.decode",
    "SampleChecks": "transforms.decode",
    "EmbedImages": "transforms.embed", "OpenClipModelHandler": "transforms.embed",
    "EmbedResult": "transforms.embed",
    "ScoreImages": "transforms.scores",
    "FilterByScores": "transforms.filters", "FilterResult": "transforms.filters",
    "Deduplicate": "transforms.dedup", "DeduplicateEmbeddings": "transforms.dedup",
    "DedupResult": "transforms.dedup",
    "WriteCuratedShards": "transforms.remove", "RemoveSamples": "transforms.remove",
    "WriteSamples": "transforms.write", "WriteErrors": "transforms.write",
    "WriteEmbeddings": "transforms.write",
    "WriteTextEmbeddings": "transforms.text_embeddings",
}
_SCHEMA = {"ShardSample", "SampleInfo", "SampleResult", "ErrorRecord", "DedupDecision",
           "STATUSES", "KEPT", "FILTERED_AESTHETIC", "FILTERED_NSFW", "EXACT_DUPLICATE",
           "SEMANTIC_DUPLICATE", "ERROR", "FILTERED_CAPTION_LENGTH", "FILTERED_CAPTION_LANGUAGE",
           "FILTERED_IMAGE_SIZE", "FILTERED_ASPECT_RATIO", "FILTERED_CLIP_SCORE",
           "FILTERED_TARGET", "REFERENCE_DUPLICATE"}


def __getattr__(name):
    # Lazy: `python -m beam_curator --help` must not pay for torch and RunInference imports.
    import importlib

    if name in _SCHEMA:
        module = "schema"
    elif name in _WHERE:
        module = _WHERE[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
