"""Faulty inputs through the API: damaged adapters, misbehaving plugins, hostile patterns and typos each raise one
typed error (a `PeftMergeExtError`) naming what is wrong, before any output exists, and never change the user's
adapters.

Plugins are real distributions installed into a sandbox (`test_plugins.sandbox`); adapters are real PEFT folders.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import add_lora, tiny_llama
from safetensors.torch import load_file
from test_checkpoint_merge import _rewrite_adapter as rewrite_adapter
from test_plugins import sandbox  # noqa: F401  (the fixture, used through request.getfixturevalue)

from peft_merge_ext.checkpoint.adapter_config import pattern_value
from peft_merge_ext.checkpoint.background_writer import BackgroundWriter
from peft_merge_ext.checkpoint.writer import ShardedSafetensorsWriter, TensorSpec
from peft_merge_ext.errors import CombinationError, MergeInputError, PeftMergeExtError
from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint, plan_checkpoint_merge
from peft_merge_ext.publish.push import push_merged
from peft_merge_ext.publish.save import save_merged

FAULTY_PLUGIN = """
    import torch
    import peft_merge_ext
    from peft_merge_ext import LowRankDelta

    def nan_dense(deltas, weights, context):
        dense = torch.zeros(deltas[0].shape, dtype=deltas[0].B.dtype)
        dense[0, 0] = float("nan")
        return dense

    def wrong_shape(deltas, weights, context):
        out_features, in_features = deltas[0].shape
        return torch.zeros(out_features + 1, in_features, dtype=deltas[0].B.dtype)

    def first(deltas, weights, context):
        return deltas[0]

    def crash(weights, options):
        raise ZeroDivisionError("boom")

    def wide(deltas, weights, context):
        # Factors of inner size min(out, in) + 5, seeded by the module name: the test rebuilds them.
        out_features, in_features = deltas[0].shape
        rank = min(out_features, in_features) + 5
        generator = torch.Generator().manual_seed(len(context.name))
        b = torch.randn(out_features, rank, generator=generator, dtype=torch.float64)
        return LowRankDelta(b / 100, torch.randn(rank, in_features, generator=generator, dtype=torch.float64))

    def in_place(deltas, weights, context):
        for delta in deltas:
            delta.A.mul_(3.0)
            delta.B.zero_()
        return LowRankDelta(deltas[0].A.T.new_ones(deltas[0].shape[0], 1), deltas[0].A[:1] * 0 + 1)

    @peft_merge_ext.hookimpl
    def register_combination_types(register):
        register("nan_dense", nan_dense)
        register("wrong_shape", wrong_shape)
        register("crashing_validate", first, validate=crash)
        register("wide", wide)
        register("in_place", in_place)
"""
PLUGIN_PROVIDER = "peft_merge_ext_faulty (peft-merge-ext-faulty 1.0)"


@pytest.fixture
def faulty_types(request):
    """The combination types of `FAULTY_PLUGIN`, installed as a real distribution for this test."""
    box = request.getfixturevalue("sandbox")
    box.add_distribution("peft-merge-ext-faulty", FAULTY_PLUGIN)
    box.reload()
    return box


@pytest.fixture
def folders(tmp_path):
    """`base/` (a tiny Llama) and the adapter folders `fr` (r=4: q_proj, v_proj) and `de` (r=2: q_proj, down_proj)
    in `tmp_path / "in"`; outputs go to `tmp_path / "out"`, which starts empty."""
    inputs = tmp_path / "in"
    model = tiny_llama()
    model.save_pretrained(inputs / "base")
    model = add_lora(model, "fr", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    add_lora(model, "de", seed=2, r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"])
    model.save_pretrained(inputs)
    (tmp_path / "out").mkdir()
    return inputs


def _assert_nothing_written(out: Path) -> None:
    assert list(out.iterdir()) == [], sorted(path.name for path in out.iterdir())


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# Non-finite values


def _poisoned(folder: Path, part: str, value: float) -> dict[str, torch.Tensor]:
    """The last module's `part` factor of `folder` (the merge would reach it late) with `value` in it."""
    state = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(k for k in state if part in k)[-1]
    state[key][0, 0] = value
    return {key: state[key]}


