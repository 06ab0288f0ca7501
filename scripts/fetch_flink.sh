#!/usr/bin/env bash
# Fetch (once) and cache everything the Flink tests need:
#   * a Flink distribution tree  $CACHE/flink-<FLINK_VERSION>/{bin,conf,lib,opt,plugins}
#     unpacked from the PyPI packages apache-flink-libraries (lib/, opt/, plugins/,
#     bash-java-utils.jar: an sdist) and apache-flink (bin/, conf/: a wheel).
#     They are only unpacked, never pip-installed: they conflict with apache-beam.
#   * a Beam Flink job server for that Flink minor version, resolved with Maven into
#     $CACHE/job-server/<name>/lib/*.jar plus a launcher jar <name>.jar whose
#     manifest has Main-Class FlinkJobServerDriver and a relative Class-Path on lib/,
#     so `java -jar <name>.jar` and Beam's --flink_job_server_jar both work.
#   * $CACHE/job-server/<name>/lib/beam-curator-flink-staging.jar (javac): lets a job be
#     submitted without the job server's jars, to a cluster that has them in its lib/.
#   * $CACHE/job-server/<name>/flink-lib/*.jar: the subset of those jars that a session
#     cluster puts in its lib/ so that SDK workers are reused across stages
#     (scripts/flink_cluster.sh; README, Run on Flink).
#   * $CACHE/flink.env: shell-sourceable facts (paths, versions) for the other scripts
#     and for tests/flink_support.py.
#
# Idempotent: each part is built in a temp dir, moved into place atomically and
# marked complete; a second run with everything cached does no network access and
# takes well under a second.
#
# Versions: scripts/flink-versions.env holds the Flink version and the Beam Java version of
# the job server, and says which newer ones were tried and why each was refused. The
# registries reachable here serve no beam-runners-flink-*-job-server jar, so the job server
# is assembled from org.apache.beam:beam-runners-flink-<minor> + its Maven dependencies.
# Beam's portability API lets the 2.77 Python SDK drive that job server.
#
# Environment overrides:
#   BEAM_CURATOR_FLINK_CACHE       cache dir (default $HOME/.cache/beam-curator/flink)
#   BEAM_CURATOR_FLINK_VERSION     Flink distribution version (default: flink-versions.env)
#   BEAM_CURATOR_FLINK_BEAM_VERSION Beam Java version of the job server (default: same file)
#   BEAM_CURATOR_FLINK_REST_PORT   REST port written to the tree's conf (default 18081;
#                                  scripts/flink_cluster.sh sets each cluster's own)
#   BEAM_CURATOR_FLINK_RPC_PORT    JobManager RPC port, likewise (default 16123)
#   PYTHON                         python with pip, for `pip download` (default: the active
#                                  venv, else <repo>/.venv/bin/python, else python3)
#   MVN                            maven executable (default: mvn)
#   MVN_ARGS                       extra maven args (e.g. -o, -Dmaven.repo.local=...)
#   BEAM_CURATOR_FLINK_KEEP_DOWNLOADS=1  keep the 230 MB sdist after unpacking
# Options:  --print-env   only print the flink.env contents (after fetching)
#           --force       rebuild everything (the wheel is reused; the sdist is
#                         fetched again unless BEAM_CURATOR_FLINK_KEEP_DOWNLOADS=1 kept it)
set -euo pipefail

CACHE="${BEAM_CURATOR_FLINK_CACHE:-${HOME}/.cache/beam-curator/flink}"
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/flink-versions.env"   # FLINK_VERSION, BEAM_JAVA_VERSION
FLINK_VERSION="${BEAM_CURATOR_FLINK_VERSION:-$FLINK_VERSION}"
FLINK_MINOR="$(echo "$FLINK_VERSION" | cut -d. -f1,2)"
BEAM_JAVA_VERSION="${BEAM_CURATOR_FLINK_BEAM_VERSION:-$BEAM_JAVA_VERSION}"
REST_PORT="${BEAM_CURATOR_FLINK_REST_PORT:-18081}"
RPC_PORT="${BEAM_CURATOR_FLINK_RPC_PORT:-16123}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON="$REPO_ROOT/.venv/bin/python"
  else PYTHON=python3; fi
fi
MVN="${MVN:-mvn}"
SLF4J_VERSION=2.0.16

PRINT_ENV=0
FORCE=0
for a in "$@"; do
  case "$a" in
    --print-env) PRINT_ENV=1 ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done

