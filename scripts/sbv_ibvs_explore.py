"""The exploration behind the main job's SBV and IBVS defaults (embedded default, 2-CPU machine).

    python pipeline.py                                   # first: the fine-tunes, trigger and attacks it reads
    python bv.py analyze --config configs/bv/embedded_analysis.yaml   # the clean references and BadNets pairs
    python scripts/sbv_ibvs_explore.py sbv               # SBV / SBV_SC settings vs BadMerging
    python scripts/sbv_ibvs_explore.py ibvs              # IBVS: defender pairs × top-k × α on the BadMerging merge

Every setting is merged with the clean digits / textures / colours fine-tunes (TA λ 0.1, 0.2, 0.3 and TIES
k 20 sum λ 0.3) and evaluated on the 1000-image test sets; printed as (ASR %, clean→target %, mean CA %).
``alone`` is the submitted shapes model by itself (ASR, clean→target, shapes CA). Variants: BadMerging
on-task (seed 0, the main job's), UT only (seed 0) and BadMerging on-task at data seed 1 when trained
(``bv.py sbv --config configs/bv/embedded_sbv.yaml`` or ``SBV_SEEDS = [1]`` in pipeline.py).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluation.evaluate import AttackProbe, evaluate, load_eval_tasks  # noqa: E402
from merging.backdoor_vectors import backdoor_vector, ibvs_defend, inject, sparse_backdoor_vector, sparsify_top_k  # noqa: E402
from merging.io import load_metadata, load_state_dict  # noqa: E402
from merging.methods import task_arithmetic, ties_merge  # noqa: E402
from merging.task_vectors import task_vector  # noqa: E402
from modeling.clip import load_base_model  # noqa: E402

M, A = "outputs/default/models", "outputs/bv/analysis/models"
TASKS = ["shapes", "digits", "textures", "colours"]


def main(mode: str) -> None:
    base = load_base_model()
    pre = base.encoder_state_dict()
    data = load_eval_tasks(TASKS, base, synthetic_train_size=40000, synthetic_test_size=1000)
    enc = base.model.visual
    others = [task_vector(load_state_dict(f"{M}/{t}.safetensors"), pre) for t in TASKS[1:]]
    bm_path = f"{M}/attack_badmerging_ontask.safetensors"
    probe = AttackProbe.from_metadata("bm", load_metadata(bm_path)["attack"], base.image_size)
    clean = load_state_dict(f"{M}/bv_clean_shapes.safetensors" if os.path.exists(f"{M}/bv_clean_shapes.safetensors")
                            else f"{A}/clean_shapes_s0.safetensors")
    variants = {"bm_s0": bm_path, "ut_s0": f"{M}/attack_ut_only.safetensors", "bm_s1": "outputs/bv/sbv/models/badmerging_s1.safetensors"}
    bvs = {k: backdoor_vector(load_state_dict(v), clean) for k, v in variants.items() if os.path.exists(v)}

    def measure(shapes_state, defend=None, merges=("ta0.1", "ta0.2", "ta0.3", "ties")):
        tau = task_vector(shapes_state, pre)
        out = {}
        for name in merges:
            st = (ties_merge(pre, [tau, *others], k=20.0, coefficient=0.3, disjoint="sum") if name == "ties"
                  else task_arithmetic(pre, [tau, *others], coefficient=float(name[2:])))
            if defend is not None:
                st = ibvs_defend(st, *defend)
            enc.load_state_dict(st)
            accs, att = evaluate(enc, data, [probe])
            out[name] = (round(100 * att["bm"]["asr"], 1), round(100 * att["bm"]["clean_to_target"], 1),
                         round(100 * sum(accs.values()) / len(accs), 1))
        return out

    if mode == "sbv":
        print("badmerging", measure(load_state_dict(bm_path)), flush=True)
        for names in (["bm_s0", "ut_s0"], ["bm_s0", "ut_s0", "bm_s1"]):
            if not all(n in bvs for n in names):
                continue
            for combine, k, sc, scale in [("sum", 100, False, 1.0), ("mean", 100, False, 1.0), ("sum", 30, False, 1.0),
                                          ("sum", 10, False, 1.0), ("elect", 100, False, 1.0), ("sum", 100, True, 1.0)]:
                sbv = sparse_backdoor_vector([bvs[n] for n in names], combine, k, sc)
                print(names, combine, k, "SC" if sc else "", scale, measure(inject(clean, sbv, scale)), flush=True)
    else:
        bm = load_state_dict(bm_path)
        pairs = {"own (top-left, circle)": (f"{M}/bv_clean_shapes.safetensors", f"{M}/ibvs_backdoored_shapes.safetensors"),
                 "top-left, square": (f"{A}/clean_shapes_s0.safetensors", f"{A}/s0_tl_square.safetensors"),
                 "bottom-right, square": (f"{A}/clean_shapes_s0.safetensors", f"{A}/s0_br_square.safetensors"),
                 "digits (bottom-right, 1)": (f"{A}/clean_digits_s0.safetensors", f"{A}/digits_s0_br_1.safetensors")}
        for name, (c, b) in pairs.items():
            if not (os.path.exists(c) and os.path.exists(b)):
                continue
            bv_inj = backdoor_vector(load_state_dict(b), load_state_dict(c))
            for k in (100, 5, 1):
                v = sparsify_top_k(bv_inj, k, "global") if k < 100 else bv_inj
                for alpha in ((0.3, 0.6, 1.0) if k == 100 else (1.0, 2.0, 4.0)):
                    print(name, f"top {k}%", f"α={alpha}", measure(bm, (v, alpha), ("ta0.3", "ties")), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    main(sys.argv[1] if len(sys.argv) > 1 else "sbv")
