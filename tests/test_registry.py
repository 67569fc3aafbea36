"""The model registry: champion/challenger promotion on a temporary SQLite store (the
paired-bootstrap rule on validation, and the point rule of ``confidence=0``), re-scoring a
champion on a new split, concurrent registrations and their locks, skipping a retraining
that would reproduce the champion, and the register task (a retry reuses the run's
version; the checkpoint is loaded once from evaluation to registration)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import restored_mlflow_uris, run_together
from mlflow import MlflowClient

import emonet.tracking.registry
from emonet.inference.loop import Predictions
from emonet.metrics import mean_average_precision_score
from emonet.reports.evaluation import evaluate_checkpoint, split_fingerprint
from emonet.schema import NUM_EMOTIONS, annotations_path, arrays_dir
from emonet.tracking.recipe import code_version, recipe_tags, retraining_unneeded
from emonet.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    PromotionDecision,
    find_run_version,
    predict_model_on_split,
    promote_model,
    split_score_tag,
)
from emonet.tracking.run_logging import configure_mlflow, log_emonet_model

# The rule before validation decided: point test mAPs, any higher one wins.
OLD_RULE = {"split": "test", "confidence": 0.0}


def score_model_on_split(model_uri, split_csv, img_dir) -> float:
    """The mAP of a model's re-scoring predictions (what a point comparison reads)."""
    predictions = predict_model_on_split(model_uri, split_csv, img_dir)
    return mean_average_precision_score(predictions.emotions_true, predictions.emotion_prob)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint["checkpoint"]


@pytest.fixture
def registry(logged_model, request):
    """A fresh registered model per test, whose versions reuse the logged_model model's source."""
    client = logged_model["client"]
    name = f"promo-{request.node.name}"[:100]
    client.create_registered_model(name)
    source, experiment_id = logged_model["version"].source, client.get_run(logged_model["run_id"]).info.experiment_id

    def new_version() -> tuple[str, str]:
        run_id = client.create_run(experiment_id).info.run_id
        return str(client.create_model_version(name, source, run_id=run_id).version), run_id

    return client, name, new_version


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def test_first_version_becomes_champion(registry):
    client, name, new_version = registry
    version, run_id = new_version()
    result = promote_model(client, name, version, 0.31, "split-a", run_id, **OLD_RULE)
    assert result == PromotionDecision(
        version=version,
        alias=CHAMPION,
        decision="first_version",
        reason=result.reason,
        new_map=0.31,
        previous_map=None,
        previous_version=None,
        split="test",
        split_id="split-a",
        difference=None,
        name=name,
        error=None,
    )
    assert result.explain() == f"Version {version} is the first version of {name}: it becomes champion."
    assert _aliases(client, name) == {CHAMPION: version}
    tags = client.get_model_version(name, version).tags
    assert float(tags["test_mAP"]) == 0.31 and tags["test_split"] == "split-a"
    run = client.get_run(run_id)
    assert run.data.tags["promotion_decision"] == "first_version"
    assert run.data.metrics["candidate_test_mAP"] == 0.31
    assert "champion_previous_test_mAP" not in run.data.metrics


def test_worse_then_better_version(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "split-a", r1, **OLD_RULE)

    v2, r2 = new_version()
    worse = promote_model(client, name, v2, 0.28, "split-a", r2, **OLD_RULE)
    assert (worse.alias, worse.decision, worse.previous_map, worse.previous_version) == (
        CHALLENGER,
        "clearly_worse",
        0.30,
        v1,
    )
    assert worse.difference.estimate == pytest.approx(-0.02) and worse.difference.low == worse.difference.high
    assert _aliases(client, name) == {CHAMPION: v1, CHALLENGER: v2}
    run = client.get_run(r2)
    assert run.data.metrics["champion_previous_test_mAP"] == 0.30 and run.data.metrics["candidate_test_mAP"] == 0.28
    assert run.data.tags["promotion_decision"] == "clearly_worse" and run.data.tags["champion_previous_version"] == v1
    assert run.data.tags["promotion_split"] == "test" and run.data.metrics["promotion_difference_mAP"] == pytest.approx(
        -0.02
    )

    v3, r3 = new_version()
    tie = promote_model(client, name, v3, 0.30, "split-a", r3, **OLD_RULE)
    assert tie.alias == CHALLENGER and _aliases(client, name)[CHAMPION] == v1  # a tie does not win
    assert tie.decision == "not_significantly_better"

    v4, r4 = new_version()
    better = promote_model(client, name, v4, 0.35, "split-a", r4, **OLD_RULE)
    assert (better.alias, better.decision, better.previous_map) == (CHAMPION, "promoted", 0.30)
    assert _aliases(client, name)[CHAMPION] == v4
    assert client.get_run(r4).data.tags["promotion_alias"] == CHAMPION

    again = promote_model(client, name, int(v4), 0.35, "split-a", r4, **OLD_RULE)  # re-run of the same step
    assert (again.alias, again.decision) == (CHAMPION, "already_champion")
    assert _aliases(client, name) == {CHAMPION: v4, CHALLENGER: v3}


