"""Speed and accuracy of the built-in combination types against PEFT's own `svd`, `cat` and `linear`.

Mistral-7B shapes (hidden 4096, intermediate 14336, 8 KV heads so k/v project to 1024, 32 blocks, LoRA on all seven
linear projections), adapters of rank 16. The base model lives on the meta device (accelerate `init_empty_weights`):
only the LoRA factors take memory, and the built-in types run on that meta base as is. PEFT puts the factors of the
adapter that `get_peft_model` creates on the base weights' (meta) device, while adapters added later with
`add_adapter` get real CPU factors; so the model is created with a throw-away placeholder adapter, the measured
adapters are added with PEFT's own `add_adapter` (`init_lora_weights=False`: random A and B), and the placeholder is
deleted. PEFT's own `cat`, `linear` and `svd` do not run on a meta base (they write in place into a new adapter that
PEFT creates on the meta device), so for them the base weights are then swapped for zero-memory CPU placeholders
(see `use_cpu_placeholders`).

Run from the repository root:

    python benchmarks/combination_speed.py            # full: 32 blocks, 4 adapters, PEFT svd on 2 modules
    python benchmarks/combination_speed.py --quick    # 4 blocks, 2 adapters, PEFT svd on 1 module
    python benchmarks/combination_speed.py --adapters 8 --types core_ties --dense none   # the whole-model goal

The tables are printed and written to `benchmarks/results/combination_speed[-quick][-K-adapters].md` (and `.json`).

Columns: `per 4096x14336 module` is the time to combine one MLP projection (median over the measured modules;
for PEFT's `cat`/`linear`, the whole-model time divided by the number of modules; for PEFT's `svd`, the time of
`add_weighted_adapter` on a model whose adapters target only those modules, divided by their number).
`whole model` is the wall time of `add_weighted_adapter` over every module (PEFT `svd`: extrapolated from the
per-module time, marked `est.`). `max rel. error` is `|merged - reference|_F / |reference|_F` (max over the checked
modules), the reference being computed densely in float64 from PEFT's own per-adapter `get_delta_weight`; for
truncated results it is the dense SVD truncation of the reference, and on the 4096x14336 module the comparison is
with PEFT's `svd` result (a dense float64 SVD of that size is too slow for a benchmark).

Second table: every built-in task-merging type (`core_ties`, `core_dare`, `tsv`, `iso_c`, `iso_cts`, `knots_ties`,
`knots_dare`: every registered built-in type but `weighted`, `average`, `slerp`, `karcher`), default options, against
the same method computed densely by `benchmarks/dense_routes.py` (float32 dense deltas, dense SVDs, dense TIES/DARE
on the `out x in` matrices), in the same run, on one 4096x14336 and one 1024x4096 module (the first dense SVD of each
shape is timed, the later ones of that shape are charged its time: see that module). The
speed-up goal is >= 1000x per 4096x14336 module; `result vs dense route` is the relative Frobenius difference of the
two results where the maths is the same (float32 rounding), and for information where it is not (full-space TIES /
DARE is another method than TIES / DARE in core space; DARE's random draws differ).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.dense_routes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dense_routes import DENSE_ROUTES, DenseOps

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LINEAR_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
# The built-in types older than the task-merging ones; every other built-in type gets a row against its dense route.
BASELINE_TYPES = ("weighted", "average", "slerp", "karcher")
SPEEDUP_GOAL = 1000  # factor space vs the dense route, per 4096x14336 module
WHOLE_MODEL_GOAL = ("core_ties", 8, 30.0)  # type, adapters, seconds: a whole 32-block merge


@dataclass
class Row:
    """One line of the result table."""

    method: str
    per_module: float | None = None
    per_module_note: str = ""
    whole: float | None = None
    whole_note: str = ""
    error: float | None = None
    error_note: str = ""
    rank: str = ""
    extra: dict = field(default_factory=dict)


def mistral_config(num_layers: int):
    from transformers import MistralConfig

    return MistralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=num_layers,
        vocab_size=32000,
    )


def build_model(num_layers: int, adapters: list[str], target_modules: list[str] | str) -> torch.nn.Module:
    """A meta-device Mistral-shaped model with real CPU LoRA factors for `adapters` (rank 16, alpha 32)."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    with init_empty_weights():
        base = MistralForCausalLM(mistral_config(num_layers))
    model = get_peft_model(base, LoraConfig(r=1, target_modules=target_modules), adapter_name="placeholder")
    for index, name in enumerate(adapters):
        torch.manual_seed(index + 1)
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, init_lora_weights=False, target_modules=target_modules)
        model.add_adapter(name, config)
    model.delete_adapter("placeholder")
    model.set_adapter(adapters[0])
    for name in adapters:  # the measured factors are real tensors
        sample = next(m for m in model.modules() if hasattr(m, "lora_A") and name in m.lora_A)
        assert sample.lora_A[name].weight.device.type == "cpu"
    return model


