"""The layers point one way, checked two ways: statically by the import-linter contracts in
``pyproject.toml`` (every import in ``emonet/``, deferred ones included), and at run time for
the one path where it matters most: loading the served MLflow model in a fresh interpreter
loads no training code and no scikit-learn. The tooling that keeps the tree tidy (ruff) runs
here too, so the quick suite and CI fail on a broken contract or an unformatted file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed in {BIN}: rebuild the venv (make venv)")
        return found
    return str(path)


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_import_contracts_hold():
    result = _run(_tool("lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_ruff_finds_nothing_to_lint():
    result = _run(_tool("ruff"), "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_finds_nothing_to_format():
    result = _run(_tool("ruff"), "format", "--check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_at_most_six_modules_at_the_top_of_the_package():
    top = sorted(path.name for path in (ROOT / "emonet").glob("*.py") if path.name != "__init__.py")
    assert len(top) <= 6, top


# What the served model loads: its model file, and through it the Predictor, the loop and
# the readers. None of it may reach the training layer (losses, schedules, the loops) or
# scikit-learn, which the model's pip requirements leave out.
SERVED_MODEL = ["emonet.inference.pyfunc_model", "emonet.inference.loading", "emonet.inference.csv_scoring"]


def _loaded_after_importing(module: str) -> set[str]:
    script = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "EAGER_IMPORT": ""}  # lazy_loader's switch: keep the re-exports lazy
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True, env=env
    )
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", SERVED_MODEL)
def test_the_served_model_loads_no_training_code_and_no_scikit_learn(module):
    loaded = _loaded_after_importing(module)
    training = sorted(name for name in loaded if name == "emonet.training" or name.startswith("emonet.training."))
    assert not training, training
    assert "sklearn" not in loaded, "its pip requirements leave scikit-learn out"


def test_a_torch_free_step_stays_torch_free_at_run_time():
    # The contracts see every import; this checks the lazy re-exports of emonet.data keep
    # a data step (normalization, face visibility) from loading torch through __init__.
    loaded = _loaded_after_importing("emonet.data.normalize, emonet.data.visibility_column, emonet.tracking.stale_runs")
    assert "torch" not in loaded


@pytest.mark.parametrize("package", ["utils", "data", "models", "inference", "reports", "tracking", "training"])
def test_each_subpackage_re_exports_what_its_modules_export(package):
    import importlib

    exported = set(importlib.import_module(f"emonet.{package}").__all__)
    for path in sorted((ROOT / "emonet" / package).glob("*.py")):
        if path.name == "__init__.py" or path.stem == "pyfunc_model":  # MLflow runs that file itself
            continue
        module = importlib.import_module(f"emonet.{package}.{path.stem}")
        missing = set(getattr(module, "__all__", ())) - exported
        assert not missing, f"emonet.{package} does not re-export {sorted(missing)} of {module.__name__}"
