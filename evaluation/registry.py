"""A registry of components (merge methods, defenses): one class each, found by name or by import path.

A component is named in three ways (as jsonargparse names classes):

    ties                                              a registered name (case and '-'/'_' insensitive)
    my_module.MyMethod                                an import path: the module must be importable
    {class_path: my_module.MyMethod, init_args: {}}   the same with constructor arguments

so a user's new component is one Python file plus one config, and no orchestration code changes.
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, Mapping, TypeVar

from merging.io import MergeInputError

T = TypeVar("T")


def canonical_name(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Classes deriving from ``base``, registered under their ``name`` attribute."""

    def __init__(self, kind: str, base: type, example: str):
        self.kind, self.base, self.example = kind, base, example
        self._classes: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: ``cls`` becomes resolvable by ``cls.name``."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a {self.base.__name__} subclass")
        self._classes[canonical_name(cls.name)] = cls
        return cls

    def names(self) -> list[str]:
        return list(self._classes)

    def unknown(self, spec: object, flag: str | None = None, also: tuple[str, ...] = ()) -> MergeInputError:
        known = ", ".join([*also, *self._classes])
        hint = f"or a class path such as {self.example}"
        if flag:
            return MergeInputError(f"{flag}={spec!r} is unknown; use one of {known}, {hint}")
        return MergeInputError(f"unknown {self.kind} {spec!r}; known: {known}; {hint}")

    def resolve(self, spec: Any, *, flag: str | None = None, also: tuple[str, ...] = ()) -> T:
        """An instance for ``spec``: an instance, a class, a registered name, an import path or {class_path, init_args}."""
        if isinstance(spec, self.base):
            return spec
        init_args: Mapping = {}
        if isinstance(spec, Mapping):
            extra = sorted(set(map(str, spec)) - {"class_path", "init_args"})
            if extra or "class_path" not in spec:
                raise MergeInputError(f"{self.kind} {dict(spec)!r}: give {{class_path: module.Class, init_args: {{...}}}}"
                                      + (f"; unknown key(s) {extra}" if extra else ""))
            init_args = spec.get("init_args") or {}
            if not isinstance(init_args, Mapping):
                raise MergeInputError(f"{self.kind} {spec['class_path']}: init_args={init_args!r} must be a mapping")
            spec = spec["class_path"]
        if isinstance(spec, type):
            cls = spec
        elif isinstance(spec, str) and canonical_name(spec) in self._classes:
            cls = self._classes[canonical_name(spec)]
        elif isinstance(spec, str) and "." in spec.strip(". "):
            cls = self._import(spec.strip())
        else:
            raise self.unknown(spec, flag, also)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise MergeInputError(f"{self.kind} {spec!r} is not a {self.base.__name__} subclass; derive it from "
                                  f"{self.base.__module__}.{self.base.__name__}")
        try:
            return cls(**dict(init_args))
        except TypeError as e:
            raise MergeInputError(f"{self.kind} {cls.__name__}: bad init_args {dict(init_args)!r} ({e})") from None

    def _import(self, path: str) -> type:
        module_name, _, attribute = path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except (ImportError, SyntaxError) as e:  # a missing module, or a user's file that does not parse
            raise MergeInputError(f"{self.kind} class path {path!r}: cannot import {module_name!r} ({e}); "
                                  "put its directory on PYTHONPATH") from None
        if not hasattr(module, attribute):
            raise MergeInputError(f"{self.kind} class path {path!r}: module {module_name!r} has no {attribute!r}")
        return getattr(module, attribute)
