"""Lazy package exports (PEP 562): importing a package of the project loads nothing heavy.

Each package's ``__init__`` names its public objects and the module each comes from; a name is imported on first use.
So ``condvec-train --help`` (and every CLI's) does not import torch and diffusers just to print usage.
"""

from __future__ import annotations

import importlib
import sys
import types


class _Package(types.ModuleType):
    """A package module whose exports win over same-named submodules (``conditioner.encode`` the function, not the
    module), exactly as the eager ``from conditioner.encode import encode`` in an ``__init__`` used to make them."""

    def __setattr__(self, name, value):
        exports = self.__dict__.get("_EXPORTS", {})
        if name in exports and isinstance(value, types.ModuleType):
            return  # the import system binding the submodule: keep the export reachable under its name
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: dict[str, str]) -> None:
    """Make ``package`` resolve each name in ``exports`` (``{name: module}``) from its module on first access."""
    module = sys.modules[package]
    module.__dict__["_EXPORTS"] = exports

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            module.__dict__[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(module.__dict__.get("__all__", [])) | set(module.__dict__))

    module.__dict__["__getattr__"] = __getattr__
    module.__dict__["__dir__"] = __dir__
    module.__class__ = _Package
