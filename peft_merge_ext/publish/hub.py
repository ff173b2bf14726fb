"""Upload a local folder (typically a merged model) to the Hugging Face Hub in one commit.

Every failure raises one `HubUploadError` that says what went wrong, what to do about it, and how to retry from the
local folder, which is never modified or deleted. The token is never logged nor put in a message.

`huggingface_hub` is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from collections.abc import Iterable
from pathlib import Path

from ..errors import HubUploadError

__all__ = ["DEFAULT_COMMIT_MESSAGE", "upload_folder"]

DEFAULT_COMMIT_MESSAGE = "Upload merged model with peft-merge-ext"
# Folders that are never uploaded: git metadata and huggingface_hub's local upload/download metadata.
_SKIPPED_FOLDERS = (".git", ".cache/huggingface")
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
) -> str:
    """Upload every file of `folder` to the Hub repository `repo_id` in a single commit.

    The repository is created if needed (an existing one is reused, its visibility unchanged) and so is the branch
    `revision` when it does not exist yet (it starts from the default branch). Files that huggingface_hub's server
    marks as large (`*.safetensors`, `*.bin`, anything of 10 MB or more, ...) go through LFS.

    The Hub address is `HF_ENDPOINT` read at call time (so setting it after `huggingface_hub` was imported works),
    else huggingface_hub's default.

    Args:
        folder (`str` or `os.PathLike`):
            The local folder to upload, for example the output of a merge. It is only read.
        repo_id (`str`):
            The repository, `namespace/name` (or `name` for the token's own namespace).
        token (`str`, *optional*):
            A Hub token with write access. Defaults to what `huggingface_hub.get_token()` finds: `HF_TOKEN`, else
            the token stored by `hf auth login`.
        private (`bool`, *optional*):
            Whether to create the repository as private. `None` follows the namespace's default. Ignored when the
            repository already exists.
        revision (`str`, *optional*):
            The branch to commit to (created from the default branch if missing), or `refs/pr/N` to add a commit
            to an open pull request. Defaults to the default branch.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request against `revision` (or the default branch) instead of committing to it directly.
        commit_message (`str`, *optional*):
            The commit title. Defaults to `DEFAULT_COMMIT_MESSAGE`.
        commit_description (`str`, *optional*):
            The commit description (the pull request description with `create_pr=True`).

    Returns:
        `str`: The URL of the commit, or of the pull request with `create_pr=True`.

    Raises:
        `HubUploadError`: When the folder is missing or empty, no token is available, or the Hub rejects or fails
            the upload. The message names the local folder and how to retry.
    """
    folder_path = Path(folder).expanduser().resolve()
    retry = _retry_hint(folder_path, repo_id)
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise HubUploadError(f"repo_id must be a non-empty 'namespace/name' string, got {repo_id!r}. {retry}")
    files = _list_files(folder_path, retry)
    token = _resolve_token(token, retry)

    from huggingface_hub import CommitOperationAdd, HfApi

    from .._version import __version__

    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token, library_name="peft-merge-ext", library_version=__version__)
    step = "creating the repository"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        target_repo = repo_url.repo_id or repo_id
        step = "listing the branches"
        branch = _branch_to_create(api, target_repo, revision)
        if branch is not None:
            step = f"creating the branch {branch!r}"
            api.create_branch(target_repo, branch=branch, exist_ok=True)
        step = "uploading the files"
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files]
        commit = api.create_commit(
            target_repo,
            operations,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as error:
        message = _describe_failure(error, step=step, repo_id=repo_id, revision=revision, endpoint=api.endpoint)
        failure = HubUploadError(_without_token(f"{message} {retry}", token))
        echoed = any(token in str(cause) for cause in _causes(error))  # e.g. a proxy echoing the request headers
        raise failure from (None if echoed else error)
    return commit.pr_url if create_pr and commit.pr_url else commit.commit_url


def _retry_hint(folder: Path, repo_id: object) -> str:
    return (
        f"The local folder {folder} is kept unchanged; once fixed, retry with "
        f"`peft-merge-ext upload {shlex.quote(str(folder))} {shlex.quote(str(repo_id))}` or "
        f"`push_merged(..., local_dir={str(folder)!r})`."
    )


def _list_files(folder: Path, retry: str) -> list[tuple[str, Path]]:
    """The files to upload as (path in repo, local path), sorted; raises before any network call if there are none."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise HubUploadError(f"Cannot upload {folder}: it {what}. Pass the folder a merge was saved to. {retry}")
    files = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not any(name == skip or name.startswith(f"{skip}/") for skip in _SKIPPED_FOLDERS):
            files.append((name, path))
    if not files:
        raise HubUploadError(f"Cannot upload {folder}: it contains no files. {retry}")
    return files


def _resolve_token(token: str | None, retry: str) -> str:
    """The token argument, else HF_TOKEN, else the stored login; raises if there is none."""
    if token:
        return token
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as error:  # e.g. a failed OIDC exchange when HF_OIDC_RESOURCE is set
        raise HubUploadError(
            f"Could not get a Hugging Face token ({type(error).__name__}: {error}). {retry}"
        ) from None
    if not found:
        raise HubUploadError(
            "No Hugging Face token found, so nothing was uploaded. Log in with `hf auth login`, or set the HF_TOKEN "
            "environment variable, or pass `token=...`; the token needs write access (create one at "
            f"https://huggingface.co/settings/tokens). {retry}"
        )
    return found


def _branch_to_create(api, repo_id: str, revision: str | None) -> str | None:
    """The branch `revision` names if it does not exist yet; None for existing branches, PR refs and commit ids."""
    if revision is None or revision.startswith("refs/pr/") or _COMMIT_ID.fullmatch(revision):
        return None
    branch = revision.removeprefix("refs/heads/")
    return None if branch in {ref.name for ref in api.list_repo_refs(repo_id).branches} else branch


def _causes(error: BaseException) -> Iterable[BaseException]:
    """The error and the errors it was raised from, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError]  # requests' and the standard library's connection errors
    for module_name in ("httpx2", "httpx"):  # the HTTP clients huggingface_hub uses (version dependent)
        try:
            types.append(importlib.import_module(module_name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(types)


def _describe_failure(error: Exception, *, step: str, repo_id: str, revision: str | None, endpoint: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    causes = list(_causes(error))
    http_error = next((cause for cause in causes if isinstance(cause, HfHubHTTPError)), None)
    response = getattr(http_error, "response", None)
    status = getattr(response, "status_code", None)
    prefix = f"Uploading to {repo_id} failed while {step}"
    if isinstance(http_error, RevisionNotFoundError):
        return f"{prefix}: the revision {revision!r} does not exist in {repo_id} (404)."
    if isinstance(http_error, RepositoryNotFoundError):
        return (
            f"{prefix}: the repository {repo_id} was not found or is not visible with this token ({status}). Check "
            "the repo id and that the token's account or organization owns it."
        )
    if status == 401:
        return (
            f"{prefix}: the Hub rejected the token (401 Unauthorized); it is invalid or expired. Create a token "
            "with write access at https://huggingface.co/settings/tokens, then log in again with "
            "`hf auth login` or set HF_TOKEN."
        )
    if status == 403:
        return (
            f"{prefix}: the token is not allowed to write to {repo_id} (403 Forbidden). Use a token with write "
            "access to that namespace (a fine-grained token needs write permission on the repo or organization)."
        )
    if status == 404:
        return f"{prefix}: not found (404): {_server_message(http_error)} Check the repo id and revision."
    if status in (409, 412):
        return f"{prefix}: the repository changed during the upload ({status}); retrying usually works."
    if status == 429:
        return f"{prefix}: the Hub rate limit was hit (429); wait a few minutes before retrying."
    if status is not None and status >= 500:
        return (
            f"{prefix}: the Hub had a server error (HTTP {status}); this is usually temporary, so retry later "
            "(files already uploaded are not sent again)."
        )
    if status is not None:
        # The client may wrap the HTTP error in a clearer one (e.g. "Invalid metadata in README.md" for a 400).
        detail = _server_message(http_error) if error is http_error else " ".join(str(error).split())
        return f"{prefix}: the Hub answered HTTP {status}: {detail}"
    network_error = next((cause for cause in causes if isinstance(cause, _network_error_types())), None)
    if network_error is not None:
        return (
            f"{prefix}: could not reach the Hub at {endpoint} ({type(network_error).__name__}: {network_error}). "
            "Check the network connection, and HF_ENDPOINT / HF_HUB_OFFLINE if set."
        )
    return f"{prefix}: {type(error).__name__}: {error}"


def _server_message(http_error) -> str:
    message = getattr(http_error, "server_message", None) or str(http_error)
    return " ".join(message.split())


def _without_token(text: str, token: str) -> str:
    return text.replace(token, "hf_***") if token else text
