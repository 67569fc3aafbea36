"""The module paths of EmoNet's flat layout, importable with a ``FutureWarning``.

EmoNet 0.1 kept every module at ``emonet/`` top level (``emonet.train``, ``emonet.batch``, ...);
scripts, notebooks and registered models written for it import those paths: a model logged
by MLflow runs its own copy of the package in a fresh process, but in a process that has
already imported today's ``emonet`` (the training flow re-scoring its champion) its model
file imports from today's package. Each old path is served by a module that looks a name
up in the new modules it was split into, in the order listed, and warns once on import,
as scikit-learn's deprecated module paths do. The paths that are packages today
(``emonet.data``, ``emonet.models``, ``emonet.inference``, ``emonet.tracking``,
``emonet.metrics``) re-export the old modules' names themselves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED_MODULES", "install"]

# Old path -> the modules its names live in now, searched in this order.
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "emonet.io": ("emonet.utils.io",),
    "emonet.stopping": ("emonet.utils.stopping",),
    "emonet.store": ("emonet.utils.store",),
    "emonet.arrays": ("emonet.data.arrays",),
    "emonet.images": ("emonet.data.images",),
    "emonet.annotations": ("emonet.data.annotations",),
    "emonet.normalize": ("emonet.data.normalize",),
    "emonet.demo_data": ("emonet.data.demo",),
    "emonet.visibility": ("emonet.data.face_visibility",),
    "emonet.visibility_split": ("emonet.data.visibility_column",),
    "emonet.transforms": ("emonet.data.transforms",),
    "emonet.loaders": ("emonet.data.loaders",),
    "emonet.bootstrap": ("emonet.metrics.bootstrap",),
    "emonet.checkpoint": ("emonet.models.checkpoint", "emonet.training.run_state", "emonet.models.devices"),
    "emonet.prediction": ("emonet.inference.loop",),
    "emonet.batch": ("emonet.inference.csv_scoring", "emonet.inference.loading"),
    "emonet.pyfunc_model": ("emonet.inference.pyfunc_model",),
    "emonet.evaluation": ("emonet.reports.evaluation",),
    "emonet.benchmark": ("emonet.reports.benchmark",),
    "emonet.review": ("emonet.reports.review",),
    "emonet.review.drawing": ("emonet.reports.review.drawing",),
    "emonet.review.page": ("emonet.reports.review.page",),
    "emonet.review.selection": ("emonet.reports.review.selection",),
    "emonet.runs": ("emonet.tracking.stale_runs",),
    "emonet.registry": ("emonet.tracking.registry",),
    "emonet.recipe": ("emonet.tracking.recipe",),
    "emonet.train": ("emonet.training.trainer",),
    "emonet.train_loaders": ("emonet.training.run_loaders",),
    "emonet.parallel": ("emonet.training.ddp",),
    "emonet.distributed": ("emonet.training.launcher",),
    "emonet.losses": ("emonet.training.losses",),
    "emonet.schedules": ("emonet.training.schedules",),
    "emonet.seeding": ("emonet.training.seeding",),
}


def _public_names(module_name: str) -> list[str]:
    """A module's ``__all__``, else its names without a leading underscore."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    return list(names) if names is not None else [name for name in vars(module) if not name.startswith("_")]


class _MovedModule(types.ModuleType):
    """An old module path: each attribute comes from the first new module that has it."""

    __emonet_targets__: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        if name == "__all__":  # `from emonet.checkpoint import *`: the new modules' public names
            return sorted({public for target in self.__emonet_targets__ for public in _public_names(target)})
        if name.startswith("__"):
            raise AttributeError(name)
        for target in self.__emonet_targets__:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(
            f"module {self.__name__!r} (moved to {', '.join(self.__emonet_targets__)}) has no attribute {name!r}"
        )

    def __dir__(self) -> list[str]:
        names = set(super().__dir__())
        for target in self.__emonet_targets__:
            names.update(dir(importlib.import_module(target)))
        return sorted(names)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds only the paths of :data:`MOVED_MODULES`, after every other finder had its turn."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        # A package, so that its old submodules (emonet.review.page) are found here too.
        is_package = any(other.startswith(fullname + ".") for other in MOVED_MODULES)
        return importlib.machinery.ModuleSpec(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        targets = MOVED_MODULES[module.__name__]
        module.__emonet_targets__ = targets  # type: ignore[attr-defined]
        warnings.warn(
            f"{module.__name__} is deprecated since EmoNet 0.2 and will be removed in 0.4: "
            f"import from {' or '.join(targets)} instead",
            FutureWarning,
            stacklevel=2,
        )

    def get_code(self, fullname: str) -> types.CodeType:
        # `python -m emonet.store` (an old entry point): run the new module as __main__.
        target = MOVED_MODULES[fullname][0]
        source = (
            "import runpy, warnings\n"
            f"warnings.warn({fullname!r} + ' is deprecated since EmoNet 0.2: run python -m {target}', FutureWarning)\n"
            f"runpy.run_module({target!r}, run_name='__main__', alter_sys=True)\n"
        )
        return compile(source, f"<{fullname}, moved to {target}>", "exec")


def install() -> None:
    """Serve the old paths in this process (``import emonet`` does it; calling again is a no-op)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