log() { echo "[fetch_flink] $*" >&2; }

DL="$CACHE/downloads"
FLINK_HOME_DIR="$CACHE/flink-$FLINK_VERSION"
JS_NAME="beam-runners-flink-$FLINK_MINOR-job-server-$BEAM_JAVA_VERSION"
JS_DIR="$CACHE/job-server/$JS_NAME"
JS_JAR="$JS_DIR/$JS_NAME.jar"
ENV_FILE="$CACHE/flink.env"

mkdir -p "$CACHE" "$DL"

# Serialize concurrent runs (pytest-xdist workers, two make targets...).
exec 9>"$CACHE/.fetch.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

# ---------------------------------------------------------------- downloads
fetch_flink_packages() {
  local libs_sdist="$DL/apache-flink-libraries-$FLINK_VERSION.tar.gz"
  if [ ! -s "$libs_sdist" ]; then
    log "downloading apache-flink-libraries==$FLINK_VERSION (sdist, ~230 MB) from PyPI"
    local tmp; tmp="$(mktemp -d "$DL/.dl.XXXXXX")"
    # Only an sdist exists; pip prepares its metadata (a few seconds), nothing is installed.
    "$PYTHON" -m pip download --no-deps --disable-pip-version-check -q -d "$tmp" \
      "apache-flink-libraries==$FLINK_VERSION" >&2
    mv "$tmp"/apache*flink*libraries*"$FLINK_VERSION".tar.gz "$libs_sdist"
    rm -rf "$tmp"
  fi
  if ! ls "$DL"/apache_flink-"$FLINK_VERSION"-*.whl >/dev/null 2>&1; then
    log "downloading apache-flink==$FLINK_VERSION (wheel; only bin/ and conf/ are used)"
    local tmp; tmp="$(mktemp -d "$DL/.dl.XXXXXX")"
    # Pin the wheel flavour so the result does not depend on the local interpreter.
    "$PYTHON" -m pip download --no-deps --disable-pip-version-check -q -d "$tmp" \
      --only-binary :all: --implementation cp --python-version 3.11 --abi cp311 \
      --platform manylinux2014_x86_64 "apache-flink==$FLINK_VERSION" >&2
    mv "$tmp"/apache_flink-"$FLINK_VERSION"-*.whl "$DL/"
    rm -rf "$tmp"
  fi
}

# ---------------------------------------------------------------- flink tree
write_config_yaml() {
  # $1 = conf dir; $2 = java opts line from the shipped config.yaml
  # Flat dotted keys: valid in Flink >= 1.19 config.yaml (standard YAML), and easy to
  # override line-by-line (scripts/flink_cluster.sh rewrites the port lines).
  cat >"$1/config.yaml" <<EOF
# Written by scripts/fetch_flink.sh for a small single-host session cluster
# (2 cores / shared memory). Flink >= 1.19 reads conf/config.yaml (standard YAML);
# flat dotted keys are equivalent to nested ones. Do not add a key twice.
env.java.opts.all: $2
jobmanager.bind-host: localhost
jobmanager.rpc.address: localhost
jobmanager.rpc.port: $RPC_PORT
jobmanager.memory.process.size: 1024m
jobmanager.execution.failover-strategy: region
taskmanager.bind-host: localhost
taskmanager.host: localhost
taskmanager.numberOfTaskSlots: 2
taskmanager.memory.process.size: 2048m
parallelism.default: 1
rest.address: localhost
rest.bind-address: localhost
rest.port: $REST_PORT
blob.server.port: 0
taskmanager.rpc.port: 0
taskmanager.data.port: 0
# no restarts: a failing test job should fail fast
restart-strategy.type: none
web.submit.enable: true
web.cancel.enable: true
EOF
}

