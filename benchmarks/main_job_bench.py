"""The main job's stages against the floor each could reach: where a run's time goes, as ratios that show regressions.

    python pipeline.py --jobs 2 --out_dir outputs/default          # writes per-node, per-stage seconds
    python benchmarks/main_job_bench.py outputs/default/results.json --out benchmarks/results

``results.json`` holds, per node of the job graph, the seconds it took and, for evaluations, the seconds,
calls and encoder inputs (images × views) of every stage (``decode/*``, ``merge/<method>``, ``evaluate/<split>``,
``defense_*``). This script measures, in this process and with the same torch threads, the two floors those
stages can be compared with:

    forward floor  f = seconds per image of a bare encoder forward (inference mode, batch 512, no metrics)
    step floor     s = seconds per plain training step (features → zero-shot logits → CE → backward → AdamW,
                       batch 128, no Lightning, no data loading)

and reports, per evaluation stage, ratio = seconds / (images · f) (1 = as fast as the bare forwards; the
metrics, trigger pasting and state loading are the rest) and, per training, ratio = seconds / (steps · s)
(rendering and decoding its task the first time, Lightning, validation and the attack's extra forwards are the
rest; a BadMerging step does ≈ 1.7 clean steps of work). The run's wall time is set against the sum of its
nodes (the parallel speed-up of ``--jobs``). Writes ``main_job_bench.json`` and ``main_job_bench.md``.
Timings of a run made on a loaded machine are slow in proportion; compare ratios of runs made alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def forward_floor(threads: int, repeats: int = 5, batch: int = 512) -> float:
    """Median seconds per image of ``encoder(x)`` on random normalised inputs, embedded encoder."""
    from modeling.clip import load_base_model

    torch.set_num_threads(threads)
    base = load_base_model()
    encoder = base.model.visual.eval()
    x = torch.randn(batch, 3, base.image_size, base.image_size)
    with torch.inference_mode():
        encoder(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoder(x)
            times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def step_floor(threads: int, repeats: int = 5, batch: int = 128, steps: int = 5) -> float:
    """Median seconds of one plain fine-tuning step (CE on zero-shot logits, AdamW) at ``batch`` images."""
    import torch.nn.functional as F

    from modeling.clip import load_base_model

    torch.set_num_threads(threads)
    base = load_base_model()
    encoder = base.model.visual.train()
    head = F.normalize(torch.randn(10, base.model.visual.output_dim), dim=-1)
    x, y = torch.randn(batch, 3, base.image_size, base.image_size), torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-5)

    def step():
        loss = F.cross_entropy(100 * F.normalize(encoder(x), dim=-1) @ head.T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()

    step()  # optimiser state
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def training_steps(models_dir: Path, node: str) -> int | None:
    """Optimiser steps of a trained node, from its export's metadata (encoders: global_step, triggers: steps)."""
    meta = models_dir / f"{node.removeprefix('train:')}.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    steps = data.get("global_step", data.get("steps"))
    return int(steps) if isinstance(steps, (int, float)) else None


def analyse(results: dict, models_dir: Path, f: float, s: float, batch: int, include_cached: bool = False) -> dict:
    """Per training and per evaluation stage, seconds against the floors. A cached node's seconds are those of the
    run that computed it: left out by default (a warm run measured nothing), counted with ``include_cached``."""
    timing = {nid: t for nid, t in results["config"]["timing"].items() if include_cached or not t.get("cached")}
    trainings, stages = [], {}
    for nid, t in timing.items():
        if t.get("kind") == "train":
            steps = training_steps(models_dir, nid)
            floor = None if steps is None else steps * s
            trainings.append({"node": nid, "seconds": t["seconds"], "steps": steps, "floor_s": floor,
                              "ratio": None if not floor else t["seconds"] / floor})
        for name, st in (t.get("stages") or {}).items():
            agg = stages.setdefault(name, {"seconds": 0.0, "count": 0, "images": 0})
            agg["seconds"] += st["seconds"]
            agg["count"] += st["count"]
            agg["images"] += st.get("images", 0)
    for name, agg in stages.items():
        agg["floor_s"] = agg["images"] * f if agg["images"] else None
        agg["ratio"] = agg["seconds"] / agg["floor_s"] if agg["floor_s"] else None
    node_sum = sum(t["seconds"] or 0 for t in timing.values())
    by_kind = {}
    for t in timing.values():
        by_kind[t.get("kind", "?")] = by_kind.get(t.get("kind", "?"), 0.0) + (t["seconds"] or 0)
    wall = None if include_cached else results["config"].get("seconds")  # a warm run's wall is not these nodes' 
    return {"floors": {"forward_s_per_image": f, "train_step_s": s, "train_batch": batch},
            "wall_s": wall, "node_seconds_sum": node_sum, "parallel_speedup": node_sum / wall if wall else None,
            "seconds_by_kind": by_kind, "trainings": trainings, "stages": dict(sorted(stages.items()))}


def markdown(report: dict) -> str:
    a = report["analysis"]
    lines = [f"# Main job against its floors ({report['results']})", "",
             f"{report['meta']['date']}, code {report['meta']['code_version']}, {report['meta']['threads']} thread(s); "
             f"floors: bare forward {1e6 * a['floors']['forward_s_per_image']:.0f} µs/image, plain training step "
             f"{1e3 * a['floors']['train_step_s']:.0f} ms (batch {a['floors']['train_batch']}).", "",
             f"Wall {a['wall_s'] if a['wall_s'] is not None else '(cached nodes: not this run)'} s; sum over nodes {a['node_seconds_sum']:.0f} s (parallel speed-up "
             f"{a['parallel_speedup'] or 0:.2f}); by kind: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in a["seconds_by_kind"].items()), "",
             "| training | seconds | steps | floor (s) | ratio |", "|---|---|---|---|---|"]
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    for t in a["trainings"]:
        lines.append(f"| {t['node']} | {t['seconds']} | {t['steps']} | {num(t['floor_s'], '.1f')} | "
                     f"{num(t['ratio'], '.2f')} |")
    lines += ["", "| evaluation stage (all scenarios) | seconds | calls | images | floor (s) | ratio |",
              "|---|---|---|---|---|---|"]
    for name, st in a["stages"].items():
        lines.append(f"| {name} | {st['seconds']:.1f} | {st['count']} | {st['images'] or ''} | "
                     f"{num(st['floor_s'], '.1f')} | {num(st['ratio'], '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from modeling.version import code_version

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json of a pipeline.py run")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the floors (as one --jobs worker)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=128, help="training batch of the floor step (the embedded configs')")
    p.add_argument("--include_cached", action="store_true",
                   help="count cached nodes with the seconds of the run that computed them (a warm rerun's results.json)")
    p.add_argument("--out", default=None, help="folder for main_job_bench.json / .md (default: beside results.json)")
    a = p.parse_args(argv)
    path = Path(a.results)
    if not path.is_file():
        p.error(f"{path} does not exist; pass the results.json of a pipeline.py run")
    results = json.loads(path.read_text())
    if "timing" not in results.get("config", {}):
        p.error(f"{path} has no per-node timing; rerun it with this version of pipeline.py")
    f = forward_floor(a.threads, a.repeats)
    s = step_floor(a.threads, a.repeats, a.batch)
    report = {"benchmark": "main_job_bench", "results": str(path),
              "meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code_version": code_version(),
                       "torch": torch.__version__, "threads": a.threads, "machine": platform.machine()},
              "analysis": analyse(results, path.parent / "models", f, s, a.batch,
                                                                       a.include_cached)}
    out = Path(a.out) if a.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "main_job_bench.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "main_job_bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
