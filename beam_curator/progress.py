"""Progress lines while a pipeline runs on the local runner, and the end-of-run summary lines.

    from beam_curator.progress import run_with_progress, final_summary_lines
    result = run_with_progress(pipeline, interval_s=10.0)   # blocks until done, like run()
    print("\\n".join(final_summary_lines(summary, output_dir)))

Every `interval_s` seconds a line like

    [progress 0:40] read 1,200 · embedded 1,150 (28.7 img/s, avg 26.9) · passed 900 ·
    filtered 250 · errors 2 · dedup assigned 0 · kept (written) 0

goes to stderr, from the Beam counters the transforms already emit (namespace "curator":
samples_read, decoded, decode_errors, shard_errors, passed_filters, filtered, dedup_assigned,
exact_duplicates, semantic_duplicates, reference_duplicates, kept, curated_samples_written;
and RunInference's own "curator_clip/num_inferences" for the images embedded).

How the numbers are read while the pipeline runs (why not just poll result.metrics()):
`FnApiRunner.run_pipeline` blocks until the whole pipeline is done and only then returns a
result with metrics, and on FnApiRunner a stage's input is ONE bundle, so the long
read → decode → embed → score → filter stage reports nothing until it is over. Beam's own
progress mechanism (`FnApiRunner(progress_request_frequency=...)`) sends
ProcessBundleProgressRequests, but (a) it drops the answers (no callback), and (b) with the
default in-process worker (EmbeddedWorkerHandler) the bundle runs synchronously inside the
request that starts it, so the progress thread only starts once the bundle has finished.

So `run_with_progress` runs the pipeline on `_ProgressFnApiRunner`, a small FnApiRunner
subclass that (1) adds up the final counters of every finished bundle, and (2) remembers the
worker handlers of the bundle being run; a reporter thread then asks the in-process worker's
active BundleProcessors for their live `monitoring_infos()` — exactly what the SDK harness
answers to a ProcessBundleProgressRequest — and adds them to the finished totals. No transform
changes, no extra steps in the graph, exact counts at the end (the final line comes from the
PipelineResult). It uses FnApiRunner internals (`_execute_bundle`, the worker handlers'
`bundle_processor_cache`) of the pinned Beam 2.77; every access is guarded, so if a Beam
upgrade moves them the run goes on unchanged and only the live numbers stop (logged once).
Other runners (Dataflow, Flink, Portable) have their own UIs: there the pipeline runs as usual
and one final line is printed from the result's metrics.
"""
from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, TextIO, Tuple

_LOG = logging.getLogger(__name__)

NAMESPACE = "curator"
EMBED_NAMESPACE = "curator_clip"          # OpenClipModelHandler.get_metrics_namespace()

# (label, how to compute it from the counters); a field shows once any of its counters exists.
MetricKey = Tuple[str, str]


def _c(name: str, namespace: str = NAMESPACE) -> MetricKey:
    return (namespace, name)


FIELDS: List[Tuple[str, Tuple[MetricKey, ...]]] = [
    ("read", (_c("samples_read"),)),
    ("embedded", (_c("num_inferences", EMBED_NAMESPACE),)),
    ("passed", (_c("passed_filters"),)),
    ("filtered", (_c("filtered"),)),
    ("errors", (_c("decode_errors"), _c("shard_errors"))),
    ("dedup assigned", (_c("dedup_assigned"),)),
    ("duplicates", (_c("exact_duplicates"), _c("semantic_duplicates"))),
    ("reference duplicates", (_c("reference_duplicates"),)),
    ("kept", (_c("kept"),)),
    ("kept (written)", (_c("curated_samples_written"),)),
]
RATE_FIELD = "embedded"


# ---- reading counters -------------------------------------------------------------------

