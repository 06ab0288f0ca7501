"""Score heads: the LAION aesthetic predictor and the LAION CLIP NSFW detector on each embedding.

The heads load once per worker in setup(); they are a few small matrices, so scoring runs on
the CPU whatever device embedded the images, in batches (one matrix product per batch, not
per image, so scoring keeps up with a GPU embedding thousands of images a second).
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from beam_curator.schema import with_scores


class ScoreBatchFn(beam.DoFn):
    """[(SampleInfo, embedding)] -> (SampleInfo with scores, embedding) for each."""

    def __init__(self, model_dir: str):
        self._model_dir = model_dir
        self._heads = None

    def setup(self):
        from beam_curator.models import ScoreHeads, localize_model_dir

        self._heads = ScoreHeads.from_model_dir(localize_model_dir(self._model_dir))

    def process(self, batch):
        vectors = np.stack([np.asarray(e, dtype=np.float32) for _, e in batch])
        aesthetic, nsfw = self._heads.score(vectors)
        for (info, embedding), a, n in zip(batch, aesthetic.tolist(), nsfw.tolist()):
            yield with_scores(info, a, n), embedding


class ScoreImages(beam.PTransform):
    """(SampleInfo, embedding) -> (SampleInfo with aesthetic_score and nsfw_score, embedding).

    The LAION improved aesthetic predictor (raw score, 1–10 scale) and the LAION CLIP NSFW
    detector (0–1), loaded once per worker from `model_dir`, run on the CPU in batches. Both
    expect CLIP ViT-L/14 embeddings (768-d, unit length).

    Args:
      model_dir: a beam-curator model dir (aesthetic/ and nsfw/ weights).
      batch_size: embeddings per matrix product.

    Example::

        scored = embedded | ScoreImages("models/")
    """

    def __init__(self, model_dir: str, *, batch_size: int = 256):
        super().__init__()
        self._model_dir = model_dir
        self._batch_size = batch_size

    def expand(self, embedded):
        return (embedded
                | "BatchForHeads" >> beam.BatchElements(min_batch_size=1,
                                                        max_batch_size=self._batch_size)
                | "AestheticAndNsfw" >> beam.ParDo(ScoreBatchFn(self._model_dir)))
