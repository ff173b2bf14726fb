"""Upload a merged model to the Hugging Face Hub: a pre-flight check, then exactly the listed files in one commit.

`check_hub_access` runs before a long merge: it checks the repo id, the token (with `whoami`) and that the repository
exists or can be created, so a bad token or missing write access fails in seconds. `upload_files` then sends exactly
the files the merge wrote, never anything else lying in the folder; `upload_folder` sends a whole folder.

Every failure raises one `HubUploadError` that says what went wrong, what to do about it (`hub_errors`), and how to
retry from the local folder, which is never modified or deleted. The token is never logged nor put in a message. The
local names are checked before any network call (`hub_files`).

`huggingface_hub` is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HubUploadError
from .hub_errors import describe_failure, raise_masked, without_token
from .hub_files import checked_files, checked_names, folder_files, list_files

__all__ = ["DEFAULT_COMMIT_MESSAGE", "HubTarget", "check_hub_access", "upload_files", "upload_folder"]

DEFAULT_COMMIT_MESSAGE = "Upload merged model with peft-merge-ext"
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")
_PULL_REQUEST_REF = re.compile(r"refs/pr/(\d+)")


@dataclass(frozen=True)
class HubTarget:
    """Where and how `upload_files` commits: what `check_hub_access` validated.

    Args:
        repo_id (`str`):
            The repository, `namespace/name`.
        private (`bool`, *optional*):
            Whether to create the repository as private if it does not exist. `None` follows the namespace's default.
        revision (`str`, *optional*):
            The branch to commit to (created from the default branch if missing) or `refs/pr/N`.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request against `revision` (or the default branch) instead of committing to it.
        token (`str` or `bool`, *optional*):
            The Hub token to use (`check_hub_access` puts the resolved one here). `None` or `True` use the stored
            login (`HF_TOKEN`, else `hf auth login`); `False` means no token, with which uploading fails. It is left
            out of the repr.
    """

    repo_id: str
    private: bool | None = None
    revision: str | None = None
    create_pr: bool = False
    token: str | bool | None = field(default=None, repr=False)


def check_hub_access(
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> HubTarget:
    """Check, before a long merge, that an upload to `repo_id` can work; returns the target for `upload_files`.

    Checks the repo id syntax, resolves the token, asks the Hub who the token belongs to (`whoami`: an invalid token
    or a read-only one fails here), checks the token's account may write to the namespace (unless `create_pr`, as
    anyone may open a pull request on a public repository), creates the repository if needed (`exist_ok`, the
    visibility of an existing one is left alone) and checks that a `refs/pr/N` revision exists. Nothing is uploaded.

    Args:
        repo_id (`str`):
            The repository, `namespace/name` (the namespace is required).
        token (`str` or `bool`, *optional*):
            A Hub token with write access. `True` requires the stored login (`HF_TOKEN`, else `hf auth login`);
            `None` (the default) uses it too; `False` means no token, with which nothing can be uploaded (an
            error).
        private (`bool`, *optional*):
            Whether to create the repository as private. `None` follows the namespace's default. Ignored when the
            repository already exists.
        revision (`str`, *optional*):
            The branch to commit to (created at upload time if missing), or `refs/pr/N` to add a commit to an open
            pull request. Defaults to the default branch.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request against `revision` (or the default branch) instead of committing to it directly.

    Returns:
        `HubTarget`: The checked repo id, options and resolved token, to pass to `upload_files`.

    Raises:
        `HubUploadError`: When the repo id is invalid, no token is available, the token is invalid or may not write
            to the repository, the repository cannot be created, the pull request does not exist, or the Hub cannot
            be reached. The one-line message names the repository and the fix, never the token.
    """
    repo_id = _checked_repo_id(repo_id, require_namespace=True)
    _check_options(private=private, revision=revision, create_pr=create_pr)
    try:
        resolved = _resolve_token(token, "")
    except HubUploadError as error:
        raise HubUploadError(f"Pre-flight check of {repo_id} failed: {error}") from None
    api = _api(resolved)
    step = "checking the token"
    try:
        problem = _write_access_problem(api.whoami(), repo_id, create_pr=create_pr)
        if problem is not None:
            raise HubUploadError(f"Pre-flight check of {repo_id} failed: {problem} Nothing was uploaded.")
        step = "creating the repository"
        api.create_repo(repo_id, private=private, exist_ok=True)
        match = _PULL_REQUEST_REF.fullmatch(revision or "")
        if match:
            step = "looking for the pull request"
            pulls = api.list_repo_refs(repo_id, include_pull_requests=True).pull_requests or []
            if revision not in {ref.ref for ref in pulls}:
                raise HubUploadError(
                    f"Pre-flight check of {repo_id} failed: the pull request {revision!r} does not exist in "
                    f"{repo_id}. Pass the ref of an open pull request, or create_pr=True to open one. Nothing was "
                    "uploaded."
                )
    except HubUploadError as error:
        raise HubUploadError(without_token(str(error), resolved)) from None
    except Exception as error:
        message = describe_failure(
            error, step=step, repo_id=repo_id, revision=revision, endpoint=api.endpoint, action="Pre-flight check of"
        )
        raise_masked(f"{message} Nothing was uploaded.", error, resolved)
    return HubTarget(repo_id=repo_id, private=private, revision=revision, create_pr=create_pr, token=resolved)


def upload_files(
    folder: str | os.PathLike,
    files: Iterable[str | os.PathLike],
    target: HubTarget,
    *,
    commit_message: str | None,
    commit_description: str | None = None,
) -> str:
    """Upload exactly the files `files` of `folder` to `target` in a single commit.

    Nothing else in the folder is read or sent. Each name is relative to `folder` (`/`-separated, kept as the path in
    the repository) and must be a regular file inside it: absolute names, `..`, `.git/` and `.cache/huggingface/`
    entries, folders, missing files and symlinks that point outside the folder are refused before any network call.

    The repository is created if needed (an existing one is reused, its visibility unchanged) and so is the branch
    `target.revision` when it does not exist yet (it starts from the default branch). Files that the Hub marks as
    large (`*.safetensors`, `*.bin`, anything of 10 MB or more, ...) go through LFS. The Hub address is
    `HF_ENDPOINT` read at call time, else huggingface_hub's default.

    Args:
        folder (`str` or `os.PathLike`):
            The local folder the files are in, for example the output of a merge. It is only read.
        files (`Iterable[str]`):
            The names of the files to upload, relative to `folder`, e.g. `["config.json", "model.safetensors"]`.
        target (`HubTarget`):
            The repository and options, as returned by `check_hub_access`. A bare `name` repo id means the token's
            own namespace.
        commit_message (`str`):
            The commit title (the pull request title with `create_pr`). `None` uses `DEFAULT_COMMIT_MESSAGE`.
        commit_description (`str`, *optional*):
            The commit description (the pull request description with `create_pr`).

    Returns:
        `str`: The URL of the commit, or of the pull request with `target.create_pr`.

    Raises:
        `HubUploadError`: When a name is refused, no token is available, or the Hub rejects or fails the upload. The
            message names the local folder and how to retry.
    """
    if not isinstance(target, HubTarget):
        raise HubUploadError(f"target must be a HubTarget (see check_hub_access), got {type(target).__name__}.")
    folder_path = Path(folder).expanduser().resolve()
    names = checked_names(files, folder_path)
    retry = _retry_hint(folder_path, target, names, commit_message)
    repo_id = _checked_repo_id(target.repo_id, require_namespace=False, retry=retry)
    _check_options(private=target.private, revision=target.revision, create_pr=target.create_pr)
    local_files = checked_files(folder_path, names, retry)
    return _commit(local_files, target, retry, repo_id, commit_message, commit_description)


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
) -> str:
    """Upload every file of `folder` to the Hub repository `repo_id` in a single commit.

    `upload_files` with every file of the folder except `.git/` and `.cache/huggingface/` (a symlink pointing outside
    the folder is refused). The repository is created if needed (an existing one is reused, its visibility unchanged)
    and so is the branch `revision` when it does not exist yet (it starts from the default branch). Files that
    huggingface_hub's server marks as large (`*.safetensors`, `*.bin`, anything of 10 MB or more, ...) go through
    LFS.

    The Hub address is `HF_ENDPOINT` read at call time (so setting it after `huggingface_hub` was imported works),
    else huggingface_hub's default.

    Args:
        folder (`str` or `os.PathLike`):
            The local folder to upload, for example the output of a merge. It is only read.
        repo_id (`str`):
            The repository, `namespace/name` (or `name` for the token's own namespace).
        token (`str` or `bool`, *optional*):
            A Hub token with write access. `None` or `True` use what `huggingface_hub.get_token()` finds: `HF_TOKEN`,
            else the token stored by `hf auth login`. `False` (no token) cannot upload and raises.
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
    target = HubTarget(repo_id=repo_id, private=private, revision=revision, create_pr=create_pr, token=None)
    retry = _retry_hint(folder_path, target, None, commit_message)
    _checked_repo_id(repo_id, require_namespace=False, retry=retry)
    names = list_files(folder_path, retry)
    resolved = _resolve_token(token, retry)
    target = HubTarget(repo_id=repo_id, private=private, revision=revision, create_pr=create_pr, token=resolved)
    return upload_files(
        folder_path, names, target, commit_message=commit_message, commit_description=commit_description
    )


def _commit(
    files: list[tuple[str, Path]],
    target: HubTarget,
    retry: str,
    repo_id: str,
    commit_message: str | None,
    commit_description: str | None,
) -> str:
    from huggingface_hub import CommitOperationAdd

    token = _resolve_token(target.token, retry)
    api = _api(token)
    revision, create_pr = target.revision, target.create_pr
    step = "creating the repository"
    try:
        repo_url = api.create_repo(repo_id, private=target.private, exist_ok=True)
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
        message = describe_failure(error, step=step, repo_id=repo_id, revision=revision, endpoint=api.endpoint)
        raise_masked(f"{message} {retry}", error, token)
    return commit.pr_url if create_pr and commit.pr_url else commit.commit_url


def _api(token: str) -> Any:
    from huggingface_hub import HfApi

    from .._version import __version__

    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    return HfApi(endpoint=endpoint, token=token, library_name="peft-merge-ext", library_version=__version__)


def _checked_repo_id(repo_id: object, *, require_namespace: bool, retry: str = "") -> str:
    """The one repo id rule: huggingface_hub's `validate_repo_id`, plus a namespace when `require_namespace`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    suffix = f" {retry}" if retry else ""
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise HubUploadError(f"repo_id must be a non-empty 'namespace/name' string, got {repo_id!r}.{suffix}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubUploadError(
            f"Invalid Hub repo id {repo_id!r}: use 'namespace/name' made of letters, digits, '-', '_' and '.' (no "
            "'--' or '..', no '-' or '.' at either end, at most 96 characters, not ending in '.git')."
            f"{suffix}"
        ) from None
    if require_namespace and "/" not in repo_id:
        raise HubUploadError(
            f"The Hub repo id {repo_id!r} has no namespace: use 'your-username/{repo_id}' or "
            f"'your-organization/{repo_id}'.{suffix}"
        )
    return repo_id


def _check_options(*, private: object, revision: object, create_pr: object) -> None:
    if private is not None and not isinstance(private, bool):
        raise HubUploadError(f"private must be True, False or None, got {private!r}.")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise HubUploadError(f"revision must be a branch name or 'refs/pr/N', got {revision!r}.")
    if not isinstance(create_pr, bool):
        raise HubUploadError(f"create_pr must be True or False, got {create_pr!r}.")


def _resolve_token(token: str | bool | None, retry: str) -> str:
    """The token to use: a string as is; `None`/`True`: HF_TOKEN, else the stored login; raises if there is none."""
    suffix = f" {retry}" if retry else ""
    if token is False:
        raise HubUploadError(
            "token=False means no Hugging Face token, so nothing can be uploaded. Pass a token with write access, "
            f"or token=None/True to use HF_TOKEN or the `hf auth login` token.{suffix}"
        )
    if isinstance(token, str) and token.strip():
        return token.strip()
    if token is not None and token is not True and not isinstance(token, str):
        raise HubUploadError(f"token must be a string, True, False or None, got {type(token).__name__}.{suffix}")
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as error:  # e.g. a failed OIDC exchange when HF_OIDC_RESOURCE is set
        raise HubUploadError(
            f"Could not get a Hugging Face token ({type(error).__name__}: {error}).{suffix}"
        ) from None
    if not found:
        raise HubUploadError(
            "No Hugging Face token found, so nothing was uploaded. Log in with `hf auth login`, or set the HF_TOKEN "
            "environment variable, or pass `token=...`; the token needs write access (create one at "
            f"https://huggingface.co/settings/tokens).{suffix}"
        )
    return found


def _write_access_problem(info: Any, repo_id: str, *, create_pr: bool) -> str | None:
    """Why `whoami`'s answer shows the token cannot write to `repo_id`, or None when nothing says so."""
    if not isinstance(info, dict):
        return None
    auth = info.get("auth")
    access = auth.get("accessToken") if isinstance(auth, dict) else None
    role = access.get("role") if isinstance(access, dict) else None
    account = info.get("name")
    if role == "read":
        return (
            f"the token of {account} is read-only, so it cannot upload to {repo_id}. Use a token with write access "
            "(create one at https://huggingface.co/settings/tokens), then `hf auth login` again or set HF_TOKEN."
        )
    if create_pr or not isinstance(account, str):
        return None  # anyone with a write token may open a pull request on a public repository
    namespace = repo_id.split("/")[0]
    if namespace.casefold() == account.casefold():  # Hub names are case-insensitive
        return None
    orgs = {str(org.get("name")).casefold(): org for org in info.get("orgs") or [] if isinstance(org, dict)}
    if namespace.casefold() not in orgs:
        return (
            f"the token belongs to {account}, who is not a member of the namespace {namespace!r}, so it cannot "
            f"create or write to {repo_id}. Use a repo id under {account!r} or one of your organizations, or "
            "create_pr=True to propose the files as a pull request."
        )
    if orgs[namespace.casefold()].get("roleInOrg") == "read":
        return (
            f"{account} has the read role in the organization {namespace!r}, so it cannot write to {repo_id}. Ask an "
            "admin of the organization for the write role, or use create_pr=True to open a pull request."
        )
    return None


def _retry_hint(folder: Path, target: HubTarget, names: Sequence[str] | None, commit_message: str | None) -> str:
    """How to redo the same upload: the `peft-merge-ext upload` command when it would send the same files."""
    whole_folder = names is None or (folder.is_dir() and set(names) == set(folder_files(folder)))
    message = commit_message if commit_message and commit_message != DEFAULT_COMMIT_MESSAGE else None
    if whole_folder:
        command = ["peft-merge-ext", "upload", shlex.quote(str(folder)), shlex.quote(str(target.repo_id))]
        if target.private:
            command.append("--private")
        if target.revision is not None:
            command += ["--revision", shlex.quote(str(target.revision))]
        if target.create_pr:
            command.append("--create-pr")
        if message is not None:
            command += ["--message", shlex.quote(message)]
        return (
            f"The local folder {folder} is kept unchanged; once fixed, retry with `{' '.join(command)}` or "
            f"`push_merged(..., local_dir={str(folder)!r})`."
        )
    others = len(folder_files(folder)) - len(names) if folder.is_dir() else 0
    options = [repr(target.repo_id)]
    if target.private is not None:
        options.append(f"private={target.private!r}")
    if target.revision is not None:
        options.append(f"revision={target.revision!r}")
    if target.create_pr:
        options.append("create_pr=True")
    call = (
        f"upload_files({str(folder)!r}, {list(names)!r}, check_hub_access({', '.join(options)}), "
        f"commit_message={message or DEFAULT_COMMIT_MESSAGE!r})"
    )
    caveat = (
        f" (not the peft-merge-ext upload command, which would also send the {others} other file(s) of the folder)"
        if others > 0
        else ""
    )
    return (
        f"The local folder {folder} is kept unchanged; once fixed, retry with `{call}` from "
        f"peft_merge_ext.publish.hub{caveat}."
    )


def _branch_to_create(api, repo_id: str, revision: str | None) -> str | None:
    """The branch `revision` names if it does not exist yet; None for existing branches, PR refs and commit ids."""
    if revision is None or revision.startswith("refs/pr/") or _COMMIT_ID.fullmatch(revision):
        return None
    branch = revision.removeprefix("refs/heads/")
    return None if branch in {ref.name for ref in api.list_repo_refs(repo_id).branches} else branch
