"""GGUF output checked by llama.cpp itself: the merged model and the combined adapter (as a llama.cpp LoRA) are loaded
with llama-cpp-python and their logits compared with transformers' logits of the same merged model; llama.cpp's own
converter (`convert_hf_to_gguf.py`, shipped in llama-cpp-python's source package) run on the merged safetensors
folder gives the same tensors, types and metadata.

Models are tiny Llama / Qwen2 with a real byte-level BPE tokenizer trained here in about a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf_oracle
import numpy as np
import pytest
import torch
from conftest import add_lora

from peft_merge_ext.cli import main
from peft_merge_ext.errors import MergeInputError
from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint

gguf = pytest.importorskip("gguf", reason='GGUF output needs the gguf package: pip install "peft-merge-ext[gguf]"')
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (.ci/run builds it from its source package)"
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _convert(jobs, lora_jobs=()) -> None:
    """Run llama.cpp's converters (`gguf_oracle.converter_command`), or skip when they are not extracted."""
    if not gguf_oracle.converter_available():
        pytest.skip(f"llama.cpp's converter is not extracted to {gguf_oracle.CONVERTER} (.ci/run does it)")
    gguf_oracle.run(gguf_oracle.converter_command(jobs, lora_jobs))


def _model(arch: str, vocab: int, tied: bool, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    values = {
        "vocab_size": vocab + 8,  # a few ids the tokenizer leaves empty, as real models have
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tied,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**values)).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**values)).eval()
    # Llama 3.1's rotary scaling (llama.cpp: a rope_freqs tensor), with a short original context so that the tiny
    # head size has frequencies in all three bands (kept, scaled, blended).
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0}
    llama3.update(high_freq_factor=4.0, original_max_position_embeddings=32)
    return LlamaForCausalLM(LlamaConfig(**values, rope_parameters=llama3)).eval()


def _files(
    root: Path, arch: str = "llama", tied: bool = False, seed: int = 0, sentencepiece: bool = False
) -> dict[str, Path]:
    """Base folder (weights + tokenizer) and two adapter folders (different ranks)."""
    base = root / f"base-{arch}"
    if sentencepiece:
        vocab = gguf_oracle.train_sentencepiece(base)
    else:
        split = gguf_oracle.QWEN2_SPLIT if arch == "qwen2" else gguf_oracle.LLAMA3_SPLIT
        vocab = gguf_oracle.train_tokenizer(base, split)
    model = _model(arch, vocab, tied, seed)
    model.save_pretrained(base)
    folders = {"base": base}
    for name, offset, rank in (("a", 1, 4), ("b", 2, 8)):
        peft_model = add_lora(
            _model(arch, vocab, tied, seed),
            name,
            seed=seed + offset,
            r=rank,
            lora_alpha=2 * rank,
            target_modules=TARGETS,
        )
        peft_model.save_pretrained(root / f"adapters-{arch}", selected_adapters=[name])
        folders[name] = root / f"adapters-{arch}" / name
    return folders


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("gguf-llama"))


def _tokens(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)("The quick brown fox merges adapters: 12 345!")["input_ids"]


