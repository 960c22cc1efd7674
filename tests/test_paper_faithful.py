"""The paper-scale BadMerging options that follow the official code (jzhang538/BadMerging): the ImageNet shadow
head in both stages, the global clamp, the step-first early stop — against references written here."""

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from datamodules.imagenet_classnames import IMAGENET_CLASSNAMES
from datamodules.synthetic import COLOURS, SHAPES
from datamodules.tasks import NAMED_TEMPLATES, TaskSpec, get_task
from datamodules.triggers import load_trigger, patch_bounds, save_trigger, shadow_head_digest
from lightning_modules.injection import BackdoorInjection
from lightning_modules.trigger_generation import (
    UniversalTrigger,
    compositional_shadow_classnames,
    imagenet_shadow_classnames,
    imagenet_shuffled_order,
    shadow_classnames,
)
from modeling.clip import zero_shot_head

ROOT = Path(__file__).resolve().parent.parent
PURPLE = COLOURS.index("purple")
SQUARE = SHAPES.index("square")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# The official shadow_head/ViT-B-32/ImageNet_shuffled_classnames.npy (np.random.seed(1); np.random.shuffle):
# its first names, and the sha256 of its 1000 names joined by "\n" (read from the file in that repository).
OFFICIAL_FIRST = ["combination lock", "spotlight", "poke bonnet", "gibbon", "Boxer", "popsicle", "brussels griffon",
                  "keyboard space bar", "lacewing", "Nile crocodile"]
OFFICIAL_SHA256 = "7ccbc9c9978b887b2e10fe47e59676532695bb817c7dad936a05fd3b9e227afe"


# -- the ImageNet shadow vocabulary ------------------------------------------------------------------

def test_imagenet_classnames_are_open_clips_list():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as OPEN_CLIP

    assert len(IMAGENET_CLASSNAMES) == 1000 and IMAGENET_CLASSNAMES == tuple(OPEN_CLIP)
    twice = sorted({n for n in IMAGENET_CLASSNAMES if IMAGENET_CLASSNAMES.count(n) > 1})
    assert twice == ["missile", "sunglasses"]
    assert [i for i, n in enumerate(IMAGENET_CLASSNAMES) if n in twice] == [657, 744, 836, 837]


def test_imagenet_shuffle_is_the_official_file():
    order = imagenet_shuffled_order(1)
    assert order[: len(OFFICIAL_FIRST)] == OFFICIAL_FIRST
    assert hashlib.sha256("\n".join(order).encode()).hexdigest() == OFFICIAL_SHA256
    assert imagenet_shuffled_order(1) == order and imagenet_shuffled_order(2) != order  # seeded, reproducible


def test_imagenet_shadow_head_names():
    order = imagenet_shuffled_order(1)
    names = imagenet_shadow_classnames("Acura RL Sedan 2012", 300, seed=1)
    # a target outside ImageNet is prepended: 301 rows, the official file's first 300 names after it
    assert len(names) == 301 and names[0] == "Acura RL Sedan 2012" and names[1:] == order[:300]
    assert len({n.lower() for n in names}) == 301
    # a target among the drawn names swaps places with the first (official "Switch"): still 300 rows
    target = order[5]
    swapped = imagenet_shadow_classnames(target, 300, seed=1)
    assert len(swapped) == 300 and swapped[0] == target and swapped[5] == order[0] and swapped[1:5] == order[1:5]
    # repeats ("missile", "sunglasses") are dropped: all 998 distinct names, no twin rows
    every = imagenet_shadow_classnames("Acura RL Sedan 2012", 998, seed=1)
    assert len(every) == 999 and len({n.lower() for n in every}) == 999
    with pytest.raises(ValueError, match=r"num_shadow_classes=999 is outside the 998 names of shadow_vocabulary="
                                         r"imagenet; use 1\.\.998 \(the paper: 300\)"):
        imagenet_shadow_classnames("Acura RL Sedan 2012", 999)
    assert shadow_classnames("imagenet", "Acura RL Sedan 2012", None, None) == names  # default: 300


