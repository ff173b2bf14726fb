"""Merge-quality benchmark: which combination type keeps most of each adapter's skill, and do searched weights help?

One command, everything built locally (no downloads):

    python benchmarks/quality.py --quick          # a few minutes on 2 CPU cores
    python benchmarks/quality.py                  # the full run
    python benchmarks/quality.py --out DIR        # where quality.md / quality.json / quality.png go

A tiny Llama is pretrained on a mix of six synthetic sequence tasks with short inputs (3-4 digits), then one LoRA
adapter per task (sort, add3, pairsum, rotr) specializes it on longer inputs (5 digits), all with the same rank and
targets: the base alone fails at that length, each adapter alone solves its task. On held-out data of every task it
measures the exact-match accuracy (greedy decoding reproduces the whole answer) and the answer loss of the base, of
each adapter alone, and of the adapters merged with every combination type: ours (`weighted`, `average`, `karcher`,
`slerp` for pairs, and every installed plugin type) and PEFT's (`linear`, `cat`, `svd`, `ties`, `dare_linear`,
`dare_ties`, `magnitude_prune`, density 0.5).

Uniform weights are `1 / k` each (they sum to 1), except for PEFT's `ties` and `dare_ties`, which average the
sign-consistent entries themselves and take weight 1 each. Types that can bound their output rank run at the adapters'
rank (`svd_rank=r`), the rank PEFT's `linear` / `ties` / `dare_*` / `magnitude_prune` produce anyway; `cat` and
`weighted (exact)` keep the exact combination (rank up to `k * r`). The headline number is the normalized accuracy:
merged accuracy / accuracy of the task's adapter alone. Finally `search_weights` tunes the weights on a separate search
split and is compared with the uniform weights on the held-out split.

The markdown table is printed and written to `quality.md`; the raw numbers to `quality.json`; a bar chart to
`quality.png` when matplotlib is installed (`pip install "peft-merge-ext[plot]"`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.tasks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.tasks import (
    ADAPTER_TASKS,
    TASK_DESCRIPTIONS,
    TASKS,
    ModelSize,
    build_base_model,
    lora_config,
    make_splits,
    pretraining_mix,
    train,
)

OURS = ("weighted", "average", "karcher")
PEFT_TYPES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PEFT_DENSITY_TYPES = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
# PEFT's TIES-style types average the sign-consistent entries themselves: they take weight 1 per adapter.
SELF_AVERAGING_TYPES = {"ties", "dare_ties"}
SEARCHED_TYPES = ("weighted", "karcher", "ties")


@dataclass(frozen=True)
class Settings:
    """The knobs of one run (`--quick` or full)."""

    digits: int
    pretrain_digits: tuple[int, ...]
    pretrain_per_length: int
    size: ModelSize
    rank: int
    pretrain_steps: int
    adapter_steps: int
    train_examples: int
    search_examples: int
    test_examples: int
    batch_size: int
    search_budget: int
    density: float = 0.5


QUICK = Settings(
    digits=5,
    pretrain_digits=(3, 4),
    pretrain_per_length=2000,
    size=ModelSize(hidden=64, layers=2, heads=4, intermediate=128),
    rank=8,
    pretrain_steps=600,
    adapter_steps=300,
    train_examples=2000,
    search_examples=32,
    test_examples=200,
    batch_size=64,
    search_budget=16,
)
FULL = Settings(
    digits=5,
    pretrain_digits=(3, 4),
    pretrain_per_length=4000,
    size=ModelSize(hidden=64, layers=2, heads=4, intermediate=128),
    rank=8,
    pretrain_steps=1500,
    adapter_steps=600,
    train_examples=4000,
    search_examples=64,
    test_examples=1000,
    batch_size=64,
    search_budget=40,
)


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def measure(model: Any, adapter: str | None, examples: list[dict]) -> tuple[float, float]:
    """(accuracy, loss) of `model` with only `adapter` active (`None`: the base, adapters disabled)."""
    from peft_merge_ext.search.evaluation import compute_metrics

    if adapter is None:
        with model.disable_adapter():
            metrics = compute_metrics(model, examples, batch_size=256)
    else:
        model.base_model.set_adapter(adapter)
        metrics = compute_metrics(model, examples, batch_size=256)
    return metrics.accuracy, metrics.loss


def merge(model: Any, name: str, method: str, adapters: list[str], weights: list[float], settings: Settings) -> str:
    """Add the merge of `adapters` as adapter `name`; returns a short description of the output rank rule."""
    options: dict[str, Any] = {}
    if method == "weighted (exact)":
        method, rank_rule = "weighted", f"exact (<= {settings.rank * len(adapters)})"
    elif method in PEFT_TYPES:
        rank_rule = {"cat": f"exact ({settings.rank * len(adapters)})", "svd": str(settings.rank)}.get(
            method, str(settings.rank)
        )
        if method == "svd":
            options["svd_rank"] = settings.rank
        if method in PEFT_DENSITY_TYPES:
            options["density"] = settings.density
    else:
        options["svd_rank"] = settings.rank
        rank_rule = f"<= {settings.rank}"
    torch.manual_seed(0)  # DARE's random drops
    model.add_weighted_adapter(adapters, weights, name, combination_type=method, **options)
    return rank_rule


def uniform(method: str, count: int) -> list[float]:
    """Uniform weights: 1 / count each, or 1 each for the types that average by themselves."""
    return [1.0 if method in SELF_AVERAGING_TYPES else 1.0 / count] * count


def ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else math.nan


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_chart(results: dict, path: Path) -> str:
    """A grouped bar chart of the normalized accuracy per task and method; returns a note for the report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 'Chart skipped: matplotlib is not installed (pip install "peft-merge-ext[plot]").'
    rows = [row for row in results["merged"] if row.get("normalized")]
    tasks = results["tasks"]
    figure, axis = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.2))
    width = 0.8 / (len(tasks) + 1)
    for index, label in enumerate([*tasks, "mean"]):
        values = [row["normalized"][label] if label != "mean" else row["normalized_mean"] for row in rows]
        positions = [x + (index - len(tasks) / 2) * width for x in range(len(rows))]
        axis.bar(positions, values, width, label=label, color="black" if label == "mean" else None)
    axis.set_xticks(range(len(rows)))
    axis.set_xticklabels([row["method"] for row in rows], rotation=30, ha="right")
    axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axis.set_ylabel("merged accuracy / adapter alone")
    axis.set_title(f"Merging {len(tasks)} task adapters (held-out exact match, higher is better)")
    axis.legend(ncol=len(tasks) + 1, fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"Chart: {path.name}"


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def run(settings: Settings, seed: int, quick: bool) -> dict:
    from peft import get_peft_model

    import peft_merge_ext
    from peft_merge_ext.plugins.registry import get_combination_types
    from peft_merge_ext.search.weight_search import search_weights

    started = time.perf_counter()
    timings: dict[str, float] = {}
    tasks = list(ADAPTER_TASKS)
    splits = {
        task: make_splits(
            task, settings.digits, settings.train_examples, settings.search_examples, settings.test_examples, seed
        )
        for task in tasks
    }

    # 1. A real shared base: pretrained on every task with short inputs.
    clock = time.perf_counter()
    base = build_base_model(settings.size, seed)
    mix = pretraining_mix(settings.pretrain_digits, settings.pretrain_per_length, seed)
    train(base, mix, steps=settings.pretrain_steps, lr=3e-3, batch_size=settings.batch_size, seed=seed)
    timings["pretrain"] = time.perf_counter() - clock
    print(f"pretrained the base in {timings['pretrain']:.1f}s", flush=True)

    # 2. One adapter per task, same rank and targets.
    clock = time.perf_counter()
    model = get_peft_model(base, lora_config(settings.rank), adapter_name=tasks[0])
    for index, task in enumerate(tasks):
        if index:
            model.add_adapter(task, lora_config(settings.rank))
        model.base_model.set_adapter(task)
        train(
            model, splits[task].train, steps=settings.adapter_steps, lr=5e-3, batch_size=settings.batch_size, seed=seed
        )
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    timings["adapters"] = time.perf_counter() - clock
    print(f"trained {len(tasks)} adapters in {timings['adapters']:.1f}s", flush=True)

    # 3. References: the base and each adapter alone, on every task.
    clock = time.perf_counter()
    test = {task: splits[task].test for task in tasks}
    reference = {"base": {task: measure(model, None, test[task]) for task in tasks}}
    for adapter in tasks:
        reference[adapter] = {task: measure(model, adapter, test[task]) for task in tasks}
    alone = {task: reference[task][task][0] for task in tasks}

    # 4. All adapters merged, every combination type.
    types = get_combination_types()
    plugin_types = [name for name in types if name not in (*OURS, "slerp")]
    methods = [
        *(("ours", name) for name in OURS),
        ("ours", "weighted (exact)"),
        *(("plugin", name) for name in plugin_types),
        *(("peft", name) for name in PEFT_TYPES),
    ]
    merged_rows, skipped = [], []
    for family, method in methods:
        name = "merged"
        try:
            rank_rule = merge(model, name, method, tasks, uniform(method, len(tasks)), settings)
        except Exception as error:  # a plugin type that needs options this generic run cannot guess
            skipped.append({"method": method, "family": family, "reason": f"{type(error).__name__}: {error}"})
            continue
        scores = {task: measure(model, name, test[task]) for task in tasks}
        model.base_model.set_adapter(tasks[0])
        model.delete_adapter(name)
        normalized = {task: ratio(scores[task][0], alone[task]) for task in tasks}
        merged_rows.append(
            {
                "method": method,
                "family": family,
                "rank": rank_rule,
                "accuracy": {task: scores[task][0] for task in tasks},
                "loss": {task: scores[task][1] for task in tasks},
                "normalized": normalized,
                "normalized_mean": sum(normalized.values()) / len(tasks),
                "loss_mean": sum(scores[task][1] for task in tasks) / len(tasks),
            }
        )
    timings["merges"] = time.perf_counter() - clock
    print(f"evaluated {len(merged_rows)} merges of all adapters in {timings['merges']:.1f}s", flush=True)

    # 5. Pairs (where slerp applies): mean normalized accuracy over the pair's two tasks.
    clock = time.perf_counter()
    pairs = list(itertools.combinations(tasks, 2))
    pair_methods = [("ours", name) for name in ("weighted", "average", "slerp", "karcher")]
    pair_methods += [("plugin", name) for name in plugin_types if name not in {s["method"] for s in skipped}]
    pair_methods += [("peft", name) for name in PEFT_TYPES]
    pair_rows = []
    for family, method in pair_methods:
        values = {}
        for pair in pairs:
            try:
                merge(model, "pair", method, list(pair), uniform(method, 2), settings)
            except Exception as error:
                skipped.append({"method": f"{method} (pairs)", "family": family, "reason": f"{error}"})
                values = None
                break
            values["+".join(pair)] = sum(ratio(measure(model, "pair", test[t])[0], alone[t]) for t in pair) / 2
            model.base_model.set_adapter(tasks[0])
            model.delete_adapter("pair")
        if values:
            pair_rows.append(
                {"method": method, "family": family, "pairs": values, "mean": sum(values.values()) / len(values)}
            )
    timings["pairs"] = time.perf_counter() - clock
    print(f"evaluated {len(pair_rows)} types on {len(pairs)} pairs in {timings['pairs']:.1f}s", flush=True)

    # 6. Searched weights vs uniform weights (search split for the search, held-out split for the comparison).
    clock = time.perf_counter()
    search_set = [example for task in tasks for example in splits[task].search]
    search_rows = []
    for method in SEARCHED_TYPES:
        result = search_weights(
            model,
            tasks,
            search_set,
            combination_type=method,
            budget=settings.search_budget,
            bounds=(0.0, 2.0 * uniform(method, len(tasks))[0]),
            initial_weights=uniform(method, len(tasks)),
            svd_rank=settings.rank,
            seed=seed,
            adapter_name="searched",
            batch_size=256,
            progress=False,
            **({"density": settings.density} if method in PEFT_DENSITY_TYPES else {}),
        )
        merge(model, "uniform", method, tasks, uniform(method, len(tasks)), settings)
        rows = {}
        for label, adapter in (("uniform", "uniform"), ("searched", "searched")):
            scores = {task: measure(model, adapter, test[task]) for task in tasks}
            normalized = [ratio(scores[task][0], alone[task]) for task in tasks]
            rows[label] = {
                "normalized_mean": sum(normalized) / len(tasks),
                "accuracy_mean": sum(s[0] for s in scores.values()) / len(tasks),
                "loss_mean": sum(s[1] for s in scores.values()) / len(tasks),
            }
        model.base_model.set_adapter(tasks[0])
        model.delete_adapter("uniform")
        model.delete_adapter("searched")
        search_rows.append(
            {
                "method": method,
                "optimizer": result.optimizer,
                "trials": len(result.history),
                "weights": result.weights,
                "uniform_weights": uniform(method, len(tasks)),
                "search_loss": {"uniform": result.initial_value, "searched": result.value},
                **rows,
            }
        )
    timings["search"] = time.perf_counter() - clock
    print(f"searched weights for {len(SEARCHED_TYPES)} types in {timings['search']:.1f}s", flush=True)
    timings["total"] = time.perf_counter() - started

    return {
        "settings": {**asdict(settings), "mode": "quick" if quick else "full", "seed": seed},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft_merge_ext": peft_merge_ext.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": __import__("os").cpu_count(),
        },
        "tasks": tasks,
        "reference": {
            who: {task: {"accuracy": acc, "loss": loss} for task, (acc, loss) in scores.items()}
            for who, scores in reference.items()
        },
        "merged": merged_rows,
        "pairs": pair_rows,
        "search": search_rows,
        "skipped": skipped,
        "timings": timings,
    }


