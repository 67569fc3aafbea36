"""EmoNet: multi-label emotion recognition on EMOTIC (library; no orchestration)."""

from emonet.schema import EMOTIONS, NUM_EMOTIONS

__version__ = "0.1.0"
__all__ = ["EMOTIONS", "NUM_EMOTIONS", "__version__"]
