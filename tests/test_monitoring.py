"""Monitoring: the tests control false alarms across the signals, Evidently's report runs the
decision's own tests, bad batches get one line, and on a demo model a batch drawn like the
reference is not flagged while a shifted one is, with its performance checked and the
result recorded once in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from emonet.data.demo import make_demo_data
from emonet.monitoring.batches import open_batch
from emonet.monitoring.demo import write_demo_batches
from emonet.monitoring.drift import check_performance, detect_drift, embedding_drift
from emonet.monitoring.monitor import MONITORING_EXPERIMENT, TAG_DRIFT, TAG_PERFORMANCE, monitor_batch
from emonet.monitoring.reference import REFERENCE_TAG
from emonet.monitoring.report import evidently_drift_values, write_html_report
from emonet.monitoring.signals import SIGNALS, signal_table
from emonet.schema import EMOTIONS, annotations_path, arrays_dir

REPO = Path(__file__).resolve().parents[1]


def random_signals(rng: np.random.Generator, n: int, shift: float = 0.0) -> pd.DataFrame:
    """A signal table like a model's: skewed probabilities, a few face classes, 0/1 positives."""
    inputs = np.column_stack(
        [rng.normal(120 + shift, 20, n), rng.gamma(4, 10, n), np.full(n, 112.0), rng.integers(60, 200, n)]
    )
    faces = rng.choice([0.0, 85.0, 100.0], size=n, p=[0.4, 0.2, 0.4])
    probs = rng.beta(0.6, 3.0, size=(n, len(EMOTIONS)))
    affect = np.tanh(rng.normal(0, 0.5, size=(n, 2)))
    return signal_table(inputs, faces, probs, affect, np.full(len(EMOTIONS), 0.3))


def test_false_alarms_are_controlled_across_the_many_signals():
    """60 batches drawn like the reference: at most a few are flagged (the family-wise rate
    is 0.05), where testing each of the 60 columns at 0.05 would flag nearly all."""
    rng = np.random.default_rng(0)
    flagged = uncorrected = 0
    for _ in range(60):
        report = detect_drift(random_signals(rng, 300), random_signals(rng, 150))
        flagged += report.drift_detected
        uncorrected += any(signal.p_value < 0.05 for signal in report.signals)
    assert len(report.signals) == len(SIGNALS) == 60
    assert flagged <= 8, flagged  # P(X >= 9) < 0.004 for Binomial(60, 0.05)
    assert uncorrected >= 45, uncorrected
    shifted = detect_drift(random_signals(rng, 300), random_signals(rng, 150, shift=15.0))
    assert shifted.drift_detected and [s.name for s in shifted.drifted] == ["brightness"]
    assert shifted.most_moved(1)[0].name == "brightness"


def test_the_embedding_test_holds_its_level_and_finds_a_moved_embedding():
    rng = np.random.default_rng(1)
    p_values = [
        embedding_drift(rng.normal(size=(200, 64)), rng.normal(size=(100, 64)), n_permutations=199, seed=s)[1]
        for s in range(20)
    ]
    assert sum(p < 0.05 for p in p_values) <= 4, p_values
    moved = rng.normal(size=(100, 64))
    moved[:, :8] += 0.6
    _, p_value, reference, batch = embedding_drift(rng.normal(size=(200, 64)), moved)
    assert p_value == pytest.approx(1 / 2000) and batch > reference


def test_evidently_report_runs_the_decisions_tests(tmp_path: Path):
    rng = np.random.default_rng(2)
    reference, batch = random_signals(rng, 200), random_signals(rng, 100, shift=10.0)
    batch.loc[:40, "face_class"] = "none"
    ours = {signal.name: signal.p_value for signal in detect_drift(reference, batch).signals}
    theirs = evidently_drift_values(reference, batch, threshold=0.05 / 60)
    assert set(theirs) == {signal.name for signal in SIGNALS}
    for name, value in theirs.items():
        assert value == pytest.approx(ours[name], rel=1e-9, abs=1e-12), name
    path = write_html_report(reference, batch, 0.05 / 60, tmp_path / "report.html")
    html = path.read_text()
    assert "brightness" in html and "emonet_chi2_homogeneity" in html or "homogeneity" in html


