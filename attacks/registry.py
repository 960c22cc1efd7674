"""The one attack registry: a name -> (class, default settings); a class by import path works unregistered.

An attack is named by a spec, as configs write it:

    "badmerging"                                         a registered name
    "my_module.MyAttack"                                 an import path (the module must be importable)
    {class_path: badmerging | my_module.MyAttack, init_args: {...}}   either, with constructor arguments

``make_attack(spec, PoisoningAttack)`` returns the instance, its ``name`` set to the registered name (for
an import path: the class's own ``name``, else the path).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from attacks.base import Attack, AttackError, PoisoningAttack, VectorAttack

__all__ = ["attack_names", "build_vector_attack", "make_attack", "poisoning_attack_names", "register_attack", "vector_attack_names"]

_REGISTRY: dict[str, tuple[type[Attack], dict[str, Any]]] = {}
A = TypeVar("A", bound=type[Attack])


def register_attack(name: str, **defaults: Any) -> Callable[[A], A]:
    """Class decorator: register the class under ``name``; ``defaults`` are constructor arguments that
    this name implies (``sbv_sc`` = SBV with ``sign_consistent=True``), overridable by a spec's init_args."""

    def add(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, (PoisoningAttack, VectorAttack))):
            raise AttackError(f"register_attack({name!r}): {cls!r} is not a PoisoningAttack or VectorAttack subclass")
        known = _REGISTRY.get(name)
        if known is not None and (known[0] is not cls or known[1] != defaults):
            raise AttackError(f"attack name {name!r} is already registered to {known[0].__qualname__}; pick another name")
        _REGISTRY[name] = (cls, dict(defaults))
        return cls

    return add


def attack_names(kind: type[Attack] = Attack) -> list[str]:
    """Registered names whose class is a ``kind`` subclass, in registration order."""
    return [n for n, (cls, _) in _REGISTRY.items() if issubclass(cls, kind)]


def poisoning_attack_names() -> list[str]:
    return attack_names(PoisoningAttack)


def vector_attack_names() -> list[str]:
    return attack_names(VectorAttack)


def _import_class(path: str) -> type:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise AttackError(f"attack class_path {path!r}: no module {e.name!r}; add its directory to PYTHONPATH "
                          "or use a registered attack") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise AttackError(f"attack class_path {path!r}: module {module_name} has no class {attr!r}; check the name")
    return cls


def _parse(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and isinstance(spec.get("class_path"), str) and set(spec) <= {"class_path", "init_args"}:
        init_args = spec.get("init_args") or {}
        if isinstance(init_args, Mapping):
            return spec["class_path"], dict(init_args)
    raise AttackError(f"attack={spec!r} is neither a name nor {{class_path: <name or module.Class>, init_args: {{...}}}}; "
                      "fix the attack entry")


def make_attack(spec: str | Mapping[str, Any], kind: type[Attack] = Attack) -> Attack:
    """The attack ``spec`` names (see the module docstring), checked to be a ``kind``."""
    path, init_args = _parse(spec)
    what = "poisoning" if kind is PoisoningAttack else "vector" if kind is VectorAttack else "any"
    if path in _REGISTRY:
        cls, defaults = _REGISTRY[path]
        name, init_args = path, {**defaults, **init_args}
    elif "." in path:
        cls = _import_class(path)
        name = getattr(cls, "name", "") or path
    else:
        raise AttackError(f"attack={path!r} is unknown; use one of {', '.join(attack_names(kind))} "
                          "or an import path such as my_module.MyAttack")
    if not issubclass(cls, kind):
        raise AttackError(f"attack={path!r} ({cls.__qualname__}) is not a {what} attack ({kind.__name__} subclass); "
                          f"use one of {', '.join(attack_names(kind))}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise AttackError(f"attack={path!r} ({cls.__qualname__}) is abstract: define {missing}")
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(init_args) - set(params))
        if unknown:
            raise AttackError(f"attack {name}: unknown setting(s) {unknown}; use {sorted(params)}")
    attack = cls(**init_args)
    attack.name = name
    return attack


def build_vector_attack(kind: str | Mapping[str, Any], clean_path: str, variant_paths: Mapping[str, str],
                        output: Mapping[str, Any], trigger_from: str, path: str | Path) -> Path:
    """Build the vector attack ``kind`` (e.g. ``sbv``) from trained pairs into ``path``.

    ``output`` = ``{name: <export's attack name>, **settings}``; the settings override the kind's defaults.
    """
    settings = {k: v for k, v in output.items() if k != "name"}
    spec = {"class_path": kind, "init_args": settings} if isinstance(kind, str) else kind
    attack = make_attack(spec, VectorAttack)
    return attack.build(clean_path, variant_paths, trigger_from, path, name=output.get("name"))
