"""mlx-lm's parts that the engine uses, imported without running mlx-lm's package `__init__`.

`import mlx_lm.models.cache` runs `mlx_lm/__init__.py` first, which imports its converter, generator and
loader, and through them transformers: 1.6 s (up to 4 s cold) before a model can load, for caches and
samplers that need only MLX. So the package is registered here unexecuted: its submodules import as usual,
and its `__init__` runs the moment anything asks the package itself for a name (`mlx_lm.load`, `from mlx_lm
import convert`), so every other use of mlx-lm behaves exactly as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

from .errors import QwenMLXError

_lock = threading.Lock()


def _defer_package_init() -> None:
    with _lock:
        if "mlx_lm" in sys.modules:
            return
        spec = importlib.util.find_spec("mlx_lm")
        if spec is None or spec.loader is None:
            raise QwenMLXError("mlx-lm is not installed: pip install mlx-lm")
        package = importlib.util.module_from_spec(spec)

        def complete(name: str):
            # A name of the package itself is wanted: run its __init__ now, once.
            with _lock:
                if package.__dict__.pop("__getattr__", None) is not None:
                    spec.loader.exec_module(package)
            try:
                return package.__dict__[name]
            except KeyError:
                raise AttributeError(f"module 'mlx_lm' has no attribute {name!r}") from None

        package.__getattr__ = complete
        sys.modules["mlx_lm"] = package


def submodule(name: str) -> ModuleType:
    """`mlx_lm.<name>` (e.g. "models.cache", "sample_utils"), without the package's heavy `__init__`."""
    _defer_package_init()
    return importlib.import_module(f"mlx_lm.{name}")