def test_performance_is_degraded_only_when_the_evidence_says_so():
    rng = np.random.default_rng(3)
    labels = (rng.random((300, len(EMOTIONS))) < 0.2).astype(np.float32)
    good = np.clip(labels * 0.6 + rng.random(labels.shape) * 0.5, 0, 1)
    batch_labels = (rng.random((150, len(EMOTIONS))) < 0.2).astype(np.float32)
    like = np.clip(batch_labels * 0.6 + rng.random(batch_labels.shape) * 0.5, 0, 1)
    assert not check_performance(labels, good, batch_labels, like, n_resamples=200).degraded
    worse = check_performance(labels, good, batch_labels, rng.random(batch_labels.shape), n_resamples=200)
    assert worse.degraded and worse.difference["mAP"].high < 0
    assert worse.batch["mAP_voc11"].estimate < worse.reference["mAP_voc11"].estimate


def test_bad_batches_are_refused_in_one_line(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no crop"):
        open_batch(empty)
    with pytest.raises(FileNotFoundError, match="batch not found"):
        open_batch(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="a folder of crops or a .csv file"):
        open_batch(tmp_path / "notes.txt")
    header_only = tmp_path / "header.csv"
    header_only.write_text("image_path\n")
    with pytest.raises(ValueError, match="lists no crop"):
        open_batch(header_only)
    some = tmp_path / "some.csv"
    pd.DataFrame({"image_path": ["a.png"], "Peace": [1], "Anger": [0]}).to_csv(some, index=False)
    with pytest.raises(ValueError, match=r"but not \['Affection'"):
        open_batch(some)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"image_path": ["a.png"], **{e: [0] for e in EMOTIONS}} | {"Fear": [2]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="row 0: Fear is 2; emotion labels must be 0 or 1"):
        open_batch(bad)
    no_column = tmp_path / "cols.csv"
    pd.DataFrame({"file": ["a.png"]}).to_csv(no_column, index=False)
    with pytest.raises(ValueError, match="needs an 'image_path' column"):
        open_batch(no_column)


def test_the_content_fingerprint_follows_the_content_not_the_place(tmp_path: Path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / "x.png")
    assert open_batch(tmp_path / "a").fingerprint == open_batch(tmp_path / "b").fingerprint
    Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(tmp_path / "b" / "x.png")
    assert open_batch(tmp_path / "a").fingerprint != open_batch(tmp_path / "b").fingerprint


# --------------------------------------------------------------------------- on a demo model


@pytest.fixture(scope="module")
def demo_monitoring(tmp_path_factory, mlflow_store, demo_checkpoint):
    """The demo checkpoint registered as ``emonet-demo`` version 1, with its reference
    computed on a 150-row validation split of another demo seed, and the two demo batches."""
    from emonet.monitoring.monitor import load_monitoring_predictor
    from emonet.monitoring.reference import ensure_reference
    from emonet.tracking.run_logging import log_emonet_model

    base = tmp_path_factory.mktemp("monitoring")
    client = MlflowClient()
    run_id = client.create_run(mlflow_store["experiment_id"]).info.run_id
    version = log_emonet_model(run_id, demo_checkpoint[1], registered_model_name="emonet-demo")
    client.set_terminated(run_id)
    client.set_registered_model_alias("emonet-demo", "champion", version.version)
    split = make_demo_data(base / "reference", seed=5, n_train=1, n_val=150, n_test=1)
    batches = write_demo_batches(base / "batches", rows=150)
    split_csv, img_dir = annotations_path(split, "val"), arrays_dir(split)
    ensure_reference(client, version, load_monitoring_predictor(version), split_csv=split_csv, img_dir=img_dir)
    return {"version": version, "split": split, "batches": batches, "base": base, "uri": mlflow_store["uri"]}