@pytest.fixture(scope="module")
def split(tiny_checkpoint):
    """A real labelled test split (the tiny archive's) and its fingerprint."""
    root = tiny_checkpoint["root"]
    test_csv, val_csv = annotations_path(root, "test"), annotations_path(root, "val")
    return {
        "csv": test_csv,
        "img_dir": arrays_dir(root),
        "id": split_fingerprint(pd.read_csv(test_csv)),
        "val_csv": val_csv,
        "val_id": split_fingerprint(pd.read_csv(val_csv)),
    }


def test_predict_model_on_split_matches_the_evaluation(logged_model, evaluation, split):
    predictions = predict_model_on_split(logged_model["version"].source, split["csv"], split["img_dir"])
    np.testing.assert_array_equal(predictions.indices, evaluation.predictions.indices)
    np.testing.assert_allclose(predictions.emotion_prob, evaluation.predictions.emotion_prob, atol=1e-6)
    score = mean_average_precision_score(predictions.emotions_true, predictions.emotion_prob)
    assert score == pytest.approx(evaluation.metrics["mAP"], abs=1e-6)


def test_champion_of_another_split_is_rescored_on_the_candidates(registry, split, rescored):
    """A new test split no longer freezes the champion: it is re-scored on the candidate's split."""
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.99, "sha256:aaa", r1, **OLD_RULE)  # a high score, but on another split
    truth = score_model_on_split(f"models:/{name}/{v1}", split["csv"], split["img_dir"])

    v2, r2 = new_version()
    better = promote_model(
        client, name, v2, truth + 0.01, split["id"], r2, split_csv=split["csv"], img_dir=split["img_dir"], **OLD_RULE
    )
    assert [args[0] for args in rescored] == [f"models:/{name}/{v1}"]
    assert (better.alias, better.decision, better.previous_version) == (CHAMPION, "promoted", v1)
    assert better.previous_map == pytest.approx(truth)
    assert _aliases(client, name) == {CHAMPION: v2}
    run = client.get_run(r2)
    assert run.data.metrics["champion_previous_test_mAP"] == pytest.approx(truth)
    assert run.data.tags["champion_previous_version"] == v1 and run.data.tags["promotion_decision"] == "promoted"
    # The old champion keeps its score on the new split as a tag, so it is never re-scored twice.
    old = client.get_model_version(name, v1).tags
    assert float(old[split_score_tag(split["id"])]) == pytest.approx(truth) and old["test_split"] == "sha256:aaa"

    v3, r3 = new_version()
    worse = promote_model(
        client, name, v3, truth, split["id"], r3, split_csv=split["csv"], img_dir=split["img_dir"], **OLD_RULE
    )
    assert (worse.alias, worse.decision, worse.previous_map) == (CHALLENGER, "clearly_worse", truth + 0.01)
    assert len(rescored) == 1, "the champion was scored on this split: its own score is used"


def test_rescoring_needs_the_split(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "sha256:aaa", r1, **OLD_RULE)
    v2, r2 = new_version()
    with pytest.raises(ValueError, match="never scored on test split sha256:bbb: pass split_csv"):
        promote_model(client, name, v2, 0.40, "sha256:bbb", r2, **OLD_RULE)
    assert _aliases(client, name) == {CHAMPION: v1}


