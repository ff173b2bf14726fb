"""A mergekit recipe of LoRA models: mergekit itself vs `peft-merge-ext run`. One command, one run, prints a table.

    python benchmarks/mergekit_recipes.py                  # ~300M-parameter bf16 Llama, two rank-16 adapters, ties
    python benchmarks/mergekit_recipes.py --method slerp   # any supported method
    python benchmarks/mergekit_recipes.py --size tiny      # a quick check that everything runs

The base checkpoint (random bf16 weights) and two rank-16 LoRA adapters on every linear projection are written once
into `--workdir` (by `checkpoint_merge.build_inputs`). The same mergekit configuration (`models: base+adapter`) is
then run, each in its own subprocess (peak memory from its own rusage, as in `checkpoint_merge.py`), by:

- `import torch`: the interpreter + torch, subtracted from the others to get the memory the work needs;
- mergekit: `mergekit-yaml CONFIG OUT --lora-merge-cache CACHE` (it first writes every base+adapter as a full model
  into the cache, then merges);
- peft-merge-ext: `peft-merge-ext run CONFIG --out OUT` (streams the base, one module at a time, no cache).

It prints wall time, peak memory, work memory and the disk each used besides its output (mergekit's LoRA cache;
anything peft-merge-ext left), the ratios, and the largest absolute difference between the two outputs. Goals:
work memory at most 1/10 of mergekit's, at least 2x faster, zero cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import checkpoint_merge as shared  # build_inputs, measure, max_abs_difference, folder_bytes

shared.SIZES["300m"] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
CONFIGS = {
    "linear": "models:\n  - {{model: {a}, parameters: {{weight: 0.6}}}}\n"
    "  - {{model: {b}, parameters: {{weight: 0.4}}}}\n",
    "task_arithmetic": "models:\n  - {{model: {a}, parameters: {{weight: 0.6}}}}\n"
    "  - {{model: {b}, parameters: {{weight: 0.4}}}}\nbase_model: {base}\n",
    "ties": "models:\n  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
    "  - {{model: {b}, parameters: {{weight: 0.4, density: 0.5}}}}\nbase_model: {base}\n",
    "slerp": "models:\n  - {{model: {a}}}\n  - {{model: {b}}}\nbase_model: {a}\nparameters: {{t: 0.4}}\n",
    "karcher": "models:\n  - {{model: {a}}}\n  - {{model: {b}}}\n",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(shared.SIZES), default="300m")
    parser.add_argument("--method", choices=sorted(CONFIGS), default="ties")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="Where inputs and outputs go (kept between runs; default: temp).")
    parser.add_argument("--workers", type=int, default=1, help="peft-merge-ext run --workers (modules at a time)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergekit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base, first, second = shared.build_inputs(workdir, args.size, args.rank, args.seed)
    run = workdir / f"run-{args.method}"
    run.mkdir(exist_ok=True)
    for name in ("mergekit-out", "ours-out", "lora-cache"):
        if (run / name).exists():
            import shutil

            shutil.rmtree(run / name)
    config = run / "config.yaml"
    text = CONFIGS[args.method].format(base=base, a=f"{base}+{first}", b=f"{base}+{second}")
    config.write_text(text + f"merge_method: {args.method}\ndtype: bfloat16\n")
    for path in (*base.iterdir(), *first.iterdir(), *second.iterdir()):  # the same warm page cache for both
        if path.is_file():
            path.read_bytes()

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    baseline = shared.measure([sys.executable, "-c", "import torch"], run / "baseline.log", env)
    mergekit = shared.measure(
        [str(bin_dir / "mergekit-yaml"), str(config), str(run / "mergekit-out"), "--lora-merge-cache",
         str(run / "lora-cache"), "--no-write-model-card", "--no-copy-tokenizer"],
        run / "mergekit.log",
        env,
    )  # fmt: skip
    before = {path.name for path in run.iterdir()}
    ours = shared.measure(
        [
            str(bin_dir / "peft-merge-ext"),
            "run",
            str(config),
            "--out",
            str(run / "ours-out"),
            "--quiet",
            "--workers",
            str(args.workers),
        ],
        run / "ours.log",
        env,
    )
    left_behind = sorted(p.name for p in run.iterdir() if p.name not in before | {"ours-out"} and p.suffix != ".log")
    cache_bytes = shared.folder_bytes(run / "lora-cache")
    difference, tensors = shared.max_abs_difference(run / "mergekit-out", run / "ours-out")

    base_mb = baseline["peak_mb"]
    rows = [("import torch", baseline, 0), ("mergekit", mergekit, cache_bytes), ("peft-merge-ext", ours, 0)]
    print(
        f"{args.method} on a {args.size} bf16 Llama with two rank-{args.rank} adapters ({tensors} tensors), "
        f"peft-merge-ext with --workers {args.workers}"
    )
    print("| run | wall (s) | peak RSS (MB) | work memory (MB) | cache on disk (MB) |")
    print("|---|---|---|---|---|")
    for name, result, disk in rows:
        work = result["peak_mb"] - base_mb if result is not baseline else 0.0
        print(f"| {name} | {result['seconds']:.1f} | {result['peak_mb']:.0f} | {work:.0f} | {disk / 1e6:.0f} |")
    work_ratio = (ours["peak_mb"] - base_mb) / max(mergekit["peak_mb"] - base_mb, 1e-9)
    print(
        f"Ratios (peft-merge-ext / mergekit): wall {ours['seconds'] / mergekit['seconds']:.3f} "
        f"({mergekit['seconds'] / ours['seconds']:.1f}x faster; goal >= 2x), peak RSS "
        f"{ours['peak_mb'] / mergekit['peak_mb']:.3f}, work memory {work_ratio:.3f} (goal <= 0.1), cache "
        f"{0 if not left_behind else 'files: ' + ', '.join(left_behind)} (goal 0)."
    )
    print(f"Largest absolute difference between the two outputs: {difference:.3g}")


if __name__ == "__main__":
    main()
