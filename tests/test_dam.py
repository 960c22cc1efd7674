"""DAM (Defense-Aware Merging): its concrete mask against torch.distributions, the training loop against a small
reference written like the public code (a shared mask on every task vector, FusionBench's TaskWiseMergedModel),
the defense through the evaluation API and merge.py, its refusals, and that it reads no attacker data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

import merge
from defenses import DAM, defense_setting, defense_settings, resolve_defense
from evaluation.merge_eval import MergeEvalRequest, evaluate_merges
from evaluation.merge_methods import MergeContext
from merging.dam import concrete_sample, dam_defend
from merging.io import MergeInputError, save_state_dict

SMALL = dict(synthetic_train_size=200, synthetic_test_size=40, val_max_examples=20, batch_size=64, device="cpu")
CONFIG = "configs/defense/embedded_dam.yaml"


def test_concrete_sample_is_torch_relaxed_bernoulli():
    logits = torch.linspace(-3, 3, 40).view(5, 8).requires_grad_(True)
    torch.manual_seed(11)
    ref = torch.distributions.RelaxedBernoulli(torch.tensor(0.5), logits=logits).rsample()
    got = concrete_sample(logits, 0.5, torch.Generator().manual_seed(11))  # the same uniforms: the same stream
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    g_ref, = torch.autograd.grad(ref.sum(), logits)
    g_got, = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)


# --- the training loop against a reference written like clip_safe_concrete_adamerging.py (task-wise, λ fixed) ----
def _toy(seed=0, n_tasks=2, steps=4, batch=6):
    """θ_pre, task vectors, heads and per-draw batches of a linear "encoder" f(x) = W·vec(x) + b on 3×4×4 images."""
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(5, 48, generator=g), "b": torch.randn(5, generator=g), "step": torch.tensor(3)}
    taus = [{"w": 0.5 * torch.randn(5, 48, generator=g), "b": 0.5 * torch.randn(5, generator=g)} for _ in range(n_tasks)]
    heads = [torch.randn(3, 5, generator=g) for _ in range(n_tasks)]
    draws = [[torch.rand(batch, 3, 4, 4, generator=g) for _ in range(n_tasks)] for _ in range(2 * steps)]
    return pre, taus, heads, draws


def _encode(params, x):
    return x.flatten(1) @ params["w"].T + params["b"]


def _reference(pre, taus, heads, draws, lam, steps, w, lr, adv_lr, T, seed):
    """The public code's loop, literally: a mask sampled by RelaxedBernoulli from the global RNG and rescaled by its
    mean; merge_weights: θ_pre + Σ_t τ_t·(λ_t·m); a task loop for the perturbation (−CE to the clean argmax, mask
    detached) and one for the mask (entropy + w·entropy of clamp(x + P_t, 0, 1)); the final continuous sample."""
    torch.manual_seed(seed)
    logits = {k: torch.zeros_like(pre[k], requires_grad=True) for k in ("w", "b")}
    P = torch.zeros(len(taus), 3, 4, 4, requires_grad=True)
    opt, opt_adv = torch.optim.Adam(logits.values(), lr=lr), torch.optim.Adam([P], lr=adv_lr)

    def sample():
        m = {k: torch.distributions.RelaxedBernoulli(torch.tensor(T), logits=v).rsample() for k, v in logits.items()}
        return {k: v / v.mean() for k, v in m.items()}

    def merge_weights(mask):
        state = {k: pre[k] for k in ("w", "b")}
        for tau in taus:
            state = {k: state[k] + tau[k] * (lam * mask[k]) for k in state}
        return state

    def H(z):
        p = z.softmax(-1)
        return -(p * p.log()).sum(-1).mean()

    batches = iter(draws)
    for _ in range(steps):
        mask = sample()
        state = merge_weights(mask)
        detached = {k: v.detach() for k, v in state.items()}
        total = 0
        for t, x in enumerate(next(batches)):
            z = _encode(detached, torch.cat([x, x + P[t]])) @ heads[t].T
            total = total + torch.mean(-F.cross_entropy(z[len(x):], z[:len(x)].argmax(1)))
        total.backward()
        opt_adv.step()
        opt_adv.zero_grad()
        total = 0
        for t, x in enumerate(next(batches)):
            with torch.no_grad():
                xp = torch.clamp(x + P[t], min=0, max=1)
            z = _encode(state, torch.cat([x, xp])) @ heads[t].T
            total = total + H(z[:len(x)]) + w * H(z[len(x):])
        total.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return {**merge_weights(sample()), "step": pre["step"]}


def test_dam_on_a_task_arithmetic_merge_is_the_reference():
    """Masking the TA merge θ_pre + λΣτ_t is DAM's shared mask on every task vector: the same weights."""
    pre, taus, heads, draws = _toy()
    lam, steps, w, T, seed = 0.3, 4, 0.5, 0.5, 5
    ref = _reference(pre, taus, heads, draws, lam, steps, w, lr=0.05, adv_lr=0.05, T=T, seed=seed)
    merged = {"w": pre["w"] + lam * sum(t["w"] for t in taus), "b": pre["b"] + lam * sum(t["b"] for t in taus),
              "step": pre["step"]}
    flat = iter([x for draw in draws for x in draw])  # the same batches in the same order
    got = dam_defend(pre, merged, lambda p, xs: [_encode(p, x) @ h.T for x, h in zip(xs, heads)],
                     lambda t: next(flat), len(taus), (3, 4, 4), adv_weight=w, steps=steps, lr=0.05, adv_lr=0.05,
                     temperature=T, bounds=(0.0, 1.0), generator=torch.Generator().manual_seed(seed))
    assert set(got) == {"w", "b", "step"} and torch.equal(got["step"], pre["step"])  # non-float keys copied
    torch.testing.assert_close(got["w"], ref["w"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["b"], ref["b"], rtol=1e-4, atol=1e-5)
    # and it did something: not the merge, and another w gives another mask
    assert not torch.allclose(got["w"], merged["w"], atol=1e-3)
    flat = iter([x for draw in draws for x in draw])
    other = dam_defend(pre, merged, lambda p, xs: [_encode(p, x) @ h.T for x, h in zip(xs, heads)],
                       lambda t: next(flat), len(taus), (3, 4, 4), adv_weight=5.0, steps=steps, lr=0.05, adv_lr=0.05,
                       temperature=T, bounds=(0.0, 1.0), generator=torch.Generator().manual_seed(seed))
    assert not torch.allclose(other["w"], got["w"], atol=1e-4)


# --- the defense: data it reads, the evaluation API, merge.py ---------------------------------------------------
class Poison:
    """Stands for what DAM must never read (the models' metadata and files, where an attacker's trigger lives)."""

    def __getattr__(self, name):
        raise AssertionError(f"DAM read attacker-side data ({name})")

    def __getitem__(self, key):
        raise AssertionError(f"DAM read attacker-side data [{key!r}]")

    def __iter__(self):
        raise AssertionError("DAM read attacker-side data (iterated)")

    def __len__(self):
        raise AssertionError("DAM read attacker-side data (len)")


class SpyContext(MergeContext):
    """Val images of each task from a fixed tensor, labels from ``label_seed``; records every split read."""

    def datamodule(self, task, batch_size, stage="fit"):
        ctx = self

        class Data:
            def dataset(self, split):
                ctx.splits.append((task, split))
                g = torch.Generator().manual_seed(len(task))
                x = torch.randn(40, 3, 24, 24, generator=g)
                y = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(ctx.label_seed))
                return torch.utils.data.TensorDataset(x, y)
        return Data()


