"""Streaming vs naive merge: wall time and peak RSS at ViT-B/32 image-encoder scale.

    python benchmarks/merge_bench.py --n 2 4 8 --out benchmarks/results/merge_bench.json

Writes n random open_clip ViT-B-32 visual-tower-shaped state dicts (~88M float32 parameters each) to
a temporary directory (removed afterwards), then merges each (engine, method, n) in a fresh
subprocess so that peak RSS (the child's ru_maxrss) is measured in isolation:

* streaming: ``merging.merge_files`` (tensor-by-tensor, chunked reads, exact TIES threshold);
* naive: load all n models, flatten and stack them into one n x P matrix, merge on the matrix (as
  the TIES reference code does; this baseline frees each loaded dict once it is flattened).

Both engines return the merged state dict in memory; neither writes it. Results: JSON at --out and
a markdown table next to it (same name, .md). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

TARGETS = {
    "streaming_peak_over_naive_at_max_n": 0.5,  # streaming peak <= 0.5 x naive peak at the largest n
    "streaming_peak_growth_min_to_max_n": 0.15,  # streaming peak grows <= 15% from the smallest to largest n
    "streaming_time_over_naive": 1.0,  # streaming no slower than naive
}


def vit_b32_visual_shapes(width: int = 768, layers: int = 12, patch: int = 32, image: int = 224,
                          output_dim: int = 512) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of open_clip ViT-B-32's image tower (``model.visual``), prefixed 'visual.'."""
    grid = image // patch
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (width,),
        "visual.positional_embedding": (grid * grid + 1, width),
        "visual.proj": (width, output_dim),
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
    }
    for i in range(layers):
        block = f"visual.transformer.resblocks.{i}"
        shapes.update({
            f"{block}.ln_1.weight": (width,),
            f"{block}.ln_1.bias": (width,),
            f"{block}.attn.in_proj_weight": (3 * width, width),
            f"{block}.attn.in_proj_bias": (3 * width,),
            f"{block}.attn.out_proj.weight": (width, width),
            f"{block}.attn.out_proj.bias": (width,),
            f"{block}.ln_2.weight": (width,),
            f"{block}.ln_2.bias": (width,),
            f"{block}.mlp.c_fc.weight": (4 * width, width),
            f"{block}.mlp.c_fc.bias": (4 * width,),
            f"{block}.mlp.c_proj.weight": (width, 4 * width),
            f"{block}.mlp.c_proj.bias": (width,),
        })
    shapes["visual.ln_post.weight"] = (width,)
    shapes["visual.ln_post.bias"] = (width,)
    return shapes


def write_models(directory: Path, n: int, seed: int = 0) -> tuple[Path, list[Path], int]:
    import torch

    from merging.io import save_state_dict

    shapes = vit_b32_visual_shapes()
    gen = torch.Generator().manual_seed(seed)
    pre = {k: 0.02 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    pre_path = directory / "pretrained.safetensors"
    save_state_dict(pre_path, pre, {"role": "pretrained"})
    paths = []
    for t in range(n):
        model = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in pre.items()}
        path = directory / f"task{t}.safetensors"
        save_state_dict(path, model, {"task": f"task{t}"})
        paths.append(path)
        del model
    return pre_path, paths, sum(v.numel() for v in pre.values())


