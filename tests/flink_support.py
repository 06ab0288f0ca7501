"""Pytest fixtures and helpers to run Beam pipelines on Apache Flink in tests.

Three ways to run a portable Beam pipeline, all real components:

``portable``  PortableRunner against Beam's Python job service
              (``python -m apache_beam.runners.portability.local_job_service_main``),
              SDK harness in-process (``--environment_type=LOOPBACK``). No Java.
``embedded``  FlinkRunner with ``--flink_master=[local]``: Beam starts the Flink job
              server JVM, which runs an embedded Flink MiniCluster.
``session``   FlinkRunner with ``--flink_master=localhost:<rest port>``: the job server
              submits to the standalone session cluster of ``scripts/flink_cluster.sh``
              (fixture ``flink_cluster``): a JobManager and two TaskManagers, each with its
              own SDK worker pool (``python -m beam_curator.worker_pool``), all separate
              processes under supervisors that restart them. ``FlinkCluster.pipeline_args``
              submits with ``--environment_type=EXTERNAL``, as on a production cluster.

Versions: ``scripts/flink-versions.env`` (Flink distribution unpacked from the PyPI packages
apache-flink-libraries / apache-flink; Beam's Flink job server assembled from
``org.apache.beam:beam-runners-flink-<minor>`` + its Maven dependencies, since Maven Central
as reachable here serves no ``*-job-server`` jar and no newer runner whose dependencies all
resolve). The 2.77 Python SDK drives it through the portability API.

SDK harness (``--environment_type``):

* ``LOOPBACK`` (``portable`` and ``embedded`` here): the harness runs inside the submitting
  Python process; the runner connects back to it on localhost. Works only when the
  TaskManagers run on the submitting host.
* ``EXTERNAL`` (``session`` here, and any real cluster): a worker pool beside each
  TaskManager starts the harness processes; ``--environment_config=HOST:PORT`` is resolved
  on each TaskManager. Unlike LOOPBACK, the workers unpickle the DoFns in another process:
  code pickled by reference (module-level functions of a test module, ``beam_curator.*``)
  must be importable there (installed package, ``--setup_file`` or ``--extra_package``),
  else ``ModuleNotFoundError`` in the harness; lambdas travel by value. Paths are opened by
  the workers: pass absolute ones.
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
    "FlinkCluster",
    "flink_cluster",
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
                        flink_version: str | None = None,
                        no_jar_staging: bool = False,
                        job_endpoint: str | None = None) -> list[str]:
    """Beam pipeline args for ``mode`` in :data:`MODES`.

    ``portable``: ``master`` is the job endpoint of :func:`python_job_service`.
    ``embedded``: ``master`` ignored (``[local]``).
    ``session``:  ``master`` is the ``localhost:<rest port>`` of the session cluster.
    ``jar`` defaults to the cached job server jar (fetched if needed).
    ``streaming=True`` switches to Flink's streaming translation, the only one where
    ``max_bundle_size`` / ``max_bundle_time_ms`` bound the bundles (see module doc).
    ``no_jar_staging=True`` (``session`` only: a cluster with Beam's runner in its lib/)
    submits the job without the job server's jars (scripts/fetch_flink.sh's NoJarsToStage).
    ``job_endpoint`` (``session`` only): submit through that running job server (the one
    flink_cluster.sh starts) instead of one FlinkRunner starts for the job.
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
    facts = fetch_flink() if (jar is None or flink_version is None or no_jar_staging) else {}
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
    if no_jar_staging and mode == "session" and facts.get("BEAM_FLINK_NO_JAR_STAGING"):
        args.append("--pipeline_resources_detector_factory_class="
                    + facts["BEAM_FLINK_NO_JAR_STAGING"])
    if job_endpoint and mode == "session":
        args.append(f"--job_endpoint={job_endpoint}")
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


