"""Shared fixtures: tiny real models built locally (no downloads)."""

from __future__ import annotations

import os
import warnings

import pytest

# Hub: before anything imports huggingface_hub, point HF_ENDPOINT at a local port (the `hub_server` fixture serves a
# fake Hub there) and stay offline by default; the fixture turns offline mode off for the tests that use it.
from hub_server import hub_server, reserve_hub_endpoint  # noqa: F401  (registers the `hub_server` fixture)

reserve_hub_endpoint()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message="Adapter name .* should not be contained in the prefix")


@pytest.fixture(autouse=True, scope="session")
def _session_temp_dir(tmp_path_factory):
    """Temporary files of the package (e.g. the local copy a failed upload keeps on purpose) go to pytest's own
    temporary folder, not to the system's, so a test run leaves nothing behind in /tmp."""
    import tempfile

    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    yield
    tempfile.tempdir = previous


def tiny_llama_config(num_layers: int = 2, **overrides):
    from transformers import LlamaConfig

    values = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(num_layers: int = 2, seed: int = 0, **overrides):
    """A randomly initialized Llama causal LM with `num_layers` blocks (float32)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(num_layers, **overrides)).eval()


def tiny_gpt2(num_layers: int = 2, seed: int = 0):
    """A randomly initialized GPT-2 causal LM (its attention/MLP use `Conv1D`, so LoRA needs fan_in_fan_out)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=num_layers, n_head=4)
    return GPT2LMHeadModel(config).eval()


def add_lora(model, name: str, seed: int, **config):
    """Add a LoRA adapter with random non-zero A and B (init_lora_weights=False) to a model or PeftModel."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(seed)
    lora_config = LoraConfig(init_lora_weights=False, **config)
    if isinstance(model, PeftModel):
        model.add_adapter(name, lora_config)
        return model
    return get_peft_model(model, lora_config, adapter_name=name)


@pytest.fixture
def llama_two_adapters():
    """A PeftModel over a 2-layer Llama with adapters 'a' (r=4) and 'b' (r=6, rslora) on overlapping modules."""
    model = add_lora(tiny_llama(), "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    add_lora(model, "b", seed=2, r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"])
    return model