def test_dam_reads_only_unlabeled_clean_val_images(base, session_cache, monkeypatch):
    import evaluation.evaluate

    def no_trigger(*a, **k):
        raise AssertionError("DAM pasted a trigger")
    monkeypatch.setattr(evaluation.evaluate, "apply_trigger", no_trigger)
    theta_pre = base.encoder_state_dict()
    merged = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) if v.is_floating_point()
              else v for k, v in theta_pre.items()}
    results = []
    for label_seed in (0, 1):  # other labels: the same defended weights (labels are never read)
        ctx = SpyContext(base, theta_pre, Poison(), ["shapes", "digits"], metas=Poison(), cache_dir=session_cache)
        ctx.splits, ctx.label_seed = [], label_seed
        dam = DAM(steps=2, batch_size=8, device="cpu")
        dam.prepare(ctx, {})
        results.append(dam.apply(merged, 0.1))
        assert ctx.splits == [("shapes", "val"), ("digits", "val")]
    for k in merged:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=0, atol=0)
    assert any(not torch.equal(results[0][k], merged[k]) for k in merged)
    # the cache: the same merge and strength again is the same tensors, not a new training
    assert all(results[1][k] is dam.apply(merged, 0.1)[k] for k in merged)


def _backdoored(tmp_path, base, models):
    """A copy of the shapes model that carries an attacker's trigger in its metadata (a BadNets patch → class 1)."""
    from datamodules.triggers import TriggerSpec
    from merging.io import load_metadata, load_state_dict

    meta = load_metadata(models[0])
    meta["attack"] = {"name": "badnets", "trigger": TriggerSpec(kind="patch", size=4, location="bottom_right", seed=3).to_dict(),
                      "mean": list(base.mean), "std": list(base.std), "target_task": "shapes", "target_task_class": 1}
    path = tmp_path / "shapes_bd.safetensors"
    save_state_dict(path, load_state_dict(models[0]), meta)
    return path


