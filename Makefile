# EmoNet: `make demo` runs the main job on generated demo data, `make test` runs the tests.
# Both create .venv on first use; nothing else needs installing by hand.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
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
# Each worker's share of the cores, as its torch threads: N workers never oversubscribe them.
SERVE_THREADS = $(shell n=$$(nproc 2>/dev/null || echo 1); t=$$(expr $$n / "$(WORKERS)" 2>/dev/null); [ "$${t:-0}" -ge 1 ] && echo $$t || echo 1)

.PHONY: demo test venv ui deploy serve servers servers-stop postgresql clean-outputs

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 12) else "EmoNet needs Python 3.10 to 3.12, found %d.%d: set PYTHON=python3.X" % v)'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The whole flow on the demo data, with an ephemeral Prefect server and SQLite MLflow.
demo: $(STAMP)
	$(PY) -m flows.training_pipeline --demo-dir $(DEMO_DIR) --output-dir $(OUT_DIR)/demo

test: $(STAMP) postgresql
	$(PY) -m pytest -q

# PostgreSQL's initdb and pg_ctl, for `make servers` and its test: Debian's postgresql
# package, installed when missing (needs root, as in CI).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	    [ "$$(id -u)" = 0 ] || { echo "PostgreSQL binaries missing: run 'apt-get install -y postgresql' as root" >&2; exit 1; }; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

# Prefect server (UI at http://127.0.0.1:4200) and MLflow UI (http://127.0.0.1:5000),
# both on loopback only; Ctrl-C stops exactly these two servers.
ui: $(STAMP)
	@mkdir -p mlruns
	$(PY) -m scripts.ui --mlflow-store '$(MLFLOW_DB)' --mlflow-port $(MLFLOW_PORT) --prefect-port $(PREFECT_PORT)

# With `make ui` (or `make servers`) running: create the process work pool, deploy
# prefect.yaml (each deployment records this checkout) and start a worker.
deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect work-pool create emonet-process --type process --overwrite
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect --no-prompt deploy --all
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect worker start --pool emonet-process

# The team set-up in the background: MLflow tracking server and Prefect server on
# PostgreSQL ($$EMONET_DATABASE_URL, else a local cluster under .servers/), on loopback.
servers: $(STAMP) $(if $(EMONET_DATABASE_URL),,postgresql)
	$(PY) -m scripts.servers start --mlflow-port $(MLFLOW_PORT) --prefect-port $(PREFECT_PORT)

# Stops exactly what `make servers` started; the data stays.
servers-stop:
	$(PY) -m scripts.servers stop

# MODEL over REST on 127.0.0.1:$(PORT) with $(WORKERS) scoring workers, from
# $$MLFLOW_TRACKING_URI (default: the SQLite store under mlruns/). The scoring server
# starts uvicorn by name: the venv goes on PATH.
serve: $(STAMP)
	@case '$(WORKERS)' in ''|*[!0-9]*|0) echo "WORKERS must be a positive integer, got '$(WORKERS)'" >&2; exit 2;; esac
	PATH='$(CURDIR)/$(VENV)/bin':"$$PATH" MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-$(MLFLOW_DB)}" \
	    OMP_NUM_THREADS=$(SERVE_THREADS) MKL_NUM_THREADS=$(SERVE_THREADS) \
	    $(VENV)/bin/mlflow models serve -m '$(MODEL)' --env-manager local --host 127.0.0.1 --port $(PORT) \
	    --workers $(WORKERS)

clean-outputs:
	rm -rf $(OUT_DIR)