def counters_from_monitoring_infos(infos: Iterable) -> Dict[MetricKey, int]:
    """User int64 counters in MonitoringInfo protos -> {(namespace, name): value} (summed)."""
    from apache_beam.metrics import monitoring_infos as mi

    totals: Dict[MetricKey, int] = collections.Counter()
    for info in infos:
        if info.urn != mi.USER_COUNTER_URN:
            continue
        namespace, name = mi.parse_namespace_and_name(info)
        totals[(namespace, name)] += int(mi.extract_counter_value(info))
    return dict(totals)


def counters_from_result(result) -> Dict[MetricKey, int]:
    """Committed (else attempted) counters of a finished PipelineResult."""
    totals: Dict[MetricKey, int] = collections.Counter()
    try:
        counters = result.metrics().query()["counters"]
    except Exception as exc:   # noqa: BLE001 (some runners have no metrics)
        _LOG.debug("no metrics from %s: %s", type(result).__name__, exc)
        return {}
    for counter in counters:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[(counter.key.metric.namespace, counter.key.metric.name)] += int(value or 0)
    return dict(totals)


class LiveCounters:
    """Counters of a pipeline running on `_ProgressFnApiRunner`: finished bundles + in flight."""

    def __init__(self):
        self._lock = threading.Lock()
        self._done: Dict[MetricKey, int] = collections.Counter()
        self._done_instructions: set = set()
        self._handlers: Dict[int, object] = {}
        self._broken = False

    # called by the runner, on the pipeline's thread
    def watch(self, handlers) -> None:
        with self._lock:
            for handler in handlers or ():
                self._handlers[id(handler)] = handler

    def bundle_done(self, response) -> None:
        counts = counters_from_monitoring_infos(response.process_bundle.monitoring_infos)
        with self._lock:
            for key, value in counts.items():
                self._done[key] += value
            if getattr(response, "instruction_id", ""):
                self._done_instructions.add(response.instruction_id)

    # called by the reporter thread
    def snapshot(self) -> Dict[MetricKey, int]:
        with self._lock:
            totals = collections.Counter(self._done)
            handlers = list(self._handlers.values())
            done = set(self._done_instructions)
        if not self._broken:
            try:
                for infos in self._in_flight(handlers, done):
                    for key, value in counters_from_monitoring_infos(infos).items():
                        totals[key] += value
            except Exception as exc:   # noqa: BLE001 (live numbers are best effort)
                self._broken = True
                _LOG.warning("progress: live counters unavailable on this Beam version (%s); "
                             "showing finished stages only", exc)
        return dict(totals)

    @staticmethod
    def _in_flight(handlers, done) -> List[list]:
        out = []
        for handler in handlers:
            cache = getattr(handler, "bundle_processor_cache", None)
            if cache is None:
                continue   # a gRPC/subprocess worker: its counters arrive per bundle only
            for _ in range(3):
                try:
                    active = list(cache.active_bundle_processors.items())
                    break
                except RuntimeError:   # the dict changed while being copied
                    continue
            else:
                active = []
            for instruction_id, (_, processor) in active:
                if instruction_id in done:
                    continue   # finished, waiting for finalization: counted already
                try:
                    out.append(processor.monitoring_infos())
                except Exception:   # noqa: BLE001 (released and reset meanwhile)
                    continue
        return out


def _progress_runner_class():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    class _ProgressFnApiRunner(FnApiRunner):
        """FnApiRunner that tells a LiveCounters about each bundle it runs."""

        def __init__(self, live: LiveCounters, **kwargs):
            super().__init__(**kwargs)
            self._live = live

        def _execute_bundle(self, runner_execution_context, bundle_context_manager,
                            bundle_input):
            try:
                self._live.watch(bundle_context_manager.worker_handlers)
            except Exception as exc:   # noqa: BLE001
                _LOG.debug("progress: cannot watch the worker handlers: %s", exc)
            result = super()._execute_bundle(runner_execution_context, bundle_context_manager,
                                             bundle_input)
            try:
                self._live.bundle_done(result)
            except Exception as exc:   # noqa: BLE001
                _LOG.debug("progress: cannot read a bundle's counters: %s", exc)
            return result

    return _ProgressFnApiRunner


