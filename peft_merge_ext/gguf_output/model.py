"""The GGUF layout of a merged model, known before any weight is read: the llama.cpp architecture, every tensor's
GGUF name, shape and type, and the hyperparameter metadata, from the base's `config.json` and the planned tensors.

The rules follow llama.cpp's own converter (`convert_hf_to_gguf.py`), so that llama.cpp loads the file and the
conformance test finds the same tensors and keys: names from the `gguf` package's tensor-name map; query and key
projections of the Llama family reordered for llama.cpp's rotary layout; norms and 1-D tensors stored as F32, the
other weights in the requested type (`q8_0` falls back to F16 for a row length that is not a multiple of 32, as the
converter does); no `output.weight` when the embeddings are tied (llama.cpp then reuses `token_embd.weight`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MergeInputError
from .options import SUPPORTED_ARCHITECTURES

__all__ = [
    "GGUFModelLayout",
    "GGUFTensor",
    "file_type_of",
    "gguf_architecture",
    "llama3_rope_factors",
    "plan_gguf_model",
    "rope_permute",
    "tensor_qtype",
]

_SKIPPED = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF file.

    Args:
        source (`str`): Its Hugging Face state-dict key (`None` for a tensor computed from the config).
        name (`str`): Its GGUF name (`blk.0.attn_q.weight`).
        shape (`tuple[int, ...]`): Its shape in PyTorch order (GGUF stores it reversed).
        qtype (`int`): Its `gguf.GGMLQuantizationType`.
        heads (`int`, *optional*): For a Llama-family query/key projection, the head count of the rotary reordering.
    """

    source: str | None
    name: str
    shape: tuple[int, ...]
    qtype: int
    heads: int | None = None


@dataclass
class GGUFModelLayout:
    """A planned GGUF model file: architecture, tensors in writing order and metadata values."""

    arch: str
    tensors: list[GGUFTensor]
    hparams: dict[str, Any]
    extra: dict[str, Any]
    file_type: int

    def add_metadata(self, writer: Any) -> None:
        """Add the architecture's hyperparameters to a `gguf.GGUFWriter`."""
        import gguf

        hp = self.hparams
        writer.add_block_count(hp["num_hidden_layers"])
        if hp.get("max_position_embeddings") is not None:
            writer.add_context_length(hp["max_position_embeddings"])
        writer.add_embedding_length(hp["hidden_size"])
        writer.add_feed_forward_length(hp["intermediate_size"])
        writer.add_head_count(hp["num_attention_heads"])
        if hp.get("num_key_value_heads") is not None:
            writer.add_head_count_kv(hp["num_key_value_heads"])
        rope = self.extra["rope"]
        if rope.get("rope_type") == "linear" and rope.get("factor") is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
        if rope.get("rope_theta") is not None:
            writer.add_rope_freq_base(rope["rope_theta"])
        if hp.get("rms_norm_eps") is not None:
            writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        if hp.get("head_dim") is not None:
            writer.add_key_length(hp["head_dim"])
            writer.add_value_length(hp["head_dim"])
        writer.add_file_type(self.file_type)
        if self.arch == "llama":
            writer.add_vocab_size(hp["vocab_size"])
            writer.add_rope_dimension_count(self.extra["head_dim"])


