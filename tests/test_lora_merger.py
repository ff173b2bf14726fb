"""`LoRAMerger`, the API of the project that inspired peft-merge-ext: its README's Basic Usage and mortgage examples
run as written (local folders instead of Hub ids), every registered type works, and the merged weights are the
ones `merge_checkpoint` streams."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import add_lora, tiny_llama
from peft import PeftModel
from safetensors.torch import load, load_file

from peft_merge_ext.errors import UnknownCombinationTypeError
from peft_merge_ext.lora_merger import LoRAMerger
from peft_merge_ext.plugins.registry import get_combination_types
from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint


@pytest.fixture
def folders(tmp_path):
    """A tiny base and three adapters (loan_docs, underwriting, fraud_detect) with different ranks and targets."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = add_lora(base, "loan_docs", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    add_lora(model, "underwriting", seed=2, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    add_lora(model, "fraud_detect", seed=3, r=3, lora_alpha=3, use_rslora=True, target_modules=["v_proj", "o_proj"])
    model.save_pretrained(tmp_path / "adapters")
    return tmp_path / "base", tmp_path / "adapters"


def test_basic_usage_example(folders, tmp_path, hub_server):
    base, adapters = folders
    # --- the inspiring README's Basic Usage, with local folders ---
    merger = LoRAMerger(base_model=str(base), adapters=[str(adapters / "loan_docs"), str(adapters / "underwriting")])
    merged_model = merger.merge(method="weighted", weights=[0.6, 0.4])
    merged_model.save_pretrained(tmp_path / "merged_output")
    url = merger.push_to_hub(repo_id="test-user/model-name", token=hub_server.token)
    # ---
    assert not any("lora_" in key for key in merged_model.state_dict())
    saved = load_file(str(tmp_path / "merged_output" / "model.safetensors"))
    streamed = merge_checkpoint(
        base,
        [adapters / "loan_docs", adapters / "underwriting"],
        out=tmp_path / "streamed",
        combination_type="weighted",
        weights=[0.6, 0.4],
        quiet=True,
    )
    expected = load_file(str(streamed.path / "model.safetensors"))
    assert all(torch.equal(saved[key], expected[key]) for key in expected)  # bit-identical
    repo = hub_server.repo("test-user/model-name")
    assert url.endswith(repo.head().oid)
    pushed = load(repo.files()["model.safetensors"])
    assert all(torch.equal(pushed[key], expected[key]) for key in expected)
    card = repo.files()["README.md"].decode()
    assert "weighted" in card and "loan_docs" in card


def test_mortgage_example(folders):
    base, adapters = folders
    # --- the inspiring README's mortgage example, with local folders ---
    merger = LoRAMerger(
        base_model=str(base),
        adapters=[
            str(adapters / "loan_docs"),  # Weight: 0.4
            str(adapters / "underwriting"),  # Weight: 0.4
            str(adapters / "fraud_detect"),  # Weight: 0.2
        ],
    )
    mortgage_model = merger.merge(method="weighted", weights=[0.4, 0.4, 0.2])
    # ---
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapters / "loan_docs", adapter_name="loan_docs"
    )
    for name in ("underwriting", "fraud_detect"):
        reference.load_adapter(adapters / name, adapter_name=name)
    names = ["loan_docs", "underwriting", "fraud_detect"]
    reference.add_weighted_adapter(names, [0.4, 0.4, 0.2], "sum", combination_type="cat")  # PEFT's exact sum
    reference.set_adapter("sum")
    inputs = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(mortgage_model(inputs).logits, reference(inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", sorted(get_combination_types()))
def test_every_registered_type(folders, method):
    base, adapters = folders
    merger = LoRAMerger(base, [adapters / "loan_docs", adapters / "underwriting"])
    model = merger.merge(method=method, weights=[0.5, 0.5])
    base_weights = load_file(str(base / "model.safetensors"))
    merged = model.state_dict()
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base_weights["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        merged["model.layers.0.self_attn.k_proj.weight"], base_weights["model.layers.0.self_attn.k_proj.weight"]
    )


def test_default_is_the_average_and_slerp_takes_options(folders):
    base, adapters = folders
    pair = [adapters / "loan_docs", adapters / "underwriting"]
    average = LoRAMerger(base, pair).merge().state_dict()
    weighted = LoRAMerger(base, pair).merge(method="weighted", weights=[0.5, 0.5]).state_dict()
    key = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(average[key], weighted[key], rtol=0, atol=1e-7)
    slerp_low = LoRAMerger(base, pair).merge(method="slerp", t=0.0).state_dict()
    single = LoRAMerger(base, pair[:1]).merge(method=None).state_dict()
    torch.testing.assert_close(slerp_low[key], single[key], rtol=0, atol=1e-6)  # t=0: the first adapter


def test_unknown_method_fails_before_loading(folders):
    base, adapters = folders
    with pytest.raises(UnknownCombinationTypeError, match="average"):
        LoRAMerger(base, [adapters / "loan_docs"]).merge(method="magic")


def test_push_to_hub_can_keep_the_folder(folders, tmp_path, hub_server):
    base, adapters = folders
    merger = LoRAMerger(base, [adapters / "loan_docs", adapters / "fraud_detect"])
    merger.merge(method="slerp", weights=[0.3, 0.7])
    merger.push_to_hub("test-user/kept", token=hub_server.token, local_dir=tmp_path / "kept", private=True)
    assert (tmp_path / "kept" / "model.safetensors").is_file()
    repo = hub_server.repo("test-user/kept")
    assert repo.private is True
    assert (
        io.BytesIO(repo.files()["model.safetensors"]).getvalue()
        == (tmp_path / "kept" / "model.safetensors").read_bytes()
    )


def test_failed_push_to_hub_names_a_folder_that_still_exists(folders, hub_server):
    """The error of a failed upload names the merged folder, which is kept for the retry (it used to name a temporary
    folder already deleted); a bad token fails before anything is merged."""
    import re
    from pathlib import Path

    from peft_merge_ext.errors import HubUploadError

    base, adapters = folders
    merger = LoRAMerger(base, [adapters / "loan_docs", adapters / "underwriting"])
    with pytest.raises(HubUploadError):
        merger.push_to_hub("test-user/model", token="hf_invalid")
    hub_server.fail("commit", 500)
    with pytest.raises(HubUploadError) as caught:
        merger.push_to_hub("test-user/model", token=hub_server.token)
    named = [Path(m) for m in re.findall(r"(/\S*peft-merge-ext-push-[^/\s]+/merged)", str(caught.value))]
    assert named and (named[0] / "model.safetensors").is_file() and (named[0] / "README.md").is_file()
