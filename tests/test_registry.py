"""The model registry: champion/challenger promotion on a temporary SQLite store, re-scoring
a champion on a new split, concurrent registrations and their locks, and the register task
(a retry reuses the run's version; the checkpoint is loaded once from evaluation to registration)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import restored_mlflow_uris, run_together
from emonet.evaluation import split_fingerprint
from emonet.registry import (
    CHALLENGER,
    CHAMPION,
    PromotionDecision,
    find_run_version,
    promote_model,
    score_model_on_split,
    split_score_tag,
)
from emonet.schema import annotations_path, arrays_dir
from emonet.tracking import configure_mlflow, log_emonet_model


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
    result = promote_model(client, name, version, 0.31, "split-a", run_id)
    assert result == PromotionDecision(
        version=version, alias=CHAMPION, decision="first_version", reason=result.reason,
        new_map=0.31, previous_map=None, previous_version=None,
    )
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
    promote_model(client, name, v1, 0.30, "split-a", r1)

    v2, r2 = new_version()
    worse = promote_model(client, name, v2, 0.28, "split-a", r2)
    assert (worse.alias, worse.decision, worse.previous_map, worse.previous_version) == (
        CHALLENGER, "not_better", 0.30, v1)
    assert _aliases(client, name) == {CHAMPION: v1, CHALLENGER: v2}
    run = client.get_run(r2)
    assert run.data.metrics["champion_previous_test_mAP"] == 0.30 and run.data.metrics["candidate_test_mAP"] == 0.28
    assert run.data.tags["promotion_decision"] == "not_better" and run.data.tags["champion_previous_version"] == v1

    v3, r3 = new_version()
    tie = promote_model(client, name, v3, 0.30, "split-a", r3)
    assert tie.alias == CHALLENGER and _aliases(client, name)[CHAMPION] == v1  # a tie does not win

    v4, r4 = new_version()
    better = promote_model(client, name, v4, 0.35, "split-a", r4)
    assert (better.alias, better.decision, better.previous_map) == (CHAMPION, "promoted", 0.30)
    assert _aliases(client, name)[CHAMPION] == v4
    assert client.get_run(r4).data.tags["promotion_alias"] == CHAMPION

    again = promote_model(client, name, int(v4), 0.35, "split-a", r4)  # re-run of the same step
    assert (again.alias, again.decision) == (CHAMPION, "already_champion")
    assert _aliases(client, name) == {CHAMPION: v4, CHALLENGER: v3}


@pytest.fixture(scope="module")
def split(tiny_checkpoint):
    """A real labelled test split (the tiny archive's) and its fingerprint."""
    root = tiny_checkpoint["root"]
    test_csv = annotations_path(root, "test")
    return {"csv": test_csv, "img_dir": arrays_dir(root), "id": split_fingerprint(pd.read_csv(test_csv))}


def test_score_model_on_split_matches_the_evaluation(logged_model, checkpoint, split, tmp_path):
    from emonet.evaluation import evaluate_checkpoint

    score = score_model_on_split(logged_model["version"].source, split["csv"], split["img_dir"])
    report = evaluate_checkpoint(checkpoint, split["csv"], split["img_dir"], tmp_path, device="cpu", progress=False)
    assert score == pytest.approx(report.metrics["mAP"], abs=1e-6)


def test_champion_of_another_split_is_rescored_on_the_candidates(registry, split, monkeypatch):
    """A new test split no longer freezes the champion: it is re-scored on the candidate's split."""
    import emonet.registry

    client, name, new_version = registry
    rescored = []

    def counting_score(*args):
        rescored.append(args)
        return score_model_on_split(*args)

    monkeypatch.setattr(emonet.registry, "score_model_on_split", counting_score)
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.99, "sha256:aaa", r1)  # a high score, but on another split
    truth = score_model_on_split(f"models:/{name}/{v1}", split["csv"], split["img_dir"])

    v2, r2 = new_version()
    better = promote_model(
        client, name, v2, truth + 0.01, split["id"], r2, test_csv=split["csv"], img_dir=split["img_dir"]
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
        client, name, v3, truth, split["id"], r3, test_csv=split["csv"], img_dir=split["img_dir"]
    )
    assert (worse.alias, worse.decision, worse.previous_map) == (CHALLENGER, "not_better", truth + 0.01)
    assert len(rescored) == 1, "the champion was scored on this split: its own score is used"


