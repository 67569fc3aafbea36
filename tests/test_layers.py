"""The layers point one way: serving code loads no training code (nor scikit-learn), and
pandas-only steps load no torch. Each check imports in a fresh interpreter, so modules
already imported by other tests cannot hide a dependency."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SERVING = [
    "emonet.inference", "emonet.batch", "emonet.pyfunc_model", "emonet.tracking", "emonet.registry", "emonet.recipe",
    "emonet.runs", "emonet.prediction", "emonet.store", "emonet.benchmark", "emonet.evaluation", "emonet.review",
]
# The training layer's own modules, and the loss and schedules only training uses.
TRAINING = {"emonet.train", "emonet.train_loaders", "emonet.parallel", "emonet.losses", "emonet.schedules"}
# What the logged MLflow model loads and predicts with (the registry also re-scores champions with it).
SERVED_MODEL = ["emonet.inference", "emonet.batch", "emonet.pyfunc_model", "emonet.prediction"]
# The base layer of the README's table: everything a data step or a report needs without torch.
TORCH_FREE = [
    "emonet.annotations", "emonet.normalize", "emonet.visibility", "emonet.visibility_split", "emonet.arrays", "emonet.affect",
    "emonet.schema", "emonet.config", "emonet.io", "emonet.images", "emonet.store", "emonet.runs", "emonet.stopping",
    "emonet.metrics", "emonet.bootstrap", "emonet.plots", "emonet.demo_data",
]


def _loaded_after_importing(module: str) -> set[str]:
    script = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", SERVING)
def test_serving_code_never_imports_training_code(module):
    loaded = _loaded_after_importing(module)
    assert not loaded & TRAINING, sorted(loaded & TRAINING)


@pytest.mark.parametrize("module", SERVED_MODEL)
def test_the_served_model_needs_no_scikit_learn(module):
    assert "sklearn" not in _loaded_after_importing(module), "its pip requirements leave scikit-learn out"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_pandas_only_steps_import_no_torch(module):
    assert "torch" not in _loaded_after_importing(module)
