"""A small Hugging Face Hub-compatible HTTP server for tests, and the `hub_server` pytest fixture.

It implements the endpoints the real `huggingface_hub` client calls to authenticate, create repositories and
branches, upload files (small files inline in the commit; checkpoint types such as `*.safetensors` and files of 10
MiB or more through the LFS batch API, a signed PUT and a verify call), commit (NDJSON body, optional pull request)
and download (`resolve/{revision}/{path}`), and keeps everything in memory so tests can check what arrived: repos
and their private flag, branches, commits per revision (message, description, files added), file bytes per revision,
LFS objects and pull requests.

Failure injection: unknown tokens get 401, read-only tokens or foreign namespaces get 403, unknown repos 404,
`HubServer.fail(operation, status)` makes the next call(s) of one operation fail (for example a 500 on the commit
call, after the LFS upload went through), and `HubServer.stop()` takes the server down (connection refused).

`huggingface_hub` reads `HF_ENDPOINT` into `huggingface_hub.constants` when it is imported, so `tests/conftest.py`
calls `reserve_hub_endpoint()` first thing: it picks a free local port and points `HF_ENDPOINT` at it before
anything imports `huggingface_hub`. The fixture then serves on that port (and re-points `huggingface_hub.constants`
if it had to take another port). Only the standard library, PyYAML and pytest are used.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

__all__ = [
    "LFS_EXTENSIONS",
    "OPERATIONS",
    "Commit",
    "HubServer",
    "HubState",
    "PullRequest",
    "RecordedRequest",
    "Repo",
    "StoredFile",
    "hub_server",
    "reserve_hub_endpoint",
]

HOST = "127.0.0.1"
DEFAULT_USER = "test-user"
DEFAULT_ORG = "test-org"
# File types the Hub's default `.gitattributes` stores with LFS (a subset that covers model checkpoints).
# fmt: off
LFS_EXTENSIONS = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".gguf", ".gz", ".h5", ".joblib", ".msgpack", ".npy", ".npz", ".onnx",
    ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".safetensors", ".tar", ".tflite", ".xz", ".zip",
    ".zst",
)
# fmt: on
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # like the Hub: anything from 10 MiB goes through LFS
OPERATIONS = (
    "whoami",
    "create_repo",
    "repo_info",
    "refs",
    "create_branch",
    "validate_yaml",
    "preupload",
    "lfs_batch",
    "lfs_upload",
    "lfs_verify",
    "commit",
    "download",
)
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SEGMENT = r"[\w.\-]+"
_REPO_ID = rf"(?P<repo_id>{_SEGMENT}/{_SEGMENT})"
_API_REPO = rf"^/api/(?P<kind>models|datasets|spaces)/{_REPO_ID}"
_WEB_REPO = rf"^/(?:(?P<kind>datasets|spaces)/)?{_REPO_ID}"


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class StoredFile:
    """One file of a revision: its bytes and whether it was committed as an LFS pointer."""

    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """The id the client compares against: sha256 for LFS files, the git blob sha1 otherwise."""
        return hashlib.sha256(self.content).hexdigest() if self.lfs else _git_blob_sha1(self.content)


@dataclass
class Commit:
    """A commit as the server recorded it (`files` is the full snapshot after the commit)."""

    oid: str
    revision: str
    message: str
    description: str
    parent: str | None
    added: dict[str, StoredFile]
    deleted: tuple[str, ...]
    files: dict[str, StoredFile]
    created_at: str = field(default_factory=_now)

    @property
    def lfs_paths(self) -> set[str]:
        """Paths this commit added as LFS files."""
        return {path for path, stored in self.added.items() if stored.lfs}


@dataclass
class PullRequest:
    """A pull request opened by a commit with `create_pr=1`."""

    num: int
    title: str
    description: str
    target_branch: str
    author: str

    @property
    def ref(self) -> str:
        return f"refs/pr/{self.num}"


@dataclass
class Repo:
    """A repository: branches and pull requests point at commits; LFS objects are stored per repository."""

    repo_id: str
    repo_type: str
    private: bool
    created_by: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: dict[int, PullRequest] = field(default_factory=dict)
    pr_heads: dict[int, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def url_path(self) -> str:
        """The path of the repository's web pages: `ns/name` for models, `datasets/ns/name` for datasets."""
        return _URL_PREFIX[self.repo_type] + self.repo_id

    def resolve(self, revision: str | None) -> str | None:
        """The commit id a revision (branch, `refs/heads/x`, `refs/pr/N` or commit id) points at, or None."""
        revision = revision or "main"
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        if revision in self.branches:
            return self.branches[revision]
        match = re.fullmatch(r"refs/pr/(\d+)", revision)
        if match:
            return self.pr_heads.get(int(match[1]))
        return revision if revision in self.commits else None

    def head(self, revision: str | None = "main") -> Commit:
        """The commit a revision points at (KeyError if it does not exist)."""
        oid = self.resolve(revision)
        if oid is None:
            raise KeyError(f"{self.repo_id} has no revision {revision!r} (branches: {sorted(self.branches)})")
        return self.commits[oid]

    def files(self, revision: str | None = "main") -> dict[str, bytes]:
        """The bytes of every file at a revision."""
        return {path: stored.content for path, stored in self.head(revision).files.items()}

    def history(self, revision: str | None = "main") -> list[Commit]:
        """The commits reachable from a revision, newest first."""
        commits = []
        oid: str | None = self.head(revision).oid
        while oid is not None:
            commits.append(self.commits[oid])
            oid = self.commits[oid].parent
        return commits


