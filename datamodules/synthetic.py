"""The synthetic suite: four procedural 10-class image tasks with real class names.

Every image is rendered in torch, batched, from a seeded ``torch.Generator``, so a task is a pure
function of ``(task, split, seed, size)``. Four tasks, four visual *domains* (the analogue of
satellite photos vs digits vs textures in the real 8-task suite):

- ``shapes``   a coloured shape on a light background            (circle, square, ...)
- ``digits``   a light digit on a dark background                 (0 ... 9)
- ``textures`` a full-frame two-colour pattern                    (stripes, checkerboard, ...)
- ``colours``  a grey-world scene with one object of a named colour (red, green, ...)

``difficulty`` adds the task's nuisance (noise, clutter strokes, low contrast, small glyphs). The
embedded base model is pre-trained on clean captioned renders (``difficulty=0``), the downstream
tasks use ``difficulty=1``: the base knows the domain but only partly, as CLIP knows EuroSAT.

``render_batch`` gives tensors in [0, 1] (B, 3, S, S); ``make_task_dataset`` wraps renders into a
``datasets.Dataset`` with ``image``/``label`` columns, the same shape a hub dataset has.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "arrow", "crescent", "semicircle")
DIGITS = tuple(str(i) for i in range(10))
TEXTURES = (
    "horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots",
    "grid", "zigzag", "speckles", "concentric circles", "waves",
)
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "cyan", "white")
COLOUR_RGB = torch.tensor([
    [0.86, 0.12, 0.12], [0.15, 0.65, 0.22], [0.15, 0.27, 0.88], [0.95, 0.88, 0.15], [0.97, 0.55, 0.08],
    [0.55, 0.18, 0.72], [0.98, 0.55, 0.76], [0.50, 0.31, 0.14], [0.15, 0.80, 0.86], [0.97, 0.97, 0.97],
])

SYNTHETIC_CLASSNAMES = {"shapes": SHAPES, "digits": DIGITS, "textures": TEXTURES, "colours": COLOURS}
SYNTHETIC_TEMPLATES = {
    "shapes": ("a photo of a {}.", "a drawing of a {}.", "a {} shape."),
    "digits": ('a photo of the number: "{}".', "the digit {}.", "a picture of a {}."),
    "textures": ("a photo of a {} texture.", "a {} pattern.", "a close-up of {}."),
    "colours": ("a photo of something {}.", "a {} object.", "the colour {}."),
}
TASK_NAMES = tuple(SYNTHETIC_CLASSNAMES)

# 5x7 bitmap font for the digits, rows top to bottom.
_FONT = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
}
_GLYPHS = torch.tensor([[[int(c) for c in row] for row in _FONT[d].split()] for d in DIGITS], dtype=torch.float32)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _grid(n: int, size: int, g: torch.Generator, scale: tuple[float, float], jitter: float, rotate: float = math.pi):
    """Per-image object coordinates (u, v) of shape (n, S, S): pixel grid in [-1, 1], shifted, rotated, scaled."""
    lin = (torch.arange(size) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    cx, cy = _uniform(g, n, -jitter, jitter), _uniform(g, n, -jitter, jitter)
    s = _uniform(g, n, *scale)
    a = _uniform(g, n, -rotate, rotate)
    dx, dy = x[None] - cx[:, None, None], y[None] - cy[:, None, None]
    ca, sa = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    u = (ca * dx + sa * dy) / s[:, None, None]
    v = (-sa * dx + ca * dy) / s[:, None, None]
    return u, v


def _shape_mask(cls: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean masks (n, S, S) of the shape ``SHAPES[cls[i]]`` in object coordinates (unit size)."""
    out = torch.zeros(u.shape, dtype=torch.bool)
    for c in cls.unique().tolist():  # only the classes present: rendering is on the training hot path
        idx = (cls == c).nonzero().squeeze(1)
        out[idx] = _one_shape(c, u[idx], v[idx])
    return out


