"""`push_merged`: merge into a local folder (`save.save_to_folder`), then upload exactly the files it wrote.

The token, the repo id and write access are checked before anything is merged. `local_dir` is accepted only new,
empty, or holding an earlier output of the same merge (recognized by a fingerprint of the inputs and arguments kept in
the output's manifest), so an upload never carries files another merge, or the user, put there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint.output_folder import push_folder
from ..errors import HubUploadError, MergeInputError
from .save import MergeArguments, _check_card_inputs, _resolve, save_to_folder

__all__ = ["push_merged"]


def _fingerprint(model: Any, repo_id: str, args: MergeArguments) -> str:
    """A digest of everything that determines a push's files: the inputs' contents and every argument."""
    from ..engine.combine import plain

    source, request, dtype = _resolve(model, args)
    described = [source.describe(a, w).sha256 for a, w in zip(request.adapters, request.weights, strict=True)]
    data = {
        "adapters": list(zip(request.adapters, described, strict=True)),
        "weights": request.weights,
        "method": request.method,
        "options": plain(request.options),
        "svd_rank": request.svd_rank,
        "merge_into_base": args.merge_into_base,
        "dtype": str(dtype),
        "max_shard_size": str(args.max_shard_size),
        "base": getattr(source.base, "name_or_path", None),
        "tags": list(args.tags or []),
        "eval_results": plain([dict(row) for row in args.eval_results or []]),
        "repo_id": repo_id,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _reusable(folder: Path, fingerprint: str) -> list[str] | None:
    """The files of an earlier output of the same merge in `folder`, `None` when the folder is empty or missing.

    Raises:
        `MergeInputError`: When the folder holds anything else.
    """
    from .output import read_manifest

    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return None
    files, recorded = read_manifest(folder) or ([], None)
    if recorded != fingerprint or not all((folder / name).is_file() for name in files):
        raise MergeInputError(
            f"local_dir {str(folder)!r} is not empty and is not an earlier output of this same merge, so its files "
            "will not be uploaded; pass an empty or new folder (or the folder a failed push of this merge left)."
        )
    return files


def push_merged(
    model: Any,
    repo_id: str,
    *,
    adapters: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    combination_type: str | None = None,
    merge_into_base: bool = True,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "5GB",
    tags: Sequence[str] | None = None,
    dtype: Any = None,
    local_dir: str | os.PathLike | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    base_model: str | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    **combination_options: Any,
) -> str:
    """`save_merged` into a local folder, then upload exactly the files it wrote to the Hub in one commit.

    The token, the repo id and write access are checked before anything is merged.

    Args:
        repo_id (`str`): The target repo, `user/name` (created if needed).
        commit_message (`str`, *optional*): The commit message.
        commit_description (`str`, *optional*): The commit description.
        private (`bool`, *optional*): Visibility of a newly created repo.
        token (`str` or `bool`, *optional*): Hub token; `True` or `None` use `HF_TOKEN` or the stored login. Never
            written anywhere.
        revision (`str`, *optional*): Branch to commit to (created when missing).
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing directly.
        local_dir (`str` or `os.PathLike`, *optional*): Where the folder is built: a new or empty folder, or the
            folder an earlier (failed) push of this same merge left, which is then uploaded without recomputing. By
            default a temporary folder, deleted after a successful upload and kept (and named in the error) after a
            failure.
        Other arguments: as in `save_merged`.

    Returns:
        `str`: The commit URL (the pull request URL with `create_pr=True`).

    Raises:
        `HubUploadError`: When the Hub check or the upload fails; after a merge the message names the local folder
            and the command that retries the upload.
    """
    from .hub import check_hub_access, upload_files

    _check_card_inputs(tags, eval_results)
    args = MergeArguments.of(locals(), push_merged)
    fingerprint = _fingerprint(model, repo_id, args)
    target = check_hub_access(repo_id, token=token, private=private, revision=revision, create_pr=create_pr)
    # A failed upload keeps the merged folder (its error names it and the retry); anything else removes ours.
    with push_folder(local_dir, repo_id.replace("/", "--"), keep_on=(HubUploadError,)) as folder:
        files = _reusable(folder, fingerprint) if local_dir is not None else None
        if files is None:
            _, files = save_to_folder(model, folder, False, args, fingerprint)
        return upload_files(
            folder,
            files,
            target,
            commit_message=commit_message
            or (
                "Upload merged model with peft-merge-ext"
                if merge_into_base
                else "Upload LoRA adapter with peft-merge-ext"
            ),
            commit_description=commit_description,
        )
