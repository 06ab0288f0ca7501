"""The caption embeddings, in clip-retrieval's `clip inference` layout (--text_embeddings).

    OUTPUT/text_embeddings/text_emb/text_emb_<shard>.npy       (n, d) float16, L2-normalised
    OUTPUT/text_embeddings/metadata/metadata_<shard>.parquet   n rows, row i = npy row i:
        id, image_path (the webdataset key), caption, shard, key, clip_score

One pair of files per input shard that has at least one embedded sample with a caption, rows
sorted by id; written where they are computed (a GroupByKey on the shard, as embeddings/ is),
each file through the atomic writer, so no process ever holds more than one shard's rows and
a rerun writes the same bytes. The vectors travel as numpy float16 arrays (what is stored),
never as Python lists. clip-retrieval names its files by a partition number; here the "number"
is the shard name, which sorts the npy and metadata lists alike, which is how clip-retrieval's
readers (embedding-reader, autofaiss, `clip index`) pair them.
"""
from __future__ import annotations

import io
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from beam_curator.atomic import write_atomically

TEXT_EMB = "text_emb"
METADATA = "metadata"


class TextRow(NamedTuple):
    """One caption embedding on its way to its shard's files."""

    id: str
    key: str
    caption: Optional[str]
    clip_score: Optional[float]
    vector: np.ndarray     # (d,) float16


def text_emb_path(directory: str, shard: str) -> str:
    return FileSystems.join(directory, TEXT_EMB, f"{TEXT_EMB}_{shard}.npy")


def metadata_path(directory: str, shard: str) -> str:
    return FileSystems.join(directory, METADATA, f"{METADATA}_{shard}.parquet")


def _text_row(element):
    info, vector, caption = element
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    return info.shard, TextRow(info.id, info.key, caption, info.clip_score,
                               vector.astype(np.float16))


def write_npy(path: str, vectors: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    data = buffer.getbuffer()
    return write_atomically(path, lambda stream: stream.write(data))


class WriteTextShardFn(beam.DoFn):
    """(shard, TextRows) -> its npy and metadata parquet; emits (shard, rows written)."""

    def __init__(self, directory: str):
        self._directory = directory

    def process(self, shard_rows):
        import pyarrow as pa

        from beam_curator.schema import TEXT_METADATA_SCHEMA
        from beam_curator.transforms.write import write_parquet

        shard, rows = shard_rows
        rows = sorted(rows, key=lambda r: r.id)
        write_npy(text_emb_path(self._directory, shard),
                  np.stack([r.vector for r in rows]).astype(np.float16, copy=False))
        table = pa.table({
            "id": [r.id for r in rows],
            "image_path": [r.key for r in rows],
            "caption": [r.caption for r in rows],
            "shard": [shard] * len(rows),
            "key": [r.key for r in rows],
            "clip_score": [r.clip_score for r in rows],
        }, schema=TEXT_METADATA_SCHEMA)
        write_parquet(metadata_path(self._directory, shard), table)
        yield shard, len(rows)


class WriteTextEmbeddings(beam.PTransform):
    """(SampleInfo, caption embedding, caption) -> OUTPUT/text_embeddings/ in clip-retrieval's
    layout: text_emb/text_emb_<shard>.npy (float16, L2-normalised, rows sorted by id) and
    metadata/metadata_<shard>.parquet row for row (schema.TEXT_METADATA_SCHEMA: id,
    image_path, caption, shard, key, clip_score).

    Emits one dict once every file is written: {"rows", "files", "text_emb", "metadata"}
    (what summary.json says under "text_embeddings").

    Args:
      output_dir: the output directory (local, gs://, s3://).

    Example::

        embedded = decoded.decoded | EmbedImages("models/", text_embeddings=True)
        embedded.text | WriteTextEmbeddings("/tmp/out")
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, captions):
        from beam_curator import outputs
        from beam_curator.transforms.summary import sum_pairs

        directory = outputs.text_embeddings_dir(self._output_dir)
        return (captions
                | "TextRows" >> beam.Map(_text_row)
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteTextShard" >> beam.ParDo(WriteTextShardFn(directory))
                | "RowsAndFiles" >> beam.MapTuple(lambda _, n: (n, 1))
                | "CountTextEmbeddings" >> beam.CombineGlobally(sum_pairs)
                | "Info" >> beam.MapTuple(lambda rows, files: {
                    "rows": rows, "files": files,
                    "text_emb": f"text_embeddings/{TEXT_EMB}",
                    "metadata": f"text_embeddings/{METADATA}"}))