@pytest.mark.parametrize(("part", "value"), [("lora_B", math.nan), ("lora_A", math.inf)])
@pytest.mark.parametrize("combined", [False, True], ids=["as-is", "combined"])
def test_non_finite_factor_is_refused_before_any_output(folders, tmp_path, part, value, combined):
    bad = rewrite_adapter(folders / "fr", tmp_path / "in" / "bad", None, _poisoned(folders / "fr", part, value))
    adapters = [bad, folders / "de"] if combined else [bad]
    method = "weighted" if combined else None
    pattern = rf"Adapter 'bad' has non-finite values \(NaN or Inf\) in {part} of 'model\.layers\.1\.self_attn\.v_proj'"
    with pytest.raises(MergeInputError, match=pattern) as raised:
        plan_checkpoint_merge(folders / "base", adapters, combination_type=method)  # a dry run already says it
    assert "combination_type" not in str(raised.value)
    with pytest.raises(MergeInputError, match=pattern):
        merge_checkpoint(folders / "base", adapters, out=tmp_path / "out" / "m", combination_type=method, quiet=True)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("alpha", ["NaN", "1e999", "-Infinity"])
def test_non_finite_lora_alpha_is_refused_naming_the_adapter(folders, tmp_path, alpha):
    bad = rewrite_adapter(folders / "fr", tmp_path / "in" / "bad")
    config = bad / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8', f'"lora_alpha": {alpha}'))
    assert f'"lora_alpha": {alpha}' in config.read_text()
    with pytest.raises(MergeInputError, match=r"Adapter 'bad' has lora_alpha .*finite"):
        merge_checkpoint(folders / "base", [bad], out=tmp_path / "out" / "m", quiet=True)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("combined", [False, True], ids=["as-is", "combined"])
def test_save_merged_refuses_a_nan_in_memory(llama_two_adapters, tmp_path, combined):
    layer = llama_two_adapters.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["a"].weight[0, 0] = math.nan
    adapters = ["a", "b"] if combined else ["a"]
    with pytest.raises(MergeInputError, match=r"Adapter 'a' at 'model\.layers\.1\.mlp\.down_proj' has non-finite"):
        save_merged(llama_two_adapters, tmp_path / "out" / "m", adapters=adapters)
    assert not (tmp_path / "out").exists()


# Plugins


@pytest.mark.parametrize(
    ("method", "match"),
    [
        ("nan_dense", "returned non-finite values"),
        ("wrong_shape", r"returned a dense delta of shape \(33, 48\)"),
        ("crashing_validate", "validate function .* failed: ZeroDivisionError: boom"),
    ],
)
def test_faulty_plugin_gives_one_error_naming_it(faulty_types, folders, tmp_path, method, match):
    adapters = [folders / "fr", folders / "de"]
    with pytest.raises(CombinationError, match=match) as raised:
        merge_checkpoint(folders / "base", adapters, out=tmp_path / "out" / "m", combination_type=method, quiet=True)
    assert f"combination_type={method!r} (from {PLUGIN_PROVIDER})" in str(raised.value)
    _assert_nothing_written(tmp_path / "out")


def test_plugin_rank_above_min_out_in_is_compressed_exactly(faulty_types, folders, tmp_path):
    """Factors of inner size above min(out, in) describe a valid delta: it is stored at its exact rank."""
    result = merge_checkpoint(
        folders / "base", [folders / "fr", folders / "de"], out=tmp_path / "out" / "m", combination_type="wide"
    )
    merged, base = (
        load_file(str(result.path / "model.safetensors")),
        load_file(str(folders / "base" / "model.safetensors")),
    )
    for entry in result.report.modules:
        key = f"{entry.name}.weight"
        out_features, in_features = base[key].shape
        rank = min(out_features, in_features) + 5
        generator = torch.Generator().manual_seed(len(entry.name))
        b = torch.randn(out_features, rank, generator=generator, dtype=torch.float64) / 100
        expected = base[key].double() + b @ torch.randn(rank, in_features, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-5)
        assert entry.stats["rank"] <= min(out_features, in_features)


