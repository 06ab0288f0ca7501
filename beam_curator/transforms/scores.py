"""Score heads: the LAION aesthetic predictor and the LAION CLIP NSFW detector on each embedding.

The heads load once per worker in setup(); they are a few small matrices, so scoring runs on
the CPU whatever device embedded the images.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from beam_curator.schema import with_scores


class ScoreFn(beam.DoFn):
    """(SampleInfo, embedding) -> (SampleInfo with scores, embedding)."""

    def __init__(self, model_dir: str):
        self._model_dir = model_dir
        self._heads = None

    def setup(self):
        from beam_curator.models import ScoreHeads, localize_model_dir

        self._heads = ScoreHeads.from_model_dir(localize_model_dir(self._model_dir))

    def process(self, element):
        info, embedding = element
        aesthetic, nsfw = self._heads.score(np.asarray(embedding, dtype=np.float32)[None, :])
        yield with_scores(info, aesthetic[0], nsfw[0]), embedding


class ScoreImages(beam.PTransform):
    def __init__(self, model_dir: str):
        super().__init__()
        self._model_dir = model_dir

    def expand(self, embedded):
        return embedded | "AestheticAndNsfw" >> beam.ParDo(ScoreFn(self._model_dir))
