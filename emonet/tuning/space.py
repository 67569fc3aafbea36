"""A sweep's search space: fields of :class:`~emonet.config.EmoNetConfig` and the
distribution of each, read from YAML and checked before any training.

A search-space file maps dotted config fields to distributions::

    params:
      train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      train.batch_size: {type: int, low: 8, high: 32, step: 8}
      loss.gamma_neg: {type: float, low: 0.0, high: 4.0}
      train.scheduler: {type: categorical, choices: [plateau, cosine]}

Each entry names a leaf field (a section's field, ``train.distributed.nproc_per_node``
for a nested one), and every value it can take must be valid for that field: both ends
of a range and every choice are checked against the config's own validation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from pydantic import BaseModel

from emonet.config import EmoNetConfig, config_to_dict, load_config

__all__ = ["Param", "SearchSpace", "apply_params", "load_search_space"]

Kind = Literal["float", "int", "categorical"]
_KEYS: dict[str, set[str]] = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


@dataclass(frozen=True)
class Param:
    """One entry: the dotted config field and its distribution."""

    path: str
    kind: Kind
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution the sampler draws this field from."""
        if self.kind == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return optuna.distributions.CategoricalDistribution(self.choices)

    def as_dict(self) -> dict[str, Any]:
        """The entry as written in the YAML file (defaults left out)."""
        if self.kind == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        entry: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            entry["log"] = True
        if self.step is not None:
            entry["step"] = self.step
        return entry

    def values_to_check(self) -> list[Any]:
        """The values whose validity stands for the whole distribution: both ends, or every choice."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


@dataclass(frozen=True)
class SearchSpace:
    """The entries of a search space, in file order."""

    params: tuple[Param, ...]

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {param.path: param.distribution() for param in self.params}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's value of each field, drawn by the study's sampler."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "float":
                values[p.path] = trial.suggest_float(p.path, p.low, p.high, log=p.log, step=p.step)
            elif p.kind == "int":
                step = int(p.step or 1)
                values[p.path] = trial.suggest_int(p.path, int(p.low), int(p.high), log=p.log, step=step)
            else:
                values[p.path] = trial.suggest_categorical(p.path, list(p.choices))
        return values

    def as_dict(self) -> dict[str, Any]:
        return {"params": {param.path: param.as_dict() for param in self.params}}

    def canonical(self) -> str:
        """The space as canonical JSON: what a study records, to refuse another space under its name."""
        return json.dumps(self.as_dict(), sort_keys=True)

    def differences(self, other: SearchSpace) -> list[str]:
        """Lines naming each entry that differs from ``other``'s (added, removed or changed)."""
        mine, theirs = self.as_dict()["params"], other.as_dict()["params"]
        lines = []
        for path in sorted(set(mine) | set(theirs)):
            if path not in theirs:
                lines.append(f"{path}: {mine[path]} here, absent from the study")
            elif path not in mine:
                lines.append(f"{path}: absent here, {theirs[path]} in the study")
            elif mine[path] != theirs[path]:
                lines.append(f"{path}: {mine[path]} here, {theirs[path]} in the study")
        return lines


def _field_kind(path: str) -> None:
    """Raise ValueError unless ``path`` names a leaf field of :class:`EmoNetConfig`."""
    model: type[BaseModel] = EmoNetConfig
    parts = path.split(".")
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the config"
            raise ValueError(
                f"search space entry {path!r}: {where} has no field {part!r} (fields: {', '.join(fields)})"
            )
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth < len(parts) - 1 and not is_section:
            raise ValueError(f"search space entry {path!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        if depth == len(parts) - 1 and is_section:
            raise ValueError(
                f"search space entry {path!r}: a section; name one of its fields ({', '.join(annotation.model_fields)})"
            )
        if is_section:
            model = annotation


def _number(path: str, entry: Mapping[str, Any], key: str) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"search space entry {path!r}: {key} must be a number, got {value!r}")
    return float(value)


def _param(path: str, entry: Any) -> Param:
    if not isinstance(path, str) or not path:
        raise ValueError(f"search space entry {path!r}: expected a dotted config field such as 'train.lr'")
    _field_kind(path)
    if not isinstance(entry, Mapping):
        raise ValueError(f"search space entry {path!r}: expected a mapping with a 'type', got {entry!r}")
    kind = entry.get("type")
    if kind not in _KEYS:
        raise ValueError(f"search space entry {path!r}: type must be one of {', '.join(_KEYS)}, got {kind!r}")
    unknown = set(entry) - _KEYS[kind]
    if unknown:
        raise ValueError(
            f"search space entry {path!r}: unknown keys for a {kind} distribution: {', '.join(sorted(unknown))}"
        )
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, Sequence) or isinstance(choices, str) or len(choices) == 0:
            raise ValueError(f"search space entry {path!r}: choices must be a non-empty list, got {choices!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError(f"search space entry {path!r}: choices repeat a value: {list(choices)}")
        return Param(path, "categorical", choices=tuple(choices))
    low, high = _number(path, entry, "low"), _number(path, entry, "high")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"search space entry {path!r}: log must be true or false, got {log!r}")
    step = _number(path, entry, "step") if entry.get("step") is not None else None
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise ValueError(f"search space entry {path!r}: an int distribution needs whole low, high and step")
    if not low < high:
        raise ValueError(f"search space entry {path!r}: empty range: low {low:g} must be below high {high:g}")
    if log and low <= 0:
        raise ValueError(f"search space entry {path!r}: a log distribution needs low > 0, got {low:g}")
    if step is not None and (step <= 0 or log):
        raise ValueError(f"search space entry {path!r}: step must be > 0 and cannot go with log, got step {step:g}")
    return Param(path, kind, low=low, high=high, log=log, step=step)


def apply_params(config: EmoNetConfig, values: Mapping[str, Any]) -> EmoNetConfig:
    """``config`` with each dotted field of ``values`` set, validated as a whole."""
    data = config_to_dict(config)
    for path, value in values.items():
        *sections, field = path.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[field] = value
    return load_config(data)


def load_search_space(source: str | Path | Mapping[str, Any], base: EmoNetConfig | None = None) -> SearchSpace:
    """Read and check a search space: a YAML file's path or its mapping.

    Every entry is checked before any training: the field exists and is a value (not a
    section), the distribution is well formed (a known type, a non-empty range, log only
    above 0, non-empty choices), and each end of the range and each choice gives a valid
    config over ``base`` (default: the library's defaults). The first problem is raised
    as a ValueError naming the entry.
    """
    if isinstance(source, Mapping):
        data: Any = source
        name = "search space"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"search space file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from None
        name = str(path)
    if not isinstance(data, Mapping) or set(data) != {"params"} or not isinstance(data["params"], Mapping):
        raise ValueError(f"{name}: expected one top-level key 'params' mapping config fields to distributions")
    if not data["params"]:
        raise ValueError(f"{name}: the search space has no entry")
    space = SearchSpace(tuple(_param(path, entry) for path, entry in data["params"].items()))
    base = base or EmoNetConfig()
    for param in space.params:
        for value in param.values_to_check():
            try:
                apply_params(base, {param.path: value})
            except ValueError as error:
                reason = str(error).splitlines()
                detail = reason[-1].strip() if reason else str(error)
                raise ValueError(
                    f"search space entry {param.path!r}: {value!r} is not a valid value: {detail}"
                ) from None
    return space
