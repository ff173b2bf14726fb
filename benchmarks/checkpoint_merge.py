"""Out-of-core merge vs the usual in-memory path, on a synthetic Llama checkpoint. One command, prints a table.

    python benchmarks/checkpoint_merge.py                 # TinyLlama shapes: ~1.1B parameters, bf16, ~2.2 GB
    python benchmarks/checkpoint_merge.py --size tiny     # a few MB, a quick check that everything runs
    python benchmarks/checkpoint_merge.py --size 7b       # Mistral-7B shapes, ~14.5 GB (needs ~45 GB of disk)

The base checkpoint (random bf16 weights, sharded safetensors) and two rank-16 LoRA adapters on every linear
projection (q, k, v, o, gate, up, down; float32 factors, lora_alpha 32) are written once into `--workdir`. Then,
each in its own subprocess, so peak memory is that process' own (`os.wait4` rusage):

- `import torch`: the bare interpreter + torch, subtracted from the others to get the memory the work needs;
- copy: a plain copy of the base folder, the I/O floor;
- merge_checkpoint: `peft-merge-ext merge --method weighted --weights 1 1` (streaming, out of core);
- usual path: transformers `from_pretrained` + PEFT loads both adapters + `add_weighted_adapter(..., "cat")` +
  `merge_and_unload` + `save_pretrained` (PEFT's own code, peft-merge-ext's patch disabled).

Both merges compute W + 1.0 * B1 A1 + 1.0 * B2 A2 in bf16 output, so the table also gives the largest absolute
difference between their outputs (bf16 rounding: PEFT rounds the delta to bf16 before adding it, peft-merge-ext adds
in float32 and rounds once). Targets: work memory of merge_checkpoint at most 1/10 of the usual path, wall time at
most 1/3. The input files are read once before the timed runs, and dirty pages are flushed before each run, so every
run starts with the same warm page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
    },
    "tinyllama": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
    },
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

USUAL_PATH = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, first, second, out = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, first, adapter_name="a")
model.load_adapter(second, adapter_name="b")
model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
model.set_adapter("ab")
merged = model.merge_and_unload(adapter_names=["ab"])
merged.save_pretrained(out, max_shard_size="1GB")
"""
COPY = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])"


def build_inputs(workdir: Path, size: str, rank: int, seed: int) -> tuple[Path, Path, Path]:
    """Write the synthetic base (tensor by tensor, constant memory) and two adapters, once."""
    import torch
    from peft import LoraConfig
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from peft_merge_ext.checkpoint.writer import ShardedSafetensorsWriter, TensorSpec, atomic_directory

    base, first, second = workdir / "base", workdir / "adapter-a", workdir / "adapter-b"
    config = LlamaConfig(**SIZES[size], tie_word_embeddings=False, max_position_embeddings=2048)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    if not base.exists():
        with atomic_directory(base) as folder:
            specs = [TensorSpec(name, shape, torch.bfloat16) for name, shape in shapes.items()]
            writer = ShardedSafetensorsWriter(folder, specs, max_shard_size="1GB")
            for spec in specs:
                if spec.name.endswith("norm.weight"):
                    tensor = torch.ones(spec.shape, dtype=torch.bfloat16)
                else:
                    tensor = (torch.randn(spec.shape, generator=generator) * 0.02).to(torch.bfloat16)
                writer.write(spec.name, tensor)
            writer.finish()
            config.save_pretrained(folder)
            GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    targets = [name[: -len(".weight")] for name in shapes if name.split(".")[-2] in TARGETS]
    for folder, adapter_seed in ((first, seed + 1), (second, seed + 2)):
        if folder.exists():
            continue
        with atomic_directory(folder) as temporary:
            from safetensors.torch import save_file

            adapter_generator = torch.Generator().manual_seed(adapter_seed)
            tensors = {}
            for module in targets:
                out_features, in_features = shapes[f"{module}.weight"]
                prefix = f"base_model.model.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=adapter_generator) * 0.02
                tensors[f"{prefix}.lora_B.weight"] = (
                    torch.randn(out_features, rank, generator=adapter_generator) * 0.02
                )
            save_file(tensors, str(temporary / "adapter_model.safetensors"), metadata={"format": "pt"})
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(
                str(temporary)
            )
    return base, first, second


LAUNCHER = """
import json, os, subprocess, sys, time
command, log = json.loads(sys.argv[1]), sys.argv[2]
started = time.perf_counter()
with open(log, "w") as output:
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": usage.ru_maxrss / 1024,
                  "returncode": os.waitstatus_to_exitcode(status)}))
"""