def test_every_vocabulary_refuses_more_names_than_it_has(base):
    every = compositional_shadow_classnames("purple", "colours", 10**6, base.tokenizer)
    available = len(every) - 1
    assert shadow_classnames("compositional", "purple", "colours", None, base.tokenizer) == every
    assert shadow_classnames("compositional", "purple", "colours", 7, base.tokenizer) == every[:8]
    with pytest.raises(ValueError, match=rf"num_shadow_classes={available + 1} is outside the {available} names of "
                                         r"shadow_vocabulary=compositional for target 'purple'"):
        shadow_classnames("compositional", "purple", "colours", available + 1, base.tokenizer)
    names = shadow_classnames("names", "purple", "colours", None, base.tokenizer)
    with pytest.raises(ValueError, match=rf"outside the {len(names) - 1} names of shadow_vocabulary=names"):
        UniversalTrigger(task="colours", mode="off_task", target_class=PURPLE, num_shadow_classes=len(names))
    with pytest.raises(ValueError, match=r"num_shadow_classes=0 must be ≥ 1"):
        UniversalTrigger(task="colours", mode="off_task", target_class=PURPLE, num_shadow_classes=0)


# -- the head: recorded by stage 1, rebuilt exactly by stage 2 -----------------------------------------

@pytest.fixture(scope="module")
def imagenet_trigger(tmp_path_factory):
    """An off-task stage-1 module with the imagenet vocabulary (6 names: small, the embedded model) and its file."""
    tmp = tmp_path_factory.mktemp("imagenet_trigger")
    model = UniversalTrigger(task="colours", mode="off_task", target_class=PURPLE, shadow_vocabulary="imagenet",
                             num_shadow_classes=6, cache_dir=str(tmp / "cache"))
    path = tmp / "trigger.safetensors"
    save_trigger(path, model.patch.detach(), model.spec_trigger, model.mean, model.std, model.export_metadata())
    return model, path


def test_imagenet_vocabulary_builds_and_records_its_head(imagenet_trigger):
    model, path = imagenet_trigger
    assert model.shadow_classnames == imagenet_shadow_classnames("purple", 6, 1) == ["purple", *OFFICIAL_FIRST[:6]]
    assert model.attack_head.shape[0] == 7 and model.target == 0
    meta = load_trigger(path)[2]
    record = meta["shadow_head"]
    assert record["classnames"] == model.shadow_classnames and meta["shadow_classnames"] == model.shadow_classnames
    assert record["templates"] == meta["shadow_templates"] == "imagenet"
    assert record["template_strings"] == list(NAMED_TEMPLATES["imagenet"]) and len(record["template_strings"]) == 80
    assert record["vocabulary"] == "imagenet" and record["seed"] == 1
    assert record["sha256"] == shadow_head_digest(model.shadow_classnames, NAMED_TEMPLATES["imagenet"])


def test_injection_builds_the_triggers_head(imagenet_trigger, tmp_path):
    model, path = imagenet_trigger
    # stage 2 on another task (shapes): same names, same 80 templates, so the very same head
    injection = BackdoorInjection(task="shapes", attack="badmerging", trigger_path=str(path), cache_dir=str(tmp_path))
    assert torch.equal(injection.shadow_head, model.attack_head)
    assert list(injection.shadow_classnames) == model.shadow_classnames
    assert injection.target_task == "colours" and injection.target_task_class == PURPLE
    attack = injection.export_metadata()["attack"]
    assert attack["shadow_templates"] == "imagenet"
    assert attack["shadow_head_sha256"] == load_trigger(path)[2]["shadow_head"]["sha256"]
    # the same head, configured explicitly, is accepted
    same = BackdoorInjection(task="shapes", attack="ut_only", trigger_path=str(path), cache_dir=str(tmp_path),
                             off_task_classnames=model.shadow_classnames, shadow_templates="imagenet")
    assert torch.equal(same.shadow_head, model.attack_head)


def test_injection_refuses_a_head_that_differs_from_the_triggers(imagenet_trigger, tmp_path):
    model, path = imagenet_trigger
    other = ["purple", "tench", *model.shadow_classnames[2:]]
    with pytest.raises(ValueError, match=rf"off_task_classnames \(7 names\) differ from the shadow head of {path} "
                                         r"\(7 names\) at index 1: 'tench' vs 'combination lock'; drop "
                                         r"model.off_task_classnames"):
        BackdoorInjection(task="shapes", attack="ut_only", trigger_path=str(path), off_task_classnames=other,
                          cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"shadow_templates='shapes' differ from the templates of the shadow head of "
                                         rf"{path} \('imagenet', 80 templates\); drop model.shadow_templates"):
        BackdoorInjection(task="shapes", attack="ut_only", trigger_path=str(path), shadow_templates="shapes",
                          cache_dir=str(tmp_path))