def report(results: dict, chart_note: str) -> str:
    tasks = results["tasks"]
    settings = results["settings"]
    size = settings["size"]
    lines = [
        "# Merge quality",
        "",
        f"Mode `{settings['mode']}` (seed {settings['seed']}): tiny Llama (hidden {size['hidden']}, {size['layers']} "
        f"layers) pretrained {settings['pretrain_steps']} steps on {', '.join(TASKS)} with "
        f"{'-'.join(map(str, settings['pretrain_digits']))} digits; one LoRA adapter (r={settings['rank']}, all "
        f"linear layers) per task trained {settings['adapter_steps']} steps on {settings['digits']} digits; "
        f"{settings['test_examples']} held-out examples per task. Uniform weights 1/k (1 each for ties and "
        f"dare_ties, which average by themselves); PEFT's density {settings['density']}; rank-bounded types at "
        f"svd_rank={settings['rank']}. Total {results['timings']['total']:.0f}s on "
        f"{results['environment']['threads']} thread(s).",
        "",
        "Tasks: " + "; ".join(f"`{task}`: {TASK_DESCRIPTIONS[task]}" for task in tasks) + ".",
        "",
        "## Base and adapters alone (held-out exact-match accuracy / loss)",
        "",
    ]
    header = ["model", *tasks]
    rows = [
        [who, *(f"{fmt(scores[t]['accuracy'])} / {fmt(scores[t]['loss'])}" for t in tasks)]
        for who, scores in results["reference"].items()
    ]
    lines += [markdown_table(header, rows), ""]
    lines += [
        f"## All {len(tasks)} adapters merged: normalized accuracy (merged / adapter alone)",
        "",
    ]
    header = ["method", "from", "output rank", *tasks, "mean", "mean loss"]
    rows = [
        [
            row["method"],
            row["family"],
            row["rank"],
            *(fmt(row["normalized"][t]) for t in tasks),
            f"**{fmt(row['normalized_mean'])}**",
            fmt(row["loss_mean"]),
        ]
        for row in results["merged"]
    ]
    lines += [markdown_table(header, rows), ""]
    if results["pairs"]:
        pairs = list(results["pairs"][0]["pairs"])
        lines += ["## Pairs of adapters (slerp applies): mean normalized accuracy over the pair's two tasks", ""]
        rows = [
            [row["method"], row["family"], *(fmt(row["pairs"][p]) for p in pairs), f"**{fmt(row['mean'])}**"]
            for row in results["pairs"]
        ]
        lines += [markdown_table(["method", "from", *pairs, "mean"], rows), ""]
    if results["search"]:
        lines += [
            "## Searched vs uniform weights (held-out data; the search used a separate split)",
            "",
        ]
        rows = []
        for row in results["search"]:
            for label in ("uniform", "searched"):
                shown = row["weights"] if label == "searched" else row["uniform_weights"]
                weights = ", ".join(f"{w:.2f}" for w in shown)
                rows.append(
                    [
                        row["method"],
                        label,
                        weights,
                        fmt(row["search_loss"][label], 3),
                        fmt(row[label]["loss_mean"], 3),
                        fmt(row[label]["accuracy_mean"]),
                        f"**{fmt(row[label]['normalized_mean'])}**",
                    ]
                )
        header = ["method", "run", "weights", "search loss", "held-out loss", "held-out acc", "normalized acc"]
        lines += [markdown_table(header, rows), ""]
        optimizers = {f"{row['optimizer']} ({row['trials']} trials)" for row in results["search"]}
        lines += [f"Optimizer: {', '.join(sorted(optimizers))}.", ""]
    for item in results["skipped"]:
        lines.append(f"- skipped `{item['method']}` ({item['family']}): {item['reason']}")
    if results["skipped"]:
        lines.append("")
    timings = ", ".join(f"{key} {value:.1f}s" for key, value in results["timings"].items())
    lines += [f"Timings: {timings}.", "", chart_note, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small setting (a few minutes on 2 CPU cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)
    settings = QUICK if args.quick else FULL
    results = run(settings, args.seed, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    chart_note = write_chart(results, args.out / f"quality{suffix}.png")
    text = report(results, chart_note)
    print()
    print(text)
    (args.out / f"quality{suffix}.md").write_text(text)
    (args.out / f"quality{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out / f'quality{suffix}.md'}, {args.out / f'quality{suffix}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
