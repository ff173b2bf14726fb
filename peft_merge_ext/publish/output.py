"""The last steps every merge shares: stream the weights into planned safetensors shards, then write the card.

A weight source gives `(TensorSpec, tensor or CopyFromFile)` pairs in the order the shards were planned; a
background thread writes them while the next tensors are computed (`checkpoint.background_writer`), and bytes a merge
leaves as they are go file to file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint.background_writer import BackgroundWriter
from ..checkpoint.base_checkpoint import CopyFromFile
from ..checkpoint.writer import ShardedSafetensorsWriter, TensorSpec

__all__ = ["MANIFEST_FILE", "read_manifest", "stream_weights", "write_card", "write_manifest"]

# Written into every output folder: the files the merge wrote (what an upload sends) and a fingerprint of the merge.
MANIFEST_FILE = ".peft-merge-ext-files.json"


def write_manifest(folder: Path, files: Sequence[str], fingerprint: str = "") -> None:
    """Record which files of `folder` a merge wrote, and what merge (a digest of its inputs and arguments)."""
    import json

    data = {"files": list(dict.fromkeys(files)), "fingerprint": fingerprint}
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_manifest(folder: Path) -> tuple[list[str], str] | None:
    """`(files, fingerprint)` recorded by `write_manifest`, `None` when the folder has no (valid) manifest."""
    import json

    try:
        data = json.loads((folder / MANIFEST_FILE).read_text())
        files, fingerprint = data["files"], data["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return files, str(fingerprint)


def stream_weights(
    folder: Path,
    specs: Sequence[TensorSpec],
    items: Iterable[tuple[TensorSpec, Any]],
    max_shard_size: int | str,
    *,
    quiet: bool = True,
    background: bool = True,
    writer: Any = None,
) -> list[str]:
    """Write every tensor of `items` into shards planned from `specs`; returns the file names written (shards and
    index).

    With `background` (the streamed merge), a thread writes while the next tensors are computed, holding up to the
    background writer's bound of pending tensors; without it (the in-memory merge, whose model is already in memory)
    each tensor is written before the next is computed, so at most one merged tensor exists at a time. `writer`:
    another planned writer with the same interface (`gguf_output.writer.GGUFFileWriter`) instead of safetensors
    shards.
    """
    from tqdm.auto import tqdm

    planned = writer if writer is not None else ShardedSafetensorsWriter(folder, specs, max_shard_size)
    writer = BackgroundWriter(planned) if background else planned
    progress = tqdm(total=writer.total_size, unit="B", unit_scale=True, desc="Merging", disable=quiet, leave=False)
    try:
        for spec, item in items:
            if isinstance(item, CopyFromFile):
                writer.copy_from_file(spec.name, item.file, item.offset)
            else:
                writer.write(spec.name, item)
            progress.update(spec.nbytes)
            del item
        return writer.finish()
    finally:
        writer.close()
        progress.close()


def write_card(
    info: Any,
    folder: Path,
    *,
    repo_id: str | None,
    tags: Sequence[str] | None = None,
    notes: Sequence[str] | None = None,
    base_card_folder: Path | None = None,
) -> str:
    """Write the model card (`README.md`) of a merge into `folder`; returns its file name."""
    from .card import write_model_card

    path = write_model_card(
        info, folder, repo_id=repo_id or "merged-model", tags=tags, notes=notes, base_card_folder=base_card_folder
    )
    return path.name