class FlinkCluster:
    """A running cluster of scripts/flink_cluster.sh: its REST API and its processes.

    ``master`` is the --flink_master, ``environment_config`` the address every TaskManager
    resolves to its own SDK worker pool (--environment_type EXTERNAL)."""

    owned = True   # started by the test session (its processes may be killed)

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        env = dict(line.split("=", 1) for line in
                   (self.run_dir / "cluster.env").read_text().split() if "=" in line)
        self.master = env["FLINK_MASTER"]
        self.environment_config = env["ENVIRONMENT_CONFIG"]
        self.taskmanagers = int(env["TASKMANAGERS"])
        self.task_slots = int(env["TASK_SLOTS"])
        # Beam's runner jars in the cluster's lib/ (parent-first): SDK workers are reused
        # across stages, and jobs need not ship the job server's jars (issue 30)
        self.beam_lib = env.get("BEAM_LIB", "0") == "1"
        # the cluster's long-running job server ("" when started without one)
        self.job_endpoint = env.get("JOB_ENDPOINT", "")

    def pipeline_args(self, parallelism: int = 2, own_job_server: bool = False) -> list[str]:
        """Args to submit to this cluster, through its running job server unless
        ``own_job_server`` (then FlinkRunner starts one for the job, as with no --job_endpoint)."""
        return flink_pipeline_args("session", self.master, parallelism=parallelism,
                                   environment_type="EXTERNAL",
                                   environment_config=self.environment_config,
                                   no_jar_staging=self.beam_lib,
                                   job_endpoint=None if own_job_server else self.job_endpoint)

    def worker_starts(self) -> list[int]:
        """SDK workers each pool has started so far (its "started worker" log lines)."""
        counts = []
        for i in range(1, self.taskmanagers + 1):
            log = self.run_dir / "log" / f"pool{i}.out"
            text = log.read_text(errors="replace") if log.exists() else ""
            counts.append(text.count("started worker"))
        return counts

    def rest(self, path: str):
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://{self.master}{path}", timeout=10) as r:
            return json.load(r)

    def pid(self, name: str) -> int:
        """pid of supervised process ``tm<i>`` (TaskManager JVM) or ``pool<i>`` (its pool)."""
        return int((self.run_dir / "pids" / f"{name}.pid").read_text().split()[0])

    def worker_pids(self, pool: str) -> list[int]:
        """The SDK worker processes a pool has running now."""
        pool_pid = self.pid(pool)
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pool_pid:
                    found.append(int(stat.parent.name))
            except (OSError, ValueError, IndexError):
                continue
        return found

    def ready(self) -> bool:
        """Every TaskManager registered with all slots free, every pool up (by its pid file)."""
        try:
            o = self.rest("/overview")
        except OSError:
            return False
        if o.get("taskmanagers") != self.taskmanagers or \
                o.get("slots-available") != self.taskmanagers * self.task_slots:
            return False
        for i in range(1, self.taskmanagers + 1):
            try:
                os.kill(self.pid(f"pool{i}"), 0)
                with socket.create_connection((f"127.0.0.{i + 1}",
                                               int(self.environment_config.split(":")[1])),
                                              timeout=2):
                    pass
            except (OSError, ValueError):
                return False
        return True

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Wait until :meth:`ready` (e.g. after a killed process was restarted); seconds."""
        t0 = time.monotonic()
        while not self.ready():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"cluster not back to full strength in {timeout}s: "
                                   f"{self.rest('/overview')}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def job_after(self, t0_ms: int) -> str | None:
        """id of the newest job submitted at or after ``t0_ms`` (epoch ms), if any."""
        jobs = [j for j in self.rest("/jobs/overview")["jobs"] if j["start-time"] >= t0_ms]
        return max(jobs, key=lambda j: j["start-time"])["jid"] if jobs else None

    def running_subtasks(self, jid: str, name_part: str = "", *, after: str = "") -> list[dict]:
        """RUNNING subtasks of the job's vertices whose name contains ``name_part`` (or that
        read from a vertex whose name contains ``after``: Beam names a fused stage by its
        top-level transforms only, a GroupByKey by its full path). Each carries ``vertex``
        and ``taskmanager`` = ``tm<i>`` (the resource id prefix flink_cluster.sh sets)."""
        job = self.rest(f"/jobs/{jid}")
        names = {v["id"]: v["name"] for v in job["vertices"]}
        inputs = {}
        if after:
            for node in self.rest(f"/jobs/{jid}/plan").get("plan", {}).get("nodes", []):
                inputs[node["id"]] = [names.get(i["id"], "") for i in node.get("inputs", [])]
        found = []
        for v in job["vertices"]:
            if v["status"] != "RUNNING":
                continue
            if after and not any(after in n for n in inputs.get(v["id"], [])):
                continue
            if name_part not in v["name"]:
                continue
            for st in self.rest(f"/jobs/{jid}/vertices/{v['id']}")["subtasks"]:
                if st["status"] == "RUNNING":
                    tm_id = st.get("taskmanager-id", "")
                    found.append(dict(st, vertex=v["name"], taskmanager=tm_id.split("-")[0]))
        return found

    def exceptions(self, jid: str) -> list[str]:
        """Root causes of the job's failures so far (Flink's exception history)."""
        history = self.rest(f"/jobs/{jid}/exceptions").get("exceptionHistory", {})
        return [e.get("exceptionName", "") + ": " + (e.get("stacktrace", "") or "")[:2000]
                for e in history.get("entries", [])]


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
            and "flink_cluster" in getattr(item, "fixturenames", ()):
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


def _free_pool_port(hosts: list[str]) -> int:
    """A port free on every pool address (each TaskManager's pool listens on its own)."""
    for _ in range(50):
        port = find_free_port()
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {hosts}")


def free_port_pair() -> int:
    """A port p with p + 1 free too (the job server's job and artifact ports)."""
    import socket

    for _ in range(50):
        port = find_free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="session")
