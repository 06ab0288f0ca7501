"""The sample record, the statuses, and the pyarrow schema of every output.

One input sample is one record, keyed by a stable id `<shard name>/<webdataset key>`.
The record changes type as it moves through the graph, and each type carries only what the
later stages need: image bytes stop at decode (curated shards are written by re-reading the
source tar), so no shuffle ever moves an image.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa

# ---- statuses: every sample read ends in exactly one ------------------------------------
KEPT = "kept"
FILTERED_AESTHETIC = "filtered_aesthetic"
FILTERED_NSFW = "filtered_nsfw"
EXACT_DUPLICATE = "exact_duplicate"
SEMANTIC_DUPLICATE = "semantic_duplicate"
ERROR = "error"
# The field's filters (DataComp's "basic" filter, LAION's CLIP score), checked in this order,
# before the model for all but the score (transforms/decode.py, transforms/filters.py).
FILTERED_CAPTION_LENGTH = "filtered_caption_length"
FILTERED_CAPTION_LANGUAGE = "filtered_caption_language"
FILTERED_IMAGE_SIZE = "filtered_image_size"
FILTERED_ASPECT_RATIO = "filtered_aspect_ratio"
FILTERED_CLIP_SCORE = "filtered_clip_score"
# Dedup against other sets (--target, --reference), decided in the dedup step: a candidate
# outside the target's clusters is filtered_target (and takes no part in the dedup); one
# within --reference_eps of a reference embedding is a reference_duplicate (before the
# semantic duplicates among the candidates).
FILTERED_TARGET = "filtered_target"
REFERENCE_DUPLICATE = "reference_duplicate"
STATUSES = (KEPT, FILTERED_AESTHETIC, FILTERED_NSFW, EXACT_DUPLICATE, SEMANTIC_DUPLICATE, ERROR,
            FILTERED_CAPTION_LENGTH, FILTERED_CAPTION_LANGUAGE, FILTERED_IMAGE_SIZE,
            FILTERED_ASPECT_RATIO, FILTERED_CLIP_SCORE, FILTERED_TARGET, REFERENCE_DUPLICATE)

# ---- stages named in error records ------------------------------------------------------
STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_EMBED = "embed"

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def make_id(shard: str, key: str) -> str:
    return f"{shard}/{key}"


def shard_of_id(sample_id: str) -> str:
    """Ids are '<shard name>/<key>' and shard names hold no '/' (keys may)."""
    return sample_id.split("/", 1)[0]


@dataclass(frozen=True)
class ShardSample:
    """One webdataset sample as read from its tar: the only record that holds image bytes."""

    id: str
    shard: str            # shard name: the tar's file name without .tar
    shard_url: str        # where the tar was read from (local path, gs://, s3://)
    key: str              # webdataset __key__
    image_ext: Optional[str] = None
    image_bytes: Optional[bytes] = None
    sidecars: dict = field(default_factory=dict)   # extension -> bytes, kept verbatim
    error: Optional[str] = None   # set by the reader when the sample is already known bad


@dataclass(frozen=True)
class SampleInfo:
    """A sample after decode: small, hashable, safe to shuffle. Scores are filled in later."""

    id: str
    shard: str
    shard_url: str
    key: str
    image_ext: Optional[str] = None
    content_hash: Optional[str] = None   # sha256 of the original image bytes
    width: Optional[int] = None
    height: Optional[int] = None
    aesthetic_score: Optional[float] = None
    nsfw_score: Optional[float] = None
    # From the caption (None: no caption, or not measured because no filter needs it).
    caption_words: Optional[int] = None
    caption_chars: Optional[int] = None
    caption_language: Optional[str] = None
    caption_language_prob: Optional[float] = None
    clip_score: Optional[float] = None   # cosine of the image and caption embeddings


@dataclass(frozen=True)
class SampleResult:
    """A sample's final word: what goes into samples/*.parquet."""

    info: SampleInfo
    status: str
    reason: Optional[str] = None
    stage: Optional[str] = None
    cluster: Optional[int] = None
    duplicate_of: Optional[str] = None
    cosine_sim: Optional[float] = None

    @property
    def id(self) -> str:
        return self.info.id

    def to_row(self) -> dict:
        info = self.info
        return {
            "id": info.id,
            "shard": info.shard,
            "key": info.key,
            "status": self.status,
            "reason": self.reason,
            "aesthetic_score": info.aesthetic_score,
            "nsfw_score": info.nsfw_score,
            "cluster": self.cluster,
            "duplicate_of": self.duplicate_of,
            "cosine_sim": self.cosine_sim,
            "stage": self.stage,
            "image_ext": info.image_ext,
            "content_hash": info.content_hash,
            "width": info.width,
            "height": info.height,
            "shard_url": info.shard_url,
            "caption_words": info.caption_words,
            "caption_chars": info.caption_chars,
            "caption_language": info.caption_language,
            "caption_language_prob": info.caption_language_prob,
            "clip_score": info.clip_score,
        }


