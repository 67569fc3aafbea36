# EmoNet: `make demo` runs the main job on generated demo data, `make test` runs the tests.
# Both create .venv on first use; nothing else needs installing by hand.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= data/demo
OUT_DIR ?= outputs

.PHONY: demo test venv clean-outputs

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 12) else "EmoNet needs Python 3.10 to 3.12, found %d.%d: set PYTHON=python3.X" % v)'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet "pip>=23.2"
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/emonet demo --data-dir $(DEMO_DIR) --out-dir $(OUT_DIR)

test: $(STAMP)
	$(PY) -m pytest -q

clean-outputs:
	rm -rf $(OUT_DIR)
