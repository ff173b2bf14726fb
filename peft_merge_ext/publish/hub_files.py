"""Which local files an upload sends: the names checked and resolved inside the folder before any network call.

`checked_names` turns the listed names into paths in the repository and refuses absolute names, `..`, `.git/` and
`.cache/huggingface/`; `checked_files` resolves them to regular files inside the folder (a symlink pointing outside is
refused); `folder_files` and `list_files` give every file of a folder that a whole-folder upload sends.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import HubUploadError

__all__ = ["checked_files", "checked_names", "folder_files", "list_files"]

# Folders that are never uploaded: git metadata and huggingface_hub's local upload/download metadata.
_SKIPPED_FOLDERS = (".git", ".cache/huggingface")
_SEPARATORS = r"[/\\]" if os.sep == "\\" else "/"


def _skipped(name: str) -> bool:
    """Whether the path in repo `name` lies in a folder that is never uploaded."""
    return any(name == skip or name.startswith(f"{skip}/") for skip in _SKIPPED_FOLDERS) or ".git" in name.split("/")


def folder_files(folder: Path) -> list[str]:
    """Every file of `folder` that `upload_folder` sends (path in repo), sorted: for an output folder of
    peft-merge-ext, exactly the files its merge wrote (listed in its manifest); else every file."""
    from .output import read_manifest

    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None:
        return sorted(manifest[0])
    names = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not _skipped(name):
            names.append(name)
    return names


def list_files(folder: Path, retry: str) -> list[str]:
    """The files `upload_folder` sends; raises before any network call if there are none."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise HubUploadError(f"Cannot upload {folder}: it {what}. Pass the folder a merge was saved to. {retry}")
    names = folder_files(folder)
    if not names:
        raise HubUploadError(f"Cannot upload {folder}: it contains no files. {retry}")
    return names


def checked_names(files: Iterable[str | os.PathLike], folder: Path) -> list[str]:
    """The listed names as paths in the repository (`/`-separated, deduplicated, in order); refuses unsafe names."""
    if isinstance(files, (str, bytes, os.PathLike)) or not isinstance(files, Iterable):
        raise HubUploadError(
            f"files must be a list of file names relative to {folder}, got {type(files).__name__} {files!r}."
        )
    names: list[str] = []
    for entry in files:
        raw = os.fspath(entry) if isinstance(entry, (str, os.PathLike)) else entry
        if not isinstance(raw, str) or not raw.strip():
            raise HubUploadError(f"Cannot upload {entry!r} from {folder}: file names must be non-empty strings.")
        if PurePosixPath(raw).is_absolute() or PureWindowsPath(raw).is_absolute() or PureWindowsPath(raw).drive:
            raise HubUploadError(f"Cannot upload {raw!r}: names must be relative to the folder {folder}.")
        parts = [part for part in re.split(_SEPARATORS, raw) if part not in ("", ".")]
        if ".." in parts:
            raise HubUploadError(f"Cannot upload {raw!r}: names may not contain '..' (the folder is {folder}).")
        if not parts:
            raise HubUploadError(f"Cannot upload {raw!r} from {folder}: it names the folder itself, not a file.")
        name = "/".join(parts)
        if _skipped(name):
            raise HubUploadError(f"Cannot upload {raw!r}: .git/ and .cache/huggingface/ are never uploaded.")
        if name not in names:
            names.append(name)
    if not names:
        raise HubUploadError(f"Cannot upload from {folder}: no files were listed.")
    return names


def checked_files(folder: Path, names: Sequence[str], retry: str) -> list[tuple[str, Path]]:
    """(path in repo, resolved local path) for each name; each must be a regular file inside `folder`."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise HubUploadError(f"Cannot upload {folder}: it {what}. Pass the folder a merge was saved to. {retry}")
    files = []
    for name in names:
        local = folder.joinpath(*name.split("/"))
        resolved = local.resolve()
        if resolved != folder and folder not in resolved.parents:
            raise HubUploadError(
                f"Cannot upload {name!r}: it is a symlink to {resolved}, outside the folder {folder}. Copy the file "
                f"into the folder instead. {retry}"
            )
        if resolved != local and _skipped(resolved.relative_to(folder).as_posix()):
            raise HubUploadError(f"Cannot upload {name!r}: it links into .git/ or .cache/huggingface/. {retry}")
        if not resolved.is_file():
            what = "does not exist" if not local.exists() else "is not a regular file"
            raise HubUploadError(f"Cannot upload {name!r}: {local} {what}. {retry}")
        files.append((name, resolved))
    return files
