"""The Prefect flows end to end: on tiny demo data, against a temporary Prefect server,
result store and MLflow SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from emonet.config import EmoNetConfig
from emonet.data.demo import make_demo_data
from emonet.schema import EMOTIONS, annotations_path, arrays_dir
from emonet.tracking.registry import PromotionDecision
from tasks.summary import RunSummary

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# The smallest run that still exercises every step: 32 px crops, one epoch. The flow reads
# it from a YAML file, as a deployment does.
TINY_CONFIG = {
    "model": {"backbone": "resnet18"},
    "train": {"image_size": 32, "context_size": 32, "epochs": 1, "batch_size": 8, "num_workers": 0},
}
# A review of 4 crops with one page of its own: the figures cost more than the training.
TINY_RUN = {"visibility_workers": 1, "visibility_shard_size": 16, "review_samples": 4, "review_detailed_samples": 1}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo") / "archive", seed=3, n_train=32, n_val=16, n_test=16, size=48)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


def _run_pipeline(prefect_env, demo_root, config, **overrides):
    from flows.training_pipeline import emonet_training_pipeline

    params = {
        "config": config,
        "data_root": demo_root,
        "out_dir": prefect_env["base"] / "outputs",
        "experiment_name": "flow-tests",
        "registered_model_name": "emonet-test",
        **TINY_RUN,
        **overrides,
    }
    return emonet_training_pipeline(**params)


def _artifacts(flow_run_id: str) -> dict[str, object]:
    """The flow run's artifacts by key, read through Prefect's API as the UI does."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


class CallCounter:
    """Wraps a function and counts calls; ``fail_first`` raises on the first calls."""

    def __init__(self, func, fail_first: int = 0):
        self.func, self.calls, self.fail_first = func, 0, fail_first

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.fail_first:
            raise OSError("injected transient failure")
        return self.func(*args, **kwargs)


def test_pipeline_end_to_end_with_retry_cache_and_registry(prefect_env, demo_root, tiny_yaml, monkeypatch):
    import tasks.data
    import tasks.registration

    score = CallCounter(tasks.data.score_crops)
    normalize = CallCounter(tasks.data.normalize_frames)
    # The model registration fails once, as a tracking server might; the task retries.
    register = CallCounter(tasks.registration.log_emonet_model, fail_first=1)
    monkeypatch.setattr(tasks.data, "score_crops", score)
    monkeypatch.setattr(tasks.data, "normalize_frames", normalize)
    monkeypatch.setattr(tasks.registration, "log_emonet_model", register)

    first = _run_pipeline(prefect_env, demo_root, tiny_yaml)
    assert isinstance(first, RunSummary) and not first.skipped
    n_shards = sum(-(-n // TINY_RUN["visibility_shard_size"]) for n in (32, 16, 16))
    assert score.calls == n_shards and normalize.calls == 1
    assert register.calls == 2, "the failed registration was retried"
    assert first.version == "1" and first.alias == "champion"
    assert 0.0 <= first.test_mAP <= 1.0

    client = MlflowClient()
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"]
    assert run.data.params["backbone"] == "resnet18" and run.data.params["epochs"] == "1"
    assert run.data.params["dropout"] == "0.5", "fields the YAML leaves out take the library defaults"
    assert run.data.params["out_dir"] == str(prefect_env["base"] / "outputs") and "output_dir" not in run.data.params
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"emotic-train", "emotic-val", "emotic-test"}
    assert run.data.metrics["test_mAP"] == pytest.approx(first.test_mAP)
    # Both APs, the bootstrap intervals, and what the run trained from.
    assert run.data.metrics["test_mAP_voc11"] == pytest.approx(first.test_mAP_voc11)
    assert run.data.metrics["test_mAP_ci_low"] <= first.test_mAP <= run.data.metrics["test_mAP_ci_high"]
    assert (run.data.metrics["test_mAP_ci_low"], run.data.metrics["test_mAP_ci_high"]) == pytest.approx(
        first.test_mAP_ci
    )
    assert {"test_mAP_voc11_ci_low", "test_mae_valence_1_10_ci_high"} <= set(run.data.metrics)
    assert run.data.tags["emonet.training_skipped"] == "false" and run.data.tags["emonet.code_version"]
    assert run.data.tags["promotion_split"] == "val" and run.data.tags["promotion_decision"] == "first_version"
    assert run.data.metrics["candidate_val_mAP"] == pytest.approx(first.val_mAP)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mAP")] == [1]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    for name in (
        "true_vs_predicted.png",
        "cooccurrence_true.png",
        "per_emotion_metrics.png",
        "affect_scatter.png",
        "benchmark.md",
        "benchmark.csv",
    ):
        assert f"evaluation/{name}" in logged
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/best.pt"}
    review = {a.path for a in client.list_artifacts(run.info.run_id, "review")}
    assert {"review/grid.png", "review/index.html"} <= review
    # review_detailed_samples=1: one page of its own, for the worst prediction
    assert len(client.list_artifacts(run.info.run_id, "review/samples")) == 1
    assert "review/per_emotion.csv" not in review, "the review links the evaluation's report"
    champion = client.get_model_version_by_alias("emonet-test", "champion")
    assert str(champion.version) == "1"
    assert f"test mAP {first.test_mAP:.4f}" in champion.description and "first_version" in champion.description

    artifacts = _artifacts(run.data.tags["prefect.flow_run_id"])
    summary = artifacts["emonet-training-summary"].data
    assert f"| mAP | {first.test_mAP:.4f} |" in summary
    assert f"| mAP_voc11 | {first.test_mAP_voc11:.4f} |" in summary
    assert "## Benchmark (test split)" in summary and "11-point AP (%)" in summary
    assert f"| this run (v1) | {first.val_mAP:.4f} | {first.test_mAP:.4f} [" in summary
    assert "on the **val** split" in summary
    assert "| Peace |" in summary and "| Suffering |" in summary
    assert "version **1**, alias **champion**" in summary and first.mlflow_run_id in summary
    if callable(getattr(first.registration, "explain", None)):  # the registry's own explanation, where it has one
        assert first.registration.explain().strip().splitlines()[0] in summary
    else:
        assert first.registration.reason in summary
    assert artifacts["emonet-training-progress"].data == pytest.approx(100.0)

    # One changed crop array re-runs its shard only, and normalization when the scores change.
    from skimage.data import astronaut

    crop_csv = pd.read_csv(annotations_path(demo_root, "test"))
    np.save(arrays_dir(demo_root) / crop_csv.loc[0, "Crop_name"], np.ascontiguousarray(astronaut()[:360, 90:450]))
    _run_pipeline(prefect_env, demo_root, TINY_CONFIG)
    assert score.calls == n_shards + 1
    assert normalize.calls == 2


