"""How a failed Hub call is told to the user: one-line failure descriptions, with the token never shown.

`describe_failure` turns an exception raised by `huggingface_hub` (an HTTP status, a missing repository or revision,
an unreachable Hub) into a sentence that says what went wrong and what to do about it. `raise_masked` raises it as a
`HubUploadError` with the token masked, dropping the original cause when its text shows the token.

`huggingface_hub` is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import NoReturn

from ..errors import HubUploadError

__all__ = ["describe_failure", "raise_masked", "without_token"]

_MASK = "hf_***"


def describe_failure(
    error: Exception,
    *,
    step: str,
    repo_id: str,
    revision: str | None,
    endpoint: str,
    action: str = "Uploading to",
) -> str:
    """`{action} {repo_id} failed while {step}: ...`, saying why `error` happened and what to do about it."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    causes = list(_causes(error))
    http_error = next((cause for cause in causes if isinstance(cause, HfHubHTTPError)), None)
    response = getattr(http_error, "response", None)
    status = getattr(response, "status_code", None)
    prefix = f"{action} {repo_id} failed while {step}"
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


def raise_masked(message: str, error: BaseException, token: str) -> NoReturn:
    """Raise `HubUploadError(message)` from `error`, with the token masked and the cause dropped if it shows it."""
    failure = HubUploadError(without_token(message, token))
    echoed = any(token in str(cause) for cause in _causes(error))  # e.g. a proxy echoing the request headers
    raise failure from (None if echoed else error)


def without_token(text: str, token: object) -> str:
    """`text` with the token masked; only a non-empty string token can appear in a message."""
    return text.replace(token, _MASK) if isinstance(token, str) and token else text


def _causes(error: BaseException) -> Iterable[BaseException]:
    """The error and the errors it was raised from, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _network_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean the Hub could not be reached."""
    types: list[type[BaseException]] = [OSError]  # requests' and the standard library's connection errors
    for module_name in ("httpx2", "httpx"):  # the HTTP clients huggingface_hub uses (version dependent)
        try:
            types.append(importlib.import_module(module_name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(types)


def _server_message(http_error) -> str:
    """The message the Hub sent with `http_error`, on one line."""
    message = getattr(http_error, "server_message", None) or str(http_error)
    return " ".join(message.split())
