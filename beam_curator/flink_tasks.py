"""How much one Flink task may emit, and the checks that keep every task under it.

Beam's Flink batch runner (2.62 here) hands each task's whole partition to the SDK worker as
ONE bundle and reads that bundle's output only once the bundle has finished
(SdkHarnessClient.ActiveBundle.close). Until then the output waits in 100 gRPC messages
(~10 MB each) on the TaskManager's heap and ~200 MB of the SDK worker's send queues: a task
whose output passes ~1.2 GB stalls the job with idle CPUs and no error. Measured: dedup of
1M x 768 (3.1 GB) on 4 tasks ran; 2.5M on 4 tasks, and 1M with 1,000-row blocks (3x the
route output) on 4 tasks, stalled.

Two checks, both only on FlinkRunner in batch mode:

* before the run, the number of tasks is sized from what can be known then: the embedding
  files' bytes for `dedup` (:func:`tasks_for_embeddings`), the shards' bytes and a peek at
  the first shard for `run` / `embed` (:func:`tasks_for_shards`). Without --parallelism it
  is set; a smaller --parallelism fails before anything runs (:func:`checked_parallelism`;
  options.size_flink_tasks applies it to the pipeline's options);
* during the run, what an estimate cannot promise: a task whose output passes the limit
  (--flink_task_output_limit_mib, default 768) fails with the fix (:class:`GuardTaskOutput`),
  long before the stall, instead of hanging.

Plain values in, plain values out: the options are read by beam_curator.options.
"""
from __future__ import annotations

import logging
import math
import tarfile
from typing import NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam

from beam_curator.errors import OptionError

_LOG = logging.getLogger(__name__)

# dedup: each task's share of the embedding files stays at half the stall (its route step
# emits its share of the vectors, more where clusters are split into blocks).
MAX_EMBEDDING_BYTES_PER_TASK = 512 << 20

# A task that has emitted this much (as counted by GuardTaskOutput) fails: well under the
# ~1.2 GB stall, as the count is an estimate of the encoded bytes.
TASK_OUTPUT_LIMIT_MIB = 768

# run / embed: a task's expected output is a third of the limit (256 MiB by default): the
# estimate is a peek at one shard, and shards of unlike sizes share tasks unevenly.
EXPECTED_SHARE_OF_LIMIT = 3

# What leaves the embedding stage per sample besides its vectors: its SampleInfo (~460 bytes
# encoded) in the embeddings row, the candidates, the results and the counts.
SAMPLE_OVERHEAD_BYTES = 1536

# The peek at the first shard reads this much of it (or all of a smaller shard).
PEEK_BYTES = 4 << 20


def checked_parallelism(given: Optional[int], need: int, why: str) -> Optional[int]:
    """The --parallelism a job should get for `need` tasks: None to leave `given` (or the
    cluster's default, when 1 is enough) as it is, `need` when none was given (logged).
    A `given` below `need` fails now. `why` ends the sentence "each task gets ..."."""
    if given is None:
        if need <= 1:
            return None
        _LOG.warning("--parallelism not given: set to %d, so that each Flink task gets %s "
                     "(tasks beyond the free slots run in waves). Pass --parallelism to "
                     "choose more.", need, why)
        return need
    if given < need:
        raise OptionError(
            f"--parallelism {given} is too small: Beam's Flink batch runner stalls, without "
            "an error, when one task's output passes ~1 GB (it reads a task's output only "
            f"after the whole task has run). Pass --parallelism {need} or more, so that each "
            f"task gets {why}: tasks beyond the free slots run in waves.")
    return None


def tasks_for_embeddings(input_bytes: int, flag: str) -> Tuple[int, str]:
    """dedup: at least ceil(input_bytes / 512 MiB) tasks, and why."""
    need = max(1, math.ceil(input_bytes / MAX_EMBEDDING_BYTES_PER_TASK))
    return need, f"at most 512 MiB of the {input_bytes / 2**30:.1f} GiB of {flag}"


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def output_bytes_per_sample(embed_dim: int, text_embeddings: bool) -> int:
    """What one sample sends out of the embedding stage: float32 vectors and its records."""
    return 4 * embed_dim * (2 if text_embeddings else 1) + SAMPLE_OVERHEAD_BYTES


class _CountingReader:
    """A file object that counts the bytes read through it (the on-disk bytes of a
    compressed shard)."""

    def __init__(self, raw):
        self._raw = raw
        self.bytes_read = 0

    def read(self, size=-1):
        data = self._raw.read(size)
        self.bytes_read += len(data)
        return data


