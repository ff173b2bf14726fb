"""How the output-folder modules word their one-line `MergeInputError` messages.

The folder is named as the user gave it (`Output folder 'merged'`), and an `OSError` is reduced to its one-line reason.
"""

from __future__ import annotations

__all__ = ["error_reason", "folder_label"]


def folder_label(what: str, given: str) -> str:
    """`"Output folder 'merged'"` for `what="output"`."""
    return f"{what[:1].upper()}{what[1:]} folder '{given}'"


def error_reason(error: OSError) -> str:
    """A one-line reason from an `OSError`."""
    return (error.strerror or str(error) or type(error).__name__).replace("\n", " ")
