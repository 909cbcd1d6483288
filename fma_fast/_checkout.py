"""Imported first by ``fma_fast``: makes ``fma_fast.kernels`` importable from a plain checkout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _map_checkout_kernels() -> None:
    """An install maps the top-level ``kernels/`` folder to ``fma_fast.kernels``; straight
    from a checkout (``PYTHONPATH=.``, as on a machine where nothing can be installed) the
    same folder is mapped here, so the package works either way."""
    if importlib.util.find_spec("fma_fast.kernels") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file():
        return  # neither installed nor in a checkout: the imports that need it will say so
    spec = importlib.util.spec_from_file_location(
        "fma_fast.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.modules["fma_fast"].kernels = module


_map_checkout_kernels()