def test_min_improvement(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "split-a", r1, min_improvement=0.05, **OLD_RULE)
    v2, r2 = new_version()
    small = promote_model(client, name, v2, 0.34, "split-a", r2, min_improvement=0.05, **OLD_RULE)
    assert (small.alias, small.decision) == (CHALLENGER, "not_significantly_better")
    assert "min_improvement 0.05" in small.reason
    v3, r3 = new_version()
    large = promote_model(client, name, v3, 0.36, "split-a", r3, min_improvement=0.05, **OLD_RULE)
    assert (large.alias, large.decision) == (CHAMPION, "promoted")
    with pytest.raises(ValueError, match="min_improvement"):
        promote_model(client, name, v3, 0.36, "split-a", r3, min_improvement=-0.01, **OLD_RULE)


def test_champion_score_falls_back_to_its_run_metric(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "split-a", r1, **OLD_RULE)
    client.delete_model_version_tag(name, v1, "test_mAP")  # e.g. a champion registered by hand
    client.log_metric(r1, "test_mAP", 0.40)
    v2, r2 = new_version()
    result = promote_model(client, name, v2, 0.35, "split-a", r2, **OLD_RULE)
    assert (result.alias, result.previous_map) == (CHALLENGER, 0.40)


def test_promote_model_validates_inputs(registry, tmp_path):
    client, name, new_version = registry
    version, run_id = new_version()
    with pytest.raises(ValueError, match="finite"):
        promote_model(client, name, version, float("nan"), "split-a", run_id)
    with pytest.raises(ValueError, match="split_id"):
        promote_model(client, name, version, 0.3, "", run_id)
    with pytest.raises(ValueError, match="split must be one of"):
        promote_model(client, name, version, 0.3, "split-a", run_id, split="train")
    with pytest.raises(ValueError, match="confidence"):
        promote_model(client, name, version, 0.3, "split-a", run_id, confidence=1.0)


# --------------------------------------------------------------------------- concurrency and retries


def test_concurrent_registrations_leave_the_better_version_champion(tmp_path):
    """Two processes register and promote into one SQLite store at the same moment.

    The worse version's alias move is delayed the most, so without the lock around
    decide-and-alias it would move last and win. Checked with the file lock of SQLite
    stores and with the registry lock used for other stores.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with restored_mlflow_uris():
        experiment_id = configure_mlflow(uri, "exp")
        client = MlflowClient()
        for name in ("file-locked", "registry-locked"):
            client.create_registered_model(name)
            run_id = client.create_run(experiment_id).info.run_id
            version = client.create_model_version(name, "file:///nowhere/model", run_id=run_id).version
            promote_model(client, name, version, 0.30, "split-a", run_id, split="test", confidence=0.0)
    script = f"""
import json
from dataclasses import asdict
import emonet.tracking.registry
from mlflow import MlflowClient
from emonet.tracking.registry import promote_model
from emonet.tracking.run_logging import configure_mlflow

scores, delays = [0.60, 0.50], [0.2, 2.0]  # child 0 is better; child 1 moves its alias last

class SlowAliasClient(MlflowClient):
    def set_registered_model_alias(self, name, alias, version):
        time.sleep(delays[me])
        super().set_registered_model_alias(name, alias, version)

experiment_id = configure_mlflow({uri!r}, "exp")
client = SlowAliasClient()
results = {{}}
for name in ("file-locked", "registry-locked"):
    if name == "registry-locked":
        emonet.tracking.registry._promotion_lock = emonet.tracking.registry._registry_lock
    run_id = client.create_run(experiment_id).info.run_id
    barrier(name + "-register")
    version = client.create_model_version(name, "file:///nowhere/model", run_id=run_id).version
    barrier(name + "-promote")
    results[name] = asdict(promote_model(client, name, version, scores[me], "split-a", run_id, split="test",
                                         confidence=0.0))
