"""The config: loading from YAML, mappings and configs, overrides, errors that name the bad
key, and every checked-in file under configs/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emonet.config import EmoNetConfig, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_sources_agree(tmp_path):
    assert load_config() == EmoNetConfig()
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  backbone: resnet18\ntrain:\n  epochs: 3\n")
    from_yaml = load_config(path)
    assert from_yaml.model.backbone == "resnet18" and from_yaml.train.epochs == 3
    assert from_yaml.train.lr == EmoNetConfig().train.lr, "missing fields take the defaults"
    assert load_config({"model": {"backbone": "resnet18"}, "train": {"epochs": 3}}) == from_yaml
    assert load_config(from_yaml) == from_yaml


def test_overrides_merge_per_section_and_leave_the_source_alone(tmp_path):
    base = load_config({"train": {"epochs": 3, "lr": 0.01}})
    merged = load_config(base, train={"epochs": 5})
    assert (merged.train.epochs, merged.train.lr) == (5, 0.01)
    assert base.train.epochs == 3


def test_round_trip_through_the_saved_dict(tmp_path):
    config = load_config({"model": {"weights_path": str(tmp_path / "w.pth")}, "train": {"seed": 11}})
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_config(path) == config


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="epoch"):
        load_config({"train": {"epoch": 3}})
    with pytest.raises(ValueError, match="optimizer"):
        load_config({"optimizer": {"name": "sgd"}})
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        load_config(train={"batch_size": 0})
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping at the top level"):
        load_config(listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_checked_in_config_validates(path):
    raw = yaml.safe_load(path.read_text())
    config = load_config(path)
    for section, values in raw.items():
        for key, value in values.items():
            assert config_to_dict(config)[section][key] == value, f"{path.name}: {section}.{key}"
