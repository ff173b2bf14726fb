"""The planned safetensors writer: any write order, bytes at their final offset, shards + index, errors, no spool."""

from __future__ import annotations

import gc
import itertools
import json
import os
import random
import struct
import weakref
from pathlib import Path

import pytest
import torch
from conftest import add_lora, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file

from peft_merge_ext.checkpoint.background_writer import BackgroundWriter
from peft_merge_ext.checkpoint.reader import read_tensor, read_tensor_specs
from peft_merge_ext.checkpoint.writer import (
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_directory,
    plan_shards,
)


def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def _write_shuffled(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size, seed: int = 0) -> list[str]:
    folder.mkdir(exist_ok=True)
    names = list(tensors)
    random.Random(seed).shuffle(names)
    assert names != list(tensors)
    with ShardedSafetensorsWriter(folder, _specs(tensors), max_shard_size) as writer:
        for name in names:
            writer.write(name, tensors[name])
        return writer.finish()


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return length, json.loads(handle.read(length))


def _read_all(folder: Path, files: list[str]) -> dict[str, torch.Tensor]:
    loaded = {}
    for file_name in files:
        if file_name.endswith(".safetensors"):
            with safe_open(str(folder / file_name), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    assert key not in loaded
                    loaded[key] = handle.get_tensor(key)
    return loaded


@pytest.fixture
def mixed_tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "odd.bf16": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "big.f32": torch.randn(40, 33, generator=generator),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(7, dtype=torch.int64) - 3,
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "half": torch.randn(17, generator=generator).to(torch.float16),
        "empty": torch.zeros(0, 4),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "more.f32": torch.randn(9, generator=generator),
        "more.i64": torch.tensor([2**40, -(2**40)], dtype=torch.int64),
    }


def test_shuffled_mixed_dtypes_read_back_exactly_with_aligned_offsets(tmp_path, mixed_tensors):
    files = _write_shuffled(tmp_path / "out", mixed_tensors, "2KB")
    assert len(files) > 2 and files[-1] == "model.safetensors.index.json"
    assert sorted(os.listdir(tmp_path / "out")) == sorted(files)  # no spool or temporary file left
    loaded = _read_all(tmp_path / "out", files)
    assert set(loaded) == set(mixed_tensors)
    for name, tensor in mixed_tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    for file_name in files[:-1]:
        length, header = _header(tmp_path / "out" / file_name)
        assert length % 8 == 0
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        assert header["__metadata__"] == {"format": "pt"}
        for name, entry in entries.items():
            assert entry["data_offsets"][0] % mixed_tensors[name].element_size() == 0, name
        sizes = [
            mixed_tensors[name].element_size() for name in sorted(entries, key=lambda k: entries[k]["data_offsets"])
        ]
        assert sizes == sorted(sizes, reverse=True)
        assert os.path.getsize(tmp_path / "out" / file_name) == 8 + length + max(
            e["data_offsets"][1] for e in entries.values()
        )


def test_shards_follow_spec_order_and_the_index_lists_every_tensor(tmp_path, mixed_tensors):
    files = _write_shuffled(tmp_path / "out", mixed_tensors, 1000, seed=3)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in mixed_tensors.values())
    assert list(index["weight_map"]) == sorted(mixed_tensors)
    count = len(files) - 1
    assert files[:-1] == [f"model-{n:05d}-of-{count:05d}.safetensors" for n in range(1, count + 1)]
    # Consecutive runs of the spec order, each within the limit unless a single tensor.
    order = [index["weight_map"][name] for name in mixed_tensors]
    assert order == sorted(order)
    for file_name in files[:-1]:
        names = [name for name in mixed_tensors if index["weight_map"][name] == file_name]
        size = sum(mixed_tensors[n].numel() * mixed_tensors[n].element_size() for n in names)
        assert size <= 1000 or len(names) == 1
        with safe_open(str(tmp_path / "out" / file_name), framework="pt") as handle:
            assert set(handle.keys()) == set(names)
    # The next tensor would have overflowed each shard (so shards are as full as the rule allows).
    shards = plan_shards(_specs(mixed_tensors), 1000)
    for shard, following in itertools.pairwise(shards):
        assert sum(s.nbytes for s in shard) + following[0].nbytes > 1000


def test_tensor_larger_than_the_limit_gets_its_own_shard(tmp_path):
    tensors = {"a": torch.ones(10), "huge": torch.arange(600, dtype=torch.float32), "b": torch.zeros(3)}
    files = _write_shuffled(tmp_path / "out", tensors, "1KB")
    weight_map = json.loads((tmp_path / "out" / files[-1]).read_text())["weight_map"]
    assert len(files) == 4
    assert [name for name, file in weight_map.items() if file == weight_map["huge"]] == ["huge"]
    assert torch.equal(_read_all(tmp_path / "out", files)["huge"], tensors["huge"])