def test_rescoring_needs_the_split(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "sha256:aaa", r1)
    v2, r2 = new_version()
    with pytest.raises(ValueError, match="never scored on test split sha256:bbb: pass test_csv"):
        promote_model(client, name, v2, 0.40, "sha256:bbb", r2)
    assert _aliases(client, name) == {CHAMPION: v1}


def test_a_champion_that_cannot_be_loaded_is_replaced(registry, logged_model, split, tmp_path):
    client, name, new_version = registry
    copy = tmp_path / "model"
    shutil.copytree(mlflow.artifacts.download_artifacts(logged_model["version"].source), copy)
    run_id = client.create_run(client.get_run(logged_model["run_id"]).info.experiment_id).info.run_id
    v1 = str(client.create_model_version(name, copy.as_uri(), run_id=run_id).version)
    promote_model(client, name, v1, 0.30, "sha256:aaa", run_id)
    shutil.rmtree(copy)  # its artifacts are gone

    v2, r2 = new_version()
    result = promote_model(client, name, v2, 0.10, split["id"], r2, test_csv=split["csv"], img_dir=split["img_dir"])
    assert (result.alias, result.decision, result.previous_version) == (CHAMPION, "champion_unavailable", v1)
    assert f"champion version {v1} cannot be scored" in result.reason and result.previous_map is None
    assert _aliases(client, name) == {CHAMPION: v2}
    tags = client.get_run(r2).data.tags
    assert tags["promotion_decision"] == "champion_unavailable" and tags["promotion_reason"] == result.reason


def test_min_improvement(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "split-a", r1, min_improvement=0.05)
    v2, r2 = new_version()
    small = promote_model(client, name, v2, 0.34, "split-a", r2, min_improvement=0.05)
    assert (small.alias, small.decision) == (CHALLENGER, "not_better")
    assert "min_improvement 0.05" in small.reason
    v3, r3 = new_version()
    large = promote_model(client, name, v3, 0.36, "split-a", r3, min_improvement=0.05)
    assert (large.alias, large.decision) == (CHAMPION, "promoted")
    with pytest.raises(ValueError, match="min_improvement"):
        promote_model(client, name, v3, 0.36, "split-a", r3, min_improvement=-0.01)


def test_champion_score_falls_back_to_its_run_metric(registry):
    client, name, new_version = registry
    v1, r1 = new_version()
    promote_model(client, name, v1, 0.30, "split-a", r1)
    client.delete_model_version_tag(name, v1, "test_mAP")  # e.g. a champion registered by hand
    client.log_metric(r1, "test_mAP", 0.40)
    v2, r2 = new_version()
    result = promote_model(client, name, v2, 0.35, "split-a", r2)
    assert (result.alias, result.previous_map) == (CHALLENGER, 0.40)