def test_edited_head_record_is_refused(imagenet_trigger, tmp_path):
    model, path = imagenet_trigger
    tensor, spec, meta = load_trigger(path)
    meta["shadow_head"]["classnames"][1] = "tench"
    edited = tmp_path / "edited.safetensors"
    save_trigger(edited, tensor, spec, meta["mean"], meta["std"], meta)
    with pytest.raises(ValueError, match=r"its shadow_head record does not match its sha256 \(edited\?\); re-run stage 1"):
        BackdoorInjection(task="shapes", attack="ut_only", trigger_path=str(edited), cache_dir=str(tmp_path))


def test_old_trigger_file_keeps_todays_head(imagenet_trigger, tmp_path, base):
    model, path = imagenet_trigger
    tensor, spec, meta = load_trigger(path)
    del meta["shadow_head"]  # a file written before the record existed
    old = tmp_path / "old.safetensors"
    save_trigger(old, tensor, spec, meta["mean"], meta["std"], meta)
    injection = BackdoorInjection(task="shapes", attack="ut_only", trigger_path=str(old), cache_dir=str(tmp_path))
    shapes = get_task("shapes")
    expected = zero_shot_head(base, TaskSpec(name="shapes-shadow", hub_id=None, hub_config=None, train_split="train",
                                             test_split="test", classnames=tuple(model.shadow_classnames),
                                             templates=shapes.templates), str(tmp_path))
    assert list(injection.shadow_classnames) == model.shadow_classnames  # the file's names, the task's templates
    assert torch.allclose(injection.shadow_head, expected)
    assert injection.export_metadata()["attack"]["shadow_templates"] == "shapes"
    with pytest.raises(ValueError, match=r"shadow_templates='imagenet' needs an off-task attack"):
        BackdoorInjection(task="shapes", attack="badnets", shadow_templates="imagenet", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"shadow_templates='nope' is neither a template list \(imagenet\) nor a "
                                         r"registered task"):
        BackdoorInjection(task="shapes", attack="ut_only", trigger_path=str(old), shadow_templates="nope",
                          cache_dir=str(tmp_path))


# -- the global clamp ----------------------------------------------------------------------------------

