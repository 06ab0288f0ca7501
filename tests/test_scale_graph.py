"""No O(N) collection in one process: a check on the built graphs of all four commands.

At 1B images anything that gathers every sample into one element (a side input, a global
ToList) breaks a worker. Every side input and every global combine of `run`, `embed`, `dedup`
and `remove` must be over a PCollection bounded by k (clusters), the number of shards, or a
constant, and is listed below with its bound. A new one fails this test until it is listed
here with an honest bound, so an O(N) collection cannot come back unnoticed.
"""
from __future__ import annotations

import os
import re
import shutil

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_curator.options import curator_options
from beam_curator.pipelines import build_pipeline

# (regex on the full label of the PCollection's producer, its bound)
BOUNDED_SIDE_INPUTS = [
    (r"CountRead/.*|(.*/)?Count[A-Za-z]+(/.*)?|.*/Done\d+(/.*)?|.*/Written\d+(/.*)?",
     "a count (per status at most)"),
    (r".*/Some(Errors|Repeated)(/.*)?", "the first 20 / 1000 (Top.Smallest)"),
    (r".*/SumCurated(/.*)?|.*/SumCounts(/.*)?", "two sums"),
    (r".*/Plan|.*/Info|.*/K|.*/SizeStats(/.*)?", "a few numbers"),
    (r".*/DeleteStaging", "one element: dedup/ is written"),
    (r".*/TrainKMeans|.*/LoadCentroids", "k x d centroids"),
    (r".*/ClusterSizes(/.*)?", "k cluster sizes"),
    (r"Summary/CountShardStatus(/.*)?", "shards x statuses counts"),
    (r".*/RefuseRepeatedIds", "one 0: the repeated-id check passed"),
    (r".*/TallyRows(/.*)?", "two counts, counts by reason and the first 20 rows (RowTally)"),
    (r".*/InputChecks", "counts by reason and the first 20 rows (InvalidSummary)"),
    (r".*/(Reference|Target)Checks", "rows and input checks of --reference / --target"),
    (r".*/DistinctTargetClusters(/.*)?", "the clusters --target touches: at most k"),
    (r".*/ReferenceStats(/.*)?", "20 top matches and a 40-bin histogram (ReferenceStats)"),
    (r".*/(Reference|Target)Info", "a few numbers"),
]
# Global combines whose output grows with their input (the rest are counts, sums, Top-n).
COLLECTING_FNS = ("ToListCombineFn", "ToDictCombineFn", "ToSetCombineFn")
BOUNDED_GLOBAL_LISTS = [
    (r".*/GatherSample(/GatherSample)?", "k-means sample: a file path per chunk"),
    (r"Total(/Total)?", "(shard, written) per shard"),
]
CONSTANT_FNS = ("CountCombineFn", "TopCombineFn", "_SizeStats", "sum", "sum_pairs",
                "RepeatsFn", "InvalidSummary", "RowTally", "ReferenceStats",
                "ToListCombineFn", "ToDictCombineFn", "ToSetCombineFn")


class _Collect(beam.pipeline.PipelineVisitor):
    def __init__(self):
        self.side_inputs = []     # (consumer label, producer label)
        self.global_combines = []  # (label, combine fn class name)

    def visit_transform(self, node):
        if node.full_label.endswith("/InjectDefault"):
            return   # CombineGlobally's own plumbing; the combine is checked on its own
        for side in getattr(node, "side_inputs", ()) or ():
            self.side_inputs.append((node.full_label, side.pvalue.producer.full_label))

    def enter_composite_transform(self, node):
        transform = node.transform
        if isinstance(transform, beam.CombineGlobally):
            fn = transform.fn   # a CombineFn, or a plain callable such as sum
            name = fn.__name__ if callable(fn) and not isinstance(fn, beam.CombineFn) else \
                type(fn).__name__
            self.global_combines.append((node.full_label, name))
        for side in getattr(node, "side_inputs", ()) or ():
            self.side_inputs.append((node.full_label, side.pvalue.producer.full_label))


