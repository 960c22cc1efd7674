"""Backdoor Vectors (docs/design.md §10): paired runs, BV similarity / transfer / scaling, and SBV attackers.

    python bv.py analyze --config configs/bv/embedded_analysis.yaml     # cosine heat-maps, transfer, scaling
    python bv.py sbv --config configs/bv/embedded_sbv.yaml              # train the variants, build SBV / SBV_SC
    python bv.py sbv --config configs/bv/embedded_sbv.yaml --jobs 4 --devices 0 1 2 3   # one variant per GPU
    python bv.py sbv --config ... --array_index $SLURM_ARRAY_TASK_ID    # SLURM array: one run per task
    python bv.py sbv --config ... --build_only true                     # then combine (after the array)
    python bv.py analyze --config configs/bv/embedded_analysis.yaml --print_config   # the settings as YAML
    python bv.py variants --out_dir outputs/ibvs_variants               # IBVS variants on every attack and merge
    python bv.py detect --config configs/bv/embedded_detect.yaml        # score incoming models before merging

A backdoored run trains ``base_config`` (the injection recipe) + its own configs and args at its ``seed``; its
clean reference trains ``base_config`` + ``clean_config`` (FineTune instead of BackdoorInjection) at the same
seed and task, so BV = θ_bd − θ_clean isolates the attack. Every run is a training of the experiment engine,
cached in ``<cache_dir>/artifacts`` by the key rule of the main job and the sweeps (a run with a main-job recipe
reuses its model); the models are linked under ``<out_dir>/models``. See experiments/bv.py for the outputs.

**analyze** writes ``<out_dir>/bv_analysis.json`` (config, code version, runs with their attributes, cosine
matrix, per-block matrices, transfer matrix with counts, scaling curves, findings), ``cosine.csv``,
``transfer.csv``, PNGs ``bv_cosine``, ``bv_cosine_blocks``, ``bv_transfer``, ``bv_scaling`` and TensorBoard
figures (``<out_dir>/tensorboard``, tags ``bv/...``; scalars ``bv/scaling/<run>/asr``).
**sbv** exports θ_clean + scale·SBV per ``outputs`` entry to ``<out_dir>/<name>.safetensors``.
**variants** runs ``--spec`` (configs/experiments/ibvs_variants.yaml: IBVS configurations as the spec's defenses) on
the engine, as pipeline.py would (its outputs in ``<out_dir>``), then writes ``ibvs_tradeoff.csv`` (ASR / CA of every
attack × merge × variant × α), ``ibvs_tradeoff.png`` (the curves at TA λ headline, the selected α starred) and
``ibvs_variants.md`` (the operating points the clean-val rule picks). **detect** scores ``detect_models`` with the
defender's own BVs (merging.detection: per-block cosine of each task vector with BV_inj), writes ``detection.json``
/ ``detection.csv`` with the ROC AUC for the given labels (used for the AUC only) and merges every ``detect_merges``
group as given and with its flagged models dropped (modified z-score > ``--detect_threshold`` within the group).

Bad input stops before any training with exit status 2 and one line ``bv.py: error: ...``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from experiments.bv import BASE_CONFIG, CLEAN_CONFIG, BVInputError, analyze, detect, sbv, variants  # noqa: F401
from experiments.cli import (DEVICE_HELP, add_tasks_file_argument, check_config_files, load_tasks_files, resolve_device,
                             run_cli, take_tasks_files)

PROG = "bv.py"
COMMANDS = {"analyze": analyze, "sbv": sbv, "variants": variants, "detect": detect}


def build_parser() -> ArgumentParser:
    import torch

    from modeling.clip import EMBEDDED_MODEL

    p = ArgumentParser(prog=PROG, description="Backdoor Vectors: analysis, Sparse Backdoor Vectors, IBVS variants and "
                       "detection.", exit_on_error=False)
    p.add_argument("command", choices=list(COMMANDS))
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these settings (configs/bv/)")
    add_tasks_file_argument(p)
    p.add_argument("--out_dir", type=str, default="outputs/bv")
    p.add_argument("--cache_dir", type=str, default=".cache/badmerging", help="data, heads and the artifact cache")
    p.add_argument("--model_name", type=str, default=EMBEDDED_MODEL)
    p.add_argument("--pretrained", type=str | None, default=None)
    p.add_argument("--base_config", type=str, default=BASE_CONFIG, help="training recipe shared by a BV's two runs")
    p.add_argument("--clean_config", type=str, default=CLEAN_CONFIG, help="turns the recipe into the clean reference")
    p.add_argument("--task", type=str, default="shapes", help="default task of runs and the SBV reference")
    p.add_argument("--seed", type=int, default=0, help="default seed of runs and the SBV reference (the data seed)")
    p.add_argument("--train_args", type=list[str], default=[], help="extra train.py flags of every run, a YAML list")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (worker processes; 1: in this process)")
    p.add_argument("--devices", type=int, nargs="+", default=[], help="GPU ids: training i runs on devices[i %% len]")
    # analyze
    p.add_argument("--runs", type=list[dict], default=[], help="[{name, task, seed, configs, args, trigger_path, model}]")
    p.add_argument("--transfer_scale", type=float, default=1.0, help="λ of T(A→B) = ASR_B(θ_clean^B + λ·BV_A)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    p.add_argument("--scaling_runs", type=str, nargs="+", default=[], help="runs that get a scaling curve (default: the first)")
    # sbv
    p.add_argument("--variants", type=list[dict], default=[], help="backdoored runs against one clean reference")
    p.add_argument("--outputs", type=list[dict], default=[{"name": "sbv", "combine": "sum", "k": 100.0}])
    p.add_argument("--trigger_from", type=str | None, default=None, help="variant whose trigger the exports carry")
    p.add_argument("--array_index", type=int | None, default=None, help="train only run i (clean reference first)")
    p.add_argument("--build_only", type=bool, default=False, help="build the SBVs from trained runs only")
    # variants
    p.add_argument("--spec", type=str, default="configs/experiments/ibvs_variants.yaml",
                   help="variants: the experiment spec whose defenses are compared")
    p.add_argument("--quick", type=bool, default=False, help="variants: the spec's reduced run (few steps, small data)")
    p.add_argument("--methods", type=str, default="all", help="variants: all plan entries, or ta (the scenarios' own)")
    # detect
    p.add_argument("--defender", type=dict | None, default=None,
                   help="detect: the defender's own pair(s) {clean: <encoder>, backdoored: <encoder or list>}")
    p.add_argument("--detect_models", type=list[dict], default=[],
                   help="detect: [{path, backdoored}] to score (backdoored: for the AUC only; default from metadata)")
    p.add_argument("--detect_merges", type=list[dict], default=[],
                   help="detect: [{name, models: [paths]}] merged as given and with flagged models dropped")
    p.add_argument("--detect_plan", type=list[dict], default=[{"method": "task_arithmetic", "coefficients": [0.3]}],
                   help="detect: the merge plan of every group (merge.py --plan entries)")
    p.add_argument("--detect_aggregate", type=str, default="mean", help="detect: score = mean | max over blocks, or whole")
    p.add_argument("--detect_project_out", type=bool, default=True,
                   help="detect: project the defender's clean task vector out of each task vector and BV first")
    p.add_argument("--detect_threshold", type=float, default=3.5, help="detect: modified z-score above which a model is flagged")
    # evaluation
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help=DEVICE_HELP)
    p.add_argument("--synthetic_train_size", type=int, default=40000)
    p.add_argument("--synthetic_test_size", type=int, default=1000)
    return p


def _check_gpu_ids(devices: list[int]) -> None:
    """``--devices``: GPU ids of this machine (the trainings would fail one by one otherwise)."""
    if not devices:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bad = [d for d in devices if d < 0 or d >= count]
    if bad:
        have = f"{count} GPU(s), ids 0..{count - 1}" if count else "no usable CUDA GPU"
        raise BVInputError(f"--devices {' '.join(map(str, devices))}: {bad} not on this machine, which has {have}; "
                           + ("pass ids among them" if count else "leave --devices out (trainings on CPU)"))


def main(argv=None, *, state: dict | None = None):
    """Run the command; returns bv_analysis.json's path (analyze), the exported SBV paths (sbv), ibvs_variants.md's
    path (variants) or detection.json's (detect).
    Bad input raises a ``ValueError`` (``BVInputError``, ...); ``cli_main`` turns it into one line and exit 2."""
    argv, files = take_tasks_files(sys.argv[1:] if argv is None else argv, error=BVInputError)
    check_config_files(argv, shipped="configs/bv/", error=BVInputError)
    cfg = build_parser().parse_args(argv)
    load_tasks_files(cfg.tasks_file)  # named in a --config
    cfg.tasks_file = [*files, *cfg.tasks_file]
    cfg.device = resolve_device(cfg.device, error=BVInputError)
    _check_gpu_ids(cfg.devices)
    if state is not None:
        state["cfg"] = cfg
    if cfg.jobs < 1:
        raise BVInputError(f"--jobs={cfg.jobs} must be a positive integer (1: in this process)")
    if cfg.array_index is not None and cfg.array_index < 0:
        raise BVInputError(f"--array_index {cfg.array_index} must be ≥ 0")
    config = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")}
    t0 = time.time()
    result = COMMANDS[cfg.command](cfg, config)
    print(f"[bv] done in {time.time() - t0:.0f}s", flush=True)
    if isinstance(result, Path):
        print(result)
    return result


def cli_main(argv=None) -> int:
    """``python bv.py``: 0, or 2 with one line ``bv.py: error: ...`` on stderr for bad input."""
    state: dict = {}

    def body() -> None:
        main(argv, state=state)

    def interrupted() -> str:
        if "cfg" not in state:
            return "nothing was run; rerun the command"
        artifacts = Path(state["cfg"].cache_dir) / "artifacts"
        return (f"every finished training is kept in {artifacts} (an unfinished one's checkpoints in "
                f"{artifacts / '.work'}); rerun the same command to resume from there")

    return run_cli(PROG, body, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(cli_main())