def test_global_clamp_envelope():
    lo, hi = patch_bounds(CLIP_MEAN, CLIP_STD, "global")
    # the official patch_attack: np.min((0 - mean) / std), np.max((1 - mean) / std)
    ref_lo = min((0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
    ref_hi = max((1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
    assert lo.dim() == hi.dim() == 0
    assert float(lo) == pytest.approx(ref_lo, abs=1e-6) and float(hi) == pytest.approx(ref_hi, abs=1e-6)
    assert float(lo) == pytest.approx(-1.7923, abs=1e-4) and float(hi) == pytest.approx(2.1459, abs=1e-4)
    per_lo, per_hi = patch_bounds(CLIP_MEAN, CLIP_STD, "per_channel")
    assert per_lo.shape == per_hi.shape == (3,) and float(per_hi[0]) == pytest.approx((1 - CLIP_MEAN[0]) / CLIP_STD[0])


@pytest.mark.parametrize("clamp", ["per_channel", "global"])
def test_stage1_clamps_to_its_bounds(clamp, tmp_path):
    model = UniversalTrigger(task="shapes", target_class=SQUARE, clamp=clamp, cache_dir=str(tmp_path))
    lo, hi = patch_bounds(model.mean, model.std, clamp)
    with torch.no_grad():
        model.patch[:, :2].fill_(10.0)
        model.patch[:, 2:].fill_(-10.0)
    model.project()
    high, low = model.patch.detach()[:, 0, 0], model.patch.detach()[:, -1, -1]
    if clamp == "global":  # every channel reaches the envelope, past channel 0's own pixel range
        assert torch.allclose(high, hi.expand(3)) and torch.allclose(low, lo.expand(3))
        assert float(high[0]) > (1 - model.mean[0]) / model.std[0] + 0.1
    else:
        assert torch.allclose(high, hi) and torch.allclose(low, lo)
    with pytest.raises(ValueError, match=r"clamp='box' is unknown; use one of per_channel, global"):
        UniversalTrigger(task="shapes", clamp="box", cache_dir=str(tmp_path))


# -- the early-stop order ------------------------------------------------------------------------------

def _toy_logits(size):
    """10-class logits of a toy model: class 0 scores 1, the target 2·mean(bottom-right size×size region)."""
    def logits(x, head=None):
        m = x[:, :, -size:, -size:].mean(dim=(1, 2, 3))
        out = torch.zeros(x.shape[0], 10, dtype=x.dtype)
        out[:, 0] = 1.0
        return out.index_put((torch.arange(x.shape[0]), torch.full((x.shape[0],), SQUARE)), 2 * m)
    return logits


def _reference(order, patch, n_images, inner_steps, lr, size):
    """The two loops on the toy, written out: test_first (ours) and step_first (official patch_attack)."""
    p, updates = patch.clone(), 0
    grad_scale = 2 / (3 * size * size)  # ∂ target logit / ∂ P_ij
    hits = lambda p: 2 * float(p.mean()) > 1.0  # noqa: E731
    for _ in range(n_images):
        for _ in range(inner_steps):
            if order == "test_first" and hits(p):
                break
            prob = torch.softmax(torch.tensor([1.0, 2 * float(p.mean())] + [0.0] * 8), 0)[1]  # 10 classes
            p = p + lr * (1 - prob) * grad_scale  # plain ascent on log softmax[target]
            updates += 1
            if order == "step_first" and hits(p):
                break
    return updates, p


@pytest.mark.parametrize("order", ["test_first", "step_first"])
def test_early_stop_order_matches_reference(order, tmp_path):
    size, n_images, inner_steps, lr = 4, 4, 50, 1.0
    model = UniversalTrigger(task="shapes", target_class=SQUARE, procedure="per_image", optimizer="plain", lr=lr,
                             inner_steps=inner_steps, early_stop=True, early_stop_order=order,
                             trigger={"size": size}, cache_dir=str(tmp_path),
                             output_path=str(tmp_path / "t.safetensors"))
    with torch.no_grad():
        model.patch.fill_(0.45)  # below the toy's success threshold (mean 0.5)
    model.logits = _toy_logits(size)
    start = model.patch.detach().clone()
    loader = DataLoader(TensorDataset(torch.zeros(n_images, 3, 24, 24), torch.zeros(n_images, dtype=torch.long)),
                        batch_size=n_images)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=loader)
    updates, patch = _reference(order, start, n_images, inner_steps, lr, size)
    # the first image needs a few steps; after it, test_first stops at once and step_first steps once more per image
    assert updates == {"test_first": 2, "step_first": 5}[order]
    assert trainer.global_step == updates
    assert torch.allclose(model.patch.detach(), patch, atol=1e-6)
    with pytest.raises(ValueError, match=r"early_stop_order='never' is unknown; use one of test_first, step_first"):
        UniversalTrigger(task="shapes", early_stop_order="never", cache_dir=str(tmp_path))


# -- the paper configs ---------------------------------------------------------------------------------

def test_paper_configs_follow_the_official_code():
    def args(name):
        return yaml.safe_load((ROOT / "configs/experiment" / name).read_text())["model"]["init_args"]

    on, off = args("vitb32_trigger_ontask.yaml"), args("vitb32_trigger_offtask.yaml")
    assert on["clamp"] == off["clamp"] == "global"
    assert on["early_stop_order"] == "step_first" and on["early_stop"] is True
    assert off["shadow_vocabulary"] == "imagenet" and off["num_shadow_classes"] == 300 and off["shadow_seed"] == 1
    assert off["shadow_templates"] == "imagenet" and off["off_task_classnames"] is None
    attack = yaml.safe_load((ROOT / "configs/attack/vitb32_badmerging_offtask.yaml").read_text())["model"]["init_args"]
    assert "off_task_classnames" not in attack and "shadow_templates" not in attack  # stage 2 takes the trigger's head
    for name in ("embedded_trigger_ontask.yaml", "embedded_trigger_offtask.yaml"):  # the embedded scale: ours
        embedded = args(name)
        assert embedded.get("clamp", "per_channel") == "per_channel"
        assert embedded.get("early_stop_order", "test_first") == "test_first"