@dataclass(frozen=True)
class TokenInfo:
    user: str
    role: str
    orgs: tuple[str, ...]

    @property
    def namespaces(self) -> set[str]:
        return {self.user, *self.orgs}


@dataclass
class _Failure:
    operation: str
    status: int
    message: str
    error_code: str | None
    remaining: int | None


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered (the token itself is never recorded)."""

    method: str
    path: str
    operation: str | None
    status: int
    authenticated: bool


class _Reply(Exception):
    """Raised inside a handler to send an error response."""

    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra or {}


def _repo_not_found() -> _Reply:
    return _Reply(404, "Repository not found", "RepoNotFound")


def _revision_not_found(revision: str) -> _Reply:
    return _Reply(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubState:
    """Everything the server knows: tokens, repositories, injected failures and a log of answered requests."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.tokens: dict[str, TokenInfo] = {}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RecordedRequest] = []
        self.lfs_size_threshold = LFS_SIZE_THRESHOLD
        self._failures: list[_Failure] = []
        self._upload_tickets: dict[str, tuple[tuple[str, str], str, int]] = {}
        self._counter = itertools.count(1)

    # -- setup ---------------------------------------------------------------------------------------------------
    def add_token(self, user: str = DEFAULT_USER, role: str = "write", orgs: tuple[str, ...] = ()) -> str:
        """Create a valid token for `user` with `role` ("write" or "read") and membership of `orgs`."""
        if role not in ("read", "write"):
            raise ValueError(f"role must be 'read' or 'write', got {role!r}")
        token = f"hf_test{secrets.token_hex(16)}"
        with self.lock:
            self.tokens[token] = TokenInfo(user=user, role=role, orgs=tuple(orgs))
        return token

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False, user: str = "") -> Repo:
        """Create a repository with its initial commit on `main` (what `POST /api/repos/create` does)."""
        with self.lock:
            repo = Repo(
                repo_id=repo_id, repo_type=repo_type, private=private, created_by=user or repo_id.split("/")[0]
            )
            gitattributes = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS)
            initial = {".gitattributes": StoredFile(gitattributes.encode(), lfs=False)}
            repo.branches["main"] = self._add_commit(
                repo, "main", "initial commit", "", None, initial, (), initial
            ).oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def fail(
        self,
        operation: str,
        status: int = 500,
        message: str | None = None,
        *,
        error_code: str | None = None,
        times: int | None = 1,
    ) -> None:
        """Make the next `times` calls (None: all calls) of `operation` answer `status`.

        Operations: whoami, create_repo, repo_info, refs, create_branch, validate_yaml, preupload, lfs_batch,
        lfs_upload, lfs_verify, commit, download. A 404 gets `X-Error-Code: RepoNotFound` unless `error_code` says
        otherwise. Note that the client retries preupload and the LFS calls on 408/429/5xx with an exponential backoff
        (1 s, 2 s, ...): inject 5xx there only with `times=1`.
        """
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; expected one of {OPERATIONS}")
        if error_code is None and status == 404:
            error_code = "RepoNotFound"
        with self.lock:
            self._failures.append(
                _Failure(operation, status, message or f"Injected failure ({status})", error_code, times)
            )

    def clear_failures(self) -> None:
        with self.lock:
            self._failures.clear()

    # -- inspection ----------------------------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The repository `repo_id` (KeyError naming the existing ones if it does not exist)."""
        with self.lock:
            try:
                return self.repos[(repo_type, repo_id)]
            except KeyError:
                raise KeyError(f"no {repo_type} repo {repo_id!r}; repos: {sorted(r for _, r in self.repos)}") from None

    def operations(self) -> list[str]:
        """The operations answered so far, in order (unknown paths appear as None)."""
        with self.lock:
            return [request.operation for request in self.requests]

    # -- internals used by the handler ---------------------------------------------------------------------------
    def _take_failure(self, operation: str) -> _Failure | None:
        with self.lock:
            for failure in self._failures:
                if failure.operation == operation:
                    if failure.remaining is not None:
                        failure.remaining -= 1
                        if failure.remaining <= 0:
                            self._failures.remove(failure)
                    return failure
        return None

    def _add_commit(self, repo, revision, message, description, parent, added, deleted, files) -> Commit:
        seed = json.dumps([repo.repo_id, revision, message, parent, next(self._counter), sorted(files)])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid, revision, message, description, parent, dict(added), tuple(deleted), dict(files))
        repo.commits[oid] = commit
        return commit


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the handlers below; every answer is JSON except downloads and LFS uploads."""

    server_version = "FakeHub/1.0"
    protocol_version = "HTTP/1.0"  # one request per connection: no stale pooled connections between server restarts

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    @property
    def state(self) -> HubState:
        return self.hub.state

    def log_message(self, format: str, *args) -> None:  # silence the default stderr logging
        pass

    # -- plumbing ------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _routes(self):
        return (
            ("GET", r"^/api/whoami-v2$", "whoami", self._whoami),
            ("POST", r"^/api/repos/create$", "create_repo", self._create_repo),
            ("POST", r"^/api/validate-yaml$", "validate_yaml", self._validate_yaml),
            ("GET", _API_REPO + r"/refs$", "refs", self._refs),
            ("POST", _API_REPO + r"/branch/(?P<branch>[^/]+)$", "create_branch", self._create_branch),
            ("POST", _API_REPO + r"/preupload/(?P<revision>[^/]+)$", "preupload", self._preupload),
            ("POST", _API_REPO + r"/commit/(?P<revision>[^/]+)$", "commit", self._commit),
            ("GET", _API_REPO + r"(?:/revision/(?P<revision>[^/]+))?$", "repo_info", self._repo_info),
            ("POST", _WEB_REPO + r"\.git/info/lfs/objects/batch$", "lfs_batch", self._lfs_batch),
            ("PUT", r"^/__lfs/upload/(?P<ticket>[0-9a-f]+)$", "lfs_upload", self._lfs_upload),
            (
                "POST",
                r"^/__lfs/verify/(?P<kind>model|dataset|space)/" + _REPO_ID + "$",
                "lfs_verify",
                self._lfs_verify,
            ),
            ("GET", _WEB_REPO + r"/resolve/(?P<revision>[^/]+)/(?P<path>.+)$", "download", self._download),
            ("HEAD", _WEB_REPO + r"/resolve/(?P<revision>[^/]+)/(?P<path>.+)$", "download", self._download),
        )

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.body = self._read_body()
        self.is_head = method == "HEAD"
        operation = None
        status = 500
        try:
            for route_method, pattern, name, handler in self._routes():
                match = re.match(pattern, url.path) if route_method == method else None
                if match:
                    operation = name
                    failure = self.state._take_failure(name)
                    if failure is not None:
                        raise _Reply(failure.status, failure.message, failure.error_code)
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    status = handler(**params)
                    break
            else:
                raise _Reply(404, f"Not found: {method} {url.path}")
        except _Reply as reply:
            status = reply.status
            self._send_error(reply)
        except Exception as error:  # a bug in the fake server: answer 500 with the reason, so tests show it
            status = 500
            self._send_error(_Reply(500, f"fake hub crashed: {type(error).__name__}: {error}"))
        finally:
            with self.state.lock:
                self.state.requests.append(
                    RecordedRequest(method, url.path, operation, status, "authorization" in self.headers)
                )

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> int:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not self.is_head:
            self.wfile.write(body)
        return status

    def _json(self, payload, status: int = 200, headers: dict[str, str] | None = None) -> int:
        return self._send(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    def _send_error(self, reply: _Reply) -> None:
        headers = {"X-Error-Message": " ".join(reply.message.split())}  # header values are single-line
        if reply.error_code:
            headers["X-Error-Code"] = reply.error_code
        headers.update(reply.extra.pop("_headers", {}))
        self._json({"error": reply.message, **reply.extra}, status=reply.status, headers=headers)

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as error:
            raise _Reply(400, f"invalid JSON body: {error}") from None

    # -- authentication ------------------------------------------------------------------------------------------
    def _token(self) -> TokenInfo | None:
        """The caller's token (None if anonymous); any unknown token is rejected with 401 like on the Hub."""
        header = self.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        info = self.state.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if info is None:
            raise _Reply(401, "Invalid credentials in Authorization header")
        return info

    def _require_token(self) -> TokenInfo:
        info = self._token()
        if info is None:
            raise _Reply(401, "You must be authenticated to do this: pass a token in the Authorization header")
        return info

    def _repo(self, kind: str, repo_id: str, caller: TokenInfo | None) -> Repo:
        repo = self.state.repos.get((_REPO_TYPES.get(kind, kind), repo_id))
        if repo is None or (repo.private and (caller is None or repo.namespace not in caller.namespaces)):
            raise _repo_not_found()
        return repo

    def _writable_repo(self, kind: str, repo_id: str) -> tuple[Repo, TokenInfo]:
        caller = self._require_token()
        repo = self._repo(kind, repo_id, caller)
        if caller.role != "write":
            raise _Reply(403, f"You don't have write access to {repo.repo_id}: this token is read-only")
        if repo.namespace not in caller.namespaces:
            raise _Reply(403, f"You don't have write access to {repo.repo_id}: {caller.user} is not a member")
        return repo, caller

    # -- endpoints -----------------------------------------------------------------------------------------------
    def _whoami(self) -> int:
        caller = self._require_token()
        return self._json(
            {
                "type": "user",
                "id": hashlib.sha1(caller.user.encode()).hexdigest()[:24],
                "name": caller.user,
                "fullname": caller.user,
                "orgs": [{"type": "org", "name": org} for org in caller.orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": f"{caller.role}-token", "role": caller.role},
                },
            }
        )

    def _create_repo(self) -> int:
        caller = self._require_token()
        payload = self._json_body()
        name = payload.get("name")
        if not isinstance(name, str) or not re.fullmatch(_SEGMENT, name):
            raise _Reply(400, f"invalid repo name {name!r}")
        namespace = payload.get("organization") or caller.user
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{name}"
        if caller.role != "write" or namespace not in caller.namespaces:
            raise _Reply(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        url = f"{self.hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self.state.lock:
            if (repo_type, repo_id) in self.state.repos:
                raise _Reply(409, f"You already created this {repo_type} repo", extra={"url": url})
            self.state.create_repo(
                repo_id, repo_type=repo_type, private=payload.get("visibility") == "private", user=caller.user
            )
        return self._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _repo_info(self, kind: str, repo_id: str, revision: str | None = None) -> int:
        repo = self._repo(kind, repo_id, self._token())
        oid = repo.resolve(revision)
        if oid is None:
            raise _revision_not_found(revision or "main")
        commit = repo.commits[oid]
        return self._json(
            {
                "id": repo.repo_id,
                "author": repo.namespace,
                "sha": oid,
                "private": repo.private,
                "lastModified": commit.created_at,
                "createdAt": repo.history("main")[-1].created_at if "main" in repo.branches else commit.created_at,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _refs(self, kind: str, repo_id: str) -> int:
        repo = self._repo(kind, repo_id, self._token())
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid} for n, oid in repo.branches.items()]
        pulls = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": o} for n, o in repo.pr_heads.items()]
        payload = {"branches": branches, "converts": [], "tags": []}
        if self.query.get("include_prs"):
            payload["pullRequests"] = pulls
        return self._json(payload)

    def _create_branch(self, kind: str, repo_id: str, branch: str) -> int:
        repo, _ = self._writable_repo(kind, repo_id)
        if branch.startswith("refs/") or not re.fullmatch(r"[\w.\-/]+", branch):
            raise _Reply(400, f"Invalid branch name {branch!r}")
        starting_point = self._json_body().get("startingPoint") or "main"
        with self.state.lock:
            if branch in repo.branches:
                raise _Reply(409, f"Reference already exists: refs/heads/{branch}")
            oid = repo.resolve(starting_point)
            if oid is None:
                raise _revision_not_found(starting_point)
            repo.branches[branch] = oid
        return self._json({})

    def _validate_yaml(self) -> int:
        self._token()
        content = self._json_body().get("content") or ""
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match:
            try:
                metadata = yaml.safe_load(match[1])
            except yaml.YAMLError as error:
                errors.append({"message": f"Invalid YAML in the card metadata: {error}"})
            else:
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "The card metadata must be a YAML mapping"})
        return self._json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _upload_mode(self, path: str, size: int) -> str:
        lfs = path.lower().endswith(LFS_EXTENSIONS) or size >= self.state.lfs_size_threshold
        return "lfs" if lfs else "regular"

    def _preupload(self, kind: str, repo_id: str, revision: str) -> int:
        repo, _ = self._writable_repo(kind, repo_id)
        oid = repo.resolve(revision)
        if oid is None:
            raise _revision_not_found(revision)
        existing = repo.commits[oid].files
        files = []
        for item in self._json_body().get("files", []):
            path = item["path"]
            files.append(
                {
                    "path": path,
                    "uploadMode": self._upload_mode(path, int(item["size"])),
                    "shouldIgnore": False,
                    "oid": existing[path].oid if path in existing else None,
                }
            )
        return self._json({"files": files, "commitOid": oid})

    def _lfs_batch(self, repo_id: str, kind: str | None = None) -> int:
        repo, _ = self._writable_repo(kind or "models", repo_id)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise _Reply(400, "only the upload operation is supported")
        objects = []
        for item in payload.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            entry: dict = {"oid": oid, "size": size, "authenticated": True}
            if repo.lfs_objects.get(oid) is None:
                ticket = secrets.token_hex(16)
                with self.state.lock:
                    self.state._upload_tickets[ticket] = ((repo.repo_type, repo.repo_id), oid, size)
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/__lfs/upload/{ticket}", "expires_in": 3600},
                    "verify": {"href": f"{self.hub.url}/__lfs/verify/{repo.repo_type}/{repo.repo_id}", "header": {}},
                }
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/json"})

    def _lfs_upload(self, ticket: str) -> int:
        # Like a pre-signed storage URL: no Authorization header, the ticket in the URL is the credential.
        with self.state.lock:
            granted = self.state._upload_tickets.pop(ticket, None)
        if granted is None:
            raise _Reply(403, "Upload URL is invalid or was already used")
        repo_key, oid, size = granted
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            raise _Reply(400, f"Uploaded bytes do not match the announced object (sha256 {oid}, {size} bytes)")
        with self.state.lock:
            self.state.repos[repo_key].lfs_objects[oid] = self.body
        return self._send(200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _lfs_verify(self, kind: str, repo_id: str) -> int:
        self._require_token()
        repo = self.state.repos.get((kind, repo_id))
        payload = self._json_body()
        stored = repo.lfs_objects.get(payload.get("oid")) if repo is not None else None
        if stored is None or len(stored) != payload.get("size"):
            raise _Reply(404, f"LFS object {payload.get('oid')} not found")
        return self._json({"success": True})

    def _commit(self, kind: str, repo_id: str, revision: str) -> int:
        repo, caller = self._writable_repo(kind, repo_id)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, "The first line of the commit payload must be the header")
        header = lines[0]["value"]
        message, description = header.get("summary") or "", header.get("description") or ""
        if not message:
            raise _Reply(400, "The commit summary (message) cannot be empty")
        create_pr = self.query.get("create_pr") == "1"
        with self.state.lock:
            if create_pr:
                if revision not in repo.branches:
                    raise _revision_not_found(revision)
                target, parent = None, repo.branches[revision]
            else:
                parent = repo.resolve(revision)
                if parent is None or revision in repo.commits:  # cannot commit on a detached commit id
                    raise _revision_not_found(revision)
                target = revision
            if header.get("parentCommit") not in (None, parent):
                raise _Reply(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[parent].files)
            added, deleted = self._apply_operations(repo, lines[1:], files)
            if create_pr:
                num = len(repo.pull_requests) + 1
                repo.pull_requests[num] = PullRequest(num, message, description, revision, caller.user)
                target = f"refs/pr/{num}"
            commit = self.state._add_commit(repo, target, message, description, parent, added, deleted, files)
            match = re.fullmatch(r"refs/pr/(\d+)", target)
            if match:
                repo.pr_heads[int(match[1])] = commit.oid
            else:
                repo.branches[target.removeprefix("refs/heads/")] = commit.oid
        pr_url = f"{self.hub.url}/{repo.url_path}/discussions/{match[1]}" if create_pr and match else None
        return self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.url}/{repo.url_path}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
            }
        )

    @staticmethod
    def _apply_operations(repo: Repo, lines: list[dict], files: dict[str, StoredFile]):
        added: dict[str, StoredFile] = {}
        deleted: list[str] = []
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Reply(400, f"unsupported encoding for {path}")
                added[path] = files[path] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                content = repo.lfs_objects.get(value.get("oid"))
                if content is None or ("size" in value and len(content) != value["size"]):
                    raise _Reply(
                        422,
                        f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {path}",
                    )
                added[path] = files[path] = StoredFile(content, lfs=True)
            elif key == "deletedFile":
                if path not in files:
                    raise _Reply(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
                deleted.append(path)
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [name for name in files if name.startswith(prefix)]:
                    del files[name]
                    deleted.append(name)
            else:
                raise _Reply(400, f"unknown commit operation {key!r}")
        return added, deleted

    def _download(self, repo_id: str, revision: str, path: str, kind: str | None = None) -> int:
        repo = self._repo(kind or "models", repo_id, self._token())
        oid = repo.resolve(revision)
        if oid is None:
            raise _revision_not_found(revision)
        stored = repo.commits[oid].files.get(path)
        if stored is None:
            raise _Reply(404, f"Entry not found: {path}", "EntryNotFound", extra={"_headers": {"X-Repo-Commit": oid}})
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": oid, "ETag": f'"{stored.oid}"'}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.oid}"', "X-Linked-Size": str(len(stored.content))})
        content, status = stored.content, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not self.is_head:
            start = int(match[1])
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            content, status = content[start:], 206
        return self._send(status, content, headers)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HubServer:
    """A fake Hub on 127.0.0.1: `url`, a write `token`, a `read_token`, the inspectable `state`, start/stop.

    Args:
        port (`int`, *optional*, defaults to 0):
            The port to listen on; 0 takes any free port.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.state = HubState()
        self.user = DEFAULT_USER
        self.org = DEFAULT_ORG
        self.token = self.state.add_token(self.user, "write", orgs=(self.org,))
        self.read_token = self.state.add_token(self.user, "read", orgs=(self.org,))
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> HubServer:
        """Listen and serve in a background thread (again on the same port after `stop()`)."""
        if self._httpd is None:
            httpd = _HTTPServer((HOST, self.port), _Handler)
            httpd.hub = self  # type: ignore[attr-defined]
            self.port = httpd.server_address[1]
            self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
            self._thread.start()
            self._httpd = httpd
        return self

    def stop(self) -> None:
        """Take the server down: new connections are refused until `start()`."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._httpd, self._thread = None, None

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """A context in which the server is down (connection refused)."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    # Shortcuts to the state.
    def fail(self, operation: str, status: int = 500, message: str | None = None, **kwargs) -> None:
        """See `HubState.fail`."""
        self.state.fail(operation, status, message, **kwargs)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.state.repo(repo_id, repo_type)

    def create_repo(self, repo_id: str, **kwargs) -> Repo:
        return self.state.create_repo(repo_id, **kwargs)

    def add_token(self, user: str = DEFAULT_USER, role: str = "write", orgs: tuple[str, ...] = ()) -> str:
        return self.state.add_token(user, role, orgs)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def reserve_hub_endpoint() -> str:
    """Pick a free local port and point `HF_ENDPOINT` there; call it before anything imports `huggingface_hub`.

    Also sets `HF_HUB_DISABLE_XET=1` (the fake Hub speaks the LFS protocol, not Xet) and turns telemetry off. Until
    a test uses the `hub_server` fixture nothing listens on that port, so no test can reach the real Hub.

    Returns:
        `str`: The endpoint URL.
    """
    url = f"http://{HOST}:{_free_port()}"
    os.environ["HF_ENDPOINT"] = url
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    return url


def _point_huggingface_hub_at(server: HubServer, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Make the real client talk to `server` for one test, with no token from the environment or a stored login."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    if server.url != constants.ENDPOINT:  # imported before HF_ENDPOINT was reserved, or the port was taken
        from huggingface_hub import hf_api

        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_api.api, "endpoint", server.url)  # behind the module-level functions (whoami, ...)


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A running fake Hub that `huggingface_hub` talks to (HF_ENDPOINT), fresh for each test.

    Yields the `HubServer`: `url`, `token` (write access to `test-user` and `test-org`), `read_token`, `state` (repos,
    commits, files, pull requests, LFS objects, request log), `fail(operation, status)`, `stop()`/`start()`/`down()`.
    HF_TOKEN and any stored login are hidden; `huggingface_hub.login(token=...)` stores a token in a temporary home.
    """
    reserved = urlsplit(os.environ.get("HF_ENDPOINT", "")).port
    try:
        server = HubServer(port=reserved or 0).start()
    except OSError:  # the reserved port was taken meanwhile: serve elsewhere and re-point the client
        server = HubServer().start()
    try:
        _point_huggingface_hub_at(server, monkeypatch, tmp_path_factory.mktemp("hf_home"))
        yield server
    finally:
        server.stop()
