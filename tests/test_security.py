"""Hostile files: every loader refuses a malicious pickle without running it; outputs are written atomically.

The malicious pickle creates a file when unpickled (``__reduce__`` -> ``open(marker, "w")``). The test first
proves that the payload is live (plain ``pickle.loads`` creates a control file), then points every weights,
trigger, checkpoint and cache loader of the project at it and checks that each one refuses it and that the
marker file is never created.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re
import time
from pathlib import Path

import pytest
import torch

import merge
import train
from evaluation.inputs import check_base, model_metadata
from evaluation.rows import write_results
from merging.io import MergeInputError, load_metadata, load_state_dict, open_state_dict, read_header_metadata, save_state_dict


class CreatesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload(marker: Path) -> dict:
    return {"state_dict": {"visual.proj": CreatesFileWhenUnpickled(marker)}, "w": CreatesFileWhenUnpickled(marker)}


@pytest.fixture()
def evil(tmp_path):
    """Malicious files in every shape a loader may meet: raw pickles and torch.save zips, under every suffix."""
    marker = tmp_path / "pwned"
    files = {}
    raw2 = pickle.dumps(_payload(marker), protocol=2)
    raw4 = pickle.dumps(_payload(marker), protocol=4)
    for suffix in (".safetensors", ".pt", ".bin", ".ckpt", ".pth"):
        files[f"zip{suffix}"] = tmp_path / f"evil_zip{suffix}"
        torch.save(_payload(marker), files[f"zip{suffix}"])
        files[f"raw2{suffix}"] = tmp_path / f"evil_raw2{suffix}"
        files[f"raw2{suffix}"].write_bytes(raw2)
        files[f"raw4{suffix}"] = tmp_path / f"evil_raw4{suffix}"
        files[f"raw4{suffix}"].write_bytes(raw4)
    assert not marker.exists()
    return marker, files


def test_the_payload_is_live(tmp_path):
    """Control: unpickling the payload with plain pickle does create the file (so the refusals below mean something)."""
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(CreatesFileWhenUnpickled(control)))
    assert control.exists()


def test_every_loader_refuses_the_malicious_pickle(evil, tmp_path, base, session_cache, capsys):
    from datamodules.triggers import TriggerError, load_trigger
    from merging.streaming import merge_files, validate_inputs
    from modeling.clip import ModelLoadError, load_base_model

    marker, files = evil
    good = tmp_path / "good.safetensors"
    save_state_dict(good, base.encoder_state_dict(), {"task": "shapes", "base_model": base.describe()})
    refused = []

    def refuses(what: str, call, error=ValueError, pattern=None):
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
        assert "\n" not in message, message
        if pattern:
            assert re.search(pattern, message), (what, message)
        refused.append(what)

    for name, path in files.items():
        # merging.io: the only way weights enter merges
        refuses(f"load_state_dict {name}", lambda: load_state_dict(path), MergeInputError, "pickle|not a valid safetensors")
        refuses(f"open_state_dict {name}", lambda: open_state_dict(path), MergeInputError)
        refuses(f"read_header_metadata {name}", lambda: read_header_metadata(path), MergeInputError)
        # streaming engine and its validation, as a fine-tuned model and as θ_pre
        refuses(f"validate_inputs model {name}", lambda: validate_inputs(good, [path]), MergeInputError)
        refuses(f"validate_inputs θ_pre {name}", lambda: validate_inputs(path, [good]), MergeInputError)
        refuses(f"validate_inputs in-memory {name}", lambda: validate_inputs(base.encoder_state_dict(), [path]), MergeInputError)
        refuses(f"merge_files {name}", lambda: merge_files(good, [path], "ties", progress=False), MergeInputError)
        # base-model weights (open_clip checkpoints: torch.load(weights_only=True))
        refuses(f"load_base_model {name}", lambda: load_base_model("badmerging-tiny", str(path)), ModelLoadError,
                "pickle|Python objects other than tensors|not a readable torch checkpoint|not a valid safetensors")
        # trigger files
        refuses(f"load_trigger {name}", lambda: load_trigger(path), TriggerError)

    zipped, raw = files["zip.safetensors"], files["raw2.pt"]
    # AdaMerging reads its models through merging.io
    from lightning_modules.adamerging import AdaMerging

    refuses("AdaMerging models", lambda: AdaMerging(models=[str(zipped)], tasks=["shapes"], cache_dir=session_cache))
    # a BackdoorInjection stage-2 run reads the stage-1 trigger file
    from lightning_modules.injection import BackdoorInjection

    refuses("BackdoorInjection trigger_path",
            lambda: BackdoorInjection(attack="badmerging", trigger_path=str(zipped), cache_dir=session_cache), TriggerError)

    # the CLIs: merge.py --models / --pretrained, train.py --model.init_args.pretrained / --ckpt_path
    for argv in (["--models", str(zipped), "--evaluate", "false", "--export", str(tmp_path / "m.safetensors")],
                 ["--models", str(good), "--pretrained", str(raw), "--evaluate", "false",
                  "--export", str(tmp_path / "m.safetensors")]):
        assert merge.main(argv) == 2
        assert "merge.py: error: " in capsys.readouterr().err
        refused.append(f"merge.py {argv[:2]}")
    root = tmp_path / "runs"
    common = ["fit", "--config", "configs/experiment/embedded_finetune.yaml", "--model.init_args.cache_dir", session_cache,
              "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]
    for extra in (["--model.init_args.pretrained", str(raw)], ["--ckpt_path", str(files["zip.ckpt"])],
                  ["--ckpt_path", str(files["raw4.ckpt"])]):
        assert train.cli_main(common + extra) == 2
        assert "refused" in capsys.readouterr().err
        refused.append(f"train.py {extra[0]}")
    assert not root.exists()

    # a planted cache entry (zero-shot head) is parsed as safetensors only, and rebuilt
    from datamodules.tasks import get_task
    from modeling.clip import zero_shot_head

    cache = tmp_path / "cache"
    head = zero_shot_head(base, get_task("shapes"), cache)
    [cached] = (cache / "heads").glob("*.safetensors")
    cached.write_bytes(zipped.read_bytes())
    with pytest.warns(UserWarning, match="ignoring the cached zero-shot head"):
        rebuilt = zero_shot_head(base, get_task("shapes"), cache)
    assert torch.equal(rebuilt, head)
    refused.append("zero-shot head cache")

    assert not marker.exists(), "a loader unpickled the payload"
    assert len(refused) >= 9 * len(files) + 7


def test_open_clip_checkpoints_load_weights_only(tmp_path, base):
    """A genuine open_clip/torch checkpoint (state_dict wrapper, DDP 'module.' prefixes) still loads."""
    from modeling.clip import load_base_model

    state = {f"module.{k}": v.clone() for k, v in base.model.state_dict().items()}
    for suffix in (".bin", ".pt"):
        path = tmp_path / f"openclip{suffix}"
        torch.save({"state_dict": state, "epoch": 3}, path)
        loaded = load_base_model("badmerging-tiny", str(path))
        for k, v in base.model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[k], v), k
        assert loaded.base_id.startswith("badmerging-tiny@sha256:")


def test_hostile_metadata_is_refused_or_ignored(tmp_path, base):
    theta = base.encoder_state_dict()
    path = tmp_path / "m.safetensors"
    save_state_dict(path, theta, {"task": "shapes", "base_model": base.describe()})
    # the sidecar edited to claim the right base while the header names another: refused
    header_meta = {"task": "shapes", "base_model": {"base_id": "ViT-B-32@openai"}}
    save_state_dict(path, theta, header_meta)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    sidecar["base_model"] = base.describe()
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(MergeInputError, match="names base .* but its header names ViT-B-32@openai; one was edited"):
        model_metadata(str(path))
    # a sidecar that is not a JSON object
    path.with_suffix(".json").write_text("[1, 2]")
    with pytest.raises(MergeInputError, match="metadata must be a JSON object"):
        load_metadata(path)
    # base_model of the wrong type: a warning, not a crash
    with pytest.warns(UserWarning, match="names no base model"):
        check_base(str(path), {"task": "shapes", "base_model": "ViT"}, base.base_id)


# -- atomic outputs --------------------------------------------------------------------------------
def _write_results_loop(out_dir: str, tag: int, n: int) -> None:
    rows = [{"merge": f"m{tag}", "coefficient": 0.3, "attack": "none", "defense": "none", "clean_acc": {"shapes": tag / 10},
             "mean_clean_acc": tag / 10, "normalized_acc": None, "asr": None} for _ in range(200)]
    for _ in range(n):
        write_results(Path(out_dir), {"writer": tag}, rows, ["shapes"])


def _save_loop(path: str, tag: int, n: int) -> None:
    tensor = torch.full((256, 256), float(tag))
    for _ in range(n):
        save_state_dict(path, {"w": tensor}, {"writer": tag})


def _run_concurrently(target, args_list, check, seconds: float = 20.0) -> int:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    reads, deadline = 0, time.time() + seconds
    while any(p.is_alive() for p in procs) and time.time() < deadline:
        reads += check()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return reads


def test_two_merge_runs_writing_one_results_directory_never_corrupt_it(tmp_path):
    out = tmp_path / "results"
    out.mkdir()

    def check() -> int:
        path = out / "results.json"
        if not path.exists():
            return 0
        payload = json.loads(path.read_text())  # always a whole file: never half of one run, half of another
        assert payload["config"]["writer"] in (1, 2) and len(payload["rows"]) == 200
        assert {r["merge"] for r in payload["rows"]} == {f"m{payload['config']['writer']}"}
        csv = (out / "results.csv").read_text().splitlines()
        assert len(csv) == 201 and csv[0].startswith("merge,coefficient")
        return 1

    reads = _run_concurrently(_write_results_loop, [(str(out), 1, 60), (str(out), 2, 60)], check)
    assert reads > 0 and check() == 1
    assert sorted(os.listdir(out)) == ["results.csv", "results.json"]  # no temp files left


def test_concurrent_exports_to_one_path_are_always_whole(tmp_path):
    path = tmp_path / "merged.safetensors"

    def check() -> int:
        if not path.exists():
            return 0
        w = load_state_dict(path)["w"]  # opens whichever complete file is there
        assert w.shape == (256, 256) and float(w[0, 0]) in (1.0, 2.0) and bool((w == w[0, 0]).all())
        meta = load_metadata(path)
        assert meta is None or meta["writer"] in (1, 2)
        return 1

    reads = _run_concurrently(_save_loop, [(str(path), 1, 80), (str(path), 2, 80)], check)
    assert reads > 0
    assert sorted(os.listdir(tmp_path)) == ["merged.json", "merged.safetensors"]


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A checkpoint write that dies half-way leaves the previous checkpoint intact (and no temp file)."""
    io = train.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, path)

    def dies(obj, f, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 4}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert os.listdir(tmp_path) == ["last.ckpt"]
