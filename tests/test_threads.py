"""Plugin-type `add_weighted_adapter` is safe to call from several threads at once, each on its own model.

PEFT's `inject_adapter(low_cpu_mem_usage=True)` patches `torch.nn.Module.register_parameter` for the whole process
while it runs; without serialization, concurrent calls left new modules on the meta device and the patch installed.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import add_lora, tiny_llama

TYPES = ["weighted", "average", "slerp", "karcher"]


def _model(seed: int):
    model = add_lora(tiny_llama(num_layers=4), "a", seed=seed, r=4, target_modules=["q_proj", "v_proj", "o_proj"])
    add_lora(model, "b", seed=seed + 1, r=6, lora_alpha=3, target_modules=["q_proj", "k_proj", "down_proj"])
    return model


def _combine(model, method: str) -> dict[str, torch.Tensor]:
    model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "merged", combination_type=method)
    return {key: value.detach().clone() for key, value in model.state_dict().items() if ".merged" in key}


@pytest.mark.parametrize("round_", range(3))
def test_four_threads_on_separate_models_match_the_single_thread_results(round_):
    original_register = torch.nn.Module.register_parameter
    expected = {method: _combine(_model(10 * index), method) for index, method in enumerate(TYPES)}
    models = {method: _model(10 * index) for index, method in enumerate(TYPES)}
    results: dict[str, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(TYPES))

    def work(method: str) -> None:
        try:
            barrier.wait()
            results[method] = _combine(models[method], method)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(method,)) for method in TYPES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert torch.nn.Module.register_parameter is original_register  # no global patch left behind
    for method in TYPES:
        assert not any(p.device.type == "meta" for p in models[method].parameters())
        assert results[method].keys() == expected[method].keys() and expected[method]
        for key, value in expected[method].items():
            assert torch.equal(results[method][key], value), (method, key)
