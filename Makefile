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

PREFECT_API := http://127.0.0.1:4200/api
MLFLOW_DB := sqlite:///$(CURDIR)/mlruns/mlflow.db

.PHONY: demo test venv ui deploy clean-outputs

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

test: $(STAMP)
	$(PY) -m pytest -q

# Prefect server (UI at http://127.0.0.1:4200) and MLflow UI (http://127.0.0.1:5000),
# both on loopback only; Ctrl-C stops both.
ui: $(STAMP)
	@mkdir -p mlruns
	@echo "Prefect UI: http://127.0.0.1:4200    MLflow UI: http://127.0.0.1:5000"
	trap 'kill 0' INT TERM EXIT; \
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_DB) --host 127.0.0.1 --port 5000 & \
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

# With `make ui` running: create the process work pool, deploy prefect.yaml and start
# a worker that runs flows from this checkout.
deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect work-pool create emonet-process --type process --overwrite
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect --no-prompt deploy --all
	EMONET_HOME=$(CURDIR) PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect worker start --pool emonet-process

clean-outputs:
	rm -rf $(OUT_DIR)