def _hf_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def _gguf_logits(path: Path, tokens: list[int], lora: Path | None = None) -> np.ndarray:
    model = llama_cpp.Llama(
        model_path=str(path),
        lora_path=str(lora) if lora else None,
        logits_all=True,
        n_ctx=64,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,  # the KV cache is f16 by default: keep the comparison at f32
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    model.eval(tokens)
    logits = np.array(model.scores[: len(tokens)], dtype=np.float64)
    model.close()
    return logits


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _merge(files, out: Path, **kwargs):
    return merge_checkpoint(
        files["base"],
        [files["a"], files["b"]],
        out=out,
        combination_type="weighted",
        weights=[0.7, 0.5],
        quiet=True,
        **kwargs,
    )


# Metadata that names the file rather than the model: the converter takes them from the folder name and card.
PROVENANCE_KEYS = {"general.name", "general.tags", "general.basename", "general.finetune", "general.size_label"}


def _assert_same_as_converter(ours: Path, theirs: Path) -> None:
    """Same tensors (names, shapes, types, bytes) and the same metadata keys and values, file provenance aside."""
    mine, reference = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    assert {t.name: (t.tensor_type, list(t.shape)) for t in mine.tensors} == {
        t.name: (t.tensor_type, list(t.shape)) for t in reference.tensors
    }
    by_name = {t.name: t for t in reference.tensors}
    for tensor in mine.tensors:
        assert np.array_equal(np.asarray(tensor.data), np.asarray(by_name[tensor.name].data)), tensor.name
    keys = {key for key in mine.fields if not key.startswith("GGUF.")}
    expected_keys = {key for key in reference.fields if not key.startswith("GGUF.")}
    assert keys - PROVENANCE_KEYS == expected_keys - PROVENANCE_KEYS
    for key in sorted(keys - PROVENANCE_KEYS):
        assert mine.fields[key].contents() == reference.fields[key].contents(), key


@pytest.fixture(scope="module")
def llama_merges(llama_files, tmp_path_factory):
    """The same merge as safetensors, GGUF f32 and GGUF q8_0, and the transformers logits of the merged model."""
    root = tmp_path_factory.mktemp("gguf-llama-out")
    outputs = {"safetensors": _merge(llama_files, root / "safetensors").path, "root": root}
    for kind in ("f32", "q8_0"):
        outputs[kind] = _merge(llama_files, root / kind, output_format="gguf", gguf_type=kind).path
    tokens = _tokens(llama_files["base"])
    return outputs, tokens, _hf_logits(outputs["safetensors"], tokens)


@pytest.fixture(scope="module")
def converted(llama_files, llama_merges):
    """llama.cpp's own conversions, in one process: the merged folder to f32 and q8_0, the base to f32, and the
    combined adapter (saved as safetensors) with convert_lora_to_gguf.py."""
    outputs, _, _ = llama_merges
    root = outputs["root"]
    adapter = _merge(llama_files, root / "adapter-safetensors", merge_into_base=False).path
    paths = {"f32": root / "converted-f32.gguf", "q8_0": root / "converted-q8_0.gguf"}
    paths.update(base=root / "base-f32.gguf", lora=root / "converted-lora.gguf")
    jobs = [(outputs["safetensors"], paths[kind], kind, "llama-bpe") for kind in ("f32", "q8_0")]
    jobs.append((llama_files["base"], paths["base"], "f32", "llama-bpe"))
    _convert(jobs, [(adapter, llama_files["base"], paths["lora"], "f32")])
    return paths


def test_f32_model_gives_transformers_logits_and_matches_llama_cpp_converter(llama_merges, request):
    outputs, tokens, expected = llama_merges
    written = json.loads((outputs["f32"] / ".peft-merge-ext-files.json").read_text())["files"]
    assert sorted(written) == ["README.md", "model-F32.gguf"]  # no full-precision copy, no config or tokenizer
    got = _gguf_logits(outputs["f32"] / "model-F32.gguf", tokens)
    assert _relative(got, expected) <= 1e-3  # measured: about 1e-6 (f32 KV cache)
    # After the logits check, which needs no converter.
    _assert_same_as_converter(outputs["f32"] / "model-F32.gguf", request.getfixturevalue("converted")["f32"])
    reader = gguf.GGUFReader(outputs["f32"] / "model-F32.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == gguf_oracle.CHAT_TEMPLATE
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert {"output.weight", "rope_freqs.weight"} <= {t.name for t in reader.tensors}  # not tied; llama3 rotary


def test_q8_0_model_is_the_converters_file_and_close_to_transformers(llama_merges, request):
    outputs, tokens, expected = llama_merges
    path = outputs["q8_0"] / "model-Q8_0.gguf"
    # Measured over 6 seeds (Llama and Qwen2, hidden 64): 0.019-0.047 relative to the largest logit (8-bit weights,
    # and llama.cpp quantizes activations to 8 bits for q8_0 products); a wrong merge is off by more than 1.
    assert _relative(_gguf_logits(path, tokens), expected) <= 0.1
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    _assert_same_as_converter(path, request.getfixturevalue("converted")["q8_0"])


def test_lora_gguf_on_the_base_gguf_gives_the_merged_logits(llama_files, llama_merges, converted, tmp_path):
    outputs, tokens, _ = llama_merges
    base = converted["base"]
    adapter = _merge(llama_files, tmp_path / "adapter", output_format="gguf", gguf_type="f32", merge_into_base=False)
    assert sorted(adapter.files) == ["README.md", "adapter-F32.gguf", "peft_merge_ext_lineage.json"]
    path = adapter.path / "adapter-F32.gguf"
    merged = _gguf_logits(outputs["f32"] / "model-F32.gguf", tokens)
    assert _relative(_gguf_logits(base, tokens), merged) > 0.1  # the adapter matters
    assert _relative(_gguf_logits(base, tokens, lora=path), merged) <= 1e-4
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 12.0  # one rank (4 + 8) everywhere: scale 1
    # The tensors llama.cpp's convert_lora_to_gguf.py writes for the same adapter saved as safetensors.
    mine = {t.name: (t.tensor_type, list(t.shape)) for t in reader.tensors}
    assert mine == {t.name: (t.tensor_type, list(t.shape)) for t in gguf.GGUFReader(converted["lora"]).tensors}


def test_qwen2_with_tied_embeddings_from_the_command_line(tmp_path, capsys):
    files = _files(tmp_path, arch="qwen2", tied=True, seed=3)
    out = tmp_path / "merged"
    command = ["merge", "--base", str(files["base"]), "--adapter", str(files["a"]), "--adapter", str(files["b"])]
    command += ["--method", "weighted", "--weights", "0.7", "0.5", "--out", str(out), "--quiet"]
    assert main([*command, "--format", "gguf", "--gguf-type", "f16"]) == 0
    assert "model-F16.gguf" in capsys.readouterr().out
    path = out / "model-F16.gguf"
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    # Tied: no output.weight, llama.cpp reuses token_embd.weight (as its converter writes it); Qwen2 keeps q/k/v
    # biases and needs no rotary reordering.
    assert "output.weight" not in names and {"token_embd.weight", "blk.1.attn_q.bias"} <= names
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert main([*command[:-3], "--out", str(tmp_path / "st"), "--quiet"]) == 0
    _convert([(tmp_path / "st", tmp_path / "converted.gguf", "f16", "qwen2")])
    _assert_same_as_converter(path, tmp_path / "converted.gguf")
    tokens = _tokens(files["base"])
    # f16 weights: measured about 1e-3 relative to the largest logit.
    assert _relative(_gguf_logits(path, tokens), _hf_logits(tmp_path / "st", tokens)) <= 1e-2


def test_mistral_with_a_sentencepiece_tokenizer(tmp_path):
    """Mistral is llama.cpp's `llama` architecture; its SentencePiece tokenizer becomes the `llama` tokenizer model."""
    import sentencepiece

    files = _files(tmp_path, arch="mistral", sentencepiece=True, seed=4)
    merged = _merge(files, tmp_path / "gguf", output_format="gguf", gguf_type="f32").path / "model-F32.gguf"
    folder = _merge(files, tmp_path / "st").path
    _convert([(folder, tmp_path / "converted.gguf", "f32", "default")])
    _assert_same_as_converter(merged, tmp_path / "converted.gguf")
    reader = gguf.GGUFReader(merged)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(files["base"] / "tokenizer.model"))
    tokens = processor.encode("The quick brown fox merges adapters: 12 345!")
    assert _relative(_gguf_logits(merged, tokens), _hf_logits(folder, tokens)) <= 1e-3


def _peft_model(files):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(files["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, files["a"], adapter_name="a")
    model.load_adapter(files["b"], adapter_name="b")
    return model


def test_in_memory_save_merged_writes_the_same_file(llama_files, llama_merges, tmp_path):
    from peft_merge_ext.publish.save import save_merged

    outputs, _, _ = llama_merges
    out = save_merged(
        _peft_model(llama_files),
        tmp_path / "in-memory",
        adapters=["a", "b"],
        weights=[0.7, 0.5],
        combination_type="weighted",
        format="gguf",
        gguf_type="q8_0",
    )
    # The same metadata and tensors, byte for byte (the in-memory model lists its tensors in module order, the
    # checkpoint in storage order, so the files order them differently).
    mine, reference = gguf.GGUFReader(out / "model-Q8_0.gguf"), gguf.GGUFReader(outputs["q8_0"] / "model-Q8_0.gguf")
    assert {k: f.contents() for k, f in mine.fields.items()} == {k: f.contents() for k, f in reference.fields.items()}
    by_name = {t.name: t for t in reference.tensors}
    assert sorted(by_name) == sorted(t.name for t in mine.tensors)
    for tensor in mine.tensors:
        assert tensor.tensor_type == by_name[tensor.name].tensor_type
        assert np.array_equal(np.asarray(tensor.data), np.asarray(by_name[tensor.name].data)), tensor.name


def test_card_lineage_and_recipe_rerun_to_the_same_bytes(llama_files, llama_merges, tmp_path, monkeypatch):
    import yaml

    outputs, _, _ = llama_merges
    card = (outputs["q8_0"] / "README.md").read_text()
    assert "gguf" in card and "q8_0" in card and "model-Q8_0.gguf" in card and "library_name" not in card
    recipe = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe["format"] == "gguf" and recipe["gguf_type"] == "q8_0"
    recipe["base"] = str(llama_files["base"])
    recipe["adapters"] = [{**entry, "path": str(llama_files[entry["path"]])} for entry in recipe["adapters"]]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "recipe.yaml", "--quiet"]) == 0
    rerun = tmp_path / recipe["output"] / "model-Q8_0.gguf"
    assert rerun.read_bytes() == (outputs["q8_0"] / "model-Q8_0.gguf").read_bytes()
    adapter = _merge(llama_files, tmp_path / "adapter", output_format="gguf", gguf_type="f16", merge_into_base=False)
    assert adapter.merge_info.to_dict()["output_format"] == "gguf"
    assert adapter.merge_info.to_dict()["gguf_type"] == "f16"
    lineage = json.loads((adapter.path / "peft_merge_ext_lineage.json").read_text())
    assert (lineage["output_format"], lineage["gguf_type"]) == ("gguf", "f16")
    assert "format: gguf" in (adapter.path / "README.md").read_text()


def _no_tokenizer(files, root):
    import shutil

    base = root / "no-tokenizer"
    shutil.copytree(files["base"], base)
    (base / "tokenizer.json").unlink()
    return base


def _not_byte_level(files, root):
    base = _no_tokenizer(files, root)
    data = json.loads((files["base"] / "tokenizer.json").read_text())
    data["model"] = {**data["model"], "type": "WordPiece"}
    (base / "tokenizer.json").write_text(json.dumps(data))
    return base


def _gpt2(files, root):
    from conftest import tiny_gpt2

    base = root / "gpt2"
    tiny_gpt2().save_pretrained(base)
    model = add_lora(tiny_gpt2(), "g", seed=1, r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    model.save_pretrained(root / "gpt2-adapters")
    return base, root / "gpt2-adapters" / "g"


@pytest.mark.parametrize(
    ("make_base", "extra", "message"),
    [
        (None, ["--gguf-type", "q4_k"], "Unknown GGUF type 'q4_k'; this writer supports f32, f16, bf16, q8_0"),
        (_gpt2, [], "GGUF output supports the architectures LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
        (_no_tokenizer, [], "no tokenizer.json nor tokenizer.model"),
        (_not_byte_level, [], "GGUF output supports byte-level BPE tokenizers"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(llama_files, tmp_path, capsys, make_base, extra, message):
    base = make_base(llama_files, tmp_path) if make_base else llama_files["base"]
    base, adapter = base if isinstance(base, tuple) else (base, llama_files["a"])
    out = tmp_path / "out"
    command = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet"]
    capsys.readouterr()
    assert main([*command, "--format", "gguf", *extra]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def test_missing_gguf_package_names_the_extra(monkeypatch):
    from peft_merge_ext.gguf_output.options import parse_output_format

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MergeInputError, match=r'pip install "peft-merge-ext\[gguf\]"'):
        parse_output_format("gguf", "f16")
    with pytest.raises(MergeInputError, match="needs format='gguf'"):
        parse_output_format(None, "q8_0")


def test_recipe_format_fields_are_checked():
    from peft_merge_ext.recipe import RecipeError, load_recipe

    step = "{adapters: [a], output: %s%s}"
    with pytest.raises(RecipeError, match=r"steps\[0\]\.format.*only the last step may write GGUF"):
        load_recipe(f"base: b\nsteps:\n  - {step % ('m', ', format: gguf')}\n  - {step % ('n', '')}\n")
    with pytest.raises(RecipeError, match=r"gguf_type.*needs format='gguf'"):
        load_recipe("base: b\nadapters: [a]\ngguf_type: q8_0\n")
    with pytest.raises(RecipeError, match="Unknown GGUF type 'q2_k'"):
        load_recipe("base: b\nadapters: [a]\nformat: gguf\ngguf_type: q2_k\n")
    recipe = load_recipe("base: b\nadapters: [a]\nformat: gguf\n")
    assert (recipe.final.format, recipe.final.gguf_type) == ("gguf", "f16")
    assert load_recipe(recipe.to_yaml()) == recipe