def _swap_in_progress_runner(pipeline, live: LiveCounters) -> bool:
    """Replace a plain FnApiRunner by the progress subclass (same settings); False otherwise."""
    try:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    except ImportError:
        return False
    runner = getattr(pipeline, "runner", None)
    if type(runner) is not FnApiRunner:   # noqa: E721 (subclasses may rely on their own run)
        return False
    replacement = _progress_runner_class()(live)
    replacement.__dict__.update({k: v for k, v in runner.__dict__.items() if k != "_live"})
    pipeline.runner = replacement
    return True


# ---- the reporter -----------------------------------------------------------------------

def _fmt_int(n: Optional[int]) -> str:
    return "—" if n is None else f"{n:,}"


def _fmt_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressReporter:
    """Prints a progress line every `interval_s` seconds from a counters source.

    `source()` returns {(namespace, name): value}. Lines go to `stream` (default: stderr at
    print time). Displayed values never go down (a bundle that just finished can be missing
    for an instant between the worker and the runner).
    """

    def __init__(self, source: Callable[[], Dict[MetricKey, int]], interval_s: float = 10.0,
                 stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic):
        self._source = source
        self.interval_s = float(interval_s)
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self._last_t = self._start
        self._last_embedded = 0
        self._shown: Dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lines: List[str] = []

    # values ------------------------------------------------------------------------------
    def values(self, counters: Dict[MetricKey, int]) -> Dict[str, int]:
        out = {}
        for label, keys in FIELDS:
            present = [counters[k] for k in keys if k in counters]
            if present:
                out[label] = max(sum(present), self._shown.get(label, 0))
        if RATE_FIELD not in out:
            # Without RunInference's counter: every scored sample was embedded.
            scored = [counters[k] for k in (_c("passed_filters"), _c("filtered"))
                      if k in counters]
            if scored:
                out[RATE_FIELD] = max(sum(scored), self._shown.get(RATE_FIELD, 0))
        self._shown.update(out)
        return out

    def format_line(self, values: Dict[str, int], now: float, final: bool = False) -> str:
        elapsed = max(1e-9, now - self._start)
        parts = []
        for label, _ in FIELDS:
            if label not in values:
                continue
            text = f"{label} {_fmt_int(values[label])}"
            if label == RATE_FIELD:
                avg = values[label] / elapsed
                if final:
                    text += f" ({avg:.1f} img/s)"
                else:
                    dt = max(1e-9, now - self._last_t)
                    rate = (values[label] - self._last_embedded) / dt
                    text += f" ({rate:.1f} img/s, avg {avg:.1f})"
            parts.append(text)
        if not parts:
            parts.append("starting (no counters yet: loading models, listing shards)")
        tag = "done" if final else "progress"
        return f"[{tag} {_fmt_elapsed(elapsed)}] " + " · ".join(parts)

    def tick(self, final_counters: Optional[Dict[MetricKey, int]] = None) -> str:
        """Read the counters, print one line, return it."""
        final = final_counters is not None
        counters = final_counters if final else self._source()
        if final:
            self._shown = {}   # the result's metrics are exact: no clamping
        values = self.values(counters)
        now = self._clock()
        line = self.format_line(values, now, final=final)
        self._last_t, self._last_embedded = now, values.get(RATE_FIELD, 0)
        self._print(line)
        return line

    def _print(self, line: str) -> None:
        self.lines.append(line)
        stream = self._stream or sys.stderr
        try:
            print(line, file=stream, flush=True)
        except Exception:   # noqa: BLE001 (a closed stream never stops a pipeline)
            pass

    # thread ------------------------------------------------------------------------------
    def start(self) -> "ProgressReporter":
        if self.interval_s <= 0:
            return self
        self._thread = threading.Thread(target=self._loop, name="beam-curator-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as exc:   # noqa: BLE001
                _LOG.debug("progress line failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.interval_s))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run_with_progress(pipeline, interval_s: float = 10.0,
                      stream: Optional[TextIO] = None):
    """Run `pipeline` to completion, printing progress lines; returns its PipelineResult.

    On FnApiRunner (the local default) a line every `interval_s` seconds with live counts,
    then a final `[done ...]` line with the exact counts. On other runners the pipeline runs
    as usual (their UIs show progress) and one final line is printed. `interval_s <= 0`: no
    lines at all, just `pipeline.run().wait_until_finish()`.
    """
    if not interval_s or interval_s <= 0:
        result = pipeline.run()
        result.wait_until_finish()
        return result
    live = LiveCounters()
    if not _swap_in_progress_runner(pipeline, live):
        # Made before the run: the final line's img/s averages over the run's wall time
        # (made after, it divided by a few microseconds: "7,333 img/s" on DirectRunner).
        reporter = ProgressReporter(dict, interval_s, stream)
        result = pipeline.run()
        result.wait_until_finish()
        reporter.tick(final_counters=counters_from_result(result))
        return result
    reporter = ProgressReporter(live.snapshot, interval_s, stream)
    with reporter:
        result = pipeline.run()
        result.wait_until_finish()
    final = counters_from_result(result) or live.snapshot()
    reporter.tick(final_counters=final)
    return result


# ---- the end-of-run summary -------------------------------------------------------------

def final_summary_lines(summary: dict, output_dir: str) -> List[str]:
    """What to print when a command finishes: where the outputs are, the counts, the checks."""
    command = summary.get("command", "run")
    lines = [f"{command} finished: outputs in {output_dir}"]
    if summary.get("random_weights"):
        lines.append("  NOTE: the model weights are RANDOM (models init-random): scores and "
                     "embeddings are meaningless except for testing the pipeline.")
    counts = summary.get("counts")
    if counts:
        total = summary.get("samples_read", sum(counts.values()))
        lines.append(f"  samples read: {total:,}")
        width = max(len(s) for s in counts)
        for status, count in counts.items():
            share = f"{100.0 * count / total:5.1f}%" if total else "    —"
            lines.append(f"  {status:<{width}}  {count:>10,}  {share}")
        acc = summary.get("accounting") or {}
        if acc:
            lines.append(f"  accounting: input {acc.get('input'):,} = sum of statuses "
                         f"{acc.get('sum_of_statuses'):,} -> "
                         f"{'OK' if acc.get('ok') else 'FAILED'}")
        n_errors = summary.get("n_shard_errors", len(summary.get("shard_errors") or ()))
        if n_errors:
            lines.append(f"  shard-level errors: {n_errors} (see errors/*.parquet)")
    for key in ("curated_samples_written", "curated_shards_written", "n_embeddings",
                "n_duplicates", "n_clusters"):
        if key in summary:
            lines.append(f"  {key.replace('_', ' ')}: {summary[key]:,}"
                         if isinstance(summary[key], int) else
                         f"  {key.replace('_', ' ')}: {summary[key]}")
    removal = summary.get("removal_ids")
    if removal:
        lines.append(f"  removal ids: {removal['listed']:,} listed, {removal['matched']:,} "
                     f"matched a sample, {removal['unmatched']:,} matched none")
    for warning in summary.get("warnings") or ():
        lines.append(f"  WARNING: {warning}")
    join = _joiner(output_dir)
    where = [("curated shards", "curated/"), ("per-sample statuses", "samples/")]
    if counts:
        where.append(("report", "report.html"))
    existing = [(label, join(path)) for label, path in where if _exists(join(path))]
    for label, path in existing:
        lines.append(f"  {label}: {path}")
    return lines


def _joiner(output_dir: str):
    def join(path: str) -> str:
        return output_dir.rstrip("/") + "/" + path
    return join


def _exists(path: str) -> bool:
    """A file, or a directory holding files (on gs:// and s3:// a directory is a prefix)."""
    try:
        from apache_beam.io.filesystems import FileSystems

        if path.endswith("/"):
            return bool(FileSystems.match([path + "*"])[0].metadata_list)
        return FileSystems.exists(path)
    except Exception:   # noqa: BLE001
        return False