def test_unchanged_data_skips_training_and_force_retrain_retrains(prefect_env, demo_root, tiny_yaml, monkeypatch):
    """A second run on the champion's data, config and code skips training and says so in
    the log, the summary artifact and the MLflow run; ``force_retrain`` trains anyway."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    import tasks.retraining
    import tasks.training

    # A clean commit: a checkout with uncommitted changes never skips (its commit does not say what ran).
    monkeypatch.setattr(tasks.retraining, "code_version", lambda: "0123456789abcdef0123456789abcdef01234567")
    train = CallCounter(tasks.training.train_from_csvs)
    monkeypatch.setattr(tasks.training, "train_from_csvs", train)
    run = {"registered_model_name": "emonet-skip", "experiment_name": "flow-skip"}
    client = MlflowClient()

    first = _run_pipeline(prefect_env, demo_root, tiny_yaml, **run)
    assert train.calls == 1 and not first.skipped and first.alias == "champion"

    # The same recipe as a mapping, and parameters as a deployment passes them: by name, from
    # YAML, validated by the flow; the output folder under its deprecated name `output_dir`.
    from flows.training_pipeline import emonet_training_pipeline

    alias_dir = prefect_env["base"] / "outputs-alias"
    deployment = {
        "config": TINY_CONFIG,
        "data_root": str(demo_root),
        "output_dir": str(alias_dir),
        **TINY_RUN,
        **run,
    }
    with pytest.warns(FutureWarning, match="output_dir is deprecated: pass out_dir"):
        second = emonet_training_pipeline(**emonet_training_pipeline.validate_parameters(deployment))
    assert train.calls == 1, "training was skipped"
    assert second.out_dir == alias_dir.resolve() and (alias_dir / "normalized" / "normalization.json").is_file()
    assert second.skipped and "champion version 1 of 'emonet-skip'" in second.skip_reason
    mlflow_run = client.get_run(second.mlflow_run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["emonet.training_skipped"] == "true"
    assert mlflow_run.data.tags["emonet.skip_reason"] == second.skip_reason
    assert mlflow_run.data.params["out_dir"] == str(alias_dir) and "output_dir" not in mlflow_run.data.params
    assert [str(v.version) for v in client.search_model_versions("name='emonet-skip'")] == ["1"]
    flow_run_id = mlflow_run.data.tags["prefect.flow_run_id"]
    summary = _artifacts(flow_run_id)["emonet-training-summary"].data
    assert "Training skipped" in summary and second.skip_reason in summary
    APILogHandler().flush()  # the flow run's logs reach the API in the background
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(flow_run_id).state.is_completed()
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    assert any("skipping training" in log.message for log in logs)
    assert any("output_dir is deprecated" in log.message for log in logs), "the deployment's log says so too"
    with pytest.raises(TypeError, match="both out_dir=.* and its deprecated alias output_dir="):
        _run_pipeline(prefect_env, demo_root, TINY_CONFIG, output_dir=alias_dir, **run)

    # force_retrain trains the champion's recipe anyway. The seed covers initialization,
    # data order and augmentation: the same data and seed (from a mapping this time, not
    # the YAML) give the same test mAP, which is no improvement.
    third = _run_pipeline(prefect_env, demo_root, TINY_CONFIG, force_retrain=True, **run)
    assert train.calls == 2 and not third.skipped and third.version == "2"
    assert client.get_run(third.mlflow_run_id).data.tags["emonet.training_skipped"] == "false"
    assert third.test_mAP == first.test_mAP
    assert third.alias == "challenger" and third.decision == "not_significantly_better"
    third_summary = _artifacts(client.get_run(third.mlflow_run_id).data.tags["prefect.flow_run_id"])[
        "emonet-training-summary"
    ].data
    assert "| champion before (v1) |" in third_summary and "+0.0000 [+0.0000, +0.0000]" in third_summary
    assert str(client.get_model_version_by_alias("emonet-skip", "champion").version) == "1"


def test_registered_model_loads_by_alias_in_a_fresh_process(prefect_env, demo_root, tmp_path):
    """Runs after the end-to-end test in this module (which registered the champion)."""
    client = MlflowClient(tracking_uri=prefect_env["tracking_uri"])
    if not client.search_model_versions("name='emonet-test'"):
        _run_pipeline(prefect_env, demo_root, TINY_CONFIG)
    crop = arrays_dir(demo_root) / "crop_arr_test_1.npy"
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({prefect_env['tracking_uri']!r})\n"
        "model = mlflow.pyfunc.load_model('models:/emonet-test@champion')\n"
        f"out = model.predict(pd.DataFrame({{'image_path': [{str(crop)!r}]}}))\n"
        "print(json.dumps({'columns': list(out.columns), 'rows': len(out)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["rows"] == 1
    expected = [f"prob_{e}" for e in EMOTIONS] + ["emotions", "valence", "arousal", "valence_1_10", "arousal_1_10"]
    assert set(expected) <= set(answer["columns"])


def test_batch_predict_flow_scores_every_row_with_the_champion(prefect_env, demo_root, tmp_path):
    from flows.batch_predict import emonet_batch_predict

    client = MlflowClient(tracking_uri=prefect_env["tracking_uri"])
    if not client.search_model_versions("name='emonet-test'"):
        _run_pipeline(prefect_env, demo_root, TINY_CONFIG)
    input_csv = annotations_path(demo_root, "test")
    out_csv = tmp_path / "predictions.csv"
    emonet_batch_predict(
        input_csv, out_csv, img_dir=arrays_dir(demo_root), model_uri="models:/emonet-test@champion", batch_size=5
    )
    predictions = pd.read_csv(out_csv)
    assert len(predictions) == len(pd.read_csv(input_csv))
    assert predictions["Crop_name"].tolist() == pd.read_csv(input_csv)["Crop_name"].tolist()
    assert predictions[[f"prob_{e}" for e in EMOTIONS]].to_numpy().max() <= 1.0
    assert predictions["valence"].between(-1, 1).all()


def test_prefect_yaml_entrypoints_import_and_parameters_validate():
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {deployment["name"] for deployment in config["deployments"]}
    assert {"weekly-retrain", "demo", "batch-predict", "tune-demo", "monitor", "monitor-demo"} <= names
    for deployment in config["deployments"]:
        module_path, _, func = deployment["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(f"{REPO / module_path}:{func}")
        validated = flow.validate_parameters(deployment.get("parameters", {}))
        assert set(deployment.get("parameters", {})) <= set(validated)
        for path in ("config", "search"):
            if path in deployment.get("parameters", {}):
                assert (REPO / deployment["parameters"][path]).is_file(), deployment["name"]
    weekly = next(d for d in config["deployments"] if d["name"] == "weekly-retrain")
    assert weekly["schedules"][0]["cron"] == "0 3 * * 1"
    assert {"force_retrain", "promotion_confidence", "promotion_split"} <= set(weekly["parameters"])
    # Monitoring's events start a retrain of the model they name, once an hour at most.
    by_name = {d["name"]: d for d in config["deployments"]}
    for retrain, monitor in (("weekly-retrain", "monitor"), ("demo", "monitor-demo")):
        (trigger,) = by_name[retrain]["triggers"]
        model = by_name[monitor]["parameters"]["model_uri"].removeprefix("models:/").split("@")[0]
        assert trigger["match"] == {"prefect.resource.id": f"emonet.model.{model}"}
        assert set(trigger["expect"]) == {"emonet.monitoring.drift-detected", "emonet.monitoring.performance-degraded"}
        assert (trigger["posture"], trigger["threshold"], trigger["within"]) == ("Reactive", 1, 3600)
    assert by_name["monitor"]["schedules"][0]["cron"] == "0 6 * * *"


def test_flow_parameters_reject_bad_values():
    from prefect.exceptions import ParameterTypeError

    from flows.training_pipeline import emonet_training_pipeline

    with pytest.raises(ParameterTypeError):
        emonet_training_pipeline.validate_parameters({"epochs": 0})
    with pytest.raises(ParameterTypeError):
        emonet_training_pipeline.validate_parameters({"config": {"model": {"backbone": "vgg16"}}})
    with pytest.raises(ParameterTypeError):
        emonet_training_pipeline.validate_parameters({"config": {"train": {"epochs": 3, "epoch": 4}}})
    with pytest.raises(ParameterTypeError):
        emonet_training_pipeline.validate_parameters({"promotion_confidence": 1.0})
    with pytest.raises(ParameterTypeError):
        emonet_training_pipeline.validate_parameters({"promotion_split": "train"})
    defaults = emonet_training_pipeline.validate_parameters({})
    assert defaults["config"] == EmoNetConfig(), "the flow's config defaults are the library's"
    assert (defaults["promotion_confidence"], defaults["promotion_split"], defaults["force_retrain"]) == (
        0.95,
        "val",
        False,
    )


def _decision(**fields) -> PromotionDecision:
    values = {
        "version": "4",
        "alias": "challenger",
        "decision": "not_significantly_better",
        "reason": "the mAP difference's interval includes 0",
        "new_map": 0.41,
        "previous_map": 0.42,
        "previous_version": "3",
        "split": "val",
        "split_id": "abc123",
    }
    return PromotionDecision(**{**values, **fields})


def test_run_report_shows_the_interval_or_why_training_was_skipped():
    from flows.training_pipeline import run_report

    common = {
        "mlflow_run_id": "r1",
        "registered_model": "emonet-demo",
        "out_dir": Path("outputs"),
        "tracking_uri": "sqlite:///m.db",
    }
    skipped = run_report(RunSummary(**common, skip_reason="the recipe of champion version 3"))
    assert "Training skipped: the recipe of champion version 3" in skipped and "Test mAP" not in skipped
    metrics = {"mAP": 0.4123, "mAP_voc11": 0.44, "f1_macro": 0.5, "mae_valence_1_10": 1.0, "mae_arousal_1_10": 1.5}
    summary = RunSummary(
        **common,
        test_metrics=metrics,
        test_mAP_ci=(0.39, 0.43),
        ci_confidence=0.95,
        val_mAP=0.41,
        registration=_decision(),
        review=Path("outputs/review/index.html"),
    )
    trained = run_report(summary)
    assert "Test mAP: 0.4123 [0.3900, 0.4300]" in trained and "mAP_voc11 0.4400" in trained
    assert "alias 'challenger' (not_significantly_better)" in trained
    # The flow's dict, by its old keys, for scripts that read it.
    with pytest.warns(DeprecationWarning, match=r"summary\['version'\] is deprecated.*summary.version"):
        assert summary["version"] == "4"
    assert summary.as_dict()["test_mAP_ci"] == (0.39, 0.43) and summary.as_dict()["review"] == str(summary.review)