def gguf_architecture(config: Mapping[str, Any]) -> str:
    """The llama.cpp architecture of a base `config.json`, or a `MergeInputError` naming the supported ones."""
    architectures = list(config.get("architectures") or [])
    arch = SUPPORTED_ARCHITECTURES.get(architectures[0]) if architectures else None
    if arch is None:
        found = architectures[0] if architectures else "no 'architectures' entry"
        raise MergeInputError(
            f"GGUF output supports the architectures {', '.join(SUPPORTED_ARCHITECTURES)}; the base is {found}. "
            "Write safetensors (the default format) and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    return arch


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    if "original_max_position_embeddings" not in rope and config.get("original_max_position_embeddings"):
        rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    kind = rope.get("rope_type", "default")
    if kind not in _ROPE_TYPES:
        raise MergeInputError(
            f"GGUF output supports the rotary scalings {', '.join(_ROPE_TYPES)}; the base uses {str(kind)[:40]!r}. "
            "Write safetensors and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    return rope


def tensor_qtype(name: str, shape: Sequence[int], gguf_type: str) -> int:
    """The GGML type a tensor is stored in: F32 for norms and 1-D tensors, else `gguf_type` (F16 for `q8_0` when
    rows do not split into blocks)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith((".weight", ".lora_a", ".lora_b")):
        return types.F32
    wanted = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[gguf_type]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return types.F16  # llama.cpp's converter falls back to F16 when rows do not split into blocks
    return wanted


def file_type_of(gguf_type: str) -> int:
    """The `general.file_type` value (`gguf.LlamaFileType`) of a `--gguf-type`."""
    import gguf

    files = gguf.LlamaFileType
    return {"f32": files.ALL_F32, "f16": files.MOSTLY_F16, "bf16": files.MOSTLY_BF16, "q8_0": files.MOSTLY_Q8_0}[
        gguf_type
    ]


def plan_gguf_model(
    config: Mapping[str, Any], specs: Sequence[Any], gguf_type: str, *, adapter: bool = False
) -> GGUFModelLayout:
    """The GGUF tensors and metadata of a model with `config` whose state dict is `specs` (`TensorSpec`s).

    Args:
        config (`Mapping`): The base's `config.json` data.
        specs (`Sequence[TensorSpec]`): The tensors the merge produces, in writing order (a tied `lm_head.weight`
            is absent, as in a saved checkpoint).
        gguf_type (`str`): `f32`, `f16`, `bf16` or `q8_0`.
        adapter (`bool`, *optional*): Plan names only (a LoRA file maps its own tensors; no computed tensors).

    Returns:
        `GGUFModelLayout`: The planned file.

    Raises:
        `MergeInputError`: An unsupported architecture or rotary scaling, or a tensor llama.cpp has no name for.
    """
    import gguf

    arch = gguf_architecture(config)
    hparams = dict(config)
    if isinstance(hparams.get("text_config"), dict):
        hparams = {**hparams, **hparams["text_config"]}
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if not isinstance(hparams.get(key), int):
            raise MergeInputError(f"The base config.json has no integer {key!r}; cannot write GGUF metadata.")
    rope = _rope(hparams)
    heads = hparams["num_attention_heads"]
    kv_heads = hparams.get("num_key_value_heads") or heads
    head_dim = hparams.get("head_dim") or hparams["hidden_size"] // heads
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, hparams["num_hidden_layers"]
    )
    tensors = []
    if rope.get("rope_type") == "llama3" and not adapter:
        tensors.append(GGUFTensor(None, "rope_freqs.weight", (head_dim // 2,), gguf.GGMLQuantizationType.F32))
    for spec in specs:
        if spec.name.endswith(_SKIPPED):
            continue
        name = names.get_name(spec.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MergeInputError(
                f"Tensor {spec.name!r} has no GGUF name in llama.cpp's {arch} architecture; this model cannot be "
                "written as GGUF here. Write safetensors and convert with llama.cpp's convert_hf_to_gguf.py."
            )
        rotary = None
        if arch == "llama" and spec.name.endswith(("q_proj.weight", "q_proj.bias")):
            rotary = heads
        elif arch == "llama" and spec.name.endswith(("k_proj.weight", "k_proj.bias")):
            rotary = kv_heads
        tensors.append(
            GGUFTensor(spec.name, name, tuple(spec.shape), tensor_qtype(name, spec.shape, gguf_type), rotary)
        )
    extra = {"rope": rope, "head_dim": head_dim}
    return GGUFModelLayout(arch, tensors, hparams, extra, file_type_of(gguf_type))


def rope_permute(tensor: Any, heads: int) -> Any:
    """Reorder the rows of a query/key projection (weight or bias) from Hugging Face's rotary layout (halves) to
    llama.cpp's (interleaved pairs), head by head: the reordering llama.cpp's converter applies."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def llama3_rope_factors(rope: Mapping[str, Any], head_dim: int) -> Any:
    """The `rope_freqs.weight` tensor of Llama 3 rotary scaling (llama.cpp divides each rotary frequency by it): 1
    for short wavelengths, `factor` for long ones, a smooth blend in between (Meta's Llama 3.1 rule)."""
    import math

    import torch

    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    values = []
    for freq in (1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))).tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            values.append(1.0)
        elif wavelength > context / low:
            values.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            values.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(values, dtype=torch.float32)