print(json.dumps(results))
"""
    runs = run_together(script, 2, tmp_path)
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-3000:] for r in runs]
    better, worse = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    with restored_mlflow_uris():
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for name in ("file-locked", "registry-locked"):
            assert _aliases(client, name)[CHAMPION] == better[name]["version"], (better[name], worse[name])
            # Whoever decided second saw the first one's result.
            assert {better[name]["decision"], worse[name]["decision"]} in ({"promoted"}, {"promoted", "clearly_worse"})
            assert not client.search_registered_models(f"name = '{name}.promotion-lock'")  # released


def test_registry_lock_waits_for_its_holder_and_breaks_a_stale_one(logged_model):
    from emonet.tracking.registry import _registry_lock

    client, name = logged_model["client"], "locked-model"
    client.create_registered_model(
        f"{name}.promotion-lock", tags={"owner": "elsewhere:1", "acquired": repr(time.time())}
    )
    with pytest.raises(TimeoutError, match="held by elsewhere:1"), _registry_lock(client, name, timeout=0.5):
        pass
    client.set_registered_model_tag(f"{name}.promotion-lock", "acquired", repr(time.time() - 2 * 3600))
    with _registry_lock(client, name, timeout=5):  # left by a killed holder: broken
        assert client.get_registered_model(f"{name}.promotion-lock").tags["owner"] != "elsewhere:1"
    assert not client.search_registered_models(f"name = '{name}.promotion-lock'")


@pytest.fixture(scope="module")
def evaluation(checkpoint, split, tmp_path_factory):
    """The tiny checkpoint's evaluation on the split, as the flow's evaluate step makes it."""
    out_dir = tmp_path_factory.mktemp("evaluation")
    return evaluate_checkpoint(
        checkpoint, split["csv"], split["img_dir"], out_dir, device="cpu", progress=False, validation=split["val_csv"]
    )


def test_the_evaluation_carries_what_registration_needs(evaluation, split, checkpoint):
    from emonet.models.checkpoint import load_checkpoint

    assert evaluation.split_id == split["id"]
    assert evaluation.config == load_checkpoint(checkpoint)[1]
    assert 0.0 <= evaluation.metrics["mAP"] <= 1.0


def test_a_retried_registration_reuses_the_runs_version(logged_model, checkpoint, evaluation, split, monkeypatch):
    """The register-model task looks up the run's version before logging a new one."""
    import logging

    import tasks.registration

    client = logged_model["client"]
    name = "retried-registration"
    run_id = client.create_run(client.get_run(logged_model["run_id"]).info.experiment_id).info.run_id
    calls = []

    def counting_log(*args, **kwargs):
        calls.append(args)
        return log_emonet_model(*args, **kwargs)

    monkeypatch.setattr(tasks.registration, "log_emonet_model", counting_log)
    monkeypatch.setattr(tasks.registration, "get_run_logger", lambda: logging.getLogger("test"))
    arguments = {
        "run_id": run_id,
        "checkpoint": checkpoint,
        "normalization_json": None,
        "evaluation": evaluation,
        "registered_model_name": name,
        "test_csv": split["csv"],
        "img_dir": split["img_dir"],
        "val_csv": split["val_csv"],
    }
    first = tasks.registration.register_model.fn(**arguments)
    again = tasks.registration.register_model.fn(**arguments)  # as a task retry after a later failure
    assert len(calls) == 1
    assert first.version == again.version == "1"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert (first.decision, again.decision) == ("first_version", "already_champion")
    assert str(find_run_version(client, name, run_id).version) == "1"
    assert find_run_version(client, name, logged_model["run_id"]) is None
    version = client.get_model_version(name, "1")
    assert (version.tags["variant"], version.tags["backbone"]) == ("body", "resnet18")  # from evaluation.config
    assert version.tags["test_split"] == split["id"]
    # Decided on validation by default; the version carries both splits' mAP.
    assert first.split == "val" and version.tags["val_split"] == split["val_id"]
    assert float(version.tags["val_mAP"]) == pytest.approx(evaluation.validation.metrics["mAP"])
    assert float(version.tags["test_mAP"]) == pytest.approx(evaluation.metrics["mAP"])
    assert "Promotion on the val split" in version.description and "[" in version.description


