"""The UniMem engine and one file per long-context method, each registered by name in `METHODS`."""

# Importing a method file registers it; this order (the paper's) is the order of `--methods all`.
from . import vanilla  # noqa: I001, F401
from . import transformer_xl  # noqa: F401
from . import memorizing_transformer  # noqa: F401
from . import rmt  # noqa: F401
from . import longformer  # noqa: F401
from . import unimix  # noqa: F401
from . import position_interpolation  # noqa: F401
from .config import ConfigError, UniMemConfig
from .engine import HookError, MemoryLM, TokenScores, check_hookable
from .generation import Sampling
from .registry import METHODS, PAPER_CONTEXT, Method, MethodContext, describe

__all__ = ["METHODS", "PAPER_CONTEXT", "ConfigError", "HookError", "MemoryLM", "Method", "MethodContext",
           "Sampling", "TokenScores", "UniMemConfig", "check_hookable", "describe"]
