"""The attack registry: a user's attack as one file + one config, the shipped components, and SBV as a vector attack."""

import json
import textwrap

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from attacks import (AttackError, PoisoningAttack, VectorAttack, build_vector_attack, make_attack, poisoning_attack_names,
                     vector_attack_names)
from attacks.sbv import build_sbv, check_sbv_output
from datamodules.datamodule import TaskDataModule
from merging.backdoor_vectors import backdoor_vector, sparse_backdoor_vector
from merging.io import load_metadata, load_state_dict, save_state_dict

TOY = '''
"""A toy attack: pull the triggered embeddings toward the target's head row (cosine), random 3 px patch."""
import torch
import torch.nn.functional as F

from attacks import PoisoningAttack


class AlignToTarget(PoisoningAttack):
    name = "align_to_target"
    trigger_kind = "patch"

    def __init__(self, margin: float = 0.0):
        self.margin = margin
        self.calls = 0

    def backdoor_loss(self, module, x_bd, z_bd):
        self.calls += 1
        direction = module.backdoor_head[module.target]
        return (1 - F.cosine_similarity(z_bd, direction[None].to(z_bd.dtype), dim=-1) - self.margin).clamp(min=0).mean()

    def export_fields(self, module):
        return {"margin": self.margin}

    def checkpoint_state(self):
        return {"align_calls": self.calls}
'''


def _write_toy(tmp_path, monkeypatch):
    (tmp_path / "toy_attack.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "toy.yaml"  # what configs/attack/<x>.yaml would hold
    config.write_text("model:\n  init_args:\n    attack:\n      class_path: toy_attack.AlignToTarget\n"
                      "      init_args: {margin: 0.1}\n    trigger: {kind: patch, size: 3, seed: 4}\n    alpha: 2.0\n")
    return config


def test_a_users_attack_is_one_file_plus_one_config(tmp_path, monkeypatch, session_cache):
    config = _write_toy(tmp_path, monkeypatch)
    root = tmp_path / "run"
    args = ["--config", "configs/experiment/embedded_injection.yaml", "--config", str(config),
            "--model.init_args.cache_dir", session_cache, "--data.cache_dir", session_cache,
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--data.synthetic_train_size", "200",
            "--data.synthetic_test_size", "40", "--data.batch_size", "16"]
    # the plain LightningCLI (no project orchestration): the attack is found from the config alone
    cli = LightningCLI(datamodule_class=TaskDataModule, args=args, run=False, save_config_kwargs={"overwrite": True})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    attack = cli.model.attack
    assert type(attack).__name__ == "AlignToTarget" and attack.margin == 0.1 and attack.name == "align_to_target"
    assert attack.calls == 2 and cli.trainer.global_step == 2
    logged = cli.trainer.callback_metrics
    assert torch.isclose(logged["train/loss"], logged["train/clean_loss"] + 2.0 * logged["train/backdoor_loss"])
    assert cli.model._frozen == {}  # needs_pretrained_encoder is False: no copy of θ_pre kept
    checkpoint = {}
    cli.model.on_save_checkpoint(checkpoint)
    assert checkpoint == {"align_calls": 2}
    export = next(root.rglob("encoder.safetensors"))
    meta = load_metadata(export)["attack"]
    assert meta["name"] == "align_to_target" and meta["margin"] == 0.1 and meta["r_range"] is None
    assert meta["trigger"]["size"] == 3 and meta["trigger"]["seed"] == 4 and meta["alpha"] == 2.0


def test_shipped_attacks_are_registered_with_their_trigger_and_loss():
    assert poisoning_attack_names() == ["badnets", "blended", "ut_only", "badmerging"]
    assert vector_attack_names() == ["sbv", "sbv_sc"]
    kinds = {n: (a.trigger_kind, a.needs_trigger_file, a.needs_pretrained_encoder)
             for n in poisoning_attack_names() for a in [make_attack(n, PoisoningAttack)]}
    assert kinds == {"badnets": ("patch", False, False), "blended": ("blend", False, False),
                     "ut_only": (None, True, False), "badmerging": (None, True, True)}
    assert make_attack("sbv_sc", VectorAttack).sign_consistent is True
    assert make_attack({"class_path": "sbv_sc", "init_args": {"k": 30}}).settings() == {
        "combine": "sum", "k": 30, "sign_consistent": True, "scale": 1.0, "scope": "tensor"}


@pytest.mark.parametrize("spec, kind, message", [
    ("badnetz", PoisoningAttack, r"attack='badnetz' is unknown; use one of badnets, blended, ut_only, badmerging or"),
    ("sbv", PoisoningAttack, r"not a poisoning attack .*use one of badnets"),
    ("badnets", VectorAttack, r"not a vector attack .*use one of sbv, sbv_sc"),
    ({"class_path": "badnets", "init_args": {"alpha": 1}}, PoisoningAttack, r"attack badnets: unknown setting\(s\) \['alpha'\]"),
    ({"class_path": "sbv", "extra": 1}, VectorAttack, r"neither a name nor \{class_path"),
    ("no_such_module.Attack", PoisoningAttack, r"no module 'no_such_module'; add its directory to PYTHONPATH"),
    ("attacks.base.Missing", PoisoningAttack, r"module attacks.base has no class 'Missing'"),
    ("attacks.base.AttackError", PoisoningAttack, r"is not a poisoning attack"),
    ("attacks.base.PoisoningAttack", PoisoningAttack, r"is abstract: define backdoor_loss"),
    ({"class_path": "sbv", "init_args": {"k": 0}}, VectorAttack, r"sbv: k=0 must be in \(0, 100\]"),
])
def test_bad_attack_specs_fail_in_one_line(spec, kind, message):
    with pytest.raises(AttackError, match=message) as info:
        make_attack(spec, kind)
    assert "\n" not in str(info.value)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"conv1.weight": torch.randn(4, 3, 2, 2, generator=g), "ln_post.bias": torch.randn(7, generator=g),
            "transformer.resblocks.0.mlp.c_fc.weight": torch.randn(5, 3, generator=g)}