def test_evaluation_review_and_registration_load_the_checkpoint_once(
    mlflow_store, checkpoint, split, tmp_path, monkeypatch
):
    """The flow's evaluate -> review -> register steps read ``best.pt`` once: the review
    and the registration take the evaluation's predictions and config. (MLflow's check
    of the input example loads the logged model's own copy of the checkpoint, which is
    the model as it will be served, not this file.)"""
    import logging

    import torch

    import tasks.evaluation
    import tasks.registration
    import tasks.review

    loads = []
    real_load = torch.load

    def counting_load(file, *args, **kwargs):
        if Path(file).resolve() == checkpoint.resolve():
            loads.append(file)
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(tasks.registration, "get_run_logger", lambda: logging.getLogger("test"))
    client = MlflowClient()
    run_id = client.create_run(mlflow_store["experiment_id"]).info.run_id
    common = {"run_id": run_id, "checkpoint": checkpoint, "test_csv": split["csv"], "img_dir": split["img_dir"]}

    evaluation = tasks.evaluation.evaluate_model.fn(
        **common, normalization_json=None, out_dir=tmp_path / "evaluation", val_csv=split["val_csv"]
    )
    assert len(loads) == 1 and evaluation.validation is not None, "validation is predicted by the same load"
    index = tasks.review.review_model.fn(**common, evaluation=evaluation, out_dir=tmp_path / "review")
    decision = tasks.registration.register_model.fn(
        **common,
        normalization_json=None,
        evaluation=evaluation,
        registered_model_name="load-once",
        val_csv=split["val_csv"],
    )
    assert len(loads) == 1, f"best.pt was loaded {len(loads)} times"
    assert index.is_file() and decision.version == "1" and decision.decision == "first_version"
    review = json.loads((tmp_path / "review" / "summary.json").read_text())
    assert review["mAP"] == pytest.approx(evaluation.metrics["mAP"])
    # The review shows the evaluation's intervals beside the mAPs.
    assert review["intervals"]["mAP"]["low"] == pytest.approx(evaluation.intervals["mAP"].low)
    assert f"[{evaluation.intervals['mAP'].low:.4f}, " in index.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the evidence rule


def _predictions(y_true: np.ndarray, y_prob: np.ndarray) -> Predictions:
    n = len(y_true)
    return Predictions(
        emotion_prob=np.asarray(y_prob, dtype=np.float32),
        affect_pred=np.zeros((n, 2), dtype=np.float32),
        indices=np.arange(n),
        emotions_true=np.asarray(y_true, dtype=np.float32),
    )


def _labels(n: int = 400, seed: int = 0) -> np.ndarray:
    """Multi-hot labels shaped like EMOTIC's: 26 labels, prevalence 5-40%."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, NUM_EMOTIONS)) < rng.uniform(0.05, 0.4, NUM_EMOTIONS)).astype(np.float32)
    labels[0] = 1.0  # every label has a positive
    return labels


def _recipe(labels: np.ndarray, seed: int, skill: float = 1.0) -> np.ndarray:
    """Probabilities of one recipe trained with ``seed``: the same skill, seed-dependent errors."""
    noise = np.random.default_rng(seed).normal(0.0, 1.5, labels.shape)
    return 1.0 / (1.0 + np.exp(-(skill * (2.0 * labels - 1.0) + noise)))


def _map(labels: np.ndarray, probs: np.ndarray) -> float:
    return mean_average_precision_score(labels, probs)


@pytest.fixture
def rescored(monkeypatch) -> list[tuple]:
    """The arguments of every re-scoring of a champion (``predict_model_on_split``), which still runs."""
    calls = []

    def counting_predict(*args):
        calls.append(args)
        return predict_model_on_split(*args)

    monkeypatch.setattr(emonet.tracking.registry, "predict_model_on_split", counting_predict)
    return calls


@pytest.fixture
def no_rescoring(monkeypatch):
    """The champion's predictions must come from its run: a re-scoring fails the test."""

    def fail(*args):
        raise AssertionError(f"the champion was re-scored: {args}")

    monkeypatch.setattr(emonet.tracking.registry, "predict_model_on_split", fail)


