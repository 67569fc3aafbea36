"""EmoNet: multi-label emotion recognition on EMOTIC (library; no orchestration).

The subpackages, lowest layer first: ``utils``, then the top-level vocabulary (``schema``,
``config``, ``affect``), ``metrics``, ``plots``, ``data``, ``models``, ``inference``,
``reports`` and ``tracking``, ``training``, and ``cli`` on top. Each imports only from
the layers below it (the import-linter contracts in ``pyproject.toml`` check this).
"""

from emonet.schema import EMOTIONS, NUM_EMOTIONS
from emonet.utils import moved_modules

__version__ = "0.2.0"
__all__ = ["EMOTIONS", "NUM_EMOTIONS", "__version__"]

# The flat layout's module paths (emonet.train, emonet.batch, ...) keep importing, with a warning.
moved_modules.install()