@pytest.fixture
def pairs(tmp_path):
    clean = tmp_path / "clean.safetensors"
    save_state_dict(clean, _state(0), {"kind": "finetune", "task": "shapes", "attack": None})
    variants = {}
    for i, name in enumerate(["bm_s0", "ut_s0"], start=1):
        variants[name] = str(tmp_path / f"{name}.safetensors")
        save_state_dict(variants[name], _state(i), {"kind": "finetune", "task": "shapes",
                                                    "attack": {"name": name.split("_")[0], "trigger": {"size": 4 + i}}})
    return str(clean), variants


def test_build_sbv_exports_clean_plus_scaled_sparse_combination(pairs, tmp_path):
    clean, variants = pairs
    output = {"name": "sbv", "combine": "mean", "k": 40, "scale": 1.5}
    path = build_sbv(clean, variants, output, "ut_s0", tmp_path / "out" / "sbv.safetensors")
    bvs = [backdoor_vector(_state(i), _state(0)) for i in (1, 2)]
    reference = sparse_backdoor_vector(bvs, "mean", 40, False, "tensor")
    got = load_state_dict(path)
    for key, value in _state(0).items():
        assert torch.allclose(got[key], value + 1.5 * reference[key], atol=1e-6), key
    meta = load_metadata(path)
    assert meta["kind"] == "sbv" and meta["task"] == "shapes" and meta["code_version"]
    assert meta["attack"]["name"] == "sbv" and meta["attack"]["trigger"] == {"size": 6}  # trigger_from's trigger
    record = meta["attack"]["sbv"]
    assert {k: record[k] for k in ("combine", "k", "sign_consistent", "scale", "scope")} == {
        "combine": "mean", "k": 40, "sign_consistent": False, "scale": 1.5, "scope": "tensor"}
    assert record["variants"] == variants and record["clean_reference"] == clean and record["trigger_from"] == "ut_s0"
    nonzero = sum(int((reference[k] != 0).sum()) for k in reference) / sum(v.numel() for v in reference.values())
    assert record["nonzero_fraction"] == pytest.approx(nonzero)


def test_sbv_sc_by_name_is_the_sign_consistent_sbv(pairs, tmp_path):
    clean, variants = pairs
    by_kind = build_vector_attack("sbv_sc", clean, variants, {"name": "mine"}, "bm_s0", tmp_path / "a.safetensors")
    by_output = build_sbv(clean, variants, {"name": "mine", "sign_consistent": True}, "bm_s0", tmp_path / "b.safetensors")
    a, b = load_state_dict(by_kind), load_state_dict(by_output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = load_metadata(by_kind)["attack"]
    assert meta["name"] == "mine" and meta["sbv"]["sign_consistent"] is True and meta["sbv"]["k"] == 100.0
    mask = sparse_backdoor_vector([backdoor_vector(_state(i), _state(0)) for i in (1, 2)], sign_consistent=True)
    assert any(int((v == 0).sum()) > 0 for v in mask.values())  # sign consistency did drop entries


@pytest.mark.parametrize("entry, message", [
    ({"combine": "sum"}, r"has no name; give each SBV a name"),
    ({"name": "s", "kk": 3}, r"outputs s: unknown key\(s\) \['kk'\]"),
    ({"name": "s", "combine": "max"}, r"outputs s: combine='max' is unknown; use one of sum, mean, elect"),
    ({"name": "s", "k": 101}, r"outputs s: k=101 must be in \(0, 100\]"),
    ({"name": "s", "scale": float("nan")}, r"outputs s: scale=nan must be a finite number"),
])
def test_sbv_outputs_are_checked_with_one_line_errors(entry, message):
    with pytest.raises(AttackError, match=message):
        check_sbv_output(entry)


def test_build_refuses_a_trigger_source_without_attack_metadata(pairs, tmp_path):
    clean, variants = pairs
    with pytest.raises(AttackError, match="trigger_from='nope' is not a variant"):
        build_sbv(clean, variants, {"name": "sbv"}, "nope", tmp_path / "x.safetensors")
    with pytest.raises(AttackError, match="has no attack metadata"):
        build_sbv(clean, {"c": clean}, {"name": "sbv"}, "c", tmp_path / "x.safetensors")
    assert json.dumps(check_sbv_output({"name": "sbv"})) == json.dumps(
        {"name": "sbv", "combine": "sum", "k": 100.0, "sign_consistent": False, "scale": 1.0, "scope": "tensor"})