def _one_shape(c: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r, th = torch.sqrt(u * u + v * v), torch.atan2(v, u)
    au, av = u.abs(), v.abs()
    shapes = [
        lambda: r <= 0.9,
        lambda: torch.maximum(au, av) <= 0.75,
        lambda: torch.maximum(au * 0.866 + v * 0.5, -v) <= 0.5,
        lambda: au + av <= 1.0,
        lambda: ((au < 0.28) & (av < 0.95)) | ((av < 0.28) & (au < 0.95)),
        lambda: r <= 0.55 + 0.4 * torch.cos(5 * th),
        lambda: (r <= 0.95) & (r >= 0.55),
        lambda: ((v >= -0.95) & (v <= 0.0) & (au <= (v + 0.95) * 0.9)) | ((au <= 0.24) & (v > -0.1) & (v <= 0.95)),
        lambda: (r <= 0.95) & (torch.sqrt((u - 0.45) ** 2 + v**2) > 0.75),
        lambda: (r <= 0.95) & (v >= 0.0),
    ]
    return shapes[c]()


def _digit_mask(cls: torch.Tensor, n: int, size: int, g: torch.Generator, scale: tuple[float, float], jitter: float):
    """Soft masks (n, S, S) of 5x7 digit glyphs under a random affine map (scale, shift, rotation, shear)."""
    glyph = F.pad(_GLYPHS[cls], (1, 1, 1, 1))[:, None]  # (n, 1, 9, 7)
    s = _uniform(g, n, *scale)
    a = _uniform(g, n, -0.25, 0.25)
    sh = _uniform(g, n, -0.2, 0.2)
    t = torch.stack([_uniform(g, n, -jitter, jitter), _uniform(g, n, -jitter, jitter)], 1)
    ca, sa = torch.cos(a), torch.sin(a)
    # affine_grid maps output coords to input coords: inverse of (rotate, shear, scale by s, aspect 7:9).
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = ca / s * (9 / 7), (sa + sh) / s * (9 / 7)
    theta[:, 1, 0], theta[:, 1, 1] = -sa / s, ca / s
    theta[:, :, 2] = -torch.einsum("nij,nj->ni", theta[:, :, :2], t)
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    return F.grid_sample(glyph, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def _texture(cls: torch.Tensor, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Masks (n, S, S) in [0, 1] of the pattern ``TEXTURES[cls[i]]``, random period, phase and small tilt."""
    lin = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    p = _uniform(g, n, 4.0, 7.0)[:, None, None]  # period in pixels
    ph = _uniform(g, n, 0, 2 * math.pi)[:, None, None]
    tilt = _uniform(g, n, -0.15, 0.15)[:, None, None]
    xr, yr = x[None] + tilt * y[None], y[None] - tilt * x[None]
    w = 2 * math.pi / p
    cx, cy = _uniform(g, n, 6, size - 6)[:, None, None], _uniform(g, n, 6, size - 6)[:, None, None]
    rad = torch.sqrt((x[None] - cx) ** 2 + (y[None] - cy) ** 2)
    tri = torch.abs(((xr / p) % 1.0) - 0.5) * 4
    noise = torch.rand(n, 1, size // 3 + 1, size // 3 + 1, generator=g)
    speck = F.interpolate(noise, size=(size, size), mode="nearest")[:, 0]
    pats = torch.stack([
        torch.sin(w * yr + ph) > 0,
        torch.sin(w * xr + ph) > 0,
        torch.sin(w * (xr + yr) / 1.414 + ph) > 0,
        (torch.sin(w * xr + ph) * torch.sin(w * yr + ph)) > 0,
        ((xr % p - p / 2) ** 2 + (yr % p - p / 2) ** 2) < (p * 0.3) ** 2,
        ((xr + ph) % p < 1.3) | ((yr + ph) % p < 1.3),
        torch.sin(w * yr + 3.0 * tri + ph) > 0,
        speck > 0.55,
        torch.sin(w * rad + ph) > 0,
        torch.sin(w * yr + 1.6 * torch.sin(0.5 * w * xr) + ph) > 0,
    ], dim=1).float()
    return pats[torch.arange(n), cls]


def _random_colours(g: torch.Generator, n: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(n, 3, generator=g) * (hi - lo) + lo


def _composite(mask: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    m = mask[:, None]
    return fg[:, :, None, None] * m + bg[:, :, None, None] * (1 - m) if bg.dim() == 2 else fg[:, :, None, None] * m + bg * (1 - m)


def _nuisance(img: torch.Tensor, g: torch.Generator, difficulty: float) -> torch.Tensor:
    """The downstream shift: pixel noise, random clutter strokes and contrast loss, scaled by difficulty."""
    if difficulty <= 0:
        return img.clamp(0, 1)
    n, _, s, _ = img.shape
    lin = torch.arange(s, dtype=torch.float32)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    for _ in range(2):  # two thin random lines in random colours
        a = _uniform(g, n, 0, math.pi)[:, None, None]
        c = _uniform(g, n, 0, s)[:, None, None]
        d = torch.abs(torch.cos(a) * x[None] + torch.sin(a) * y[None] - c)
        on = (d < 0.7).float() * (torch.rand(n, 1, 1, generator=g) < 0.6 * difficulty).float()
        col = _random_colours(g, n)[:, :, None, None]
        img = img * (1 - on[:, None]) + col * on[:, None]
    contrast = 1 - 0.45 * difficulty * torch.rand(n, 1, 1, 1, generator=g)
    img = (img - 0.5) * contrast + 0.5 + 0.12 * difficulty * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    img = img + 0.10 * difficulty * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


def render_batch(task: str, labels: torch.Tensor, g: torch.Generator, size: int = 24, difficulty: float = 1.0):
    """Render images of ``task`` with class ``labels`` (n,) -> float tensor (n, 3, size, size) in [0, 1].

    Also returns the nuisance colour ids used, as a dict of attributes (``colour`` index into COLOURS or -1)
    so that captions can mention them.
    """
    n = len(labels)
    attrs: dict[str, torch.Tensor] = {"colour": torch.full((n,), -1, dtype=torch.long)}
    shrink = 1 - 0.25 * min(difficulty, 1.0)  # smaller objects downstream
    if task == "shapes":
        ss = 2 * size  # 2x supersampling for anti-aliased edges
        # small tilts only: a square turned 45° is a diamond, a triangle turned 180° points down
        # and larger downstream: small noisy circles, squares and diamonds kept the task at 84%
        grow = 0.1 * min(difficulty, 1.0)
        u, v = _grid(n, ss, g, scale=(0.5 + grow, 0.75 + grow), jitter=0.25, rotate=0.25)
        mask = F.avg_pool2d(_shape_mask(labels, u, v).float()[:, None], 2)[:, 0]
        cid = torch.randint(0, 9, (n,), generator=g)  # never white on the light background
        fg = (COLOUR_RGB[cid] + 0.08 * torch.randn(n, 3, generator=g)).clamp(0, 1)
        bg = _random_colours(g, n, 0.75, 1.0)
        img, attrs["colour"] = _composite(mask, fg, bg), cid
    elif task == "digits":
        mask = _digit_mask(labels, n, size, g, scale=(0.62 * shrink, 0.85), jitter=0.22)
        fg = _random_colours(g, n, 0.7, 1.0)
        bg = _random_colours(g, n, 0.0, 0.3)
        img = _composite(mask, fg, bg)
    elif task == "textures":
        mask = _texture(labels, n, size, g)
        fg, bg = _random_colours(g, n), _random_colours(g, n)
        far = (fg - bg).abs().sum(1, keepdim=True) < 0.6  # keep the two colours apart
        fg = torch.where(far, 1 - bg, fg)
        img = _composite(mask, fg, bg)
    elif task == "colours":
        ss = 2 * size
        shape = torch.randint(0, len(SHAPES), (n,), generator=g)
        u, v = _grid(n, ss, g, scale=(0.4 * shrink, 0.65), jitter=0.3)
        mask = F.avg_pool2d(_shape_mask(shape, u, v).float()[:, None], 2)[:, 0]
        fg = (COLOUR_RGB[labels] + 0.07 * torch.randn(n, 3, generator=g)).clamp(0, 1)
        grey = _uniform(g, n, 0.25, 0.6)[:, None].expand(n, 3)
        bg = grey[:, :, None, None] + 0.06 * torch.randn(n, 3, size, size, generator=g)
        img = _composite(mask, fg, bg)
        attrs["shape"] = shape
    else:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASK_NAMES)}")
    return _nuisance(img, g, difficulty), attrs


def split_seed(task: str, split: str, seed: int) -> int:
    """A distinct, stable generator seed per (task, split, seed) so train and test never share images."""
    return (seed * 1_000_003 + TASK_NAMES.index(task) * 7919 + {"train": 1, "val": 2, "test": 3}[split] * 104_729) % (2**62)


def render_task(task: str, split: str, n: int, seed: int = 0, size: int = 24, difficulty: float = 1.0, chunk: int = 2048):
    """Deterministic balanced renders of a task split -> (uint8 images (n, S, S, 3), int64 labels (n,))."""
    g = torch.Generator().manual_seed(split_seed(task, split, seed))
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    out = []
    for i in range(0, n, chunk):
        img, _ = render_batch(task, labels[i : i + chunk], g, size=size, difficulty=difficulty)
        out.append((img * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out).numpy(), labels.numpy()


def make_task_dataset(task: str, split: str, n: int, seed: int = 0, size: int = 24, difficulty: float = 1.0):
    """A ``datasets.Dataset`` with ``image`` (PIL, RGB) and ``label`` (ClassLabel with the class names) columns."""
    import datasets
    from PIL import Image

    images, labels = render_task(task, split, n, seed=seed, size=size, difficulty=difficulty)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(SYNTHETIC_CLASSNAMES[task]))})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im) for im in images], "label": labels.tolist()}, features=features
    )


# ---------------------------------------------------------------------------------------------
# Captions for contrastive pre-training of the embedded base model.

_CAPTION_FORMS = {
    "shapes": ("a {c} {x}.", "a {x}.", "a drawing of a {x}.", "a {x} shape.", "a photo of a {c} {x}."),
    "digits": ("the digit {x}.", 'the number: "{x}".', "a picture of a {x}.", "a white {x} on black."),
    "textures": ("a {x} pattern.", "a {x} texture.", "a close-up of {x}.", "{x}."),
    "colours": ("something {x}.", "a {x} {s}.", "a {x} object.", "the colour {x}."),
}


def captions_for(task: str, labels: torch.Tensor, attrs: dict, g: torch.Generator, colour_drop: float = 0.5) -> list[str]:
    """One caption per image; half the shape captions omit the colour so the model must see the shape."""
    names = SYNTHETIC_CLASSNAMES[task]
    forms = _CAPTION_FORMS[task]
    choice = torch.randint(0, len(forms), (len(labels),), generator=g).tolist()
    drop = (torch.rand(len(labels), generator=g) < colour_drop).tolist()
    caps = []
    for i, y in enumerate(labels.tolist()):
        form = forms[choice[i]]
        c = COLOURS[attrs["colour"][i]] if attrs["colour"][i] >= 0 else ""
        if task == "shapes" and "{c}" in form and drop[i]:
            form = form.replace("{c} ", "")
        s = SHAPES[attrs["shape"][i]] if "shape" in attrs else ""
        caps.append(form.format(x=names[y], c=c, s=s))
    return caps


def caption_vocabulary() -> list[str]:
    """Every text the embedded model will ever see: captions, class names, prompt templates."""
    texts = []
    for task, names in SYNTHETIC_CLASSNAMES.items():
        for x in names:
            texts += [t.format(x) for t in SYNTHETIC_TEMPLATES[task]]
            for form in _CAPTION_FORMS[task]:
                for c in COLOURS:
                    for s in SHAPES:
                        texts.append(form.format(x=x, c=c, s=s))
    return sorted(set(texts))


# ---------------------------------------------------------------------------------------------
# Registry entries and the on-disk form (a saved DatasetDict, read by the same loader as hub data).

# Bump a task's version when its generator changes: cached renders and fine-tunes are keyed by it.
TASK_VERSIONS = {"shapes": 3, "digits": 2, "textures": 2, "colours": 2}


def register_synthetic_tasks() -> None:
    from datamodules.tasks import TASKS, TaskSpec, register_task

    for task in TASK_NAMES:
        if task not in TASKS:
            register_task(TaskSpec(name=task, hub_id=None, hub_config=None, train_split="train", test_split="test",
                                   classnames=SYNTHETIC_CLASSNAMES[task], templates=SYNTHETIC_TEMPLATES[task], synthetic=True))


def synthetic_task_dir(task: str, cache_dir: str, n_train: int, n_test: int, seed: int = 0, size: int = 24,
                       difficulty: float = 1.0) -> str:
    """Render (once) and save the task as a DatasetDict with train/test splits; returns its directory."""
    import os
    import shutil
    from pathlib import Path

    import datasets

    if task not in TASK_NAMES:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASK_NAMES)}")
    path = Path(cache_dir) / "synthetic" / f"{task}-v{TASK_VERSIONS[task]}-n{n_train}-{n_test}-s{seed}-px{size}-d{difficulty:g}"
    if not (path / "dataset_dict.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        dd = datasets.DatasetDict({
            "train": make_task_dataset(task, "train", n_train, seed, size, difficulty),
            "test": make_task_dataset(task, "test", n_test, seed, size, difficulty),
        })
        dd.save_to_disk(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return str(path)
