# beam-curator: `make demo` runs the whole pipeline on generated data; `make test` runs the tests.
# Both create (or reuse) the virtualenv below and install everything they need themselves.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DATA ?= demo-data
DEMO_MODELS ?= demo-models
DEMO_OUTPUT ?= demo-output

.PHONY: venv demo test test-fast lint clean chromium flink-fetch flink-up flink-down flink-status flink-logs

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m beam_curator models init-random --dir $(DEMO_MODELS) --force
	$(PY) -m beam_curator synthetic --dir $(DEMO_DATA) --shards 3 --per-shard 100
	$(PY) -m beam_curator run --input '$(DEMO_DATA)/*.tar' --output $(DEMO_OUTPUT) \
	    --model_dir $(DEMO_MODELS) --n_clusters 8 --overwrite true

# The browser test needs Debian's chromium; the Flink tests need Flink and Beam's Flink job
# server (versions: scripts/flink-versions.env; fetched once into ~/.cache/beam-curator/flink,
# then reused with no network). They start their own cluster on free ports.
test: venv lint chromium flink-fetch
	$(PY) -m pytest -q

lint: venv
	RUFF=$(VENV)/bin/ruff bash scripts/lint.sh

chromium:
	@./scripts/install_chromium.sh || { [ -z "$$CI" ] && echo "chromium not installed: the browser test will be skipped"; }

flink-fetch:
	PYTHON=$(PY) bash scripts/fetch_flink.sh

# JobManager + 2 TaskManagers, each with its own SDK worker pool (run by .venv: make venv
# first), and a Beam Flink job server for --job_endpoint localhost:18097
flink-up: flink-fetch
	bash scripts/flink_cluster.sh up

flink-down:
	bash scripts/flink_cluster.sh down

flink-status:
	bash scripts/flink_cluster.sh status

flink-logs:
	bash scripts/flink_cluster.sh logs

test-fast: venv lint
	$(PY) -m pytest -q -m "not slow and not flink and not browser"

clean:
	rm -rf $(DEMO_DATA) $(DEMO_MODELS) $(DEMO_OUTPUT) .pytest_cache