def test_seed_noise_does_not_flip_the_champion(registry, no_rescoring):
    """Two seeds of one recipe: the better-looking one is promoted by the point rule
    (confidence 0) but not by the paired bootstrap, whose interval holds 0."""
    client, name, new_version = registry
    labels = _labels()
    seeds = sorted((0, 1), key=lambda seed: _map(labels, _recipe(labels, seed)))  # worse seed first
    low_seed, high_seed = (_predictions(labels, _recipe(labels, seed)) for seed in seeds)
    assert _map(labels, high_seed.emotion_prob) > _map(labels, low_seed.emotion_prob)

    v1, r1 = new_version()
    first = promote_model(client, name, v1, low_seed, "sha256:val", r1)
    assert (first.decision, first.split) == ("first_version", "val")
    assert {a.path for a in client.list_artifacts(r1, "promotion")} == {"promotion/predictions-val.npz"}

    v2, r2 = new_version()
    result = promote_model(client, name, v2, high_seed, "sha256:val", r2)
    assert (result.alias, result.decision) == (CHALLENGER, "not_significantly_better")
    assert result.difference.estimate == pytest.approx(
        _map(labels, high_seed.emotion_prob) - _map(labels, low_seed.emotion_prob), abs=1e-6
    )
    assert result.difference.low <= 0.0 <= result.difference.high and result.difference.confidence == 0.95
    assert result.previous_map == pytest.approx(_map(labels, low_seed.emotion_prob), abs=1e-6)
    assert _aliases(client, name) == {CHAMPION: v1, CHALLENGER: v2}
    assert f"[{result.difference.low:+.4f}, {result.difference.high:+.4f}]" in result.reason
    run = client.get_run(r2).data
    assert run.tags["promotion_split"] == "val" and run.tags["promotion_split_id"] == "sha256:val"
    assert run.tags["promotion_decision"] == "not_significantly_better"
    assert run.metrics["promotion_difference_low"] == pytest.approx(result.difference.low)
    assert run.metrics["promotion_difference_high"] == pytest.approx(result.difference.high)
    assert run.metrics["candidate_val_mAP"] == pytest.approx(result.new_map)

    # confidence 0 restores the point rule, under which the same seed would have flipped the champion.
    v3, r3 = new_version()
    point = promote_model(client, name, v3, high_seed, "sha256:val", r3, confidence=0.0)
    assert (point.alias, point.decision) == (CHAMPION, "promoted")
    assert point.difference.low == point.difference.high == pytest.approx(result.difference.estimate)


def test_a_clearly_better_model_is_promoted_and_a_clearly_worse_one_is_not(registry, no_rescoring):
    client, name, new_version = registry
    labels = _labels()
    guess = _predictions(labels, np.random.default_rng(5).random(labels.shape))  # no skill
    skilled = _predictions(labels, _recipe(labels, seed=6, skill=2.0))

    v1, r1 = new_version()
    promote_model(client, name, v1, guess, "sha256:val", r1)
    v2, r2 = new_version()
    better = promote_model(client, name, v2, skilled, "sha256:val", r2, min_improvement=0.05)
    assert (better.alias, better.decision, better.previous_version) == (CHAMPION, "promoted", v1)
    assert better.difference.low > 0.05 and "lower end exceeds min_improvement 0.05" in better.reason

    v3, r3 = new_version()  # the guess again, now against the skilled champion
    worse = promote_model(client, name, v3, guess, "sha256:val", r3)
    assert (worse.alias, worse.decision) == (CHALLENGER, "clearly_worse")
    assert worse.difference.high < 0.0 and "upper end is below 0" in worse.reason
    assert _aliases(client, name) == {CHAMPION: v2, CHALLENGER: v3}


def test_the_same_predictions_give_a_zero_interval_and_keep_the_champion(registry, no_rescoring):
    """Hand-checked: a model compared with itself differs by exactly 0, interval [0, 0]."""
    client, name, new_version = registry
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]] * 5, dtype=np.float32)
    probs = np.array([[0.9, 0.2], [0.3, 0.8], [0.7, 0.6], [0.1, 0.3]] * 5)
    v1, r1 = new_version()
    promote_model(client, name, v1, _predictions(labels, probs), "sha256:val", r1)
    v2, r2 = new_version()
    tie = promote_model(client, name, v2, _predictions(labels, probs), "sha256:val", r2, n_resamples=50)
    assert (tie.decision, tie.new_map, tie.previous_map) == ("not_significantly_better", 1.0, 1.0)
    assert (tie.difference.estimate, tie.difference.low, tie.difference.high) == (0.0, 0.0, 0.0)
    assert "+0.0000 [+0.0000, +0.0000] (95% paired bootstrap, 50 resamples)" in tie.reason


def test_a_point_score_cannot_be_compared_with_confidence(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "sha256:val", r1)  # a first version needs no comparison
    v2, r2 = new_version()
    with pytest.raises(ValueError, match="needs the candidate's predictions"):
        promote_model(client, name, v2, 0.40, "sha256:val", r2)
    assert _aliases(client, name) == {CHAMPION: v1}