def test_dam_and_its_selection_use_no_attacker_data(models, base, session_cache, tmp_path, monkeypatch):
    """A merge with a backdoored model: the rows measure its trigger, but DAM's training and the choice of w
    never paste it and read only val data; the record says what w was chosen on."""
    import datamodules.datamodule
    import evaluation.evaluate
    import evaluation.merge_eval

    inside, pasted, splits = [], [], []

    def guarded(f):
        def run(*a, **k):
            inside.append(f.__name__)
            try:
                return f(*a, **k)
            finally:
                inside.pop()
        return run
    monkeypatch.setattr(DAM, "prepare", guarded(DAM.prepare))
    monkeypatch.setattr(DAM, "apply", guarded(DAM.apply))
    monkeypatch.setattr(evaluation.merge_eval._Run, "select_strength", guarded(evaluation.merge_eval._Run.select_strength))
    paste, dataset = evaluation.evaluate.apply_trigger, datamodules.datamodule.TaskDataModule.dataset

    def spy_paste(*a, **k):
        pasted.append(list(inside))
        return paste(*a, **k)

    def spy_dataset(self, split):
        if inside:
            splits.append(split)
        return dataset(self, split)
    monkeypatch.setattr(evaluation.evaluate, "apply_trigger", spy_paste)
    monkeypatch.setattr(datamodules.datamodule.TaskDataModule, "dataset", spy_dataset)

    setting = defense_setting("dam", strengths=[0.0, 0.1], max_drop=1.0, report="selected",
                              init_args={"steps": 2, "batch_size": 8, "device": "cpu"})
    request = MergeEvalRequest(models=[str(_backdoored(tmp_path, base, models)), str(models[1])],
                               individual=False, zero_shot=False, defenses=[setting], cache_dir=session_cache, **SMALL)
    rows = evaluate_merges(request).rows
    assert pasted and all(not where for where in pasted)  # the trigger was measured, never inside DAM or selection
    assert splits and set(splits) == {"val"}
    dam_rows = [r for r in rows if r.defense == "dam"]
    assert [(r.defense_alpha, r.attack is not None) for r in dam_rows] == [(0.1, False), (0.1, True)]
    record = dam_rows[0].defense_selection
    assert record["split"] == "val" and set(record["scores"]) == {0.0, 0.1} and record["chosen"] == 0.1
    assert "w with mean val accuracy" in record["rule"]


def test_the_config_runs_through_merge_py(models, session_cache, tmp_path):
    """configs/defense/embedded_dam.yaml through merge.py (its steps cut to 2 here): a dam row per strength, the
    selected one marked, and the same settings as the API builds from the file."""
    config = yaml.safe_load(open(CONFIG))
    setting, = defense_settings(config["defenses"])
    assert isinstance(setting.defense, DAM) and setting.defense.hparams["steps"] == config["defenses"][0]["init_args"]["steps"]
    config["defenses"][0]["init_args"].update(steps=2, device="cpu")
    small = tmp_path / "dam.yaml"
    small.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    argv = ["--config", str(small), "--models", *map(str, models), "--out_dir", str(out), "--cache_dir", session_cache,
            "--synthetic_train_size", "200", "--synthetic_test_size", "40", "--val_max_examples", "20",
            "--batch_size", "64", "--device", "cpu", "--individual", "false", "--zero_shot", "false"]
    assert merge.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    dam = [r for r in rows if r["defense"] == "dam"]
    strengths = config["defenses"][0]["strengths"]
    assert [r["defense_alpha"] for r in dam if r["attack"] is None] == strengths
    selected = [r for r in dam if r["attack"] is None and r["defense_selected"]]
    assert len(selected) == 1 and selected[0]["defense_alpha"] == selected[0]["defense_selection"]["chosen"]
    assert selected[0]["defense_selection"]["split"] == "val"


@pytest.mark.parametrize("init_args, message", [
    ({"steps": 0}, r"^defense dam: steps=0 must be a positive integer$"),
    ({"lr": -1}, r"^defense dam: lr=-1 must be a finite number > 0$"),
    ({"temperature": float("nan")}, r"^defense dam: temperature=nan must be a finite number > 0$"),
    ({"clamp": "pixel"}, r"^defense dam: clamp='pixel' must be one of valid, unit$"),
    ({"eval_mask": "hard"}, r"^defense dam: eval_mask='hard' must be one of continuous, discrete$"),
    ({"tasks": "shapes"}, r"^defense dam: tasks='shapes' must be a non-empty list of the merged models' tasks"),
])
def test_dam_refuses_bad_hyperparameters(init_args, message):
    with pytest.raises(MergeInputError, match=message):
        resolve_defense({"class_path": "dam", "init_args": init_args})


def test_dam_refusals_through_merge_py(models, session_cache, tmp_path, one_error_line):
    """Before any work: a bad hyperparameter, and a data task outside the merge (checked when the run starts)."""
    out = tmp_path / "out"
    common = ["--models", *map(str, models), "--out_dir", str(out), "--cache_dir", session_cache, "--device", "cpu",
              "--synthetic_train_size", "200", "--synthetic_test_size", "40"]
    assert merge.main([*common, "--defenses", '[{name: dam, init_args: {steps: 0}}]']) == 2
    assert one_error_line("merge.py") == "merge.py: error: defense dam: steps=0 must be a positive integer"
    assert merge.main([*common, "--defenses", '[{name: dam, init_args: {tasks: [colours]}}]']) == 2
    assert one_error_line("merge.py") == ("merge.py: error: defense dam: tasks ['colours'] are not among the merged "
                                          "models' tasks ['shapes', 'digits']; name those, or null for all")
    assert not out.exists()
