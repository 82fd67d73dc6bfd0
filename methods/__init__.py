"""The UniMem engine and one file per long-context method, each registered by name in `METHODS`."""

# Importing a method file registers it; this order (the paper's) is the order of `--methods all`.
from unimem_bench.methods import vanilla  # noqa: I001, F401
from unimem_bench.methods import transformer_xl  # noqa: F401
from unimem_bench.methods import memorizing_transformer  # noqa: F401
from unimem_bench.methods import rmt  # noqa: F401
from unimem_bench.methods import longformer  # noqa: F401
from unimem_bench.methods import unimix  # noqa: F401
from unimem_bench.methods import position_interpolation  # noqa: F401
from unimem_bench.methods import streaming_llm  # noqa: F401
from unimem_bench.methods import bigbird  # noqa: F401
from unimem_bench.methods import longnet  # noqa: F401
from unimem_bench.methods import h2o  # noqa: F401
from unimem_bench.methods import tova  # noqa: F401
from unimem_bench.methods import snapkv  # noqa: F401
from unimem_bench.methods import knorm  # noqa: F401
from unimem_bench.methods import pyramidkv  # noqa: F401
from unimem_bench.methods import adakv  # noqa: F401
from unimem_bench.methods import fot  # noqa: F401
from unimem_bench.methods import unlimiformer  # noqa: F401
from unimem_bench.methods import longmem  # noqa: F401
from unimem_bench.methods import poolingformer  # noqa: F401
from unimem_bench.methods import longt5  # noqa: F401
from unimem_bench.methods import knn_lm  # noqa: F401
from unimem_bench.methods import trime  # noqa: F401
from unimem_bench.methods import autocompressor  # noqa: F401
from unimem_bench.methods import reformer  # noqa: F401
from unimem_bench.methods import routing  # noqa: F401
from unimem_bench.methods import quest  # noqa: F401
from unimem_bench.methods import infllm  # noqa: F401
from unimem_bench.methods.config import ConfigError, UniMemConfig
from unimem_bench.methods.engine.hookable import HookError, check_hookable
from unimem_bench.methods.engine.memory_lm import MemoryLM, TokenScores
from unimem_bench.methods.engine.sampling import Sampling
from unimem_bench.methods.registry import METHODS, PAPER_CONTEXT, Method, MethodContext, describe

__all__ = ["METHODS", "PAPER_CONTEXT", "ConfigError", "HookError", "MemoryLM", "Method", "MethodContext",
           "Sampling", "TokenScores", "UniMemConfig", "check_hookable", "describe"]
