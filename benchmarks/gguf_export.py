"""GGUF export of a merge: `peft-merge-ext merge --format gguf` vs the usual path, in one run. Prints a table.

    python benchmarks/gguf_export.py                      # ~300M-parameter Llama, bf16, two rank-16 adapters
    python benchmarks/gguf_export.py --gguf-type q8_0     # any of f32, f16, bf16, q8_0 (default bf16)
    python benchmarks/gguf_export.py --size tiny          # a few MB: a quick check that everything runs

Inputs (written once into `--workdir`): a random-init bf16 Llama checkpoint (`checkpoint_merge.build_inputs`) with a
byte-level BPE tokenizer trained locally, and two rank-16 LoRA adapters on every linear projection. Each step runs in
its own subprocess, peak memory from its own rusage (`checkpoint_merge.measure`), minus the peak of a bare
`import torch` process ("extra memory"):

- streamed: `peft-merge-ext merge --method weighted --weights 1 1 --format gguf --gguf-type T` (one pass, the GGUF
  file written tensor by tensor, nothing else on disk);
- usual path: transformers + PEFT load the base and both adapters, `add_weighted_adapter(..., "cat")`,
  `merge_and_unload`, `save_pretrained` (plus the tokenizer), then llama.cpp's own `convert_hf_to_gguf.py --outtype T`
  on that folder: two passes and a full-precision copy of the model on disk in between.

Needs llama-cpp-python's source package's converter (extracted by `.ci/run` into `.ci/cache/llama.cpp`). Goals:
extra memory <= 1/10 of the usual path, wall time <= 1/2, no full-precision intermediate on disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from checkpoint_merge import SIZES, TARGETS, USUAL_PATH, build_inputs, folder_bytes, measure
from gguf_oracle import converter_available, converter_command, train_tokenizer

SIZES.setdefault(
    "300m",
    {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 20,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
)


def max_tensor_difference(first: Path, second: Path) -> tuple[float, int]:
    """Largest |a - b| over the tensors of two GGUF files (dequantized, one tensor at a time), and their count."""
    import gguf
    import numpy as np

    left, right = gguf.GGUFReader(first), gguf.GGUFReader(second)
    by_name = {t.name: t for t in right.tensors}
    if set(by_name) != {t.name for t in left.tensors}:
        raise RuntimeError("The two GGUF files hold different tensors.")
    worst = 0.0
    for tensor in left.tensors:
        other = by_name[tensor.name]
        a = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float64)
        b = gguf.quants.dequantize(np.asarray(other.data), other.tensor_type).astype(np.float64)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst, len(left.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="300m")
    parser.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"], default="bf16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="Where inputs and outputs go (kept between runs; default: temp).")
    args = parser.parse_args()
    if not converter_available():
        sys.exit("llama.cpp's convert_hf_to_gguf.py is not in .ci/cache/llama.cpp; run .ci/run (or extract it there).")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"peft-merge-ext-gguf-{args.size}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"Building inputs in {workdir} ({args.size}, rank {args.rank}) ...", flush=True)
    base, first, second = build_inputs(workdir, args.size, args.rank, args.seed)
    if not (base / "tokenizer.json").is_file():
        train_tokenizer(base, vocab_size=2000)
    kind = args.gguf_type
    for name in ("streamed", "usual-merged", "usual.gguf"):
        target = workdir / name
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    for path in [*base.iterdir(), *first.iterdir(), *second.iterdir()]:  # warm the page cache for every run
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass

    python = sys.executable
    script = shutil.which("peft-merge-ext") or str(Path(python).parent / "peft-merge-ext")
    plain_env = {**os.environ, "PEFT_MERGE_EXT_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    runs = {"import torch": measure([python, "-c", "import torch"], logs / "torch.log")}
    runs["streamed: merge --format gguf"] = measure(
        [
            *[script, "merge", "--base", str(base), "--adapter", str(first), "--adapter", str(second)],
            *["--method", "weighted", "--weights", "1", "1", "--format", "gguf", "--gguf-type", kind],
            *["--out", str(workdir / "streamed"), "--quiet"],
        ],
        logs / "streamed.log",
    )
    runs["usual 1/2: merge_and_unload + save_pretrained"] = measure(
        [python, "-c", USUAL_PATH, str(base), str(first), str(second), str(workdir / "usual-merged")],
        logs / "usual-merge.log",
        env=plain_env,
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # the converter needs them
        if (base / name).is_file():
            shutil.copyfile(base / name, workdir / "usual-merged" / name)
    runs["usual 2/2: convert_hf_to_gguf.py"] = measure(
        converter_command([(workdir / "usual-merged", workdir / "usual.gguf", kind, "llama-bpe")]),
        logs / "usual-convert.log",
    )
    baseline = runs["import torch"]["peak_mb"]
    ours = runs["streamed: merge --format gguf"]
    steps = [runs["usual 1/2: merge_and_unload + save_pretrained"], runs["usual 2/2: convert_hf_to_gguf.py"]]
    usual_seconds = sum(step["seconds"] for step in steps)
    usual_extra = max(step["peak_mb"] for step in steps) - baseline
    ours_extra = ours["peak_mb"] - baseline
    gguf_file = next((workdir / "streamed").glob("*.gguf"))
    intermediate = folder_bytes(workdir / "usual-merged")
    ours_intermediate = folder_bytes(workdir / "streamed") - gguf_file.stat().st_size
    difference, count = max_tensor_difference(gguf_file, workdir / "usual.gguf")

    print(
        f"\nSynthetic Llama ({args.size}): {folder_bytes(base) / 1e9:.2f} GB bf16 checkpoint, 2 adapters of rank "
        f"{args.rank} on {', '.join(TARGETS)}; GGUF type {kind}; {os.cpu_count()} CPUs.\n"
    )
    print("| run | wall time (s) | peak RSS (MB) | extra memory (MB) |")
    print("|---|---:|---:|---:|")
    for name, run in runs.items():
        extra = "-" if name == "import torch" else f"{run['peak_mb'] - baseline:.0f}"
        print(f"| {name} | {run['seconds']:.1f} | {run['peak_mb']:.0f} | {extra} |")
    print(f"| usual path (both steps) | {usual_seconds:.1f} | - | {usual_extra:.0f} |")
    print(f"\nGGUF file: {gguf_file.stat().st_size / 1e6:.0f} MB (both paths).")
    print(
        f"Intermediate on disk: streamed {ours_intermediate / 1e6:.2f} MB (card + manifest), usual path "
        f"{intermediate / 1e6:.0f} MB (the merged bf16 safetensors folder)."
    )
    print(f"Extra memory streamed / usual: {ours_extra / max(usual_extra, 1e-9):.3f} (goal <= 0.100)")
    print(f"Wall time streamed / usual: {ours['seconds'] / usual_seconds:.3f} (goal <= 0.500)")
    print(f"Max |difference| between the two GGUF files' tensors: {difference:.3g} over {count} tensors")


if __name__ == "__main__":
    main()
