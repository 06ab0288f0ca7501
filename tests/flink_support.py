"""Pytest fixtures and helpers to run Beam pipelines on Apache Flink in tests.

Three ways to run a portable Beam pipeline, all real components:

``portable``  PortableRunner against Beam's Python job service
              (``python -m apache_beam.runners.portability.local_job_service_main``),
              SDK harness in-process (``--environment_type=LOOPBACK``). No Java.
``embedded``  FlinkRunner with ``--flink_master=[local]``: Beam starts the Flink job
              server JVM, which runs an embedded Flink MiniCluster.
``session``   FlinkRunner with ``--flink_master=localhost:<rest port>``: the job server
              submits to a standalone Flink session cluster (JobManager and TaskManager
              are separate JVMs, started by ``scripts/flink_cluster.sh up``).

Versions (see ``scripts/fetch_flink.sh``): Flink 1.19 (distribution 1.19.3, unpacked
from the PyPI packages apache-flink-libraries / apache-flink) with the Beam Flink job
server built from ``org.apache.beam:beam-runners-flink-1.19:2.62.0`` + its Maven
dependencies. Maven Central as reachable here serves no ``*-job-server`` jar and no Beam
2.77 Java artifacts; 2.62.0 is the newest Flink runner whose dependencies all resolve.
The 2.77 Python SDK drives it through the portability API (``--flink_version=1.19``).

SDK harness (``--environment_type``):

* ``LOOPBACK`` (used here for all modes): the harness runs inside the submitting Python
  process; the runner (embedded Flink or the TaskManager) connects back to it on
  localhost. Works whenever the TaskManager runs on the same host as the test.
* ``EXTERNAL`` for a real/remote cluster: start a worker pool next to each TaskManager,
  ``python -m apache_beam.runners.worker.worker_pool_main --service_port=50000`` (it
  spawns ``python -c ...`` from $PATH, so run it with the venv active), and pass
  ``--environment_type=EXTERNAL --environment_config=localhost:50000``. Verified here
  against the session cluster too. Unlike LOOPBACK, the workers unpickle the DoFns in
  another process: code pickled by reference (module-level functions of a test module,
  ``beam_curator.*``) must be importable there (installed package, ``--setup_file`` or
  ``--extra_package``), else ``ModuleNotFoundError`` in the harness.
* ``PROCESS``: ``--environment_type=PROCESS --environment_config='{"command":
  "/path/to/boot"}'`` needs Beam's Go ``boot`` launcher from the SDK container image;
  it is not on PyPI, so not available here. ``DOCKER`` (the default of PortableRunner
  for non-local masters) needs docker + the Beam SDK image: not available either.

Bundles: on Flink *batch* (the default for bounded pipelines) the portable runner runs
every executable stage as ONE bundle per partition (FlinkExecutableStageFunction), so
``--max_bundle_size`` / ``--max_bundle_time_mills`` are ignored and a DoFn that buffers
until ``finish_bundle`` (RunInference, apache/beam#34178) holds the whole partition in
memory. Those options only apply to the streaming translation: ``streaming=True`` below
adds ``--streaming --max_bundle_size=N --max_bundle_time_mills=T`` (measured: 5000
elements -> 51 bundles of <= 100 with max_bundle_size=100; batch: 1 bundle of 5000
whatever the option; works on the session cluster too). Note the Java option is
spelled ``max_bundle_time_mills``. On batch, the only other remedy is in the DoFn:
flush from ``process()`` every N elements instead of accumulating until
``finish_bundle`` (a bundle there is the whole partition).

Job server JVMs: FlinkRunner starts one ``java -jar <job server>`` per pipeline and
Beam stops it only at interpreter exit; use the ``reap_flink_job_servers`` fixture
(or :func:`stop_flink_job_servers`) in tests that run FlinkRunner pipelines.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

__all__ = [
    "MODES",
    "REPO_ROOT",
    "attach_flink_logs",
    "fetch_flink",
    "find_free_port",
    "flink_cluster_logs",
    "flink_job_server_jar",
    "flink_pipeline_args",
    "flink_session_cluster",
    "pytest_runtest_makereport",
    "python_job_service",
    "reap_flink_job_servers",
    "stop_flink_job_servers",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
FETCH_SCRIPT = REPO_ROOT / "scripts" / "fetch_flink.sh"
CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "flink_cluster.sh"

MODES = ("portable", "embedded", "session")
_MODE_ALIASES = {"job_service": "portable", "python": "portable", "local": "embedded",
                 "cluster": "session"}

#: JVM heap of the Beam job server (it hosts the whole MiniCluster in ``embedded`` mode).
JOB_SERVER_XMX = os.environ.get("BEAM_CURATOR_FLINK_JOB_SERVER_XMX", "1g")

# run dirs of the session clusters started by the fixture (for log attachment)
_CLUSTER_RUN_DIRS: list[Path] = []


# --------------------------------------------------------------------------- helpers
def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # the scripts use python3 for pip download / JSON / manifest: use this interpreter
    env.setdefault("PYTHON", sys.executable)
    if extra:
        env.update(extra)
    return env


@functools.lru_cache(maxsize=None)
def fetch_flink() -> dict[str, str]:
    """Run scripts/fetch_flink.sh (idempotent; ~0.01 s when cached) and return the facts
    it writes to ``$CACHE/flink.env``: FLINK_HOME, FLINK_VERSION, BEAM_FLINK_VERSION,
    BEAM_FLINK_JOB_SERVER_JAR, ..."""
    if shutil.which("java") is None:
        pytest.skip("Flink tests need Java (java not on PATH)")
    proc = subprocess.run(
        ["bash", str(FETCH_SCRIPT), "--print-env"],
        env=_script_env(), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"scripts/fetch_flink.sh failed (rc={proc.returncode}):\n"
                    f"{proc.stdout}\n{proc.stderr}", pytrace=False)
    facts = {}
    for line in proc.stdout.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            facts[k.strip()] = v.strip()
    return facts


def flink_pipeline_args(mode: str, master: str | None = None, jar: str | None = None,
                        *, parallelism: int = 1, streaming: bool = False,
                        max_bundle_size: int = 1000, max_bundle_time_ms: int = 1000,
                        environment_type: str = "LOOPBACK",
                        environment_config: str | None = None,
                        flink_version: str | None = None) -> list[str]:
    """Beam pipeline args for ``mode`` in :data:`MODES`.

    ``portable``: ``master`` is the job endpoint of :func:`python_job_service`.
    ``embedded``: ``master`` ignored (``[local]``).
    ``session``:  ``master`` is the ``localhost:<rest port>`` of the session cluster.
    ``jar`` defaults to the cached job server jar (fetched if needed).
    ``streaming=True`` switches to Flink's streaming translation, the only one where
    ``max_bundle_size`` / ``max_bundle_time_ms`` bound the bundles (see module doc).
    """
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    env_args = [f"--environment_type={environment_type}"]
    if environment_config:
        env_args.append(f"--environment_config={environment_config}")
    if mode == "portable":
        if not master:
            raise ValueError("portable mode needs master=<job endpoint host:port>")
        return ["--runner=PortableRunner", f"--job_endpoint={master}", *env_args]

    if mode == "session" and not master:
        raise ValueError("session mode needs master=<host:rest port>")
    if jar is None or flink_version is None:
        facts = fetch_flink()
        jar = jar or facts["BEAM_FLINK_JOB_SERVER_JAR"]
        flink_version = flink_version or facts["BEAM_FLINK_VERSION"]
    args = [
        "--runner=FlinkRunner",
        f"--flink_master={'[local]' if mode == 'embedded' else master}",
        f"--flink_version={flink_version}",
        f"--flink_job_server_jar={jar}",
        *env_args,
        f"--parallelism={parallelism}",
        # the job server JVM (hosts the MiniCluster in embedded mode); JVM default
        # would be 1/4 of the machine's RAM
        f"--job_server_jvm_properties=-Xmx{JOB_SERVER_XMX}",
    ]
    if streaming:
        args += ["--streaming", f"--max_bundle_size={max_bundle_size}",
                 f"--max_bundle_time_mills={max_bundle_time_ms}"]
    return args


def stop_flink_job_servers(timeout: float = 15.0) -> int:
    """Stop the Flink job server JVMs that FlinkRunner started from this process.

    Beam starts one ``java -jar <job server jar>`` per FlinkRunner pipeline and only
    stops it at interpreter exit (atexit), so a test session running N pipelines keeps
    N idle JVMs (~370 MB RSS each). Only direct children of this process whose command
    line is ``java ... -jar ...flink...job-server...jar`` are touched. Returns the count.
    """
    me = os.getpid()
    victims = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != me:
                continue
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if "-jar" in args:
            jar = args[args.index("-jar") + 1] if args.index("-jar") + 1 < len(args) else ""
            if "flink" in jar and "job-server" in jar:
                victims.append(int(stat.parent.name))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGINT)  # what Beam itself sends first
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in victims:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state == "Z":
                # reap it (once all its threads are gone); Beam's Popen.poll() later
                # gets ECHILD and treats it as exited
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                except ChildProcessError:
                    break
            time.sleep(0.2)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return len(victims)


def flink_cluster_logs(run_dir: Path, lines: int = 200) -> str:
    """Tail of every log/out file of a session cluster run dir."""
    parts = []
    for f in sorted((Path(run_dir) / "log").glob("*")):
        if f.suffix not in (".log", ".out"):
            continue
        try:
            text = f.read_text(errors="replace").splitlines()
        except OSError as e:
            text = [f"<unreadable: {e}>"]
        parts.append(f"===== {f}\n" + "\n".join(text[-lines:]))
    return "\n".join(parts) or f"(no logs in {run_dir}/log)"


def attach_flink_logs(item, report) -> None:
    """Add the session cluster logs to a failed test's report (shown by pytest)."""
    if report.failed and report.when in ("setup", "call") and _CLUSTER_RUN_DIRS \
            and "flink_session_cluster" in getattr(item, "fixturenames", ()):
        for run_dir in _CLUSTER_RUN_DIRS:
            report.sections.append((f"flink cluster logs ({run_dir})",
                                    flink_cluster_logs(run_dir)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Import into tests/conftest.py to get cluster logs on failing tests (or call
    :func:`attach_flink_logs` from your own hook)."""
    outcome = yield
    attach_flink_logs(item, outcome.get_result())


def _terminal_write(config, text: str) -> None:
    tr = config.pluginmanager.getplugin("terminalreporter")
    if tr is not None:
        tr.write_line(text)
    else:
        sys.__stderr__.write(text + "\n")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def flink_job_server_jar() -> str:
    """Path of the cached Beam Flink job server launcher jar (fetched if needed)."""
    return fetch_flink()["BEAM_FLINK_JOB_SERVER_JAR"]


@pytest.fixture
def reap_flink_job_servers() -> Iterator[None]:
    """Function-scoped: after the test, stop the job server JVMs its FlinkRunner
    pipelines left running (see :func:`stop_flink_job_servers`)."""
    yield
    stop_flink_job_servers()


@pytest.fixture(scope="session")
def flink_session_cluster(request, tmp_path_factory) -> Iterator[str]:
    """A standalone Flink session cluster (JobManager + TaskManager JVMs) on free ports;
    yields its master address ``localhost:<rest port>``.

    With ``BEAM_CURATOR_FLINK_MASTER=host:port`` set (e.g. after ``make flink-up``,
    which serves localhost:18081) that running cluster is used and left running."""
    existing = os.environ.get("BEAM_CURATOR_FLINK_MASTER")
    if existing:
        import json
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://{existing}/overview", timeout=10) as r:
                overview = json.load(r)
        except OSError as e:
            pytest.fail(f"BEAM_CURATOR_FLINK_MASTER={existing} unreachable: {e}",
                        pytrace=False)
        if overview.get("taskmanagers", 0) < 1:
            pytest.fail(f"Flink at {existing} has no TaskManager: {overview}", pytrace=False)
        yield existing
        return
    fetch_flink()
    run_dir = tmp_path_factory.mktemp("flink-cluster")
    rest_port, rpc_port = find_free_port(), find_free_port()
    env = _script_env({
        "BEAM_CURATOR_FLINK_RUN_DIR": str(run_dir),
        "BEAM_CURATOR_FLINK_REST_PORT": str(rest_port),
        "BEAM_CURATOR_FLINK_RPC_PORT": str(rpc_port),
    })
    t0 = time.monotonic()
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], env=env,
                        capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], env=env,
                       capture_output=True, text=True, timeout=120)
        pytest.fail(f"flink_cluster.sh up failed (rc={up.returncode}):\n"
                    f"{up.stderr}\n{up.stdout}\n{flink_cluster_logs(run_dir)}",
                    pytrace=False)
    master = up.stdout.strip().splitlines()[-1]
    _terminal_write(request.config, f"\n[flink] session cluster {master} up in "
                                    f"{time.monotonic() - t0:.1f}s (run dir {run_dir})")
    _CLUSTER_RUN_DIRS.append(run_dir)
    failed_before = request.session.testsfailed
    try:
        yield master
    finally:
        if request.session.testsfailed > failed_before:
            _terminal_write(request.config,
                            f"\n[flink] tests failed; cluster logs kept in {run_dir}/log")
        _CLUSTER_RUN_DIRS.remove(run_dir)
        down = subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], env=env,
                              capture_output=True, text=True, timeout=120)
        if down.returncode != 0:
            _terminal_write(request.config,
                            f"[flink] flink_cluster.sh down failed:\n{down.stderr}")


@pytest.fixture(scope="session")
def python_job_service(tmp_path_factory) -> Iterator[str]:
    """Beam's Python job service on a free port; yields its endpoint ``localhost:<port>``."""
    import grpc  # installed with apache-beam

    work = tmp_path_factory.mktemp("beam-job-service")
    port_file = work / "port"
    log_path = work / "job_service.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
         "--port", "0", "--port_file", str(port_file),
         "--staging_dir", str(work / "staging")],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(work))
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("local_job_service_main did not start:\n"
                            + log_path.read_text(errors="replace"), pytrace=False)
            time.sleep(0.1)
        endpoint = f"localhost:{int(port_file.read_text().strip())}"
        with grpc.insecure_channel(endpoint) as channel:
            try:
                grpc.channel_ready_future(channel).result(
                    timeout=max(1.0, deadline - time.monotonic()))
            except grpc.FutureTimeoutError:
                pytest.fail(f"job service at {endpoint} not ready:\n"
                            + log_path.read_text(errors="replace"), pytrace=False)
        yield endpoint
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        log.close()