def test_single_shard_is_model_safetensors_without_index(tmp_path, mixed_tensors):
    files = _write_shuffled(tmp_path / "out", mixed_tensors, "5GB")
    assert files == ["model.safetensors"]
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    loaded = _read_all(tmp_path / "out", files)
    assert all(torch.equal(loaded[k], v) for k, v in mixed_tensors.items())


def test_tiny_model_written_in_shuffled_order_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tie_word_embeddings=False)
    model.config.save_pretrained(tmp_path / "out")
    state = model.state_dict()
    files = _write_shuffled(tmp_path / "out", state, "20KB")
    assert len(files) > 3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bytes_land_at_their_final_offset_when_written(tmp_path):
    tensors = {"first": torch.arange(4, dtype=torch.float32), "second": torch.arange(6, dtype=torch.int64) * 7}
    writer = ShardedSafetensorsWriter(tmp_path, _specs(tensors))
    writer.write("second", tensors["second"])
    path = tmp_path / "model.safetensors"
    length, header = _header(path)
    start, stop = header["second"]["data_offsets"]
    with open(path, "rb") as handle:
        handle.seek(8 + length + start)
        assert handle.read(stop - start) == tensors["second"].numpy().tobytes()
    writer.write("first", tensors["first"])
    assert writer.finish() == ["model.safetensors"]
    assert torch.equal(read_tensor(path, "first"), tensors["first"])


def test_writer_keeps_no_reference_to_written_tensors(tmp_path):
    specs = [TensorSpec(f"t{i}", (256, 64), torch.float32) for i in range(4)]
    writer = ShardedSafetensorsWriter(tmp_path, specs, "100KB")
    references = []
    for spec in reversed(specs):
        tensor = torch.randn(spec.shape)
        writer.write(spec.name, tensor)
        references.append(weakref.ref(tensor))
        del tensor
    gc.collect()
    assert all(reference() is None for reference in references)
    writer.finish()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count open files")
def test_at_most_one_shard_file_is_open(tmp_path):
    specs = [TensorSpec(f"t{i}", (64,), torch.float32) for i in range(8)]
    writer = ShardedSafetensorsWriter(tmp_path, specs, 256)
    assert len(writer.file_names) == 8
    before = len(os.listdir("/proc/self/fd"))
    for spec in reversed(specs):
        writer.write(spec.name, torch.ones(spec.shape))
        assert len(os.listdir("/proc/self/fd")) <= before + 1
    writer.finish()
    assert len(os.listdir("/proc/self/fd")) == before


def test_errors_name_the_problem(tmp_path):
    specs = [
        TensorSpec("a", (2,), torch.float32),
        TensorSpec("b", (3,), torch.bfloat16),
        TensorSpec("c", (1,), torch.bool),
    ]
    writer = ShardedSafetensorsWriter(tmp_path, specs, 8)
    with pytest.raises(ValueError, match="'z' is not in the writer's plan"):
        writer.write("z", torch.zeros(2))
    with pytest.raises(ValueError, match=r"'a' is \(3,\) torch.float32, but the plan says \(2,\) torch.float32"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match=r"'b' is \(3,\) torch.float32, but the plan says \(3,\) torch.bfloat16"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="has no data"):
        writer.write("a", torch.zeros(2, device="meta"))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'a' was already written"):
        writer.write("a", torch.zeros(2))
    writer.write("c", torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"1 planned tensor.* starting with 'b'"):
        writer.finish()
    writer.write("b", torch.zeros(3, dtype=torch.bfloat16))
    assert writer.finish() == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    with pytest.raises(ValueError, match="finished"):
        writer.write("a", torch.zeros(2))


def test_bad_plans_are_refused_before_any_file(tmp_path):
    with pytest.raises(ValueError, match="No tensors"):
        ShardedSafetensorsWriter(tmp_path, [])
    with pytest.raises(ValueError, match="'x' is planned twice"):
        ShardedSafetensorsWriter(tmp_path, [TensorSpec("x", (1,), torch.float32)] * 2)
    with pytest.raises(TypeError, match="complex64"):
        ShardedSafetensorsWriter(tmp_path, [TensorSpec("c", (1,), torch.complex64)])
    with pytest.raises(ValueError, match="max_shard_size"):
        ShardedSafetensorsWriter(tmp_path, [TensorSpec("x", (1,), torch.float32)], "lots")
    assert list(tmp_path.iterdir()) == []