# ---------------------------------------------------------------------------------------------
# child: one merge, measured
# ---------------------------------------------------------------------------------------------
def naive_merge(pre_path: str, paths: list[str], method: str, k: float = 20.0, coefficient: float = 0.3):
    """The memory-naive way: an n x P matrix of all models (TIES as in the reference implementation)."""
    import torch
    from safetensors.torch import load_file

    pre = load_file(pre_path)
    keys = sorted(k for k, v in pre.items() if v.is_floating_point())
    pre_flat = torch.cat([pre[k].reshape(-1) for k in keys])
    matrix = torch.empty(len(paths), pre_flat.numel(), dtype=pre_flat.dtype)
    for row, path in enumerate(paths):
        model = load_file(path)
        matrix[row] = torch.cat([model[k].reshape(-1) for k in keys])
        del model
    matrix -= pre_flat  # task vectors, n x P
    if method == "task_arithmetic":
        merged = matrix.sum(0)
    elif method == "ties":
        n, total = matrix.shape
        kth = total - int(total * k / 100)
        thresholds = matrix.abs().kthvalue(kth, dim=1, keepdim=True).values
        matrix *= matrix.abs() >= thresholds
        sign = torch.sign(matrix.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        keep = torch.where(sign.unsqueeze(0) > 0, matrix > 0, matrix < 0)
        merged = (matrix * keep).sum(0)
    else:
        raise SystemExit(f"naive baseline implements task_arithmetic and ties, not {method}")
    del matrix
    merged_flat = pre_flat + coefficient * merged
    result, offset = {}, 0
    for key in pre:
        if key in keys:
            size = pre[key].numel()
            result[key] = merged_flat[offset:offset + size].view(pre[key].shape)
            offset += size
        else:
            result[key] = pre[key]
    return result


def vm_hwm_mb() -> float | None:
    """Peak resident set of this process image (VmHWM; unlike ru_maxrss, reset by exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child(args) -> None:
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from merging import merge_files

    torch.set_num_threads(args.threads)
    rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.engine == "streaming":
        merged = merge_files(args.pretrained, args.models, args.method, progress=False)
    else:
        merged = naive_merge(args.pretrained, args.models, args.method)
    seconds = time.perf_counter() - start
    checksum = float(sum(v.double().sum() for v in merged.values() if v.is_floating_point()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "vm_hwm_mb": vm_hwm_mb(),
                      "import_rss_mb": rss_after_import / 1024, "checksum": checksum, "torch": torch.__version__}))


def generate(args) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    pre_path, paths, parameters = write_models(Path(args.pretrained), args.count)
    print(json.dumps({"pretrained": str(pre_path), "models": [str(p) for p in paths], "parameters": parameters}))


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def run_child(engine: str, method: str, pre_path: Path, paths: list[Path], threads: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--engine", engine, "--method", method,
               "--threads", str(threads), "--pretrained", str(pre_path), "--models", *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{engine}/{method}/n={len(paths)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict], ns: list[int], methods: list[str]) -> dict:
    def row(engine, method, n):
        return next(r for r in rows if (r["engine"], r["method"], r["n"]) == (engine, method, n))

    lo, hi = min(ns), max(ns)
    checks = {}
    for method in methods:
        peak_ratio = row("streaming", method, hi)["peak_rss_mb"] / row("naive", method, hi)["peak_rss_mb"]
        growth = row("streaming", method, hi)["peak_rss_mb"] / row("streaming", method, lo)["peak_rss_mb"] - 1
        time_ratios = {n: row("streaming", method, n)["seconds"] / row("naive", method, n)["seconds"] for n in ns}
        checks[method] = {
            f"streaming_over_naive_peak_at_n{hi}": round(peak_ratio, 3),
            f"streaming_peak_growth_n{lo}_to_n{hi}": round(growth, 3),
            "streaming_over_naive_time": {str(n): round(r, 3) for n, r in time_ratios.items()},
            "meets_peak_target": peak_ratio <= TARGETS["streaming_peak_over_naive_at_max_n"],
            "meets_growth_target": growth <= TARGETS["streaming_peak_growth_min_to_max_n"],
            "meets_time_target": all(r <= TARGETS["streaming_time_over_naive"] for r in time_ratios.values()),
        }
    return checks


def markdown(report: dict) -> str:
    lines = [
        "# merge_bench: streaming vs naive (n x P) merging",
        "",
        f"`{report['command']}`",
        "",
        f"{report['parameters'] / 1e6:.1f}M float32 parameters per model (open_clip ViT-B-32 image tower shapes); "
        f"{report['threads']} torch threads; {report['machine']}; torch {report['torch']}. Peak RSS is the "
        "child process's ru_maxrss and includes the interpreter + torch import "
        f"(~{report['import_rss_mb']:.0f} MB).",
        "",
        "| method | n | engine | time (s) | peak RSS (MB) |",
        "|---|---:|---|---:|---:|",
    ]
    for r in sorted(report["rows"], key=lambda r: (r["method"], r["n"], r["engine"])):
        lines.append(f"| {r['method']} | {r['n']} | {r['engine']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "| method | check | value | target | met |", "|---|---|---|---|---|"]
    for method, checks in report["checks"].items():
        items = list(checks.items())
        peak_key, growth_key = items[0][0], items[1][0]
        times = ", ".join(f"n={n}: {v}" for n, v in checks["streaming_over_naive_time"].items())
        lines.append(f"| {method} | streaming / naive peak RSS ({peak_key.rsplit('_', 1)[-1]}) | {checks[peak_key]} "
                     f"| <= {TARGETS['streaming_peak_over_naive_at_max_n']} | {checks['meets_peak_target']} |")
        lines.append(f"| {method} | streaming peak growth ({growth_key.split('growth_')[-1]}) | {checks[growth_key]} "
                     f"| <= {TARGETS['streaming_peak_growth_min_to_max_n']} | {checks['meets_growth_target']} |")
        lines.append(f"| {method} | streaming / naive time | {times} | <= 1.0 | {checks['meets_time_target']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8], help="numbers of models to merge")
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    parser.add_argument("--engines", nargs="+", default=["streaming", "naive"])
    # One thread by default: on small shared machines (like the 2-core VM of the recorded run, with
    # another job on one core) every multi-threaded op can stall on a descheduled OpenMP thread,
    # which punishes the streaming engine's many chunk-sized ops far more than naive's few huge ones.
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (same for both engines)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "merge_bench.json")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the models (default: a temp dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.generate:
        generate(args)
        return

    # The parent never imports torch: Linux keeps ru_maxrss across fork+exec, so a big parent would
    # inflate every child's reading. Models are generated in a subprocess too.
    ns = sorted(set(args.n))
    workdir = Path(tempfile.mkdtemp(prefix="merge_bench_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        made = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--generate", "--count", str(max(ns)),
                               "--pretrained", str(workdir)], capture_output=True, text=True, cwd=REPO_ROOT)
        if made.returncode != 0:
            raise SystemExit(f"model generation failed:\n{made.stderr[-4000:]}")
        made = json.loads(made.stdout.strip().splitlines()[-1])
        pre_path, paths, parameters = Path(made["pretrained"]), [Path(p) for p in made["models"]], made["parameters"]
        print(f"wrote {max(ns) + 1} models of {parameters / 1e6:.1f}M parameters in "
              f"{time.perf_counter() - t0:.0f} s to {workdir}", flush=True)
        rows = []
        for n in ns:
            for method in args.methods:
                for engine in args.engines:
                    result = run_child(engine, method, pre_path, paths[:n], args.threads)
                    rows.append({"engine": engine, "method": method, "n": n, **result})
                    print(f"{method:16s} n={n} {engine:9s} {result['seconds']:7.1f} s  "
                          f"peak {result['peak_rss_mb']:7.0f} MB (VmHWM {result['vm_hwm_mb']:.0f})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    report = {
        "command": "python benchmarks/merge_bench.py " + " ".join(sys.argv[1:]),
        "parameters": parameters,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": rows[0]["torch"],
        "import_rss_mb": min(r["import_rss_mb"] for r in rows),
        "targets": TARGETS,
        "rows": rows,
        "checks": summarise(rows, ns, args.methods) if set(args.engines) == {"streaming", "naive"} else {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
