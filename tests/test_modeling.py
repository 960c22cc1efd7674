import json

import pytest
import torch
import torch.nn.functional as F

from datamodules.synthetic import SYNTHETIC_CLASSNAMES, SYNTHETIC_TEMPLATES, caption_vocabulary, render_task
from datamodules.tasks import get_task
from modeling.clip import EMBEDDED_WEIGHTS, ImageClassifier, ModelLoadError, build_zero_shot_head, load_base_model, zero_shot_head
from modeling.tokenizer import PAD, CompactTokenizer


def test_compact_tokenizer_keeps_order_and_end_of_text_largest():
    tok = CompactTokenizer.from_texts(caption_vocabulary())
    ids = tok(["a red square.", "the digit 7."])
    assert ids.shape == (2, 32)
    for row in ids:
        n = int((row != PAD).sum())
        assert row[:n].argmax() == n - 1  # open_clip pools at argmax: must be end-of-text
        assert row[n - 1] == tok.vocab_size - 1
    assert tok("zebra xylophone").max() == tok.vocab_size - 1  # unknown words map to UNK, not beyond


def test_embedded_base_is_small_and_records_its_recipe(base):
    assert EMBEDDED_WEIGHTS.stat().st_size <= 5_000_000
    assert base.base_id.startswith("badmerging-tiny@sha256:")
    assert base.tokenizer.vocab_size <= json.load(open("modeling/model_configs/badmerging-tiny.json"))["text_cfg"]["vocab_size"]


def test_zero_shot_head_shape_normalisation_and_cache(base, tmp_path):
    spec = get_task("shapes")
    head = build_zero_shot_head(base.model, base.tokenizer, spec.classnames, spec.templates)
    scale = base.model.logit_scale.exp().item()
    assert head.shape == (10, base.model.visual.output_dim)
    torch.testing.assert_close(head.norm(dim=-1), torch.full((10,), scale), rtol=1e-5, atol=1e-5)
    # reference: mean of normalised template embeddings, re-normalised, scaled
    with torch.no_grad():
        e = base.model.encode_text(base.tokenizer([t.format(spec.classnames[3]) for t in spec.templates]))
    ref = F.normalize(F.normalize(e, dim=-1).mean(0), dim=-1) * scale
    torch.testing.assert_close(head[3], ref, rtol=1e-5, atol=1e-5)
    cached = zero_shot_head(base, spec, tmp_path)
    files = list((tmp_path / "heads").glob("shapes-*.safetensors"))
    assert len(files) == 1
    files[0].write_bytes(files[0].read_bytes())  # a second call must read the file, not rebuild
    torch.testing.assert_close(zero_shot_head(base, spec, tmp_path), cached)


def test_base_knows_the_domain_above_chance(base):
    # the base is a real CLIP: zero-shot well above chance (10%) on every synthetic task
    from PIL import Image

    from datamodules.datamodule import clip_transform

    tf = clip_transform("badmerging-tiny")
    for task in SYNTHETIC_CLASSNAMES:
        x, y = render_task(task, "test", 200, seed=0)
        inputs = torch.stack([tf(Image.fromarray(im)) for im in x])
        head = build_zero_shot_head(base.model, base.tokenizer, SYNTHETIC_CLASSNAMES[task], SYNTHETIC_TEMPLATES[task])
        with torch.no_grad():
            acc = ImageClassifier(base.model.visual, head)(inputs).argmax(1).eq(torch.from_numpy(y)).float().mean()
        assert acc > 0.2, (task, acc)


def test_only_image_encoder_is_trainable_in_classifier(base):
    head = torch.randn(10, base.model.visual.output_dim)
    clf = ImageClassifier(base.model.visual, head)
    assert "head" not in dict(clf.named_parameters())
    assert all(n.startswith("encoder.") for n, _ in clf.named_parameters())


def test_bad_weights_file_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model("badmerging-tiny", str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_base_model("ViT-Q-99", None)


def test_synthetic_tasks_are_deterministic_by_seed():
    a = render_task("digits", "train", 50, seed=3)
    b = render_task("digits", "train", 50, seed=3)
    c = render_task("digits", "train", 50, seed=4)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert not (a[0] == c[0]).all()
    test = render_task("digits", "test", 50, seed=3)
    assert not (test[0] == a[0]).all()  # train and test never share renders


def test_data_preprocessing_matches_the_model_without_importing_modeling(base):
    # datamodules sits below modeling: it reads the project's model config file, never the modeling code
    import subprocess
    import sys

    from datamodules.datamodule import MODEL_CONFIG_DIR
    from modeling.clip import CONFIG_DIR

    assert MODEL_CONFIG_DIR.resolve() == CONFIG_DIR.resolve()
    probe = ("import json, sys; from datamodules.datamodule import clip_transform; tf = clip_transform('badmerging-tiny'); "
             "norm = [t for t in tf.transforms if type(t).__name__ == 'Normalize'][0]; "
             "size = [t for t in tf.transforms if type(t).__name__ == 'Resize'][0].size; "
             "print(json.dumps({'modeling': 'modeling' in sys.modules, 'size': size, 'mean': list(norm.mean), 'std': list(norm.std)}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["modeling"] is False
    assert got["size"] == base.image_size and tuple(got["mean"]) == base.mean and tuple(got["std"]) == base.std
