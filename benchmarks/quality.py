"""Merge-quality benchmark: which combination type keeps most of each adapter's skill, and do searched weights help?

One command, everything built locally (no downloads):

    python benchmarks/quality.py --quick          # a few minutes on 2 CPU cores (one seed)
    python benchmarks/quality.py                  # the full run: 3 seeds
    python benchmarks/quality.py --seeds 5        # seeds 0-4 (or a list: --seeds 0,3,7); --seed sets the first
    python benchmarks/quality.py --jobs 3         # the seeds in parallel processes
    python benchmarks/quality.py --out DIR        # where quality.md / quality.json / quality.png go

Per seed, a tiny Llama is pretrained on a mix of six synthetic sequence tasks with short inputs (3-4 digits), then one
LoRA adapter per task for four of them (sort, add3, pairsum, rotr) specializes it on longer inputs (5 digits), all with
the same rank and targets: the base alone fails at that length, each adapter alone solves its task (the 0.2.0
setting; training is not bit-reproducible across environments, hence several seeds). A second base pretrained on all
ten tasks gets eight adapters (those four and reverse, swap, mul2, diff) for the 8-way merge, where the adapters
interfere more. On held-out data of every task it measures the exact-match accuracy (greedy decoding reproduces the
whole answer) and the answer loss of the base, of each adapter alone, and of merges with every combination type: ours
(`weighted`, `average`, `karcher`, `slerp` for pairs, every other built-in type and every installed plugin type) and
PEFT's (`linear`, `cat`, `svd`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`, density 0.5). Settings: the
4-way merge, the 8-way merge and the six pairs of the 4-way adapters.

The headline number is the normalized accuracy: merged accuracy / accuracy of the task's adapter alone, averaged over
the merged tasks. Every table also shows the base model and the best single adapter (the one adapter that scores best
over all the merged tasks, as if one deployed it instead of a merge), and each row's difference to both, since merges
of LLM adapters often fail to beat either (arXiv 2511.21437). Every figure is the mean over the seeds (a new base,
new adapters and new data splits per seed) with its spread: standard deviation and min-max over the seeds.

Uniform weights are `1 / k` each (they sum to 1) for the weighted-sum types, and 1 each for the types whose method
averages or rescales by itself (`UNIT_WEIGHT_TYPES`: PEFT's `ties` and `dare_ties` average the sign-consistent
entries; TIES/DARE in core space and KnOTS likewise; TSV-M and Iso-C/Iso-CTS sum the task vectors, scale 1 in their
papers); `task arithmetic` is `weighted` at weight 1 each. Built-in and plugin types run twice: at the adapters' rank
(`svd_rank=r`, the rank PEFT's `linear` / `svd` / `ties` / `dare_*` / `magnitude_prune` produce) and unbounded
(`(exact)`, rank up to `k * r`; on the pairs only this default form); their options keep their defaults. Finally
`search_weights` tunes the weights on a separate search split for `weighted`, `karcher`, PEFT's `ties` and every newer
built-in type, compared with the uniform weights on the held-out split; the goal rows at the end of the report say
whether the targets were met.

The markdown report is printed and written to `quality.md`; the raw numbers (every seed) to `quality.json` (written
first: `--report-only quality.json` rebuilds the report from it); a bar chart of the 4-way merge to `quality.png` when
matplotlib is installed (`pip install "peft-merge-ext[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quality_measure import measure, score_merges, score_pairs, search_rows
from benchmarks.quality_report import aggregate, report, write_chart
from benchmarks.tasks import (
    ADAPTER_TASKS,
    ADAPTER_TASKS_8,
    BASE_TASKS,
    TASKS,
    ModelSize,
    build_base_model,
    lora_config,
    make_splits,
    pretraining_mix,
    train,
)

# The built-in types that existed before the newer ones: the goal rows are about the other built-in types.
BASELINE_TYPES = ("weighted", "average", "karcher", "slerp")
PEFT_TYPES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PEFT_DENSITY_TYPES = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
# Types whose uniform weight is 1 each: they average the kept entries (TIES-like, DARE-TIES) or sum the task vectors
# at scale 1 as in their papers (TSV-M, Iso-C, Iso-CTS); the weighted-sum types take 1 / k.
UNIT_WEIGHT_TYPES = {
    "ties",
    "dare_ties",
    "core_ties",
    "core_dare",
    "knots_ties",
    "knots_dare",
    "tsv",
    "iso_c",
    "iso_cts",
}
SEARCHED_BASELINES = ("weighted", "karcher", "ties")


@dataclass(frozen=True)
class Settings:
    """The knobs of one run (`--quick` or full)."""

    digits: int
    pretrain_digits: tuple[int, ...]
    pretrain_per_length: int
    size: ModelSize
    rank: int
    pretrain_steps: int
    pretrain_steps_8: int
    adapter_steps: int
    train_examples: int
    search_examples: int
    test_examples: int
    batch_size: int
    search_budget: int
    seeds: int
    density: float = 0.5


QUICK = Settings(
    digits=5,
    pretrain_digits=(3, 4),
    pretrain_per_length=2000,
    size=ModelSize(hidden=64, layers=2, heads=4, intermediate=128),
    rank=8,
    pretrain_steps=600,
    pretrain_steps_8=1000,
    adapter_steps=300,
    train_examples=2000,
    search_examples=32,
    test_examples=200,
    batch_size=64,
    search_budget=16,
    seeds=1,
)
FULL = Settings(
    digits=5,
    pretrain_digits=(3, 4),
    pretrain_per_length=4000,
    size=ModelSize(hidden=64, layers=2, heads=4, intermediate=128),
    rank=8,
    pretrain_steps=1500,
    pretrain_steps_8=2000,
    adapter_steps=600,
    train_examples=4000,
    search_examples=64,
    test_examples=1000,
    batch_size=64,
    search_budget=40,
    seeds=3,
)


@dataclass(frozen=True)
class Method:
    """One row: a combination type with its rank bound, options and uniform weight rule."""

    label: str
    family: str
    combination_type: str
    svd_rank: int | None
    rank_rule: str
    options: dict[str, Any] = field(default_factory=dict)
    unit_weights: bool = False
    new: bool = False

    def uniform(self, count: int) -> list[float]:
        """Uniform weights: 1 / count each, or 1 each for the types that average or rescale by themselves."""
        return [1.0 if self.unit_weights else 1.0 / count] * count


def methods_for(count: int, rank: int, density: float, *, pairs: bool = False) -> list[Method]:
    """Every row of a merge of `count` adapters of rank `rank`: ours, the other registered types, PEFT's."""
    from peft_merge_ext.plugins.registry import get_combination_types

    exact = f"exact (<= {rank * count})"
    rows = [
        Method("weighted", "ours", "weighted", rank, f"<= {rank}"),
        Method("average", "ours", "average", rank, f"<= {rank}"),
        *([Method("slerp", "ours", "slerp", rank, f"<= {rank}")] if pairs else []),
        Method("karcher", "ours", "karcher", rank, f"<= {rank}"),
        Method("weighted (exact)", "ours", "weighted", None, exact),
        Method("task arithmetic (weighted, w=1)", "ours", "weighted", None, exact, unit_weights=True),
    ]
    for name, combination in get_combination_types().items():
        if name in BASELINE_TYPES:
            continue
        builtin = combination.plugin == "builtin"
        family = "ours" if builtin else f"plugin ({combination.distribution or combination.plugin})"
        unit = name in UNIT_WEIGHT_TYPES
        if not pairs:  # pairs: the default form only (keeps the full run short)
            rows.append(Method(name, family, name, rank, f"<= {rank}", unit_weights=unit, new=builtin))
        rows.append(Method(f"{name} (exact)", family, name, None, exact, unit_weights=unit, new=builtin))
    for name in PEFT_TYPES:
        options = {"density": density} if name in PEFT_DENSITY_TYPES else {}
        rule = {"cat": f"exact ({rank * count})"}.get(name, str(rank))
        svd_rank = rank if name == "svd" else None
        rows.append(Method(name, "peft", name, svd_rank, rule, options, unit_weights=name in UNIT_WEIGHT_TYPES))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# One seed


