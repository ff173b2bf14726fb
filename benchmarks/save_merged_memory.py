"""Peak memory of `save_merged` vs PEFT's `merge_and_unload()` + `save_pretrained`, on the same locally built model.

Each path runs in a fresh subprocess: build a Llama model with a LoRA adapter on every linear layer, reset the
process' peak RSS (`/proc/self/clear_refs`), save, then read the peak (`VmHWM`). "extra" is peak minus the RSS just
before the save. Paths:

- `save_merged`: this package (non-destructive, streaming);
- `merge_and_unload (in place)`: PEFT's merge into the model's own weights, then `save_pretrained` (destroys the
  adapters: the PEFT model is gone afterwards);
- `deepcopy + merge_and_unload`: the non-destructive way with PEFT alone (copy the model first).

Run: `python benchmarks/save_merged_memory.py` (about 270 MB of float32 weights); `--quick` for a small model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

PATHS = ("save_merged", "merge_and_unload (in place)", "deepcopy + merge_and_unload")


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _child(path: str, hidden: int, layers: int, vocab: int, out: str) -> None:
    import copy
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_merge_ext  # noqa: F401  (activates save_merged)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
    )
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False)
    )
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    started = time.perf_counter()
    if path == "save_merged":
        model.save_merged(out)
    elif path == "merge_and_unload (in place)":
        model.merge_and_unload().save_pretrained(out)
    else:
        copy.deepcopy(model).merge_and_unload().save_pretrained(out)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "seconds": seconds, "weights": weights_bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--quick", action="store_true", help="a ~20 MB model, to check the script runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab = 256, 2, 4000
    if args.child:
        _child(args.child, args.hidden, args.layers, args.vocab, args.out)
        return
    rows = []
    for path in PATHS:
        with tempfile.TemporaryDirectory() as folder:
            command = [
                sys.executable,
                __file__,
                "--child",
                path,
                "--out",
                f"{folder}/out",
                "--hidden",
                str(args.hidden),
                "--layers",
                str(args.layers),
                "--vocab",
                str(args.vocab),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append((path, json.loads(result.stdout.strip().splitlines()[-1])))
    weights = rows[0][1]["weights"]
    print(f"model weights (base + LoRA, float32): {weights / 2**20:.0f} MiB")
    print(f"| {'path':<30} | {'RSS before (MiB)':>16} | {'peak (MiB)':>10} | {'extra (MiB)':>11} | {'seconds':>7} |")
    print(f"|{'-' * 32}|{'-' * 18}|{'-' * 12}|{'-' * 13}|{'-' * 9}|")
    for path, row in rows:
        extra = row["peak"] - row["before"]
        print(
            f"| {path:<30} | {row['before'] / 2**20:>16.0f} | {row['peak'] / 2**20:>10.0f} | "
            f"{extra / 2**20:>11.1f} | {row['seconds']:>7.2f} |"
        )
    ours = rows[0][1]["peak"] - rows[0][1]["before"]
    copy_path = rows[2][1]["peak"] - rows[2][1]["before"]
    print(f"save_merged extra / non-destructive PEFT extra: {ours / max(copy_path, 1):.3f} (target < 0.25)")
    if args.quick:
        print("(--quick: the model is too small for the ratio to mean anything; run without --quick)")


if __name__ == "__main__":
    main()
