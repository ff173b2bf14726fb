"""Running a mergekit configuration of `base+adapter` LoRA models without materializing them.

mergekit writes every `base+adapter` as a full model into a cache before merging. Here the base checkpoint is read
one tensor at a time (`checkpoint.base_checkpoint`): a tensor no adapter touches is copied file to file; for a
LoRA-targeted weight `W`, each input's full weight `W + D_i` is formed densely for that one module (`D_i = B_i A_i`
with its scaling, rounded to `W`'s dtype and added as PEFT's `merge_and_unload` does), and mergekit's method
(`engine.mergekit_methods`) merges them in mergekit's working dtype. Peak memory is a few copies of the largest
targeted weight; nothing is cached on disk. Everything is validated (the configuration, the adapters against the
base, every parameter for every tensor) before the output folder exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..engine.mergekit_methods import merge_tensor
from .mergekit_config import MergekitConfig

__all__ = ["run_mergekit_config"]


def _position(layer_index: int | None, layers: int | None) -> float:
    """mergekit's `t` of a tensor for gradients: `layer / (layers - 1)` in the blocks (1 with one block), else 0."""
    if layer_index is None or not layers:
        return 0.0
    return layer_index / (layers - 1) if layers > 1 else 1.0


class _MergekitWeights:
    """The merged value of each targeted weight, mergekit's way, and the per-module report."""

    def __init__(self, config: MergekitConfig, plan: Any) -> None:
        import torch

        from ..checkpoint.side_files import parse_dtype
        from ..engine.combine import num_layers

        self.config, self.plan = config, plan
        self.work_dtype = parse_dtype(config.dtype)
        self.layers = num_layers(plan.base_config, plan.source.module_names())
        # The plan lists the adapters in the order of `config.adapters`.
        names = {folder: adapter.name for folder, adapter in zip(config.adapters, plan.adapters, strict=True)}
        self.adapter_names = [names[entry.adapter] if entry.adapter else None for entry in config.inputs]
        self.torch = torch
        self.modules: list[Any] = []
        self.parameters = {key: self._parameters(key) for key in plan.targets}  # every value checked up front

    def _parameters(self, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        module = self.plan.source.module(self.plan.targets[key], self.plan.transpose[key])
        return self.config.resolve(key, _position(module.layer_index, self.layers))

    def prepare(self, key: str, weight: Any) -> Callable[[], tuple[Any, Any]]:
        """Read what the targeted weight `key` needs (here, in the calling thread) and return the job that merges it:
        `job() -> (merged tensor, ModuleReport)`, pure computation, safe to run in a worker thread."""
        from ..engine.report import ModuleReport

        torch = self.torch
        plan = self.plan
        module = plan.source.module(plan.targets[key], plan.transpose[key])
        weight = weight.to(plan.device)
        work_dtype = self.work_dtype or weight.dtype
        exact = torch.float64 if weight.dtype == torch.float64 else torch.float32
        deltas = [module.read(adapter) if adapter is not None else None for adapter in self.adapter_names]

        def job() -> tuple[Any, Any]:
            inputs = []
            for delta in deltas:
                value = weight
                if delta is not None:
                    dense = delta.B.to(exact) @ delta.A.to(exact)
                    dense = (dense.T if module.transpose else dense).reshape(weight.shape)
                    value = dense.add_(weight).to(weight.dtype)  # W + D in float32, one rounding, as merge_and_unload
                    del dense
                inputs.append(value.to(work_dtype))
                del value
            merged = self._merge(key, inputs)
            touched = sum(delta is not None for delta in deltas)
            stats = {"inputs": len(self.adapter_names), "adapters": touched}
            return merged, ModuleReport(module.name, module.layer_index, stats)

        return job

    def _merge(self, key: str, inputs: list[Any]) -> Any:
        shared, per_model = self.parameters[key] if key in self.parameters else self._untouched_parameters(key)
        return merge_tensor(self.config.method, inputs, self.config.base_index, shared, per_model)

    def _untouched_parameters(self, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from ..engine.combine import FactorModule

        layer = FactorModule(key, "linear", (0, 0), lambda _: None, self.plan.device, self.torch.float32).layer_index
        return self.config.resolve(key, _position(layer, self.layers))

    def shared(self, key: str, weight: Any) -> Callable[[], tuple[Any, None]]:
        """The job for a tensor no adapter touches: the method with every input equal to the base's value."""
        work = weight.to(self.plan.device).to(self.work_dtype or weight.dtype)
        return lambda: (self._merge(key, [work] * len(self.config.inputs)), None)


def _items(plan: Any, weights: _MergekitWeights, out_dtype: Any, workers: int) -> Iterator[tuple[Any, Any]]:
    """`(spec, tensor or CopyFromFile)` in storage order: targeted weights merged, the others as the base has them.

    Except for `karcher`: its iteration runs in the working dtype, so mergekit's result for a tensor every input
    shares is the base's only up to a few units in the last place; such tensors go through the method as well.

    With `workers == 1` everything runs in this thread, one tensor at a time (the least memory). With more, reading
    stays here and the merges run on `workers` threads (TIES' magnitude sort is single-threaded, so two workers use
    two cores), at most `workers` tensors ahead of the writer, results in order. The per-module reports are appended
    to `weights.modules` in storage order either way.
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor
    from contextlib import nullcontext

    from ..checkpoint.base_checkpoint import CopyFromFile

    checkpoint = plan.checkpoint
    recompute = weights.config.method == "karcher"
    ahead = workers if workers > 1 else 0

    def finished(spec: Any, item: Any) -> tuple[Any, Any]:
        if not isinstance(item, (Future, tuple)):
            return spec, item
        merged, module_report = item.result() if isinstance(item, Future) else item
        if module_report is not None:
            weights.modules.append(module_report)
        return spec, merged.to(spec.dtype)

    threads = ThreadPoolExecutor(workers, thread_name_prefix="peft-merge-ext-mergekit") if ahead else nullcontext()
    with threads as pool:

        def run(job: Callable[[], tuple[Any, Any]]) -> Any:
            return pool.submit(job) if pool is not None else job()

        pending: deque[tuple[Any, Any]] = deque()
        try:
            for tensor, spec in zip(checkpoint.tensors, checkpoint.specs(out_dtype), strict=True):
                shared = recompute and tensor.dtype.is_floating_point
                as_stored = spec.dtype == tensor.dtype and tensor.data_offset is not None
                if tensor.name not in plan.targets and not shared and as_stored:
                    pending.append((spec, CopyFromFile(tensor.file, tensor.data_offset)))
                else:
                    value = checkpoint.read(tensor)
                    if tensor.name in plan.targets:
                        pending.append((spec, run(weights.prepare(tensor.name, value))))
                    elif shared:
                        pending.append((spec, run(weights.shared(tensor.name, value))))
                    else:
                        pending.append((spec, value.to(spec.dtype)))
                    del value
                while len(pending) > ahead:
                    yield finished(*pending.popleft())
            while pending:
                yield finished(*pending.popleft())
        finally:
            for _, item in pending:  # a failure or an interrupted generator: drop what was not started
                if isinstance(item, Future):
                    item.cancel()


def _public_config(config: MergekitConfig) -> dict[str, Any]:
    """The configuration with every local path reduced to its folder name (for the model card)."""
    from ..checkpoint.side_files import public_name

    def public(reference: Any) -> Any:
        if not isinstance(reference, str):
            return reference
        return "+".join(public_name(part) or part for part in reference.split("+"))

    data = dict(config.data)
    data["models"] = [
        {**entry, "model": public(entry.get("model"))} if isinstance(entry, dict) else public(entry)
        for entry in data.get("models") or []
    ]
    if data.get("base_model") is not None:
        data["base_model"] = public(data["base_model"])
    return data


def run_mergekit_config(
    config: MergekitConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    device: Any = None,
    allow_pickle: bool = False,
    max_shard_size: int | str = "5GB",
    inputs: Sequence[str | Path] = (),
    workers: int = 1,
) -> Any:
    """Merge as mergekit would, streaming, and write the merged model to `out`.

    Args:
        config (`MergekitConfig`): The validated configuration (`mergekit_config.parse_mergekit_config`).
        out (`str` or `Path`): The output folder (must not exist or be empty unless `overwrite`).
        overwrite, quiet, device, allow_pickle, max_shard_size, inputs: As in `merge_checkpoint`.
        workers (`int`, defaults to 1): Modules merged at a time, on that many threads. TIES' magnitude sort runs on
            one core, so 2 workers on 2 cores roughly halve a `ties` run, at about twice the working memory; the
            result is the same bytes.

    Returns:
        `CheckpointMergeResult`: The folder, files and `MergeInfo`.
    """
    from ..checkpoint.output_folder import check_output, output_folder
    from ..checkpoint.side_files import copy_side_files, hub_id_of, parse_dtype, write_config
    from ..engine.merge_info import MergeInfo, library_versions
    from ..engine.report import MergeReport
    from .checkpoint_plan import plan_checkpoint_merge
    from .merge_checkpoint import CheckpointMergeResult
    from .output import stream_weights, write_card, write_manifest

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        from ..errors import MergeInputError

        raise MergeInputError(f"workers must be a positive number of threads, got {workers!r}.")
    started = time.perf_counter()
    out_dtype = parse_dtype(config.out_dtype or config.dtype)
    plan = plan_checkpoint_merge(
        config.base,
        config.adapters,
        combination_type="weighted",
        dtype=out_dtype,
        device=device,
        allow_pickle=allow_pickle,
    )
    if getattr(plan, "edits", None):  # DoRA magnitudes, LoRA biases, modules_to_save...: not B @ A
        from .mergekit_config import refusal

        raise refusal(
            f"adapter(s) {', '.join(a.name for a in plan.adapters)} change tensors beyond B @ A (DoRA, LoRA bias, "
            "modules_to_save or trainable tokens), which this path does not reproduce"
        )
    weights = _MergekitWeights(config, plan)
    owned = [*(a.folder for a in plan.adapters), plan.base_folder, *inputs]
    check_output(out, overwrite=overwrite, inputs=owned)
    pairs = zip(config.adapters, plan.adapters, strict=True)
    infos = [plan.source.describe(adapter, _scalar_weight(config, folder)) for folder, adapter in pairs]
    with output_folder(out, overwrite=overwrite, inputs=owned) as folder:
        specs = plan.checkpoint.specs(out_dtype)
        # Merged here one tensor at a time, or on `workers` threads, written here in storage order.
        items = _items(plan, weights, out_dtype, workers)
        files = stream_weights(folder, specs, items, max_shard_size, quiet=quiet, background=False)
        report = MergeReport(
            combination_type=f"mergekit_{config.method}",
            adapters=[info.name for info in infos],
            weights=[info.weight for info in infos],
            options=dict(config.parameters),
            svd_rank=None,
            provider="peft-merge-ext (mergekit semantics)",
            seconds=time.perf_counter() - started,
            modules=weights.modules,
        )
        info = MergeInfo(
            base_model=hub_id_of(plan.base),
            adapters=infos,
            combination_type=f"mergekit_{config.method}",
            options=dict(config.parameters),
            merge_into_base=True,
            dtype=config.out_dtype or config.dtype,
            report=report,
            versions=library_versions(),
            provider=report.provider,
            mergekit_config=_public_config(config),
        )
        untied = bool(plan.checkpoint.untied)
        write_config(plan.base_config, folder, dtype=out_dtype, untied=untied, hub_id=info.base_model)
        files.append("config.json")
        files += copy_side_files([plan.base_folder], folder, info.base_model)
        files.append(write_card(info, folder, repo_id=Path(out).name, base_card_folder=plan.base_folder))
        write_manifest(folder, files)
    return CheckpointMergeResult(Path(out), files, info, None, time.perf_counter() - started)


def _scalar_weight(config: MergekitConfig, folder: Path) -> float:
    """The `weight` of the input using adapter `folder`, when it is one number (for the card's table), else 1.0."""
    for entry in config.inputs:
        if entry.adapter == folder:
            value = entry.parameters.get("weight", config.parameters.get("weight"))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return 1.0