def test_promote_model_validates_inputs(registry, tmp_path):
    client, name, new_version = registry
    version, run_id = new_version()
    with pytest.raises(ValueError, match="finite"):
        promote_model(client, name, version, float("nan"), "split-a", run_id)
    with pytest.raises(ValueError, match="test_split_id"):
        promote_model(client, name, version, 0.3, "", run_id)


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
            promote_model(client, name, version, 0.30, "split-a", run_id)
    script = f"""
import json
from dataclasses import asdict
import emonet.registry
from mlflow import MlflowClient
from emonet.registry import promote_model
from emonet.tracking import configure_mlflow

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
        emonet.registry._promotion_lock = emonet.registry._registry_lock
    run_id = client.create_run(experiment_id).info.run_id
    barrier(name + "-register")
    version = client.create_model_version(name, "file:///nowhere/model", run_id=run_id).version
    barrier(name + "-promote")
    results[name] = asdict(promote_model(client, name, version, scores[me], "split-a", run_id))
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
            assert {better[name]["decision"], worse[name]["decision"]} in ({"promoted"}, {"promoted", "not_better"})
            assert not client.search_registered_models(f"name = '{name}.promotion-lock'")  # released


def test_registry_lock_waits_for_its_holder_and_breaks_a_stale_one(logged_model):
    from emonet.registry import _registry_lock

    client, name = logged_model["client"], "locked-model"
    client.create_registered_model(f"{name}.promotion-lock", tags={"owner": "elsewhere:1", "acquired": repr(time.time())})
    with pytest.raises(TimeoutError, match="held by elsewhere:1"), _registry_lock(client, name, timeout=0.5):
        pass
    client.set_registered_model_tag(f"{name}.promotion-lock", "acquired", repr(time.time() - 2 * 3600))
    with _registry_lock(client, name, timeout=5):  # left by a killed holder: broken
        assert client.get_registered_model(f"{name}.promotion-lock").tags["owner"] != "elsewhere:1"
    assert not client.search_registered_models(f"name = '{name}.promotion-lock'")


@pytest.fixture(scope="module")
def evaluation(checkpoint, split, tmp_path_factory):
    """The tiny checkpoint's evaluation on the split, as the flow's evaluate step makes it."""
    from emonet.evaluation import evaluate_checkpoint

    out_dir = tmp_path_factory.mktemp("evaluation")
    return evaluate_checkpoint(checkpoint, split["csv"], split["img_dir"], out_dir, device="cpu", progress=False)


def test_the_evaluation_carries_what_registration_needs(evaluation, split, checkpoint):
    from emonet.checkpoint import load_checkpoint

    assert evaluation.split_id == split["id"]
    assert evaluation.config == load_checkpoint(checkpoint)[1]
    assert 0.0 <= evaluation.metrics["mAP"] <= 1.0


def test_a_retried_registration_reuses_the_runs_version(logged_model, checkpoint, evaluation, split, monkeypatch):
    """The register-model task looks up the run's version before logging a new one."""
    import logging

    import tasks.model

    client = logged_model["client"]
    name = "retried-registration"
    run_id = client.create_run(client.get_run(logged_model["run_id"]).info.experiment_id).info.run_id
    calls = []

    def counting_log(*args, **kwargs):
        calls.append(args)
        return log_emonet_model(*args, **kwargs)

    monkeypatch.setattr(tasks.model, "log_emonet_model", counting_log)
    monkeypatch.setattr(tasks.model, "get_run_logger", lambda: logging.getLogger("test"))
    arguments = {
        "run_id": run_id, "checkpoint": checkpoint, "normalization_json": None, "evaluation": evaluation,
        "registered_model_name": name, "test_csv": split["csv"], "img_dir": split["img_dir"],
    }
    first = tasks.model.register_model.fn(**arguments)
    again = tasks.model.register_model.fn(**arguments)  # as a task retry after a later failure
    assert len(calls) == 1
    assert first.version == again.version == "1"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert (first.decision, again.decision) == ("first_version", "already_champion")
    assert str(find_run_version(client, name, run_id).version) == "1"
    assert find_run_version(client, name, logged_model["run_id"]) is None
    version = client.get_model_version(name, "1")
    assert (version.tags["variant"], version.tags["backbone"]) == ("body", "resnet18")  # from evaluation.config
    assert version.tags["test_split"] == split["id"]


def test_evaluation_review_and_registration_load_the_checkpoint_once(
    mlflow_store, checkpoint, split, tmp_path, monkeypatch
):
    """The flow's evaluate -> review -> register steps read ``best.pt`` once: the review
    and the registration take the evaluation's predictions and config. (MLflow's check
    of the input example loads the logged model's own copy of the checkpoint, which is
    the model as it will be served, not this file.)"""
    import logging

    import torch

    import tasks.model

    loads = []
    real_load = torch.load

    def counting_load(file, *args, **kwargs):
        if Path(file).resolve() == checkpoint.resolve():
            loads.append(file)
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(tasks.model, "get_run_logger", lambda: logging.getLogger("test"))
    client = MlflowClient()
    run_id = client.create_run(mlflow_store["experiment_id"]).info.run_id
    common = {"run_id": run_id, "checkpoint": checkpoint, "test_csv": split["csv"], "img_dir": split["img_dir"]}

    evaluation = tasks.model.evaluate_model.fn(**common, normalization_json=None, out_dir=tmp_path / "evaluation")
    assert len(loads) == 1
    index = tasks.model.review_model.fn(**common, evaluation=evaluation, out_dir=tmp_path / "review")
    decision = tasks.model.register_model.fn(
        **common, normalization_json=None, evaluation=evaluation, registered_model_name="load-once"
    )
    assert len(loads) == 1, f"best.pt was loaded {len(loads)} times"
    assert index.is_file() and decision.version == "1" and decision.decision == "first_version"
    assert json.loads((tmp_path / "review" / "summary.json").read_text())["mAP"] == pytest.approx(
        evaluation.metrics["mAP"]
    )