def _bound(label: str, table) -> str:
    for pattern, bound in table:
        if re.fullmatch(pattern, label):
            return bound
    return ""


@pytest.fixture(scope="module")
def graphs(tiny_model_dir, small_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    shards = os.path.join(os.path.dirname(small_dataset.shards[0]), "*.tar")
    emb = root / "emb"
    emb.mkdir()
    pq.write_table(pa.table({"id": ["00000/a"], "embedding": pa.array(
        [[1.0, 0.0]], type=pa.list_(pa.float32())), "content_hash": ["h"]}), emb / "e.parquet")
    removal = root / "ids"
    removal.mkdir()
    pq.write_table(pa.table({"id": ["00000/a"]}), removal / "ids.parquet")
    commands = {
        "run": ["--input", shards, "--model_dir", tiny_model_dir, "--border_margin", "0.02"],
        "run-shuffle": ["--input", shards, "--model_dir", tiny_model_dir,
                        "--dedup_vector_transport", "shuffle"],
        "embed": ["--input", shards, "--model_dir", tiny_model_dir],
        "embed-text": ["--input", shards, "--model_dir", tiny_model_dir,
                       "--text_embeddings", "true"],
        "dedup": ["--embeddings", str(emb / "*.parquet"), "--border_margin", "0.02"],
        "dedup-against": ["--embeddings", str(emb / "*.parquet"), "--reference", str(emb),
                          "--target", str(emb)],
        "dedup-exact": ["--embeddings", str(emb / "*.parquet"), "--reference", str(emb),
                        "--reference_exact", "true"],
        "remove": ["--input", shards, "--removal_ids", str(removal)],
    }
    found = {}
    for name, args in commands.items():
        options = curator_options(args + ["--output", str(root / name),
                                          "--runner", "FnApiRunner"])
        pipeline, claim = build_pipeline(name.split("-")[0], options)
        collect = _Collect()
        pipeline.visit(collect)
        found[name] = collect
        claim.release(finished=False)
        shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)
    return found


def test_every_side_input_is_bounded_by_k_shards_or_a_constant(graphs):
    unbounded = sorted({(name, consumer, producer)
                        for name, c in graphs.items() for consumer, producer in c.side_inputs
                        if not _bound(producer, BOUNDED_SIDE_INPUTS)})
    assert not unbounded, ("side inputs over a PCollection that may grow with the data "
                           f"(list them in BOUNDED_SIDE_INPUTS with their bound): {unbounded}")
    assert any("/ClusterSizes" in p for _, p in graphs["run"].side_inputs)


def test_every_global_combine_is_bounded(graphs):
    unknown = sorted({(name, label, fn) for name, c in graphs.items()
                      for label, fn in c.global_combines if fn not in CONSTANT_FNS})
    assert not unknown, f"global combines of unknown output size: {unknown}"
    collecting = sorted({(name, label) for name, c in graphs.items()
                         for label, fn in c.global_combines
                         if fn in COLLECTING_FNS and not _bound(label, BOUNDED_GLOBAL_LISTS)})
    assert not collecting, ("global lists that may grow with the data (list them in "
                            f"BOUNDED_GLOBAL_LISTS with their bound): {collecting}")


def test_the_check_catches_an_o_n_side_input(graphs, tiny_model_dir, small_dataset,
                                             tmp_path):
    """The same check on a graph with the old summary's AsList of every status row."""
    with beam.Pipeline(options=curator_options(["--runner", "FnApiRunner"])) as p:
        rows = p | "StatusRows" >> beam.Create([("id", "kept")])
        _ = (p | beam.Create([None])
             | "WriteSummaryJson" >> beam.Map(lambda _, r: len(r), beam.pvalue.AsList(rows)))
        collect = _Collect()
        p.visit(collect)
    assert [prod for _, prod in collect.side_inputs
            if not _bound(prod, BOUNDED_SIDE_INPUTS)] == ["StatusRows/Map(decode)"]