def measure(command: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `command` and return its wall time and peak RSS (MB), from its own rusage.

    A small launcher process starts it: a child forked straight from this process (which holds torch) would count
    this process' memory in its peak RSS before `exec`. Dirty pages left by the previous run are flushed first
    (`os.sync`), so no run pays for writing back another run's output.
    """
    if hasattr(os, "sync"):
        os.sync()
    completed = subprocess.run(
        [sys.executable, "-c", LAUNCHER, json.dumps(command), str(log)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(completed.stdout)
    if result["returncode"] != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed; see {log}:\n{log.read_text()[-2000:]}")
    return result


def max_abs_difference(first: Path, second: Path) -> tuple[float, int]:
    """Largest |a - b| over every tensor of two checkpoints (read one tensor at a time), and the tensor count."""
    from safetensors import safe_open

    def weight_map(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), folder / "model.safetensors")

    left, right = weight_map(first), weight_map(second)
    if set(left) != set(right):
        raise RuntimeError(f"The outputs hold different tensors: {sorted(set(left) ^ set(right))[:5]}")
    worst = 0.0
    for name, path in left.items():
        with safe_open(str(path), framework="pt") as handle:
            a = handle.get_tensor(name).float()
        with safe_open(str(right[name]), framework="pt") as handle:
            b = handle.get_tensor(name).float()
        worst = max(worst, (a - b).abs().max().item())
    return worst, len(left)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tinyllama")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="Where inputs and outputs go (kept between runs; default: temp).")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"peft-merge-ext-bench-{args.size}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"Building inputs in {workdir} ({args.size}, rank {args.rank}) ...", flush=True)
    base, first, second = build_inputs(workdir, args.size, args.rank, args.seed)
    for name in ("copy", "streamed", "usual"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    for path in [*base.iterdir(), *first.iterdir(), *second.iterdir()]:  # warm the page cache for every run
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass

    python = sys.executable
    script = shutil.which("peft-merge-ext") or str(Path(python).parent / "peft-merge-ext")
    plain_env = {**os.environ, "PEFT_MERGE_EXT_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    runs = {
        "import torch": measure([python, "-c", "import torch"], logs / "torch.log"),
        "copy (floor)": measure([python, "-c", COPY, str(base), str(workdir / "copy")], logs / "copy.log"),
        "merge_checkpoint (CLI)": measure(
            [
                *[script, "merge", "--base", str(base), "--adapter", str(first), "--adapter", str(second)],
                *["--method", "weighted", "--weights", "1", "1", "--dtype", "bf16", "--max-shard-size", "1GB"],
                *["--out", str(workdir / "streamed"), "--quiet"],
            ],
            logs / "streamed.log",
        ),
        "usual path (PEFT)": measure(
            [python, "-c", USUAL_PATH, str(base), str(first), str(second), str(workdir / "usual")],
            logs / "usual.log",
            env=plain_env,
        ),
    }
    baseline = runs["import torch"]["peak_mb"]
    difference, count = max_abs_difference(workdir / "streamed", workdir / "usual")
    size_gb = folder_bytes(base) / 1e9
    print(
        f"\nSynthetic Llama ({args.size}): {size_gb:.2f} GB bf16 checkpoint, 2 adapters of rank {args.rank} on "
        f"{', '.join(TARGETS)}; {os.cpu_count()} CPUs.\n"
    )
    print("| run | wall time (s) | peak RSS (MB) | work memory (MB) |")
    print("|---|---:|---:|---:|")
    for name, run in runs.items():
        work = "-" if name in ("import torch", "copy (floor)") else f"{run['peak_mb'] - baseline:.0f}"
        print(f"| {name} | {run['seconds']:.1f} | {run['peak_mb']:.0f} | {work} |")
    streamed, usual = runs["merge_checkpoint (CLI)"], runs["usual path (PEFT)"]
    memory_ratio = (streamed["peak_mb"] - baseline) / max(usual["peak_mb"] - baseline, 1e-9)
    time_ratio = streamed["seconds"] / usual["seconds"]
    print(f"\nWork memory merge_checkpoint / usual path: {memory_ratio:.3f} (target <= 0.100)")
    print(f"Wall time merge_checkpoint / usual path: {time_ratio:.3f} (target <= 0.333)")
    print(f"Wall time merge_checkpoint / plain copy: {streamed['seconds'] / runs['copy (floor)']['seconds']:.2f}")
    print(f"Max |difference| between the two merged checkpoints: {difference:.3g} over {count} tensors")


if __name__ == "__main__":
    main()