def test_plugin_working_in_place_leaves_the_adapters_unchanged(faulty_types, folders, tmp_path):
    # In memory, float64: the factors the plugin gets could otherwise be the adapter's own tensors.
    model = add_lora(tiny_llama().double(), "a", seed=1, r=4, target_modules=["q_proj", "v_proj"]).double()
    add_lora(model, "b", seed=2, r=2, target_modules=["q_proj"]).double()
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    assert {p.dtype for p in lora.values()} == {torch.float64}
    save_merged(model, tmp_path / "out" / "memory", adapters=["a", "b"], combination_type="in_place")
    after = {name: p.detach() for name, p in model.named_parameters() if "lora_" in name}
    assert all(torch.equal(after[name], value) for name, value in lora.items())
    # On disk: the adapter files are read, never written.
    before = {name: _digests(folders / name) for name in ("fr", "de")}
    merge_checkpoint(
        folders / "base", [folders / "fr", folders / "de"], out=tmp_path / "out" / "disk", combination_type="in_place"
    )
    assert {name: _digests(folders / name) for name in ("fr", "de")} == before


# Adapter configs: patterns, auto_mapping


def test_rank_pattern_matching_takes_bounded_time(folders, tmp_path):
    """`(a+)+b` against a crafted long module name backtracks exponentially with Python's `re`: matching is bounded
    (here: fast), and a key that needs too long anyway is refused naming the key. Run in a subprocess so that a
    regression fails on the timeout instead of hanging the suite."""
    long_name = "model." + "a" * 60

    crafted = {
        f"base_model.model.{long_name}.lora_A.weight": torch.ones(4, 32),
        f"base_model.model.{long_name}.lora_B.weight": torch.ones(32, 4),
    }
    exponential = rewrite_adapter(folders / "fr", tmp_path / "in" / "exp", {"rank_pattern": {"(a+)+b": 2}}, crafted)
    heavy = {"rank_pattern": {"(.*){1,32000}[bc]": 2}}
    heavy = rewrite_adapter(folders / "fr", tmp_path / "in" / "heavy", heavy, crafted)
    code = textwrap.dedent(
        """
        import sys, time
        from peft_merge_ext.checkpoint.adapter_files import read_adapter
        from peft_merge_ext.errors import MergeInputError
        started = time.perf_counter()
        try:
            outcome = sorted({m.rank for m in read_adapter(sys.argv[1]).modules.values()})
        except MergeInputError as error:
            outcome = str(error)
        print(round(time.perf_counter() - started, 2), outcome)
        """
    )
    for folder, expected in ((exponential, "[4]"), (heavy, "takes too long to match module")):
        run = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        seconds, outcome = run.stdout.split(" ", 1)
        assert expected in outcome and float(seconds) < 10, run.stdout
    assert "'(.*){1,32000}[bc]'" in outcome and long_name in outcome


def test_pattern_keys_with_nested_repeats_keep_peft_semantics():
    from peft.utils.other import get_pattern_key

    pattern = {r"(\w+\.)+q_proj": 1, r"layers\.(\d+\.)*mlp\.down_proj": 2}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"):
        assert pattern_value(pattern, module, "default") == pattern.get(
            get_pattern_key(list(pattern), module), "default"
        )


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"rank_pattern": {"q_proj[": 2}}, r"rank_pattern key 'q_proj\[' is not a valid regular expression"),
        ({"alpha_pattern": {"(q_proj": 2}}, r"alpha_pattern key '\(q_proj' is not a valid regular expression"),
        ({"auto_mapping": "LlamaForCausalLM"}, "auto_mapping='LlamaForCausalLM' is not valid"),
        ({"auto_mapping": ["x"]}, r"auto_mapping=\['x'\] is not valid"),
        ({"auto_mapping": {"base_model_class": 3}}, "auto_mapping=.* is not valid"),
    ],
)
def test_bad_adapter_config_fields_are_refused(folders, tmp_path, config, match):
    bad = rewrite_adapter(folders / "fr", tmp_path / "in" / "bad", config)
    with pytest.raises(MergeInputError, match=match):
        plan_checkpoint_merge(folders / "base", [bad])