def use_store(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient()


@pytest.mark.slow
def test_a_batch_like_the_reference_passes_and_a_shifted_one_is_flagged(demo_monitoring):
    client = use_store(demo_monitoring["uri"])
    batches = demo_monitoring["batches"]
    uri = "models:/emonet-demo/1"
    like = monitor_batch(batches["like"], uri, out_dir=demo_monitoring["base"] / "out")
    assert not like.drift_detected, like.most_moved
    assert like.performance_degraded is False and like.crops == 150 and like.skipped == 0
    assert REFERENCE_TAG in client.get_model_version("emonet-demo", "1").tags  # stored with the version

    shifted = monitor_batch(batches["shifted"], "models:/emonet-demo@champion", report=False)
    assert shifted.drift_detected
    moved = {signal["name"] for signal in shifted.most_moved}
    assert "brightness" in moved, shifted.most_moved
    assert {"face_class", "face_visibility", "contrast"} & set(shifted.drifted), shifted.drifted

    experiment = client.get_experiment_by_name(MONITORING_EXPERIMENT)
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {like.run_id, shifted.run_id}
    recorded = runs[shifted.run_id].data
    assert runs[shifted.run_id].info.run_name == "emonet-demo-v1-shifted-batch.csv"  # named by its folder
    assert recorded.tags[TAG_DRIFT] == "true" and recorded.tags["emonet.model_version"] == "1"
    assert recorded.tags[TAG_PERFORMANCE] in {"true", "false"}
    assert recorded.metrics["drift_p.brightness"] < 1e-6 and "mAP_difference_high" in recorded.metrics
    artifacts = {entry.path for entry in client.list_artifacts(like.run_id)}
    assert {"report.html", "signals.csv", "summary.json", "summary.md"} <= artifacts
    signals = pd.read_csv(demo_monitoring["base"] / "out" / f"emonet-demo-v1-{like.fingerprint[:12]}" / "signals.csv")
    assert len(signals) == len(SIGNALS) + 1 and "features" in set(signals["name"])

    again = monitor_batch(batches["like"], uri)  # the same content, elsewhere: monitored once
    assert again.reused and again.run_id == like.run_id
    assert len(client.search_runs([experiment.experiment_id])) == 2


@pytest.mark.slow
def test_a_version_without_a_reference_gets_one_on_first_use_or_a_clear_error(demo_monitoring, demo_checkpoint):
    from emonet.tracking.run_logging import log_emonet_model

    client = use_store(demo_monitoring["uri"])
    run_id = client.create_run(client.get_experiment_by_name("emonet-test").experiment_id).info.run_id
    version = log_emonet_model(run_id, demo_checkpoint[1], registered_model_name="emonet-demo", onnx=False)
    client.set_terminated(run_id)
    uri, batch = f"models:/emonet-demo/{version.version}", demo_monitoring["batches"]["shifted"]
    with pytest.raises(ValueError, match="has no monitoring reference and its run records no data_root: pass"):
        monitor_batch(batch, uri, report=False)
    client.log_param(run_id, "data_root", str(demo_monitoring["split"]))  # as the training flow logs it
    result = monitor_batch(batch, uri, report=False)  # torch: this version has no ONNX export
    assert result.drift_detected and REFERENCE_TAG in client.get_model_version("emonet-demo", version.version).tags


@pytest.mark.slow
def test_emonet_monitor_gives_one_line_for_bad_batches_and_skips_bad_crops(demo_monitoring, tmp_path: Path):
    base = demo_monitoring["batches"]["like"].parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": demo_monitoring["uri"]}

    def emonet(*args: str) -> subprocess.CompletedProcess:
        command = [str(Path(sys.executable).with_name("emonet")), "monitor", "--model", "models:/emonet-demo/1"]
        return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300)

    empty = tmp_path / "empty"
    empty.mkdir()
    out = emonet("--batch", str(empty))
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("emonet monitor: error: the batch")
    assert "Traceback" not in out.stderr
    wrong = tmp_path / "wrong.csv"
    pd.read_csv(base / "batch.csv").drop(columns=["Fear"]).to_csv(wrong, index=False)
    out = emonet("--batch", str(wrong), "--img-dir", str(base))
    assert out.returncode == 2 and "but not ['Fear']" in out.stderr and "Traceback" not in out.stderr

    # Two crops of the batch, one file that is not an image, and crops without any face.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in sorted((base / "crops").iterdir())[:30]:
        pixels = np.asarray(Image.open(name))
        Image.fromarray(np.full_like(pixels, pixels.mean(axis=(0, 1)).astype(np.uint8))).save(mixed / name.name)
    (mixed / "broken.png").write_bytes(b"not a png")
    out = emonet("--batch", str(mixed), "--no-report")
    assert out.returncode == 0, out.stderr
    assert "30 crops scored, 1 skipped" in out.stdout and "drift detected" in out.stdout
    assert "no face was found in any of the 30 crops" in out.stderr
    assert "broken.png" in out.stderr


@pytest.mark.slow
def test_images_kept_from_the_input_pass_score_as_images_read_again(demo_monitoring, monkeypatch):
    from emonet.monitoring import scoring
    from emonet.monitoring.monitor import load_monitoring_predictor

    use_store(demo_monitoring["uri"])
    predictor = load_monitoring_predictor(demo_monitoring["version"])
    batch = open_batch(demo_monitoring["batches"]["like"])
    kept = scoring.score_batch(predictor, batch)  # 150 small crops: all kept
    monkeypatch.setattr(scoring, "KEPT_IMAGE_BYTES", 40 * 40 * 3 * 10)  # a few kept, the rest read again
    partly = scoring.score_batch(predictor, batch)
    np.testing.assert_array_equal(kept.emotion_prob, partly.emotion_prob)
    np.testing.assert_array_equal(kept.features, partly.features)
    pd.testing.assert_frame_equal(kept.table, partly.table)