def use_cpu_placeholders(model: torch.nn.Module) -> None:
    """Give the LoRA-wrapped base layers zero-memory CPU weights (one zero expanded to the weight's shape).

    PEFT's own `add_weighted_adapter` cannot run on a meta base: it creates the new adapter on the base weights'
    (meta) device and then writes into it in place. The merging methods never read the base weights; only their
    device matters, so a stride-0 CPU tensor is an honest stand-in that costs 4 bytes.
    """
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if base.weight.device.type == "meta":
                placeholder = torch.zeros((), dtype=base.weight.dtype).expand(base.weight.shape)
                base.weight = torch.nn.Parameter(placeholder, requires_grad=False)


def lora_layers(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def delete(model: torch.nn.Module, adapter: str) -> None:
    model.delete_adapter(adapter)
    getattr(model.base_model, "peft_merge_ext_reports", {}).pop(adapter, None)
    gc.collect()


# ----------------------------------------------------------------------------------------------------------------
# Dense float64 references (from PEFT's own get_delta_weight)


def dense_deltas(module: torch.nn.Module, adapters: list[str]) -> list[torch.Tensor]:
    return [module.get_delta_weight(a).detach().double() for a in adapters]


def dense_slerp(first: torch.Tensor, second: torch.Tensor, t: float) -> torch.Tensor:
    nx, ny = float(first.norm()), float(second.norm())
    if nx == 0 or ny == 0:
        return (1 - t) * first + t * second
    cosine = min(max(float((first * second).sum()) / (nx * ny), -1.0), 1.0)
    if abs(cosine) > 0.9995:
        return (1 - t) * first + t * second
    theta = math.acos(cosine)
    return (math.sin((1 - t) * theta) * first + math.sin(t * theta) * second) / math.sin(theta)


def dense_karcher(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = sum(weights)
    weights = [w / total for w in weights]
    norms = [float(d.norm()) for d in deltas]
    mean_norm = sum(w * n for w, n in zip(weights, norms, strict=True))
    units = [d / n for d, n in zip(deltas, norms, strict=True)]
    mean = sum(w * u for w, u in zip(weights, units, strict=True))
    mean /= mean.norm()
    for _ in range(200):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units, strict=True):
            cosine = min(max(float((u * mean).sum()), -1.0), 1.0)
            angle = math.acos(cosine)
            if angle > 1e-12:
                tangent += (w * angle / math.sin(angle)) * (u - cosine * mean)
        step = float(tangent.norm())
        if step < 1e-12:
            break
        mean = math.cos(step) * mean + (math.sin(step) / step) * tangent
        mean /= mean.norm()
    return mean * mean_norm


def truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def relative_error(module: torch.nn.Module, adapter: str, reference: torch.Tensor) -> float:
    merged = module.get_delta_weight(adapter).detach().double()
    return float((merged - reference).norm() / reference.norm())


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def time_ours_per_module(model, request, names: list[str], repeats: int) -> float:
    """Time of reading the factors and combining them (the work `add_weighted_adapter` does per module): the best of
    `repeats` runs per module (robust to other processes), the median over the modules."""
    from peft_merge_ext.engine.combine import combine_factors
    from peft_merge_ext.lowrank.factor_math import compute_dtype_for
    from peft_merge_ext.peft_bridge.layers import LoraModuleInfo, read_factors

    layers = lora_layers(model, request.adapters[0])
    best = []
    for name in names:
        info = LoraModuleInfo(name, layers[name], "linear", int(name.split(".")[2]))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            device = layers[name].lora_A[request.adapters[0]].weight.device
            deltas = [read_factors(info, a, compute_dtype_for(device)) for a in request.adapters]
            combine_factors(request, deltas, name, info.layer_index, model.config.num_hidden_layers)
            times.append(time.perf_counter() - started)
        best.append(min(times))
    return statistics.median(best)


def reference_for(method: str, deltas: list[torch.Tensor], weights: list[float], t: float | None) -> torch.Tensor:
    if method in ("weighted", "svd", "cat"):
        return sum(w * d for w, d in zip(weights, deltas, strict=True))
    if method == "average":
        return sum(w / sum(weights) * d for w, d in zip(weights, deltas, strict=True))
    if method == "slerp":
        return dense_slerp(deltas[0], deltas[1], t)
    if method == "karcher":
        return dense_karcher(deltas, weights)
    if method == "linear":
        return sum(w * d for w, d in zip(weights, deltas, strict=True))  # what a user asking for a weighted sum wants
    raise ValueError(method)


def wanted(args: argparse.Namespace, name: str) -> bool:
    """Whether `--types` (a comma-separated list of type names, `None`: all) selects `name`."""
    return args.types is None or name in args.types


def run(args: argparse.Namespace) -> tuple[list[Row], list[TaskRow]]:
    import peft_merge_ext
    from peft_merge_ext.engine.request import resolve_request as prepare_request

    adapters = [f"task{i}" for i in range(args.adapters)]
    step = 0.05 if args.adapters <= 4 else 0.2 / args.adapters  # distinct positive weights around 1 / k
    weights = [round(1.0 / args.adapters + step * (i - (args.adapters - 1) / 2), 4) for i in range(args.adapters)]
    started = time.perf_counter()
    model = build_model(args.layers, adapters, LINEAR_PROJECTIONS)
    layers = lora_layers(model, adapters[0])
    print(
        f"built {len(layers)} LoRA modules x {len(adapters)} adapters (rank {RANK}) over {args.layers} blocks in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    big = [name for name in layers if name.endswith("down_proj")][: args.per_module_samples]
    # Modules compared with the dense reference: q (4096x4096), k (1024x4096) and a 4096x14336 one; truncated results
    # on k and v only (a dense float64 SVD of the bigger ones would dominate the run), plus PEFT's svd on the big one.
    check = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj")] + big[:1]
    check_truncated = [f"model.layers.0.self_attn.{p}" for p in ("k_proj", "v_proj")]

    # (label, combination_type, adapters, weights, extra kwargs)
    ours: list[tuple[str, str, list[str], list[float], dict]] = [
        ("weighted (lossless)", "weighted", adapters, weights, {}),
        (f"weighted, svd_rank={RANK}", "weighted", adapters, weights, {"svd_rank": RANK}),
        ("slerp", "slerp", adapters[:2], [0.4, 0.6], {}),
        ("karcher", "karcher", adapters, [1.0] * len(adapters), {}),
    ]
    rows: list[Row] = []
    reference_seconds = [0.0]

    def reference(method: str, name: str, use: list[str], use_weights: list[float], rank: int | None):
        started = time.perf_counter()
        deltas = dense_deltas(layers[name], use)
        value = reference_for(method, deltas, use_weights, use_weights[1] / sum(use_weights[:2]))
        del deltas
        value = truncate(value, rank) if rank is not None else value
        reference_seconds[0] += time.perf_counter() - started
        return value

    for label, kind, use, use_weights, extra in ours:
        if not wanted(args, kind):
            continue
        svd_rank = extra.get("svd_rank")
        request = prepare_request(model.peft_config, use, use_weights, kind, svd_rank, {})
        per_module = time_ours_per_module(model, request, big, args.repeats)
        started = time.perf_counter()
        model.add_weighted_adapter(use, use_weights, "merged", combination_type=kind, **extra)
        whole = time.perf_counter() - started
        report = peft_merge_ext.get_merge_report(model, "merged")
        merged_layers = lora_layers(model, "merged")
        errors = [
            relative_error(merged_layers[name], "merged", reference(kind, name, use, use_weights, svd_rank))
            for name in (check if svd_rank is None else check_truncated)
        ]
        ranks = [m.stats["rank"] for m in report.modules]
        row = Row(
            label,
            per_module,
            "",
            whole,
            f"(factors {report.seconds:.1f} s)",
            max(errors),
            "",
            f"{min(ranks)}-{max(ranks)}",
        )
        if svd_rank is not None:
            row.extra["merged_big"] = {
                n: merged_layers[n].get_delta_weight("merged").detach().double() for n in big[: args.svd_modules]
            }
        rows.append(row)
        print(f"{label}: {per_module * 1e3:.1f} ms per 4096x14336 module, {whole:.2f} s whole model", flush=True)
        delete(model, "merged")

    task_rows = measure_task_merging(args, model, adapters, weights, layers, big)

    use_cpu_placeholders(model)  # for PEFT's own types (see the function)
    for kind in [kind for kind in ("cat", "linear") if wanted(args, kind)]:
        started = time.perf_counter()
        model.add_weighted_adapter(adapters, weights, "merged", combination_type=kind)
        whole = time.perf_counter() - started
        merged_layers = lora_layers(model, "merged")
        errors = [
            relative_error(merged_layers[n], "merged", reference(kind, n, adapters, weights, None)) for n in check
        ]
        rank = merged_layers[check[0]].lora_A["merged"].weight.shape[0]
        rows.append(
            Row(f"PEFT {kind}", whole / len(merged_layers), "(model avg.)", whole, "", max(errors), "", str(rank))
        )
        print(f"PEFT {kind}: {whole:.2f} s whole model", flush=True)
        delete(model, "merged")

    print(f"(dense float64 reference checks took {reference_seconds[0]:.0f} s)", flush=True)
    if args.svd_modules > 0 and wanted(args, "svd") and any(r.method.startswith("weighted, svd_rank") for r in rows):
        svd_row = measure_peft_svd(args, model, adapters, weights, big[: args.svd_modules], rows, len(layers))
        rows.append(svd_row)
    return rows, task_rows


# ----------------------------------------------------------------------------------------------------------------
# The task-merging types (Core Space TIES/DARE, TSV, Iso-C/CTS, KnOTS) against their dense full-space routes


@dataclass
class TaskRow:
    """One task-merging type: factor space vs its dense route (`benchmarks.dense_routes`)."""

    method: str
    route: str
    same_result: bool
    per_module: float  # ours, median over the sampled 4096x14336 modules
    per_small_module: float = 0.0  # ours, on the 1024x4096 module
    whole: float = 0.0  # whole-model add_weighted_adapter
    dense: dict = field(default_factory=dict)  # module shape -> seconds, charged SVDs, steps, difference
    stats: str = ""

    def speedup(self, shape: str) -> float | None:
        dense = self.dense.get(shape)
        ours = self.per_module if shape == "4096x14336" else self.per_small_module
        return dense["seconds"] / ours if dense and ours else None


def _report_stats(report) -> str:
    """Mean kept fraction / sign-conflict rate / kept triplets over the modules, where the type records them."""
    parts = []
    for key in ("kept_fraction", "sign_conflict_rate", "kept_triplets", "common_rank", "task_rank", "aligned_rank"):
        values = [m.stats[key] for m in report.modules if key in m.stats]
        if values:
            parts.append(f"{key} {statistics.fmean(values):.3g}")
    return ", ".join(parts)


def measure_task_merging(args, model, adapters, weights, layers, big) -> list[TaskRow]:
    """Each built-in type newer than `BASELINE_TYPES`, with its default options: ours per module and for the whole
    model, and its dense route on one 1024x4096 and one 4096x14336 module (the first dense SVD of each shape timed,
    later ones of the same shape charged that time, see `benchmarks.dense_routes`)."""
    import peft_merge_ext
    from peft_merge_ext.engine.request import resolve_request
    from peft_merge_ext.plugins.registry import get_combination_types

    types = {
        name: combination
        for name, combination in get_combination_types().items()
        if combination.plugin == "builtin" and name not in BASELINE_TYPES and wanted(args, name)
    }
    small = "model.layers.0.self_attn.k_proj"
    modules = {
        shape: (name, DenseOps(charge_repeats=True)) for shape, name in (("1024x4096", small), ("4096x14336", big[0]))
    }
    rows = []
    for name, combination in types.items():
        request = resolve_request(model.peft_config, adapters, weights, name, None, {})
        per_module = time_ours_per_module(model, request, big, args.repeats)
        per_small = time_ours_per_module(model, request, [small], args.repeats)
        started = time.perf_counter()
        model.add_weighted_adapter(adapters, weights, "merged", combination_type=name)
        whole = time.perf_counter() - started
        merged_layers = lora_layers(model, "merged")
        route = DENSE_ROUTES.get(name)
        row = TaskRow(name, route.description if route else "-", bool(route and route.same_result), per_module)
        row.per_small_module, row.whole = per_small, whole
        row.stats = _report_stats(peft_merge_ext.get_merge_report(model, "merged"))
        print(f"{name}: {per_module * 1e3:.1f} ms per 4096x14336 module, {whole:.2f} s whole model", flush=True)
        for shape, (module_name, ops) in modules.items():
            if route is None or shape not in args.dense_shapes:
                continue
            ops.reset()
            module = layers[module_name]
            with torch.no_grad():
                deltas = ops.run("dense deltas", lambda m=module: [m.get_delta_weight(a).detach() for a in adapters])
                result = route.function(ops, deltas, weights, [RANK] * len(adapters), dict(combination.options))
                ours = merged_layers[module_name].get_delta_weight("merged").detach().double()
                difference = float((ours - result.double()).norm() / result.double().norm())
                row.dense[shape] = {
                    "seconds": ops.seconds,
                    "charged_svds": ops.charged,
                    "steps": [[label, seconds, charged] for label, seconds, charged in ops.steps],
                    "difference": difference,
                }
                if shape == "1024x4096":  # the same route in float64 (untimed): agreement beyond float32 rounding
                    exact = route.function(
                        DenseOps(charge_repeats=True),
                        [d.double() for d in deltas],
                        weights,
                        [RANK] * len(adapters),
                        dict(combination.options),
                    )
                    row.dense[shape]["difference_float64"] = float((ours - exact).norm() / exact.norm())
            del deltas, result, ours
            gc.collect()
            print(f"  dense route on {shape}: {ops.seconds:.1f} s ({ops.charged} SVDs charged)", flush=True)
        rows.append(row)
        delete(model, "merged")
    return rows


def task_markdown(rows: list[TaskRow], args: argparse.Namespace) -> str:
    def seconds(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"

    lines = [
        "| type | dense route (float32) | ours per 4096x14336 module | dense per 4096x14336 module | speed-up "
        f"(goal >= {SPEEDUP_GOAL:,}x) | ours / dense per 1024x4096 module | result vs dense route "
        f"(rel. diff.) | whole model ({args.adapters} adapters) | report statistics |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        big, small = row.dense.get("4096x14336"), row.dense.get("1024x4096")
        speedup = row.speedup("4096x14336")
        met = "" if speedup is None else (" met" if speedup >= SPEEDUP_GOAL else " **not met**")
        dense_big = "-" if big is None else seconds(big["seconds"])
        if big and big["charged_svds"]:
            dense_big += f" ({big['charged_svds']} SVDs charged)"
        small_cell = "-"
        if small:
            small_cell = (
                f"{seconds(row.per_small_module)} / {seconds(small['seconds'])} ({row.speedup('1024x4096'):,.0f}x)"
            )
        differences = [d["difference"] for d in (big, small) if d]
        if not differences:
            agreement = "-"
        elif row.same_result:
            agreement = f"{max(differences):.1e} (same maths, float32)"
            if small and "difference_float64" in small:
                agreement += f"; {small['difference_float64']:.1e} vs the float64 route"
        else:
            agreement = (
                f"{max(differences):.2f} (another result: {'random draws' if 'dare' in row.method else 'method'})"
            )
        cells = [
            f"`{row.method}`",
            row.route,
            seconds(row.per_module),
            dense_big,
            "-" if speedup is None else f"{speedup:,.0f}x{met}",
            small_cell,
            agreement,
            seconds(row.whole),
            row.stats,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    goal_type, goal_adapters, goal_seconds = WHOLE_MODEL_GOAL
    whole = next((row.whole for row in rows if row.method == goal_type), None)
    if whole is not None and args.adapters == goal_adapters and args.layers == 32:
        status = "met" if whole < goal_seconds else "**not met**"
        lines.append("")
        lines.append(
            f"Goal: a whole 32-block merge of {goal_adapters} rank-{RANK} adapters with `{goal_type}` in < "
            f"{goal_seconds:.0f} s: {whole:.2f} s, {status}."
        )
    return "\n".join(lines)


def measure_peft_svd(args, model, adapters, weights, names, rows, module_count) -> Row:
    """PEFT's `svd` on a separate model whose adapters target only `names`, with the same factors copied in."""
    import re

    pattern = "|".join(re.escape(n) for n in names)
    small = build_model(args.layers, adapters, f"^(?:{pattern})$")
    use_cpu_placeholders(small)
    small_layers, source = lora_layers(small, adapters[0]), lora_layers(model, adapters[0])
    assert set(small_layers) == set(names)
    with torch.no_grad():
        for name in names:
            for adapter in adapters:
                small_layers[name].lora_A[adapter].weight.copy_(source[name].lora_A[adapter].weight)
                small_layers[name].lora_B[adapter].weight.copy_(source[name].lora_B[adapter].weight)
    print(f"PEFT svd on {len(names)} module(s) of 4096x14336 (slow)...", flush=True)
    started = time.perf_counter()
    small.add_weighted_adapter(adapters, weights, "merged", combination_type="svd", svd_rank=RANK)
    per_module = (time.perf_counter() - started) / len(names)
    print(f"PEFT svd: {per_module:.1f} s per module", flush=True)
    ours = next(r for r in rows if r.method.startswith("weighted, svd_rank"))
    merged_layers = lora_layers(small, "merged")
    # PEFT's svd vs ours (weighted, svd_rank=16) on the same modules
    agreement = max(
        float((ours.extra["merged_big"][n] - merged_layers[n].get_delta_weight("merged").detach().double()).norm())
        / float(merged_layers[n].get_delta_weight("merged").detach().double().norm())
        for n in names
    )
    ours.error_note = f"(vs PEFT svd {agreement:.1e})"
    ours.extra["speedup"] = per_module / ours.per_module
    return Row(
        "PEFT svd",
        per_module,
        f"({len(names)} module{'s' if len(names) > 1 else ''})",
        per_module * module_count,
        "est.",
        None,
        f"(= weighted, svd_rank={RANK} within {agreement:.1e})",
        str(RANK),
    )


def markdown(rows: list[Row], svd_per_module: float | None) -> str:
    def seconds(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"

    lines = [
        "| method | per 4096x14336 module | vs PEFT svd | whole model | max rel. error (dense float64 ref.) | rank |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "-"  # only for times measured on the 4096x14336 modules themselves
        if svd_per_module and row.per_module and not row.method.startswith("PEFT") and not row.per_module_note:
            ratio = f"{svd_per_module / row.per_module:,.0f}x faster"
        error = "" if row.error is None else f"{row.error:.1e}"
        cells = [
            row.method,
            f"{seconds(row.per_module)} {row.per_module_note}",
            ratio,
            f"{seconds(row.whole)} {row.whole_note}",
            f"{error} {row.error_note}",
            row.rank,
        ]
        lines.append("| " + " | ".join(cell.strip() for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 blocks, 2 adapters, PEFT svd on 1 module")
    parser.add_argument("--layers", type=int, default=None, help="number of blocks (default 32, quick 4)")
    parser.add_argument("--adapters", type=int, default=None, choices=range(2, 9), help="2-8; default 4, quick 2")
    parser.add_argument("--svd-modules", type=int, default=None, help="4096x14336 modules for PEFT svd (0: skip)")
    parser.add_argument("--per-module-samples", type=int, default=4, help="down_proj modules timed per method")
    parser.add_argument("--repeats", type=int, default=3, help="timings per sampled module (the best counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--types", default=None, help="comma-separated types to run (default: all), e.g. core_ties")
    parser.add_argument(
        "--dense",
        default=None,
        help="module shapes for the dense routes of the task-merging types: '1024x4096,4096x14336' (default), "
        "'1024x4096' (quick), 'none'",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    args.layers = args.layers or (4 if args.quick else 32)
    args.adapters = args.adapters or (2 if args.quick else 4)
    args.svd_modules = args.svd_modules if args.svd_modules is not None else (1 if args.quick else 2)
    args.types = None if args.types is None else {name.strip() for name in args.types.split(",") if name.strip()}
    dense = args.dense or ("1024x4096" if args.quick else "1024x4096,4096x14336")
    args.dense_shapes = set() if dense == "none" else {shape.strip() for shape in dense.split(",")}

    import peft
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), peft {peft.__version__}, transformers "
        f"{transformers.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average at start {load:.2f}",
        flush=True,
    )
    started = time.perf_counter()
    rows, task_rows = run(args)
    svd = next((r for r in rows if r.method == "PEFT svd"), None)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    total = time.perf_counter() - started
    given = list(argv if argv is not None else sys.argv[1:])
    if "--out" in given:  # no local path in the results
        del given[given.index("--out") : given.index("--out") + 2]
    command = "python benchmarks/combination_speed.py " + " ".join(
        arg for arg in given if not arg.startswith("--out=")
    )
    text = "\n".join(
        [
            "# Combination speed",
            "",
            f"`{command.strip()}`: Mistral-7B shapes, {args.layers} blocks x 7 projections, {args.adapters} adapters "
            f"of rank {RANK} (slerp: the first 2), float32 factors, CPU ({torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, load average {load:.2f} at start, {end_load:.2f} at end); total {total:.0f} s.",
            "",
            markdown(rows, svd.per_module if svd else None) if rows else "(no row of the older types selected)",
            "",
            "## Task-merging types vs their dense full-space routes",
            "",
            task_markdown(task_rows, args) if task_rows else "(no task-merging type selected or registered)",
            "",
        ]
    )
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        "combination_speed"
        + ("-quick" if args.quick else "")
        + (f"-{args.adapters}-adapters" * (args.adapters != (2 if args.quick else 4)))
    )
    (args.out / f"{stem}.md").write_text(text)
    raw = {
        "command": command.strip(),
        "rows": [{k: v for k, v in asdict(r).items() if k != "extra"} for r in rows],
        "task_rows": [asdict(r) for r in task_rows],
        "total_seconds": total,
        "load_average": [load, end_load],
        "threads": torch.get_num_threads(),
    }
    (args.out / f"{stem}.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"written: {args.out / f'{stem}.md'}, {args.out / f'{stem}.json'}")


if __name__ == "__main__":
    main()