def test_pickle_of_other_objects_is_refused_under_allow_pickle(folders, tmp_path):
    import argparse

    state = load_file(str(folders / "fr" / "adapter_model.safetensors"))
    for name, content, match in (
        ("object", {**state, "extra": argparse.Namespace(a=1)}, "could not be loaded safely .*argparse.Namespace"),
        ("list", [1, 2], "holds a list, not a state dict"),
    ):
        folder = tmp_path / "in" / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text((folders / "fr" / "adapter_config.json").read_text())
        torch.save(content, folder / "adapter_model.bin")
        with pytest.raises(MergeInputError, match=match):
            merge_checkpoint(folders / "base", [folder], out=tmp_path / "out" / "m", allow_pickle=True, quiet=True)
    _assert_nothing_written(tmp_path / "out")


# Arguments


def test_the_same_adapter_folder_twice_is_refused(folders, tmp_path):
    (tmp_path / "in" / "link").symlink_to(folders / "fr")
    for again in (folders / "fr", f"{folders / 'fr'}/", tmp_path / "in" / "link", folders / "de" / ".." / "fr"):
        with pytest.raises(MergeInputError, match="is given twice"):
            plan_checkpoint_merge(folders / "base", [folders / "fr", again], combination_type="weighted")


def test_misspelled_argument_names_the_parameter(llama_two_adapters, tmp_path):
    out = tmp_path / "out" / "m"
    with pytest.raises(
        MergeInputError, match=r"save_merged\(\) got an unexpected argument 'adapter'; did you mean 'adapters'\?"
    ):
        save_merged(llama_two_adapters, out, adapter=["a"])
    with pytest.raises(MergeInputError, match=r"save_merged\(\) .* 'weight'; did you mean 'weights'\?"):
        save_merged(llama_two_adapters, out, adapters=["a", "b"], combination_type="slerp", weight=[1, 1])
    with pytest.raises(MergeInputError, match=r"push_merged\(\) .* 'adapter'; did you mean 'adapters'\?"):
        push_merged(llama_two_adapters, "user/repo", adapter=["a"])
    with pytest.raises(
        MergeInputError, match=r"Unknown option\(s\) 'tt' for combination_type='slerp'.*Did you mean 't'"
    ):
        save_merged(llama_two_adapters, out, adapters=["a", "b"], combination_type="slerp", tt=0.3)
    assert not out.exists()


def test_slerp_t_dict_without_default_fails_in_validation(folders):
    with pytest.raises(CombinationError, match="no 'default' entry") as raised:
        plan_checkpoint_merge(
            folders / "base", [folders / "fr", folders / "de"], combination_type="slerp", t={"q_proj": 0.3}
        )
    assert isinstance(raised.value, PeftMergeExtError)


# The background writer


class _SlowWriter(ShardedSafetensorsWriter):
    """A real writer whose `write` waits for `release` once it has started (so `close` can run meanwhile)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started, self.release = threading.Event(), threading.Event()

    def write(self, name, tensor) -> None:
        self.started.set()
        self.release.wait(10)
        super().write(name, tensor)


def test_closing_the_background_writer_while_it_writes_is_clean(tmp_path, monkeypatch):
    """What SIGINT does to a merge: `close` drops the queue while the thread writes the item at its head."""
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    writer = _SlowWriter(tmp_path, [TensorSpec("a", (4,), torch.float32), TensorSpec("b", (4,), torch.float32)])
    background = BackgroundWriter(writer)
    background.write("a", torch.ones(4))
    background.write("b", torch.ones(4))
    assert writer.started.wait(10)
    threading.Timer(0.2, writer.release.set).start()
    background.close()  # drops "b", waits for "a" to be written, removes the incomplete shard
    assert failures == [] and list(tmp_path.iterdir()) == []