def test_a_champion_is_rescored_for_its_predictions_once(registry, split, rescored):
    """A champion with no kept predictions on the candidate's validation split is
    re-scored from the registry; its predictions are kept in its run for the next one."""
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.5, "sha256:other", r1)
    same = predict_model_on_split(f"models:/{name}/{v1}", split["val_csv"], split["img_dir"])  # the same model

    v2, r2 = new_version()
    arguments = {"split_csv": split["val_csv"], "img_dir": split["img_dir"], "n_resamples": 100}
    result = promote_model(client, name, v2, same, split["val_id"], r2, **arguments)
    assert len(rescored) == 1 and result.decision == "not_significantly_better"
    assert result.difference.estimate == pytest.approx(0.0, abs=1e-6)
    kept = {a.path for a in client.list_artifacts(r1, "promotion")}
    assert f"promotion/predictions-{split['val_id'][:16]}.npz" in kept
    assert float(client.get_model_version(name, v1).tags[split_score_tag(split["val_id"])]) == pytest.approx(
        result.previous_map
    )
    v3, r3 = new_version()
    promote_model(client, name, v3, same, split["val_id"], r3, **arguments)
    assert len(rescored) == 1, "the champion's kept predictions were used"


# --------------------------------------------------------------------------- a champion that cannot be scored

ECHO_MODEL = """
import mlflow


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


mlflow.models.set_model(Echo())
"""
# A model file that breaks on load, with a message of several lines, longer than a tag keeps.
BROKEN_MODEL = "raise RuntimeError('the model file breaks on load\\n' + 'x' * 2000)\n"


def _champion_model(folder: Path) -> Path:
    """A pyfunc saved "from code" in ``folder / "model"``, whose model file loads."""
    code = folder / "echo_model.py"
    code.write_text(ECHO_MODEL)
    mlflow.pyfunc.save_model(folder / "model", python_model=str(code))
    return folder / "model"


def _break(model_dir: Path, breakage: str) -> None:
    if breakage == "artifacts_deleted":
        shutil.rmtree(model_dir)
    else:  # the model file raises (the logged copy, and the original the MLmodel also names)
        for code in (model_dir / "echo_model.py", model_dir.parent / "echo_model.py"):
            code.write_text(BROKEN_MODEL)