def flink_cluster(request, tmp_path_factory) -> Iterator[FlinkCluster]:
    """The production-shaped session cluster of scripts/flink_cluster.sh (JobManager, two
    TaskManagers, a worker pool beside each), on free ports, for the whole test session.

    With ``BEAM_CURATOR_FLINK_MASTER=host:port`` set (e.g. after ``make flink-up``) the
    running cluster of ``BEAM_CURATOR_FLINK_RUN_DIR`` (default: the cache's run dir) is used
    and left running; ``owned`` is False then, and tests that kill its processes skip."""
    existing = os.environ.get("BEAM_CURATOR_FLINK_MASTER")
    if existing:
        run_dir = Path(os.environ.get("BEAM_CURATOR_FLINK_RUN_DIR")
                       or Path(fetch_flink()["FLINK_CACHE_DIR"]) / "run")
        try:
            cluster = FlinkCluster(run_dir)
            cluster.rest("/overview")
        except OSError as e:
            pytest.fail(f"BEAM_CURATOR_FLINK_MASTER={existing}: no usable cluster in "
                        f"{run_dir}: {e}", pytrace=False)
        cluster.owned = False
        yield cluster
        return
    fetch_flink()
    run_dir = tmp_path_factory.mktemp("flink-cluster")
    rest_port, rpc_port = find_free_port(), find_free_port()
    env = _script_env({
        "BEAM_CURATOR_FLINK_RUN_DIR": str(run_dir),
        "BEAM_CURATOR_FLINK_REST_PORT": str(rest_port),
        "BEAM_CURATOR_FLINK_RPC_PORT": str(rpc_port),
        "BEAM_CURATOR_FLINK_POOL_PORT": str(_free_pool_port(["127.0.0.2", "127.0.0.3"])),
        "BEAM_CURATOR_FLINK_JOB_PORT": str(free_port_pair()),
        # the pools' SDK workers import this checkout's beam_curator
        "BEAM_CURATOR_FLINK_WORKER_PYTHON": sys.executable,
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
    cluster = FlinkCluster(run_dir)
    cluster.owned = True
    _terminal_write(request.config, f"\n[flink] session cluster {cluster.master} "
                                    f"(2 TaskManagers + worker pools) up in "
                                    f"{time.monotonic() - t0:.1f}s (run dir {run_dir})")
    _CLUSTER_RUN_DIRS.append(run_dir)
    failed_before = request.session.testsfailed
    try:
        yield cluster
    finally:
        if request.session.testsfailed > failed_before:
            _terminal_write(request.config,
                            f"\n[flink] tests failed; cluster logs kept in {run_dir}/log")
        _CLUSTER_RUN_DIRS.remove(run_dir)
        down = subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], env=env,
                              capture_output=True, text=True, timeout=180)
        if down.returncode != 0:
            _terminal_write(request.config,
                            f"[flink] flink_cluster.sh down failed:\n{down.stderr}")


@pytest.fixture(scope="session")
def flink_session_cluster(flink_cluster) -> str:
    """The master address ``localhost:<rest port>`` of :func:`flink_cluster`."""
    return flink_cluster.master


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
