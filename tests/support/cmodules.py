"""The project's C extensions in tests: a missing build fails the test, never skips it."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

__all__ = ["c_module"]


def c_module(name: str) -> ModuleType:
    """Import the C extension ``name`` or fail the calling test saying how to build it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"the C module {name} is not built ({exc}); it needs gcc and Python's "
                    "headers when the package is installed (`make venv` after installing "
                    "them)")