def train_adapters(settings: Settings, seed: int, pretrain_tasks, steps: int, tasks: list[str], splits) -> Any:
    """A base pretrained on `pretrain_tasks` for `steps`, and one LoRA adapter per task of `tasks` (frozen, eval)."""
    from peft import get_peft_model

    base = build_base_model(settings.size, seed, pretrain_tasks)
    mix = pretraining_mix(settings.pretrain_digits, settings.pretrain_per_length, seed, pretrain_tasks)
    train(base, mix, steps=steps, lr=3e-3, batch_size=settings.batch_size, seed=seed)
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
    return model


def references(model: Any, tasks: list[str], test: dict) -> dict:
    """(accuracy, loss) of the base and of each adapter alone on every task of `tasks`."""
    reference = {"base": {task: measure(model, None, test[task]) for task in tasks}}
    for adapter in tasks:
        reference[adapter] = {task: measure(model, adapter, test[task]) for task in tasks}
    return reference


def run_seed(settings: Settings, seed: int) -> dict:
    """Both bases, their adapters and every measurement, all from `seed`."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    tasks8, tasks4 = list(ADAPTER_TASKS_8), list(ADAPTER_TASKS)
    splits = {
        task: make_splits(
            task, settings.digits, settings.train_examples, settings.search_examples, settings.test_examples, seed
        )
        for task in tasks8
    }
    test = {task: splits[task].test for task in tasks8}
    skipped: list[dict] = []
    merged = {}

    # 1. The 4-way setting: the 0.2.0 base (six pretraining tasks) and four adapters.
    clock = time.perf_counter()
    model = train_adapters(settings, seed, BASE_TASKS, settings.pretrain_steps, tasks4, splits)
    timings["train 4"] = time.perf_counter() - clock
    clock = time.perf_counter()
    reference4 = references(model, tasks4, test)
    alone = {task: reference4[task][task][0] for task in tasks4}
    methods = methods_for(len(tasks4), settings.rank, settings.density)
    merged["4-way"] = score_merges(model, methods, tasks4, test, alone, skipped)
    timings["merges 4"] = time.perf_counter() - clock

    # 2. Pairs of the 4-way adapters (where slerp applies).
    clock = time.perf_counter()
    pair_methods = methods_for(2, settings.rank, settings.density, pairs=True)
    pairs = score_pairs(model, pair_methods, tasks4, test, alone, skipped)
    timings["pairs"] = time.perf_counter() - clock

    # 3. Searched vs uniform weights on the 4-way merge: the baselines and every newer built-in type (its default
    # form: options at their defaults, no rank bound).
    clock = time.perf_counter()
    failed = {item["method"] for item in skipped}
    searched = [m for m in methods if m.label in SEARCHED_BASELINES and m.family in ("ours", "peft")]
    searched += [m for m in methods if m.new and m.svd_rank is None and m.label not in failed]
    search = search_rows(model, searched, tasks4, splits, test, alone, settings, seed)
    timings["search"] = time.perf_counter() - clock
    del model

    # 4. The 8-way setting: a base pretrained on all ten tasks and eight adapters.
    clock = time.perf_counter()
    model = train_adapters(settings, seed, tuple(TASKS), settings.pretrain_steps_8, tasks8, splits)
    timings["train 8"] = time.perf_counter() - clock
    clock = time.perf_counter()
    reference8 = references(model, tasks8, test)
    alone8 = {task: reference8[task][task][0] for task in tasks8}
    methods = methods_for(len(tasks8), settings.rank, settings.density)
    merged["8-way"] = score_merges(model, methods, tasks8, test, alone8, skipped)
    timings["merges 8"] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - started
    print(f"[seed {seed}] " + ", ".join(f"{key} {value:.0f}s" for key, value in timings.items()), flush=True)

    def as_dict(reference: dict) -> dict:
        return {
            who: {task: {"accuracy": acc, "loss": loss} for task, (acc, loss) in scores.items()}
            for who, scores in reference.items()
        }

    return {
        "seed": seed,
        "reference": {"4-way": as_dict(reference4), "8-way": as_dict(reference8)},
        "merged": merged,
        "pairs": pairs,
        "search": search,
        "skipped": skipped,
        "timings": timings,
    }


def method_table(settings: Settings) -> dict[str, list[dict]]:
    """The methods of each setting with their rank rule, family and uniform weights (for the report)."""
    table = {}
    for setting, count, pairs in (("4-way", 4, False), ("8-way", 8, False), ("pairs", 2, True)):
        table[setting] = [
            {
                "method": m.label,
                "family": m.family,
                "rank": m.rank_rule,
                "uniform_weight": "1" if m.unit_weights else f"1/{count}",
                "new": m.new,
            }
            for m in methods_for(count, settings.rank, settings.density, pairs=pairs)
        ]
    return table


def parse_seeds(text: str | None, first: int, default_count: int) -> list[int]:
    """`--seeds`: a count N (seeds `first` .. `first + N - 1`) or a comma-separated list; default count otherwise."""
    if text is None:
        return list(range(first, first + default_count))
    if "," in text:
        return [int(value) for value in text.split(",") if value.strip()]
    count = int(text)
    if count < 1:
        raise SystemExit(f"--seeds must be a positive count or a list of seeds, got {text!r}.")
    return list(range(first, first + count))


def setup(threads: int) -> None:
    """Torch threads and warning filters, in the main process and in every worker."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small setting (a few minutes on 2 CPU cores)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", default=None, help="number of seeds (3; quick 1) or a list such as 0,1,2")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (default 1)")
    parser.add_argument("--report-only", type=Path, default=None, help="rewrite the report from a quality.json")
    args = parser.parse_args(argv)
    setup(args.threads)
    settings = QUICK if args.quick else FULL
    seeds = parse_seeds(args.seeds, args.seed, settings.seeds)
    suffix = "-quick" if args.quick else ""
    if args.report_only is not None:
        results = json.loads(args.report_only.read_text())
        return write_results(results, args.out, suffix)

    import peft_merge_ext
    from peft_merge_ext.plugins.registry import get_combination_types

    started = time.perf_counter()
    if args.jobs > 1 and len(seeds) > 1:
        context = multiprocessing.get_context("spawn")
        workers = min(args.jobs, len(seeds))
        with ProcessPoolExecutor(workers, mp_context=context, initializer=setup, initargs=(args.threads,)) as pool:
            per_seed = list(pool.map(run_seed, [settings] * len(seeds), seeds))
    else:
        per_seed = [run_seed(settings, seed) for seed in seeds]
    results = {
        "settings": {**asdict(settings), "mode": "quick" if args.quick else "full", "seeds": seeds},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft_merge_ext": peft_merge_ext.__version__,
            "threads": torch.get_num_threads(),
            "jobs": min(args.jobs, len(seeds)),
            "cpu_count": os.cpu_count(),
            "types": sorted(get_combination_types()),
        },
        "tasks": {"4-way": list(ADAPTER_TASKS), "8-way": list(ADAPTER_TASKS_8)},
        "methods": method_table(settings),
        "seeds": per_seed,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quality{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")  # before any formatting
    return write_results(results, args.out, suffix)


def write_results(results: dict, out: Path, suffix: str) -> int:
    """Aggregate, then write `quality{suffix}.json`, `.md` and `.png` to `out`."""
    results["aggregate"] = aggregate(results)
    out.mkdir(parents=True, exist_ok=True)
    chart_note = write_chart(results, out / f"quality{suffix}.png")
    text = report(results, chart_note)
    print()
    print(text)
    (out / f"quality{suffix}.md").write_text(text)
    (out / f"quality{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out / f'quality{suffix}.md'}, {out / f'quality{suffix}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