build_flink_tree() {
  if [ "$FORCE" = 0 ] && [ -f "$FLINK_HOME_DIR/.complete" ]; then return; fi
  fetch_flink_packages
  log "unpacking Flink $FLINK_VERSION into $FLINK_HOME_DIR"
  local tmp; tmp="$(mktemp -d "$CACHE/.flink.XXXXXX")"
  local home="$tmp/flink-$FLINK_VERSION"
  mkdir -p "$home" "$tmp/sdist" "$tmp/whl"
  tar -xzf "$DL/apache-flink-libraries-$FLINK_VERSION.tar.gz" -C "$tmp/sdist" \
    --wildcards "*/deps/*"
  local deps; deps="$(echo "$tmp"/sdist/*/deps)"
  for d in lib opt plugins licenses; do
    [ -d "$deps/$d" ] && cp -a "$deps/$d" "$home/$d"
  done
  "$PYTHON" - "$DL"/apache_flink-"$FLINK_VERSION"-*.whl "$tmp/whl" <<'PY'
import sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    z.extractall(dest, [n for n in z.namelist()
                        if n.startswith(("pyflink/bin/", "pyflink/conf/"))])
PY
  cp -a "$tmp/whl/pyflink/bin" "$home/bin"
  cp -a "$tmp/whl/pyflink/conf" "$home/conf"
  # bin/config.sh needs bin/bash-java-utils.jar, which is shipped in the sdist.
  cp -a "$deps/bin/." "$home/bin/"
  chmod +x "$home"/bin/*.sh "$home/bin/flink" 2>/dev/null || true
  mkdir -p "$home/log"
  local javaopts
  javaopts="$(grep -E '^ +all: ' "$home/conf/config.yaml" | head -1 | sed -E 's/^ +all: //')"
  [ -n "$javaopts" ] || javaopts="--add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.util=ALL-UNNAMED"
  cp "$home/conf/config.yaml" "$home/conf/config.yaml.dist"
  write_config_yaml "$home/conf" "$javaopts"
  [ -f "$home/lib/flink-dist-$FLINK_VERSION.jar" ] || { log "flink-dist jar missing"; exit 1; }
  [ -x "$home/bin/jobmanager.sh" ] || { log "bin/jobmanager.sh missing"; exit 1; }
  touch "$home/.complete"
  rm -rf "$FLINK_HOME_DIR"
  mv "$home" "$FLINK_HOME_DIR"
  rm -rf "$tmp"
  # The unpacked tree is the cache; drop the 230 MB sdist unless asked to keep it.
  if [ "${BEAM_CURATOR_FLINK_KEEP_DOWNLOADS:-0}" != 1 ]; then
    rm -f "$DL/apache-flink-libraries-$FLINK_VERSION.tar.gz"
  fi
}

# ---------------------------------------------------------------- job server
# The launcher jar $1/$JS_NAME.jar: a manifest with Main-Class FlinkJobServerDriver and a
# relative Class-Path on every jar of $1/lib.
write_launcher() {
  "$PYTHON" - "$1" "$JS_NAME.jar" <<'PY'
import os, sys, zipfile
root, name = sys.argv[1], sys.argv[2]
jars = sorted(j for j in os.listdir(os.path.join(root, "lib")) if j.endswith(".jar"))
def header(line):  # manifest lines are at most 72 bytes; continuation lines start with a space
    b = line.encode(); out = [b[:72]]; b = b[72:]
    while b:
        out.append(b" " + b[:71]); b = b[71:]
    return b"\r\n".join(out) + b"\r\n"
# Java 17: the embedded Flink (and Kryo in --streaming mode) needs the same module
# openings Flink's conf adds to env.java.opts.all; `java -jar` honours these attributes.
opens = ("java.base/java.lang java.base/java.net java.base/java.io java.base/java.nio "
         "java.base/sun.nio.ch java.base/java.lang.reflect java.base/java.text "
         "java.base/java.time java.base/java.util java.base/java.util.concurrent "
         "java.base/java.util.concurrent.atomic java.base/java.util.concurrent.locks")
exports = "java.base/sun.net.util java.rmi/sun.rmi.registry java.security.jgss/sun.security.krb5"
mf = (b"Manifest-Version: 1.0\r\n"
      + header("Main-Class: org.apache.beam.runners.flink.FlinkJobServerDriver")
      + header("Add-Opens: " + opens)
      + header("Add-Exports: " + exports)
      + header("Class-Path: " + " ".join("lib/" + j for j in jars))
      + b"\r\n")
with zipfile.ZipFile(os.path.join(root, name + ".tmp"), "w") as z:
    z.writestr("META-INF/MANIFEST.MF", mf)
os.replace(os.path.join(root, name + ".tmp"), os.path.join(root, name))   # JVMs may run it
PY
}

build_job_server() {
  if [ "$FORCE" = 0 ] && [ -f "$JS_DIR/.complete" ] && [ -f "$JS_JAR" ]; then return; fi
  command -v "$MVN" >/dev/null || { log "maven ($MVN) not found"; exit 1; }
  log "resolving org.apache.beam:beam-runners-flink-$FLINK_MINOR:$BEAM_JAVA_VERSION with Maven"
  local tmp; tmp="$(mktemp -d "$CACHE/.js.XXXXXX")"
  cat >"$tmp/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.beam-curator</groupId>
  <artifactId>$JS_NAME-classpath</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <!-- The runtime classpath of Beam's Flink job server (FlinkJobServerDriver). -->
  <dependencies>
    <dependency>
      <groupId>org.apache.beam</groupId>
      <artifactId>beam-runners-flink-$FLINK_MINOR</artifactId>
      <version>$BEAM_JAVA_VERSION</version>
    </dependency>
    <!-- pin slf4j-api 2.x (Maven would pick 1.7 from a transitive path) + a binding -->
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-simple</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  # shellcheck disable=SC2086
  (cd "$tmp" && "$MVN" -B -q -Dstyle.color=never ${MVN_ARGS:-} dependency:copy-dependencies \
      -DoutputDirectory="$tmp/lib" -DincludeScope=runtime >&2)
  write_launcher "$tmp"
  touch "$tmp/.complete"
  rm -rf "$JS_DIR"
  mkdir -p "$(dirname "$JS_DIR")"
  mv "$tmp" "$JS_DIR"
}

# ---------------------------------------------------------------- no jar staging
# $JS_DIR/lib/beam-curator-flink-staging.jar (javac, two classes), on the launcher's
# Class-Path: a PipelineResourcesDetector that finds nothing to stage, and an options
# registrar so that the job server describes --pipeline_resources_detector_factory_class
# to the Python SDK (which drops options its job server does not describe). With
#   --pipeline_resources_detector_factory_class=beam_curator.flink.NoJarsToStage
# the job server submits a job without its 152 MB of jars; ~13 s per job here, most of it
# the JobManager putting ~120 jars one by one into its blob store, plus every TaskManager
# fetching them. Only for a cluster that has Beam's runner in its lib/
# (scripts/flink_cluster.sh), as the job's classes then come from there.
STAGING_JAR_NAME=beam-curator-flink-staging.jar
build_staging_jar() {
  if [ "$FORCE" = 0 ] && [ -f "$JS_DIR/.staging-complete" ]; then return; fi
  if ! command -v javac >/dev/null; then
    log "javac not found: no $STAGING_JAR_NAME (jobs will ship the job server's jars)"
    return
  fi
  log "compiling $STAGING_JAR_NAME"
  local tmp; tmp="$(mktemp -d "$CACHE/.staging.XXXXXX")"
  mkdir -p "$tmp/src/beam_curator/flink" "$tmp/classes/META-INF/services"
  cat >"$tmp/src/beam_curator/flink/NoJarsToStage.java" <<'JAVA'
package beam_curator.flink;

import java.util.Collections;
import org.apache.beam.sdk.util.construction.resources.PipelineResourcesDetector;

/** Stage no jars with a job: the cluster's lib/ holds Beam's runner (scripts/fetch_flink.sh). */
public class NoJarsToStage implements PipelineResourcesDetector.Factory {
  public static NoJarsToStage create() {
    return new NoJarsToStage();
  }

  @Override
  public PipelineResourcesDetector getPipelineResourcesDetector() {
    return classLoader -> Collections.emptyList();
  }
}
JAVA
  cat >"$tmp/src/beam_curator/flink/StagingOptionsRegistrar.java" <<'JAVA'
package beam_curator.flink;

import java.util.Collections;
import org.apache.beam.sdk.options.PipelineOptions;
import org.apache.beam.sdk.options.PipelineOptionsRegistrar;
import org.apache.beam.sdk.util.construction.resources.PipelineResourcesOptions;

/** Lets the job server accept --pipeline_resources_detector_factory_class from Python. */
public class StagingOptionsRegistrar implements PipelineOptionsRegistrar {
  @Override
  public Iterable<Class<? extends PipelineOptions>> getPipelineOptions() {
    return Collections.singletonList(PipelineResourcesOptions.class);
  }
}
JAVA
  echo beam_curator.flink.StagingOptionsRegistrar \
    >"$tmp/classes/META-INF/services/org.apache.beam.sdk.options.PipelineOptionsRegistrar"
  javac -nowarn -d "$tmp/classes" -cp "$JS_DIR/lib/beam-sdks-java-core-$BEAM_JAVA_VERSION.jar" \
    "$tmp"/src/beam_curator/flink/*.java >&2
  "$PYTHON" - "$tmp/classes" "$tmp/$STAGING_JAR_NAME" <<'PY'
import os, sys, zipfile
root, out = sys.argv[1:3]
with zipfile.ZipFile(out, "w") as z:
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            z.write(os.path.join(d, f), os.path.relpath(os.path.join(d, f), root))
PY
  mv "$tmp/$STAGING_JAR_NAME" "$JS_DIR/lib/$STAGING_JAR_NAME"
  write_launcher "$JS_DIR"
  rm -rf "$tmp"
  touch "$JS_DIR/.staging-complete"
}

# ---------------------------------------------------------------- cluster lib/
# The Beam runner classes for the session cluster's lib/ (parent classloader):
# $JS_DIR/flink-lib/*.jar, links to the job server's jars less those Flink's lib/ already
# holds (flink-*, kryo, commons-*, ...: a jar any of whose classes Flink's lib/ has) and
# the slf4j jars (Flink binds slf4j to log4j). Why: Beam's Flink runner releases a job's
# SDK workers as soon as no task of the job runs on the TaskManager, whatever
# --environment_cache_millis says, when its classes were loaded by the job's classloader
# (FlinkExecutableStageContextFactory: release is synchronous unless the runner's class
# loader is Flink's own). Between two batch stages no task runs, so every stage started
# fresh workers. scripts/flink_cluster.sh puts these jars on the cluster's classpath.
build_cluster_lib() {
  local out="$JS_DIR/flink-lib"
  if [ "$FORCE" = 0 ] && [ -f "$out/.complete" ]; then return; fi
  log "selecting the Beam jars for the cluster's lib/ ($out)"
  local tmp; tmp="$(mktemp -d "$JS_DIR/.flink-lib.XXXXXX")"
  "$PYTHON" - "$FLINK_HOME_DIR/lib" "$JS_DIR/lib" "$tmp" <<'PY'
import glob, os, sys, zipfile
flink_lib, js_lib, out = sys.argv[1:4]
def classes(jar):
    with zipfile.ZipFile(jar) as z:   # module-info.class of multi-release jars: not a class
        return {n for n in z.namelist() if n.endswith(".class") and not n.startswith("META-INF/")}
flink = set()
for jar in glob.glob(os.path.join(flink_lib, "*.jar")):
    flink |= classes(jar)
kept = []
for jar in sorted(glob.glob(os.path.join(js_lib, "*.jar"))):
    name = os.path.basename(jar)
    if name.startswith(("slf4j-", "flink-", "beam-curator-")) or classes(jar) & flink:
        continue
    os.symlink(os.path.join("..", "lib", name), os.path.join(out, name))
    kept.append(name)
if not any(n.startswith("beam-runners-flink-") for n in kept):
    sys.exit("no beam-runners-flink jar selected")
print(f"{len(kept)} jars", file=sys.stderr)
PY
  touch "$tmp/.complete"
  rm -rf "$out"
  mv "$tmp" "$out"
}

build_flink_tree
build_job_server
build_staging_jar
build_cluster_lib
NO_JAR_STAGING=""
if [ -f "$JS_DIR/lib/$STAGING_JAR_NAME" ]; then NO_JAR_STAGING=beam_curator.flink.NoJarsToStage; fi

cat >"$ENV_FILE.tmp" <<EOF
# Written by scripts/fetch_flink.sh
FLINK_CACHE_DIR=$CACHE
FLINK_HOME=$FLINK_HOME_DIR
FLINK_VERSION=$FLINK_VERSION
BEAM_FLINK_VERSION=$FLINK_MINOR
BEAM_FLINK_JOB_SERVER_JAR=$JS_JAR
BEAM_FLINK_JOB_SERVER_BEAM_VERSION=$BEAM_JAVA_VERSION
BEAM_FLINK_CLUSTER_LIB=$JS_DIR/flink-lib
BEAM_FLINK_NO_JAR_STAGING=$NO_JAR_STAGING
EOF
mv "$ENV_FILE.tmp" "$ENV_FILE"

if [ "$PRINT_ENV" = 1 ]; then cat "$ENV_FILE"; else log "ready: $ENV_FILE"; fi