@dataclass(frozen=True)
class DedupDecision:
    """Dedup's answer for one embedding (what `DeduplicateEmbeddings` emits): status is
    kept, exact_duplicate, semantic_duplicate, reference_duplicate (`duplicate_of`: the
    reference id) or filtered_target; `duplicate_of` the member it duplicates
    (kept: its most similar earlier-ranked member, or itself when it is first);
    `cosine_sim` that similarity (1.0 for an exact copy, 0.0 when first in its cluster);
    `cluster` None for exact copies (decided before clustering)."""

    id: str
    status: str
    cluster: Optional[int]
    duplicate_of: str
    cosine_sim: float


def with_scores(info: SampleInfo, aesthetic: float, nsfw: float) -> SampleInfo:
    return dataclasses.replace(info, aesthetic_score=float(aesthetic), nsfw_score=float(nsfw))


def info_of(sample: ShardSample) -> SampleInfo:
    return SampleInfo(id=sample.id, shard=sample.shard, shard_url=sample.shard_url,
                      key=sample.key, image_ext=sample.image_ext)


# ---- pyarrow schemas of the outputs -----------------------------------------------------
SAMPLES_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("shard", pa.string()),
    ("key", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("aesthetic_score", pa.float32()),
    ("nsfw_score", pa.float32()),
    ("cluster", pa.int32()),
    ("duplicate_of", pa.string()),
    ("cosine_sim", pa.float32()),
    ("stage", pa.string()),
    ("image_ext", pa.string()),
    ("content_hash", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("shard_url", pa.string()),
    ("caption_words", pa.int32()),
    ("caption_chars", pa.int32()),
    ("caption_language", pa.string()),
    ("caption_language_prob", pa.float32()),
    ("clip_score", pa.float32()),
])

ID_COLUMN = "id"
EMBEDDING_COLUMN = "embedding"


# embeddings/: every embedded sample. `content_hash` lets the three-step flow's dedup do the
# same exact-duplicate pre-pass as `run`; `passed_filters` tells it which rows are candidates.
EMBEDDINGS_SCHEMA = pa.schema([
    (ID_COLUMN, pa.string()),
    (EMBEDDING_COLUMN, pa.list_(pa.float32())),
    ("content_hash", pa.string()),
    ("passed_filters", pa.bool_()),
    ("clip_score", pa.float32()),
])

# text_embeddings/metadata/metadata_<shard>.parquet: row i describes row i of
# text_embeddings/text_emb/text_emb_<shard>.npy. image_path and caption are the columns
# clip-retrieval's `clip inference` writes (image_path: the webdataset __key__, as its
# webdataset reader fills it); id is what `dedup` and a join with samples/ use.
TEXT_METADATA_SCHEMA = pa.schema([
    (ID_COLUMN, pa.string()),
    ("image_path", pa.string()),
    ("caption", pa.string()),
    ("shard", pa.string()),
    ("key", pa.string()),
    ("clip_score", pa.float32()),
])

# rejected/ (written by `embed`): the ids step 3 must drop besides the duplicates.
REJECTED_SCHEMA = pa.schema([("id", pa.string()), ("status", pa.string())])


ERRORS_SCHEMA = pa.schema([
    ("id", pa.string()),        # null when the error is not tied to one sample
    ("shard", pa.string()),
    ("member", pa.string()),    # tar member name, when known
    ("stage", pa.string()),
    ("reason", pa.string()),
])

KMEANS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("centroid", pa.int32()),
    ("cosine_dist_to_cent", pa.float32()),
    ("l2_dist_to_cent", pa.float32()),
])

PAIRWISE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("max_id", pa.string()),
    ("cosine_sim_score", pa.float32()),
])

DUPLICATES_SCHEMA = pa.schema([("id", pa.string())])
# dedup/reference_duplicates/: a candidate and the reference embedding it is too close to.
REFERENCE_DUPLICATES_SCHEMA = pa.schema([
    ("id", pa.string()), ("reference_id", pa.string()), ("cosine_sim_score", pa.float32())])
# dedup/target_filtered/: candidates whose nearest centroid no target embedding has.
TARGET_FILTERED_SCHEMA = pa.schema([("id", pa.string()), ("centroid", pa.int32())])


@dataclass(frozen=True)
class ErrorRecord:
    shard: str
    stage: str
    reason: str
    id: Optional[str] = None
    member: Optional[str] = None

    def to_row(self) -> dict:
        return {"id": self.id, "shard": self.shard, "member": self.member,
                "stage": self.stage, "reason": self.reason}