@pytest.mark.parametrize("breakage", ["model_file_raises", "artifacts_deleted"])
def test_a_champion_that_cannot_be_scored_keeps_its_alias(mlflow_store, tmp_path, breakage):
    """Whatever stops the champion from loading, it keeps ``champion``: the new version is
    challenger (``champion_unloadable``), however much better it looks, and the run, the
    version and ``explain()`` say why and how to promote it by hand."""
    uri = mlflow_store["uri"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = f"unloadable-{breakage}"
    client.create_registered_model(name)
    model_dir = _champion_model(tmp_path)
    labels = _labels(n=80)

    r1 = client.create_run(mlflow_store["experiment_id"]).info.run_id
    v1 = str(client.create_model_version(name, model_dir.as_uri(), run_id=r1).version)
    first = promote_model(client, name, v1, _predictions(labels, _recipe(labels, seed=0)), "sha256:old", r1)
    assert (first.alias, first.decision, first.error) == (CHAMPION, "first_version", None)
    _break(model_dir, breakage)

    r2 = client.create_run(mlflow_store["experiment_id"]).info.run_id
    v2 = str(client.create_model_version(name, model_dir.as_uri(), run_id=r2).version)
    skilled = _predictions(labels, _recipe(labels, seed=1, skill=3.0))
    result = promote_model(
        client, name, v2, skilled, "sha256:val", r2, split_csv=tmp_path / "val.csv", img_dir=tmp_path
    )
    assert (result.alias, result.decision, result.previous_version) == (CHALLENGER, "champion_unloadable", v1)
    assert result.previous_map is None and result.difference is None
    assert _aliases(client, name) == {CHAMPION: v1, CHALLENGER: v2}
    error = result.error
    assert error and "\n" not in error and len(error) <= emonet.tracking.registry.MAX_ERROR_CHARS
    if breakage == "model_file_raises":
        assert "the model file breaks on load" in error and error.endswith("...")
    assert f"champion version {v1} cannot be loaded or scored" in result.reason and error in result.reason

    run = client.get_run(r2).data
    assert run.tags["promotion_decision"] == "champion_unloadable" and run.tags["promotion_error"] == error
    assert run.tags["promotion_reason"] == result.reason and run.tags["promotion_alias"] == CHALLENGER
    assert run.tags["champion_previous_version"] == v1 and "champion_previous_val_mAP" not in run.metrics
    version_tags = client.get_model_version(name, v2).tags
    assert version_tags["promotion_decision"] == "champion_unloadable" and version_tags["promotion_error"] == error
    assert "promotion_error" not in client.get_model_version(name, v1).tags

    explanation = result.explain()
    command = f"MlflowClient().set_registered_model_alias({name!r}, 'champion', {v2!r})"
    assert f"Error: {error}" in explanation and command in explanation
    assert f"champion version {v1} of {name}" in explanation and "promote it by hand" in explanation
    # The command it gives does promote the version.
    one_liner = next(line for line in explanation.splitlines() if "python -c" in line)
    exec(one_liner.split('python -c "', 1)[1].rstrip('"'))
    assert _aliases(client, name)[CHAMPION] == v2


def test_explain_puts_each_decision_in_words():
    common = {"new_map": 0.4, "previous_map": 0.3, "split": "val", "split_id": "sha256:val", "name": "emonet"}
    worse = PromotionDecision("3", CHALLENGER, "clearly_worse", "the reason", previous_version="1", **common)
    assert worse.explain() == (
        "Version 3 stays challenger; champion version 1 stays champion (clearly_worse), on the val split: the reason."
    )
    better = PromotionDecision("3", CHAMPION, "promoted", "the reason", previous_version="1", **common)
    assert better.explain().startswith("Version 3 replaces champion version 1 as champion (promoted)")
    same = PromotionDecision("3", CHAMPION, "already_champion", "r", previous_version="3", **common)
    assert same.explain() == "Version 3 already is the champion of emonet: nothing changed."
    unnamed = PromotionDecision(
        "3", CHALLENGER, "champion_unloadable", "r", previous_version="1", **{**common, "name": None}, error="E: x"
    )
    assert "Error: E: x" in unnamed.explain()
    assert "set_registered_model_alias('<registered model>', 'champion', '3')" in unnamed.explain()


# --------------------------------------------------------------------------- skipping a retraining


def test_code_version_is_the_commit_or_unknown(tmp_path):
    import re

    assert code_version(tmp_path) == "unknown"  # not a git checkout
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", code_version())


def test_retraining_is_unneeded_only_for_the_champions_data_config_and_clean_code(registry):
    client, name, new_version = registry
    splits = {"train": "sha256:t", "val": "sha256:v", "test": "sha256:s"}
    normalization = {"low": [1.0, 1.0], "high": [10.0, 10.0]}
    config = {"train": {"seed": 0, "epochs": 5}}
    tags = recipe_tags(splits, normalization, config, "a" * 40)
    assert retraining_unneeded(client, name, tags) is None  # no champion yet
    assert retraining_unneeded(client, "no-such-model", tags) is None

    v1, r1 = new_version()
    for key, value in tags.items():
        client.set_tag(r1, key, value)
    promote_model(client, name, v1, 0.3, "sha256:v", r1)
    reason = retraining_unneeded(client, name, tags)
    assert reason is not None and f"champion version {v1}" in reason and r1 in reason

    changed = [
        recipe_tags({**splits, "val": "sha256:other"}, normalization, config, "a" * 40),
        recipe_tags(splits, {"low": [2.0, 1.0], "high": [10.0, 10.0]}, config, "a" * 40),
        recipe_tags(splits, normalization, {"train": {"seed": 1, "epochs": 5}}, "a" * 40),
        recipe_tags(splits, normalization, config, "b" * 40),
    ]
    assert all(retraining_unneeded(client, name, other) is None for other in changed)
    for code in ("unknown", "a" * 40 + "+dirty"):  # code that no commit names
        unnamed = recipe_tags(splits, normalization, config, code)
        for key, value in unnamed.items():
            client.set_tag(r1, key, value)
        assert retraining_unneeded(client, name, unnamed) is None
