"""Defenses of merged models: one class per defense, registered by name (``ibvs``, ``dam``) or named by import path.

    from defenses import defense_setting
    setting = defense_setting("ibvs", {"clean": "c.safetensors", "backdoored": "b.safetensors"}, strengths=[0.5, 1])

pass ``setting`` in ``evaluation.merge_eval.MergeEvalRequest.defenses``. A new defense is a ``Defense`` subclass in
any importable file, named in a config as ``my_module.MyDefense``.
"""

from .ibvs import IBVS
from .dam import DAM  # after IBVS: names are listed in registration order (ibvs, dam)
from .registry import REGISTRY, Defense, defense_setting, defense_settings, register_defense, resolve_defense

__all__ = ["DAM", "IBVS", "REGISTRY", "Defense", "defense_setting", "defense_settings", "register_defense", "resolve_defense"]
