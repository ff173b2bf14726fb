"""The version of peft-merge-ext, in one place (read by the build backend and by the package)."""

__version__ = "0.3.0"
