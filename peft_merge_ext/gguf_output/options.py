"""The output format a caller asks for (`format=` / `--format`, `gguf_type=` / `--gguf-type`), checked up front.

Nothing here imports torch or gguf: the checks run before any model is read, and the `gguf` package (the llama.cpp
project's own Python writer, the optional extra `peft-merge-ext[gguf]`) is only looked for when GGUF is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MergeInputError

__all__ = ["FORMATS", "GGUF_TYPES", "SUPPORTED_ARCHITECTURES", "OutputFormat", "parse_output_format"]

FORMATS = ("safetensors", "gguf")
# --gguf-type -> the GGML type of the quantizable (2-D) weights; norms and 1-D tensors stay F32, as llama.cpp's
# converter writes them.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_GGUF_TYPE = "f16"
# HF `architectures[0]` -> GGUF architecture name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
INSTALL_HINT = 'pip install "peft-merge-ext[gguf]"'


@dataclass(frozen=True)
class OutputFormat:
    """What a merge writes.

    Args:
        name (`str`): `"safetensors"` (Hugging Face folders) or `"gguf"` (one llama.cpp file).
        gguf_type (`str`, *optional*): For GGUF, the type of the 2-D weights: `f32`, `f16`, `bf16` or `q8_0`.
    """

    name: str = "safetensors"
    gguf_type: str | None = None

    @property
    def is_gguf(self) -> bool:
        """Whether the output is a GGUF file."""
        return self.name == "gguf"


def parse_output_format(output_format: str | None, gguf_type: str | None = None) -> OutputFormat:
    """Check `format` / `gguf_type` and, for GGUF, that the `gguf` package is installed.

    Args:
        output_format (`str`, *optional*): `"safetensors"` (default) or `"gguf"`.
        gguf_type (`str`, *optional*): For GGUF: `f32`, `f16` (default), `bf16` or `q8_0`.

    Returns:
        `OutputFormat`: The checked choice.

    Raises:
        `MergeInputError`: For an unknown format or type, a `gguf_type` without GGUF, or GGUF without the `gguf`
            package.
    """
    name = (output_format or "safetensors").lower()
    if name not in FORMATS:
        raise MergeInputError(f"Unknown output format {str(output_format)[:50]!r}; use one of {', '.join(FORMATS)}.")
    if name != "gguf":
        if gguf_type is not None:
            raise MergeInputError(f"gguf_type={gguf_type!r} needs format='gguf' (CLI: --format gguf).")
        return OutputFormat()
    kind = (gguf_type or DEFAULT_GGUF_TYPE).lower()
    if kind not in GGUF_TYPES:
        raise MergeInputError(
            f"Unknown GGUF type {str(gguf_type)[:50]!r}; this writer supports {', '.join(GGUF_TYPES)} (for other "
            "quantizations, run llama.cpp's llama-quantize on the f16 or bf16 file)."
        )
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MergeInputError(f"GGUF output needs the gguf package: {INSTALL_HINT}.") from None
    return OutputFormat("gguf", kind)
