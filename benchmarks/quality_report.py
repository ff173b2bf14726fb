"""Aggregation over seeds, goal checks, the markdown report and the chart of `benchmarks/quality.py`.

Every figure is aggregated over the seeds as mean, standard deviation (sample, `n - 1`) and min-max; the per-seed
numbers stay in `quality.json`. The references of every setting are the base model and the best single adapter: the
one adapter of the setting whose mean normalized accuracy over the setting's tasks is highest, chosen per seed.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from benchmarks.tasks import BASE_TASKS, TASK_DESCRIPTIONS

__all__ = ["GOAL_SEARCH", "GOAL_UNIFORM", "aggregate", "report", "write_chart"]

GOAL_UNIFORM = 0.60  # a newer type, uniform 4-way merge, mean normalized accuracy
GOAL_SEARCH = 0.75  # search_weights over the best newer type, held-out mean normalized accuracy


def stats(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of `values` (NaNs left out)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values), "n": len(values)}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _references(seed_result: dict, setting: str, tasks: list[str]) -> dict[str, dict]:
    """The base and the best single adapter of one seed: normalized accuracy per task and their mean."""
    reference = seed_result["reference"][setting]
    alone = {task: reference[task][task]["accuracy"] for task in tasks}

    def normalized(who: str) -> dict[str, float]:
        return {t: reference[who][t]["accuracy"] / alone[t] if alone[t] > 0 else math.nan for t in tasks}

    base = normalized("base")
    best = max(tasks, key=lambda adapter: mean(normalized(adapter).values()))
    return {
        "base": {"normalized": base, "mean": mean(base.values())},
        "best single": {"normalized": normalized(best), "mean": mean(normalized(best).values()), "adapter": best},
    }


def _compare(values: list[float], base: list[float], best: list[float]) -> dict:
    return {
        "mean": stats(values),
        "vs_base": stats([v - b for v, b in zip(values, base, strict=True)]),
        "vs_best_single": stats([v - b for v, b in zip(values, best, strict=True)]),
        "beats_base": sum(v > b for v, b in zip(values, base, strict=True)),
        "beats_best_single": sum(v > b for v, b in zip(values, best, strict=True)),
    }


def _aggregate_setting(results: dict, setting: str) -> dict:
    tasks = results["tasks"][setting]
    seeds = results["seeds"]
    references = [_references(seed, setting, tasks) for seed in seeds]
    out = {"reference": {}, "rows": []}
    for who in ("base", "best single"):
        out["reference"][who] = {
            "normalized": {t: mean(r[who]["normalized"][t] for r in references) for t in tasks},
            "mean": stats([r[who]["mean"] for r in references]),
            "adapters": [r[who].get("adapter") for r in references],
        }
    for method in results["methods"][setting]:
        per_seed, base, best = [], [], []
        for seed, refs in zip(seeds, references, strict=True):
            row = next((r for r in seed["merged"][setting] if r["method"] == method["method"]), None)
            if row is not None:
                per_seed.append(row)
                base.append(refs["base"]["mean"])
                best.append(refs["best single"]["mean"])
        if not per_seed:
            continue
        means = [mean(row["normalized"].values()) for row in per_seed]
        out["rows"].append(
            {
                **method,
                "normalized": {t: mean(row["normalized"][t] for row in per_seed) for t in tasks},
                "loss": stats([mean(row["loss"].values()) for row in per_seed]),
                **_compare(means, base, best),
            }
        )
    return out


def _aggregate_pairs(results: dict) -> dict:
    seeds = results["seeds"]
    if not any(seed["pairs"] for seed in seeds):
        return {"reference": {}, "rows": []}
    pair_names = list(next(seed["pairs"][0]["pairs"] for seed in seeds if seed["pairs"]))
    base, best = [], []
    base_pairs: dict[str, list[float]] = {p: [] for p in pair_names}
    best_pairs: dict[str, list[float]] = {p: [] for p in pair_names}
    for seed in seeds:
        refs = {p: _references(seed, "4-way", p.split("+")) for p in pair_names}
        for p in pair_names:
            base_pairs[p].append(refs[p]["base"]["mean"])
            best_pairs[p].append(refs[p]["best single"]["mean"])
        base.append(mean(refs[p]["base"]["mean"] for p in pair_names))
        best.append(mean(refs[p]["best single"]["mean"] for p in pair_names))
    out = {
        "pairs": pair_names,
        "reference": {
            "base": {"pairs": {p: mean(v) for p, v in base_pairs.items()}, "mean": stats(base)},
            "best single": {"pairs": {p: mean(v) for p, v in best_pairs.items()}, "mean": stats(best)},
        },
        "rows": [],
    }
    for method in results["methods"]["pairs"]:
        rows = [next((r for r in seed["pairs"] if r["method"] == method["method"]), None) for seed in seeds]
        if any(row is None for row in rows):
            continue
        per_pair = {p: [mean(row["pairs"][p].values()) for row in rows] for p in pair_names}
        means = [mean(per_pair[p][i] for p in pair_names) for i in range(len(rows))]
        out["rows"].append(
            {**method, "pairs": {p: mean(v) for p, v in per_pair.items()}, **_compare(means, base, best)}
        )
    return out


def _aggregate_search(results: dict) -> list[dict]:
    seeds = results["seeds"]
    labels = [row["method"] for row in seeds[0]["search"]] if seeds else []
    new = {m["method"] for m in results["methods"]["4-way"] if m["new"]}
    out = []
    for label in labels:
        rows = [next((r for r in seed["search"] if r["method"] == label), None) for seed in seeds]
        if any(row is None for row in rows):
            continue
        uniform = [mean(row["uniform"]["normalized"].values()) for row in rows]
        searched = [mean(row["searched"]["normalized"].values()) for row in rows]
        out.append(
            {
                "method": label,
                "new": label in new,
                "uniform_weights": rows[0]["uniform_weights"],
                "weights": [row["weights"] for row in rows],
                "optimizer": rows[0]["optimizer"],
                "trials": rows[0]["trials"],
                "uniform": stats(uniform),
                "searched": stats(searched),
                "gain": stats([s - u for s, u in zip(searched, uniform, strict=True)]),
                "search_loss_uniform": stats([row["search_loss"]["uniform"] for row in rows]),
                "search_loss_searched": stats([row["search_loss"]["searched"] for row in rows]),
            }
        )
    return out


def _goals(aggregated: dict) -> list[dict]:
    rows = aggregated["4-way"]["rows"]
    older = [r for r in rows if not r["new"]]
    best_older = max(older, key=lambda r: r["mean"]["mean"]) if older else None
    new_rows = [r for r in rows if r["new"]]
    goals = []
    if new_rows:
        best = max(new_rows, key=lambda r: r["mean"]["mean"])
        goals.append(
            {
                "goal": f"a new type reaches >= {GOAL_UNIFORM:.2f} mean normalized accuracy on the uniform 4-way "
                "merge (karcher 0.43 in the 0.2.0 single-seed table)",
                "met": best["mean"]["mean"] >= GOAL_UNIFORM,
                "value": best["mean"],
                "method": best["method"],
                "best_older": None
                if best_older is None
                else {"method": best_older["method"], "value": best_older["mean"]},
            }
        )
    else:
        goals.append({"goal": "a new type on the uniform 4-way merge", "met": False, "value": None, "method": None})
    searched = [r for r in aggregated["search"] if r["new"]]
    if searched:
        # The best new type is chosen on the search split (lowest searched search loss), never on held-out data.
        chosen = min(searched, key=lambda r: r["search_loss_searched"]["mean"])
        best_held_out = max(searched, key=lambda r: r["searched"]["mean"])
        older_searched = [r for r in aggregated["search"] if not r["new"]]
        best_older_searched = max(older_searched, key=lambda r: r["searched"]["mean"]) if older_searched else None
        goals.append(
            {
                "goal": f"search_weights over the best new type >= {GOAL_SEARCH:.2f} (held-out, 4-way)",
                "met": chosen["searched"]["mean"] >= GOAL_SEARCH,
                "value": chosen["searched"],
                "method": chosen["method"],
                "best_held_out": {"method": best_held_out["method"], "value": best_held_out["searched"]},
                "best_older": None
                if best_older_searched is None
                else {"method": best_older_searched["method"], "value": best_older_searched["searched"]},
            }
        )
    else:
        goals.append({"goal": "search_weights over a new type", "met": False, "value": None, "method": None})
    return goals


def aggregate(results: dict) -> dict:
    """Mean, spread and comparisons with the base and the best single adapter over the seeds, and the goal checks."""
    aggregated = {
        "4-way": _aggregate_setting(results, "4-way"),
        "8-way": _aggregate_setting(results, "8-way"),
        "pairs": _aggregate_pairs(results),
        "search": _aggregate_search(results),
    }
    aggregated["goals"] = _goals(aggregated)
    return aggregated


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def spread(s: dict, digits: int = 2, signed: bool = False) -> str:
    """`mean ± std (min–max)`, or just the mean for one seed."""
    sign = "+" if signed else ""
    if s["n"] == 0:
        return "n/a"
    text = f"{s['mean']:{sign}.{digits}f}"
    if s["n"] > 1:
        text += f" ± {s['std']:.{digits}f} ({s['min']:{sign}.{digits}f}–{s['max']:{sign}.{digits}f})"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _reference_rows(reference: dict, columns: list[str], key: str, extra: int) -> list[list[str]]:
    rows = []
    for who in ("base", "best single"):
        ref = reference[who]
        name = "**base model**" if who == "base" else "**best single adapter**"
        adapters = [a for a in ref.get("adapters", []) if a]
        if adapters:
            name += f" ({', '.join(dict.fromkeys(adapters))})"
        rows.append([name, "-", "-", "-", *(fmt(ref[key][c]) for c in columns), spread(ref["mean"]), *["-"] * extra])
    return rows


def _wins(row: dict, key: str) -> str:
    return f"{row[key]}/{row['mean']['n']}"


def _setting_section(title: str, data: dict, columns: list[str], key: str, loss: bool) -> list[str]:
    header = ["method", "from", "rank", "w", *columns, "mean ± std (min–max)", "vs base", "vs best single"]
    header += ["mean loss"] if loss else []
    rows = _reference_rows(data["reference"], columns, key, 2 + loss)
    for row in data["rows"]:
        cells = [
            row["method"],
            row["family"],
            row["rank"],
            row["uniform_weight"],
            *(fmt(row[key][c]) for c in columns),
            f"**{spread(row['mean'])}**",
            f"{fmt(row['vs_base']['mean'])} ({_wins(row, 'beats_base')})",
            f"{spread(row['vs_best_single'], signed=True)} ({_wins(row, 'beats_best_single')})",
        ]
        if loss:
            cells.append(fmt(row["loss"]["mean"]))
        rows.append(cells)
    return [title, "", markdown_table(header, rows), ""]


def _search_section(search: list[dict]) -> list[str]:
    header = ["method", "uniform w", "uniform (held-out)", "searched (held-out)", "gain", "search loss", "weights"]
    rows = []
    for row in search:
        weights = ", ".join(f"{w:.2f}" for w in row["weights"][0])
        rows.append(
            [
                row["method"],
                fmt(row["uniform_weights"][0]),
                spread(row["uniform"]),
                f"**{spread(row['searched'])}**",
                spread(row["gain"], signed=True),
                f"{fmt(row['search_loss_uniform']['mean'], 3)} → {fmt(row['search_loss_searched']['mean'], 3)}",
                weights,
            ]
        )
    optimizers = {f"{row['optimizer']} ({row['trials']} trials)" for row in search}
    return [
        "## Searched vs uniform weights, 4-way (held-out split; the search used a separate split)",
        "",
        markdown_table(header, rows),
        "",
        f"Optimizer: {', '.join(sorted(optimizers))}; bounds [0, 2 x uniform weight]; the first trial is the uniform "
        "weights; weights shown for the first seed. Newer types in their default form (no rank bound, default "
        "options).",
        "",
    ]


def _goal_lines(goals: list[dict], mode: str) -> list[str]:
    lines = ["## Goals", ""]
    if mode != "full":
        lines += [f"Mode `{mode}`: indicative only, the goals are judged on the full run.", ""]
    lines += ["| goal | measured | status |", "|---|---|---|"]
    for goal in goals:
        if goal["value"] is None:
            lines.append(f"| {goal['goal']} | no newer built-in type registered | **not met** |")
            continue
        measured = f"{goal['method']}: {spread(goal['value'])} over {goal['value']['n']} seed(s)"
        if goal.get("best_held_out") and goal["best_held_out"]["method"] != goal["method"]:
            best = goal["best_held_out"]
            measured += f" (chosen by search loss; best on held-out: {best['method']} {spread(best['value'])})"
        if goal.get("best_older"):
            older = goal["best_older"]
            measured += f"; best older type in this run: {older['method']} {spread(older['value'])}"
        lines.append(f"| {goal['goal']} | {measured} | **{'met' if goal['met'] else 'not met'}** |")
    return [*lines, ""]


def report(results: dict, chart_note: str) -> str:
    """The markdown report of a run."""
    settings = results["settings"]
    size = settings["size"]
    aggregated = results["aggregate"]
    seeds = settings["seeds"]
    all_tasks = results["tasks"]["8-way"]
    lines = [
        "# Merge quality",
        "",
        f"Mode `{settings['mode']}`, seeds {', '.join(map(str, seeds))}: per seed a tiny Llama (hidden "
        f"{size['hidden']}, {size['layers']} layers) pretrained {settings['pretrain_steps']} steps on "
        f"{', '.join(BASE_TASKS)} with {'-'.join(map(str, settings['pretrain_digits']))} digits; one LoRA adapter "
        f"(r={settings['rank']}, all linear layers) per task trained {settings['adapter_steps']} steps on "
        f"{settings['digits']} digits; {settings['test_examples']} held-out examples per task. The 8-way base is "
        f"pretrained {settings['pretrain_steps_8']} steps on all ten tasks. Uniform weights 1/k "
        "(1 for the types that average or rescale by themselves, column `w`); PEFT's density "
        f"{settings['density']}; newer types with their default options; `(exact)`: no rank bound. Every figure is "
        f"the mean over {len(seeds)} seed(s); `±` is the sample standard deviation over the seeds and the brackets "
        "the min–max. `vs base` / `vs best single`: the row's mean minus the reference's, per seed, with the number "
        f"of seeds where the row is higher. Total {results['wall_seconds'] / 60:.1f} min, "
        f"{results['environment'].get('jobs', 1)} process(es) of {results['environment']['threads']} thread(s).",
        "",
        "Tasks: " + "; ".join(f"`{task}`: {TASK_DESCRIPTIONS[task]}" for task in all_tasks) + ".",
        "",
    ]
    for setting, pretrained in (("4-way", 6), ("8-way", 10)):
        tasks = results["tasks"][setting]
        lines += [
            f"## {setting} base ({pretrained} pretraining tasks) and its adapters alone (held-out exact-match "
            "accuracy, mean over seeds)",
            "",
        ]
        table = []
        for who in ["base", *tasks]:
            cells = [mean(seed["reference"][setting][who][t]["accuracy"] for seed in results["seeds"]) for t in tasks]
            table.append([who, *(fmt(value) for value in cells)])
        lines += [markdown_table(["model", *tasks], table), ""]
    for setting in ("4-way", "8-way"):
        tasks = results["tasks"][setting]
        title = f"## {setting}: all {len(tasks)} adapters merged, normalized accuracy (merged / adapter alone)"
        lines += _setting_section(title, aggregated[setting], tasks, "normalized", loss=True)
    pairs = aggregated["pairs"]
    if pairs["rows"]:
        title = "## Pairs of the 4-way adapters (slerp applies): mean normalized accuracy over the pair's two tasks"
        lines += _setting_section(title, pairs, pairs["pairs"], "pairs", loss=False)
    if aggregated["search"]:
        lines += _search_section(aggregated["search"])
    lines += _goal_lines(aggregated["goals"], settings["mode"])
    skipped = {(s["method"], s["setting"], s["reason"]) for seed in results["seeds"] for s in seed["skipped"]}
    lines += [f"- skipped `{method}` ({setting}): {reason}" for method, setting, reason in sorted(skipped)]
    if skipped:
        lines.append("")
    for seed in results["seeds"]:
        timings = ", ".join(f"{key} {value:.0f}s" for key, value in seed["timings"].items())
        lines.append(f"Timings, seed {seed['seed']}: {timings}.")
    lines += ["", chart_note, ""]
    return "\n".join(lines)


def write_chart(results: dict, path: Path) -> str:
    """A grouped bar chart of the 4-way normalized accuracy per task and method; returns a note for the report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 'Chart skipped: matplotlib is not installed (pip install "peft-merge-ext[plot]").'
    data = results["aggregate"]["4-way"]
    rows = data["rows"]
    tasks = results["tasks"]["4-way"]
    figure, axis = plt.subplots(figsize=(max(8, 0.55 * len(rows)), 4.6))
    width = 0.8 / (len(tasks) + 1)
    for index, label in enumerate([*tasks, "mean"]):
        values = [row["normalized"][label] if label != "mean" else row["mean"]["mean"] for row in rows]
        positions = [x + (index - len(tasks) / 2) * width for x in range(len(rows))]
        if label == "mean":
            errors = [
                [row["mean"]["mean"] - row["mean"]["min"] for row in rows],
                [row["mean"]["max"] - row["mean"]["mean"] for row in rows],
            ]
            axis.bar(positions, values, width, label="mean (min–max)", color="black", yerr=errors, ecolor="grey")
        else:
            axis.bar(positions, values, width, label=label)
    for who, style in (("base", ":"), ("best single", "-.")):
        axis.axhline(data["reference"][who]["mean"]["mean"], color="red", linewidth=0.9, linestyle=style, label=who)
    axis.set_xticks(range(len(rows)))
    axis.set_xticklabels([row["method"] for row in rows], rotation=45, ha="right", fontsize=7)
    axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axis.set_ylabel("merged accuracy / adapter alone")
    seeds = len(results["settings"]["seeds"])
    axis.set_title(f"Merging {len(tasks)} task adapters, mean over {seeds} seed(s) (held-out exact match)")
    axis.legend(ncol=len(tasks) + 3, fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"Chart: {path.name}"
