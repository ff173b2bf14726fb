"""The error hierarchy of peft-merge-ext: every error the package raises on purpose subclasses `PeftMergeExtError`."""

from __future__ import annotations

__all__ = [
    "AdapterCompatibilityError",
    "CombinationError",
    "DuplicateCombinationTypeError",
    "EvaluationInputError",
    "HubUploadError",
    "MergeInputError",
    "PeftMergeExtError",
    "PluginError",
    "ReservedCombinationTypeError",
    "UnknownCombinationTypeError",
]


class PeftMergeExtError(Exception):
    """Base class of all errors raised by peft-merge-ext."""


class PluginError(PeftMergeExtError):
    """A plugin registered something invalid (bad name, bad options, not callable...)."""


class DuplicateCombinationTypeError(PluginError):
    """Two plugins registered the same combination type name."""


class ReservedCombinationTypeError(PluginError):
    """A plugin tried to register a name that PEFT's own `add_weighted_adapter` already owns."""


class UnknownCombinationTypeError(PeftMergeExtError, ValueError):
    """The requested combination type is neither one of PEFT's nor a registered plugin type."""


class MergeInputError(PeftMergeExtError, ValueError):
    """The arguments of a merge are invalid (unknown adapter, bad weights, name taken, unknown option...)."""


class AdapterCompatibilityError(MergeInputError):
    """An input adapter has a feature the requested combination cannot represent (DoRA, lora_bias, ...)."""


class CombinationError(PeftMergeExtError, ValueError):
    """A combination function rejected its inputs or returned something unusable."""


class HubUploadError(PeftMergeExtError, RuntimeError):
    """An upload to the Hugging Face Hub failed; the message says where the local copy is kept."""


class EvaluationInputError(PeftMergeExtError, ValueError):
    """An eval set or search objective is unusable (no tokenizer for text, no scored tokens, wrong type...)."""


def short_repr(value: object, limit: int = 200) -> str:
    """`repr(value)` cut to `limit` characters, for error messages that quote user input. Nested values are cut
    while they are printed (`reprlib`), never printed whole first: a YAML alias bomb stays cheap to quote."""
    import reprlib

    if isinstance(value, BaseException):
        text = str(value)
    else:
        short = reprlib.Repr()
        short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
        text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