def peek_bytes_per_sample(url: str, limit: int = PEEK_BYTES) -> Optional[float]:
    """On-disk bytes per sample in the first `limit` bytes of a shard (None: no sample seen,
    or the shard does not read as a tar: the run reports that shard itself)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    keys, counted, cut = set(), None, False
    try:
        with FileSystems.open(url, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
            counted = _CountingReader(raw)
            with tarfile.open(fileobj=counted, mode="r|*") as tar:
                for member in tar:
                    if member.isfile():
                        base = member.name.rsplit("/", 1)[-1]
                        keys.add(member.name[: len(member.name) - len(base)]
                                 + base.split(".", 1)[0])
                    if counted.bytes_read >= limit:
                        cut = True
                        break
    except (OSError, tarfile.TarError, EOFError) as exc:
        _LOG.info("could not peek at %s to size the Flink tasks: %s", url, exc)
    if not keys or counted is None:
        return None
    # stopped at the limit: the last sample may be cut there, count it as half
    return counted.bytes_read / max(1.0, len(keys) - (0.5 if cut else 0.0))


class ShardTasks(NamedTuple):
    """What run / embed need: `need` tasks, `why` (for the messages), `samples` estimated."""
    need: int
    why: str
    samples: int


def tasks_for_shards(shards: Sequence[Tuple[str, str]], sizes: Sequence[int],
                     embed_dim: int, text_embeddings: bool,
                     limit_mib: int = TASK_OUTPUT_LIMIT_MIB) -> Optional[ShardTasks]:
    """run / embed: enough tasks that each task's expected output (the samples its shards
    hold, estimated from the shards' bytes (`sizes`, in the order of `shards`) and a peek at
    the first one, times what a sample emits) stays under a third of `limit_mib`. None when
    the first shard gives no estimate (the run reports that shard itself)."""
    if not shards:
        return None
    per_sample = peek_bytes_per_sample(shards[0][1])
    if per_sample is None:
        return None
    total = sum(sizes)
    samples = math.ceil(total / per_sample)
    per_output = output_bytes_per_sample(embed_dim, text_embeddings)
    share = (limit_mib << 20) // EXPECTED_SHARE_OF_LIMIT
    need = max(1, math.ceil(samples * per_output / share))
    biggest = max(sizes) / per_sample * per_output
    if biggest > limit_mib << 20:
        # one shard is one task's work in the read step: more tasks cannot split it
        _LOG.warning("the largest shard (%.0f MiB) holds ~%.0f MiB of output for one Flink "
                     "task, above the %d MiB a task may emit: that task will fail. Split the "
                     "shards (e.g. 10,000 samples each, webdataset's usual size).",
                     max(sizes) / 2**20, biggest / 2**20, limit_mib)
    return ShardTasks(need, f"~{share >> 20} MiB of output of the ~{samples:,} samples "
                            f"estimated in {_size(total)} of shards ({per_output:,} bytes "
                            f"each, {embed_dim}-d vectors)", samples)


class TaskOutputTooLarge(RuntimeError):
    """A Flink task emitted more than a task may: the job would stall (module doc)."""


class _GuardTaskOutputFn(beam.DoFn):
    """Counts a bundle's elements; fails the bundle once they pass the limit. On Flink's
    batch runner a bundle is a task's whole partition."""

    def __init__(self, bytes_per_element: int, limit: int, parallelism: Optional[int]):
        self._bytes_per_element = bytes_per_element
        self._limit = limit
        self._parallelism = parallelism
        self._count = 0

    def start_bundle(self):
        self._count = 0

    def process(self, element):
        self._count += 1
        if self._count * self._bytes_per_element > self._limit:
            tasks = f"--parallelism {self._parallelism}" if self._parallelism else \
                "the cluster's default parallelism"
            more = 4 * self._parallelism if self._parallelism else "a larger number"
            raise TaskOutputTooLarge(
                f"this Flink task has emitted {self._count:,} samples (~"
                f"{self._count * self._bytes_per_element / 2**20:,.0f} MiB, "
                f"{self._bytes_per_element:,} bytes each) in one bundle, more than the "
                f"{self._limit / 2**20:,.0f} MiB a task may: Beam's Flink batch runner stalls, "
                "without an error, when one task's output passes ~1 GB, so the job is "
                f"stopped instead. It ran with {tasks}; the tasks were sized from a peek at "
                "the first shard, which this data does not match. Rerun with "
                f"--parallelism {more} (tasks beyond the free slots run in waves), or make "
                "the shards alike in size.")
        yield element


class GuardTaskOutput(beam.PTransform):
    """Passes elements through; fails a bundle that passes `limit` bytes of output, counted
    as `bytes_per_element` per element.

    Args:
      bytes_per_element: what each element sends on downstream (vectors and records).
      limit: the most bytes one bundle may send (default TASK_OUTPUT_LIMIT_MIB).
      parallelism: the job's --parallelism, for the message.
    """

    def __init__(self, bytes_per_element: int, *, limit: int = TASK_OUTPUT_LIMIT_MIB << 20,
                 parallelism: Optional[int] = None):
        super().__init__()
        self._fn = _GuardTaskOutputFn(bytes_per_element, limit, parallelism)

    def expand(self, pcoll):
        return pcoll | beam.ParDo(self._fn)
