"""Attacks: one file per component, one registry (``attacks.registry``).

Poisoning attacks (``PoisoningAttack``): badnets, blended, ut_only, badmerging; used by
``lightning_modules.injection.BackdoorInjection`` through ``model.init_args.attack`` (a registered name,
or ``{class_path: my_module.MyAttack, init_args: {...}}`` for a user's class). Vector attacks
(``VectorAttack``): sbv, sbv_sc, built from trained (clean, backdoored) pairs by ``build_vector_attack``.

**Floor.** ``attacks`` sits just above the bottom packages and below ``lightning_modules``: it imports
only ``merging``, ``modeling`` and ``datamodules`` (plus torch), never ``lightning_modules``, ``evaluation``
or anything above, so the training module can import it without a cycle. The order, encoded by
tests/test_layers.py: merging → datamodules → modeling → attacks → lightning_modules → evaluation →
defenses, callbacks → experiments → entry scripts.

Adding an attack = one file defining a ``PoisoningAttack`` subclass (registered with
``@register_attack("name")`` in this package, or named by import path from anywhere) + one config
``configs/attack/<x>.yaml`` setting ``model.init_args.attack``.
"""

# Registration order is the order names are listed in messages.
from attacks import badnets, blended, ut_only, badmerging, sbv  # noqa: F401, I001  (register the shipped attacks)
from attacks.base import Attack, AttackError, InjectionModule, PoisonedCrossEntropy, PoisoningAttack, VectorAttack
from attacks.registry import (attack_names, build_vector_attack, make_attack, poisoning_attack_names, register_attack,
                              vector_attack_names)

__all__ = ["Attack", "AttackError", "InjectionModule", "PoisonedCrossEntropy", "PoisoningAttack", "VectorAttack",
           "attack_names", "build_vector_attack", "make_attack", "poisoning_attack_names", "register_attack",
           "vector_attack_names"]