def test_close_after_an_error_removes_partial_shards(tmp_path):
    specs = [TensorSpec(f"t{i}", (64,), torch.float32) for i in range(4)]
    with pytest.raises(RuntimeError, match="boom"), ShardedSafetensorsWriter(tmp_path, specs, 256) as writer:
        writer.write("t2", torch.ones(64))
        writer.write("t0", torch.ones(64))
        assert len(list(tmp_path.iterdir())) == 2
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _data_offsets(path: Path) -> dict[str, int]:
    length, header = _header(path)
    return {k: 8 + length + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_background_writer_gives_the_same_bytes_as_the_direct_writer(
    tmp_path, mixed_tensors, monkeypatch, kernel_copy
):
    if not kernel_copy:  # the fallback through a buffer, for systems without os.copy_file_range
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    direct = _write_shuffled(tmp_path / "direct", mixed_tensors, "2KB")
    save_file(mixed_tensors, str(tmp_path / "source.safetensors"))
    offsets = _data_offsets(tmp_path / "source.safetensors")
    (tmp_path / "background").mkdir()
    names = list(mixed_tensors)
    random.Random(0).shuffle(names)
    limit = 200
    with BackgroundWriter(ShardedSafetensorsWriter(tmp_path / "background", _specs(mixed_tensors), "2KB"), limit) as w:
        for index, name in enumerate(names):
            if index % 2:  # half the tensors copied byte for byte out of another safetensors file
                w.copy_from_file(name, tmp_path / "source.safetensors", offsets[name])
            else:
                w.write(name, mixed_tensors[name].clone())
            assert w._pending_bytes <= max(limit, mixed_tensors[name].nbytes)
        files = w.finish()
    assert files == direct
    for file_name in files:
        assert (tmp_path / "background" / file_name).read_bytes() == (tmp_path / "direct" / file_name).read_bytes()


def test_background_writer_errors_reach_the_caller_and_leave_no_folder(tmp_path, mixed_tensors):
    save_file({"tiny": torch.ones(1)}, str(tmp_path / "short.safetensors"))
    destination = tmp_path / "out" / "merged"
    with (
        pytest.raises(ValueError, match="too short"),
        atomic_directory(destination) as folder,
        BackgroundWriter(ShardedSafetensorsWriter(folder, _specs(mixed_tensors), "2KB")) as writer,
    ):
        writer.copy_from_file("big.f32", tmp_path / "short.safetensors", 8)  # fails in the thread
        for name in ["odd.bf16", "mask", "ids", "half"]:
            writer.write(name, mixed_tensors[name])
        writer.finish()
    assert list((tmp_path / "out").iterdir()) == []
    second = tmp_path / "second"
    second.mkdir()
    with BackgroundWriter(ShardedSafetensorsWriter(second, _specs(mixed_tensors), "2KB")) as writer:
        with pytest.raises(ValueError, match="plan says"):  # checked in the caller's thread, at once
            writer.write("mask", torch.ones(3))
        writer.write("mask", mixed_tensors["mask"])
        with pytest.raises(ValueError, match="already written"):
            writer.write("mask", mixed_tensors["mask"])
        with pytest.raises(ValueError, match="not in the writer's plan"):
            writer.copy_from_file("nope", tmp_path / "short.safetensors", 8)
    assert list(second.iterdir()) == []  # close removed the incomplete shard


def test_read_tensor_specs_lists_tensors_in_storage_order(tmp_path):
    tensors = {
        "z.f32": torch.ones(3),
        "a.bool": torch.tensor([True]),
        "m.i64": torch.arange(2),
        "b.f32": torch.ones(1),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    _, header = _header(tmp_path / "x.safetensors")
    by_offset = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    specs = read_tensor_specs(tmp_path / "x.safetensors")
    assert [s.name for s in specs] == by_offset
    assert {s.name: (s.shape, s.dtype) for s in specs} == {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    assert torch.equal(read_tensor(tmp_path / "x.safetensors", "m.i64"), tensors["m.i64"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensors_on_the_gpu_are_written(tmp_path):
    tensor = torch.randn(5, 7, device="cuda")
    with ShardedSafetensorsWriter(tmp_path, [TensorSpec("g", (5, 7), torch.float32)]) as writer:
        writer.write("g", tensor)
        writer.finish()
    assert torch.equal(read_tensor(tmp_path / "model.safetensors", "g"), tensor.cpu())


def _live_merged(model, adapters):
    """The merged modules of `adapters` on a live model, through the pipeline's own steps."""
    from peft_merge_ext.engine.request import resolve_request
    from peft_merge_ext.peft_bridge.source import merge_live, resolve_model

    source = resolve_model(model)
    merged, _ = merge_live(source, resolve_request(source.configs, adapters))
    return source, merged


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_merged_weights_source_plans_exactly_what_it_yields(dtype):
    from peft_merge_ext.peft_bridge.weights import MergedWeightsSource

    model = add_lora(tiny_gpt2(), "a", seed=3, r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    target, deltas = _live_merged(model, ["a"])
    source = MergedWeightsSource(target.base, deltas, dtype)
    yielded = [(key, tuple(t.shape), t.dtype) for key, t in source.tensors()]
    assert [(s.name, s.shape, s.dtype) for s in source.specs()] == yielded
    assert "lm_head.weight" not in {key for key, _, _ in yielded}  # tied to wte: written once
    assert {d for _, _, d in yielded} == {dtype or torch.float32}


def _checkpoint_items(folder, merged, dtype, tied):
    from peft_merge_ext.checkpoint.base_checkpoint import BaseCheckpoint, CopyFromFile

    checkpoint = BaseCheckpoint(folder)
    checkpoint.untie(tied, {m.weight_key for m in merged})
    by_key = {m.weight_key: m for m in merged}
    transpose = {key: m.module.transpose for key, m in by_key.items()}
    items = list(checkpoint.merged_items(lambda key: by_key[key].delta, transpose, dtype))
    return checkpoint, [(spec, item) for spec, item in items if not isinstance(item, CopyFromFile)], items


def test_checkpoint_weights_source_plans_from_headers(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base", max_shard_size="40KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    model = add_lora(tiny_gpt2(), "a", seed=8, r=4, target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    target, deltas = _live_merged(model, ["a"])
    tied = dict(target.base.all_tied_weights_keys)
    checkpoint, tensors, items = _checkpoint_items(tmp_path / "base", deltas, torch.float16, tied)
    yielded = [(spec.name, tuple(t.shape), t.dtype) for spec, t in tensors]
    assert [(s.name, s.shape, s.dtype) for s, _ in tensors] == yielded
    assert [s.name for s, _ in items] == [s.name for s in checkpoint.specs(torch.float16)]
    assert "lm_head.weight" in {key for key, _, _ in yielded}  # untied: the adapter changes wte only


def _storage_order(folder: Path) -> list[tuple[str, str]]:
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    return [(name, spec.name) for name in files for spec in read_tensor_specs(folder / name)]


def test_checkpoint_weights_source_reads_the_checkpoint_front_to_back(tmp_path, monkeypatch):
    import peft_merge_ext.checkpoint.reader as reader

    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="30KB")
    model = add_lora(tiny_llama(), "a", seed=1, r=2, target_modules=["q_proj"])
    _, deltas = _live_merged(model, ["a"])
    reads, original = [], reader.read_tensor
    monkeypatch.setattr(
        reader, "read_tensor", lambda path, name: reads.append((Path(path).name, name)) or original(path, name)
    )
    # float16 output: every tensor changes dtype, so every one is read (none copied file to file), in storage order.
    checkpoint, _, items = _checkpoint_items(tmp_path / "base", deltas, torch.float16, {})
    assert [spec.name for spec, _ in items] == [s.name for s in checkpoint.specs(None)]
    assert len(_storage_order(tmp_path / "base")) > 10 and reads == _storage_order(tmp_path / "base")


def test_merge_checkpoint_reads_the_base_front_to_back(tmp_path, monkeypatch):
    import peft_merge_ext.checkpoint.reader as reader
    from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="30KB")
    add_lora(base, "default", seed=1, r=2, target_modules=["q_proj", "down_proj"]).save_pretrained(
        tmp_path / "adapter"
    )
    from peft_merge_ext.checkpoint.background_writer import BackgroundWriter

    reads, original, original_copy = [], reader.read_tensor, BackgroundWriter.copy_from_file
    monkeypatch.setattr(
        reader, "read_tensor", lambda path, name: reads.append((Path(path), name, "read")) or original(path, name)
    )
    # Unchanged tensors are copied file to file instead of read: record those requests too, in the same list.
    monkeypatch.setattr(
        BackgroundWriter,
        "copy_from_file",
        lambda self, name, source, offset: (
            reads.append((Path(source), name, "copy")) or original_copy(self, name, source, offset)
        ),
    )
    result = merge_checkpoint(
        tmp_path / "base", [tmp_path / "adapter"], out=tmp_path / "out", max_shard_size="30KB", quiet=True
    )
    base_reads = [(path.name, name) for path, name, _ in reads if path.parent == tmp_path / "base"]
    assert base_reads == _storage_order(tmp_path / "base")
    kinds = {name: kind for path, name, kind in reads if path.parent == tmp_path / "base"}
    assert {name for name, kind in kinds.items() if kind == "read"} == {
        name for name in kinds if name.endswith(("q_proj.weight", "down_proj.weight"))
    }
    assert sum(kind == "copy" for kind in kinds.values()) > 10
    assert {"README.md", "config.json", "generation_config.json"} <= set(result.files)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [*result.files, ".peft-merge-ext.json", ".peft-merge-ext-files.json"]
    )
