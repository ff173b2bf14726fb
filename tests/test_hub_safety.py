"""Safety of `publish.hub`: the pre-flight check, exact file lists, retry commands and token handling.

Real `huggingface_hub` client, real HTTP on 127.0.0.1 against the fake Hub of tests/hub_server.py; the checks look
at what the server stored and at the requests it answered.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import time
import traceback

import pytest

from peft_merge_ext.errors import HubUploadError
from peft_merge_ext.publish.hub import HubTarget, check_hub_access, upload_files, upload_folder

# huggingface_hub's own LFS upload passes a file object as `data=`, which httpx2 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

REPO = "test-user/merged"
UPLOAD_OPERATIONS = {"create_branch", "preupload", "lfs_batch", "lfs_upload", "lfs_verify", "commit"}
MERGE_FILES = [
    "config.json",
    "README.md",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
]
SECRET = b"HF_TOKEN=hf_doNotUploadThisSecret\n"


def _shard(seed: int) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save({f"layers.{seed}.weight": rng.standard_normal((8, 8)).astype(np.float32)})


def _snapshot(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _remote_files(repo, revision: str = "main") -> dict[str, bytes]:
    return {name: data for name, data in repo.files(revision).items() if name != ".gitattributes"}


def _uploaded_bytes(server) -> list[bytes]:
    """Every file content and LFS object the server stored, in any repo, revision or pull request."""
    stored = []
    for repo in server.state.repos.values():
        stored += list(repo.lfs_objects.values())
        stored += [entry.content for commit in repo.commits.values() for entry in commit.files.values()]
    return stored


def _operations(server, count: int) -> list[str]:
    """The answered operations once `count` were recorded (the server logs a request just after answering it)."""
    deadline = time.monotonic() + 5
    while len(server.state.requests) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.state.operations()


def _nothing_uploaded(server) -> bool:
    return not UPLOAD_OPERATIONS & set(server.state.operations())


def _full_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


@pytest.fixture
def merged_dir(tmp_path):
    """A merge output next to things that must never be uploaded: `.env`, private notes and a stray old shard."""
    folder = tmp_path / "merged"
    (folder / "notes").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 32}\n')
    (folder / "README.md").write_text("---\nlibrary_name: peft\ntags: [lora, merge]\n---\n# Merged\n")
    (folder / "model-00001-of-00002.safetensors").write_bytes(_shard(1))
    (folder / "model-00002-of-00002.safetensors").write_bytes(_shard(2))
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}\n')
    (folder / ".env").write_bytes(SECRET)
    (folder / "notes" / "private.txt").write_text("do not publish\n")
    (folder / "model-00001-of-00003.safetensors").write_bytes(_shard(3))  # left over from an earlier merge
    return folder


# -- check_hub_access --------------------------------------------------------------------------------------------


def test_check_hub_access_creates_the_repo_and_returns_a_target_without_the_token_in_its_repr(hub_server):
    target = check_hub_access(REPO, token=hub_server.token, private=True, revision="dev")
    assert target == HubTarget(REPO, private=True, revision="dev", create_pr=False, token=hub_server.token)
    assert hub_server.token not in repr(target) and hub_server.token not in str(target)
    assert _operations(hub_server, 2) == ["whoami", "create_repo"]
    repo = hub_server.repo(REPO)
    assert repo.private is True
    assert [commit.message for commit in repo.history()] == ["initial commit"]
    assert set(repo.branches) == {"main"}  # the branch is created at upload time, not by the check


def test_check_hub_access_reuses_an_existing_repo_and_accepts_an_organization(hub_server):
    hub_server.create_repo(REPO, private=True)
    assert check_hub_access(REPO, token=hub_server.token, private=False).repo_id == REPO
    assert hub_server.repo(REPO).private is True  # visibility of an existing repo is left alone
    assert check_hub_access(f"{hub_server.org}/merged", token=hub_server.token).repo_id == f"{hub_server.org}/merged"
    hub_server.create_repo(REPO + "-prs")
    assert check_hub_access(REPO + "-prs", token=hub_server.token, create_pr=True).create_pr is True


def test_check_hub_access_accepts_an_open_pull_request(hub_server, merged_dir):
    upload_folder(merged_dir, REPO, token=hub_server.token, create_pr=True)
    target = check_hub_access(REPO, token=hub_server.token, revision="refs/pr/1")
    (merged_dir / "config.json").write_text("{}\n")
    upload_files(merged_dir, ["config.json"], target, commit_message="Follow-up")
    assert hub_server.repo(REPO).head("refs/pr/1").message == "Follow-up"


def test_token_true_none_and_false(hub_server, monkeypatch):
    import huggingface_hub

    with pytest.raises(HubUploadError, match="No Hugging Face token found") as caught:
        check_hub_access(REPO, token=True)
    assert REPO in str(caught.value) and "hf auth login" in str(caught.value)
    with pytest.raises(HubUploadError, match="No Hugging Face token found"):
        check_hub_access(REPO)  # None: the stored login if any, and there is none
    with pytest.raises(HubUploadError, match="token=False") as caught:
        check_hub_access(REPO, token=False)
    assert REPO in str(caught.value)
    with pytest.raises(HubUploadError, match="must be a string, True, False or None"):
        check_hub_access(REPO, token=123)
    assert hub_server.state.requests == []

    huggingface_hub.login(token=hub_server.token)
    assert check_hub_access(REPO, token=True).token == hub_server.token
    assert check_hub_access(REPO).token == hub_server.token
    with pytest.raises(HubUploadError, match="token=False"):
        check_hub_access(REPO, token=False)  # even when logged in: no token, no upload
    monkeypatch.setenv("HF_TOKEN", hub_server.read_token)  # HF_TOKEN wins over the stored login
    with pytest.raises(HubUploadError, match="read-only"):
        check_hub_access(REPO, token=True)


def _invalid_token(server):
    return {"token": "hf_wrongSECRETtoken1234567890", "repo_id": REPO}, "401 Unauthorized"


def _read_only_token(server):
    return {"token": server.read_token, "repo_id": REPO}, "read-only"


def _read_only_token_existing_repo(server):
    server.create_repo(REPO)  # create_repo(exist_ok=True) alone would pass: whoami tells the role
    return {"token": server.read_token, "repo_id": REPO}, "read-only"


def _foreign_namespace(server):
    return {"token": server.token, "repo_id": "someone-else/merged"}, "not a member of the namespace"


def _foreign_existing_repo(server):
    server.create_repo("someone-else/merged")  # public: create_repo(exist_ok=True) alone would pass
    return {"token": server.token, "repo_id": "someone-else/merged"}, "not a member of the namespace"


def _repo_cannot_be_created(server):
    server.fail("create_repo", 403, message="You have reached the maximum number of repositories")
    return {"token": server.token, "repo_id": REPO, "private": True}, "403 Forbidden"


def _missing_pull_request(server):
    server.create_repo(REPO)
    return {"token": server.token, "repo_id": REPO, "revision": "refs/pr/3"}, "'refs/pr/3' does not exist"


def _server_down(server):
    server.stop()
    return {"token": server.token, "repo_id": REPO}, "could not reach the Hub"


@pytest.mark.parametrize(
    "setup",
    [
        _invalid_token,
        _read_only_token,
        _read_only_token_existing_repo,
        _foreign_namespace,
        _foreign_existing_repo,
        _repo_cannot_be_created,
        _missing_pull_request,
        _server_down,
    ],
    ids=lambda setup: setup.__name__.strip("_").replace("_", "-"),
)
def test_check_hub_access_fails_fast_with_one_line_and_uploads_nothing(hub_server, setup):
    arguments, expected = setup(hub_server)
    repos_before = set(hub_server.state.repos)
    started = time.monotonic()
    with pytest.raises(HubUploadError) as caught:
        check_hub_access(**arguments)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert expected in message
    assert arguments["repo_id"] in message
    assert "\n" not in message
    assert arguments["token"] not in _full_text(caught.value)
    assert _nothing_uploaded(hub_server)
    assert set(hub_server.state.repos) == repos_before  # no repository was created
    assert not any(commit.parent for repo in hub_server.state.repos.values() for commit in repo.commits.values())


@pytest.mark.parametrize(
    "repo_id",
    ["", "   ", "merged", "a/b/c", "test-user/bad--name", "test-user/has space", "../etc", "test-user/x.git", 42],
)
def test_invalid_repo_ids_fail_before_any_network_call(hub_server, repo_id):
    with pytest.raises(HubUploadError) as caught:
        check_hub_access(repo_id, token=hub_server.token)
    assert "\n" not in str(caught.value) and "namespace" in str(caught.value)
    assert hub_server.state.requests == []


def test_check_hub_access_then_upload_files(hub_server, merged_dir):
    target = check_hub_access(REPO, token=hub_server.token, revision="v2")
    url = upload_files(merged_dir, MERGE_FILES, target, commit_message="Merge", commit_description="slerp")
    repo = hub_server.repo(REPO)
    head = repo.head("v2")
    assert url == f"{hub_server.url}/{REPO}/commit/{head.oid}"
    assert (head.message, head.description) == ("Merge", "slerp")
    assert _remote_files(repo, "v2") == {name: (merged_dir / name).read_bytes() for name in MERGE_FILES}


# -- upload_files: exactly the listed files -----------------------------------------------------------------------


def test_upload_files_sends_exactly_the_listed_files(hub_server, merged_dir):
    before = _snapshot(merged_dir)
    target = check_hub_access(REPO, token=hub_server.token)
    upload_files(merged_dir, MERGE_FILES, target, commit_message="Merge a+b")

    repo = hub_server.repo(REPO)
    assert _remote_files(repo) == {name: before[name] for name in MERGE_FILES}
    assert repo.head().added.keys() == set(MERGE_FILES)
    assert repo.head().lfs_paths == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    shards = [before["model-00001-of-00002.safetensors"], before["model-00002-of-00002.safetensors"]]
    assert repo.lfs_objects == {hashlib.sha256(data).hexdigest(): data for data in shards}
    assert hub_server.state.operations().count("lfs_upload") == 2  # the stray shard never left the machine
    stored = _uploaded_bytes(hub_server)
    for never_sent in (SECRET, before["notes/private.txt"], before["model-00001-of-00003.safetensors"]):
        assert not any(never_sent in data for data in stored)
    assert _snapshot(merged_dir) == before


def test_upload_files_normalizes_names_and_follows_links_inside_the_folder(hub_server, merged_dir):
    from pathlib import Path

    (merged_dir / "alias.json").symlink_to("config.json")
    target = HubTarget(REPO, token=hub_server.token)
    upload_files(
        merged_dir, ["./config.json", Path("notes") / "private.txt", "config.json", "alias.json"], target,
        commit_message="m",
    )  # fmt: skip
    config = (merged_dir / "config.json").read_bytes()
    assert _remote_files(hub_server.repo(REPO)) == {
        "config.json": config,
        "notes/private.txt": b"do not publish\n",
        "alias.json": config,
    }


def _absolute(folder, outside):
    return [str(folder / "config.json")]


def _parent(folder, outside):
    return ["../outside.txt"]


def _parent_inside(folder, outside):
    return ["notes/../config.json"]


def _link_out(folder, outside):
    (folder / "link.txt").symlink_to(outside)
    return ["config.json", "link.txt"]


def _linked_folder_out(folder, outside):
    (folder / "shared").symlink_to(outside.parent, target_is_directory=True)
    return ["shared/outside.txt"]


def _link_into_git(folder, outside):
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[remote]\n")
    (folder / "gitconfig").symlink_to(".git/config")
    return ["gitconfig"]


def _git_metadata(folder, outside):
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref\n")
    return [".git/HEAD"]


def _missing(folder, outside):
    return ["config.json", "model-00003-of-00003.safetensors"]


def _a_folder(folder, outside):
    return ["notes"]


def _empty_name(folder, outside):
    return [""]


def _no_files(folder, outside):
    return []


def _a_string(folder, outside):
    return "config.json"


@pytest.mark.parametrize(
    "names",
    [
        _absolute,
        _parent,
        _parent_inside,
        _link_out,
        _linked_folder_out,
        _link_into_git,
        _git_metadata,
        _missing,
        _a_folder,
        _empty_name,
        _no_files,
        _a_string,
    ],
    ids=lambda names: names.__name__.strip("_").replace("_", "-"),
)
def test_upload_files_refuses_unsafe_names_before_any_network_call(hub_server, merged_dir, tmp_path, names):
    outside = tmp_path / "elsewhere" / "outside.txt"
    outside.parent.mkdir()
    outside.write_text("a file outside the folder\n")
    files = names(merged_dir, outside)
    with pytest.raises(HubUploadError, match=r"Cannot upload|files must be a list") as caught:
        upload_files(merged_dir, files, HubTarget(REPO, token=hub_server.token), commit_message="never lands")
    assert "\n" not in str(caught.value)
    assert hub_server.state.requests == []


def test_upload_folder_refuses_a_symlink_pointing_outside(hub_server, merged_dir, tmp_path):
    (tmp_path / "secret.txt").write_text("outside\n")
    (merged_dir / "secret.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(HubUploadError, match="outside the folder"):
        upload_folder(merged_dir, REPO, token=hub_server.token)
    assert hub_server.state.requests == []


# -- retry commands -----------------------------------------------------------------------------------------------


def _retry_command(message: str) -> list[str]:
    commands = re.findall(r"`(peft-merge-ext upload [^`]*)`", message)
    assert len(commands) == 1, message
    return shlex.split(commands[0])


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        ({}, []),
        ({"private": True}, ["--private"]),
        ({"revision": "merged-v2"}, ["--revision", "merged-v2"]),
        ({"create_pr": True}, ["--create-pr"]),
        (
            {"private": True, "revision": "dev", "create_pr": True, "commit_message": "Merge it"},
            ["--private", "--revision", "dev", "--create-pr", "--message", "Merge it"],
        ),
    ],
    ids=["plain", "private", "revision", "create-pr", "all"],
)
def test_the_printed_retry_command_does_the_same_upload(hub_server, merged_dir, monkeypatch, options, flags):
    from peft_merge_ext.cli import main

    merged_dir = merged_dir.rename(merged_dir.parent / "my merge")  # the command quotes the path
    hub_server.fail("commit", 500)
    with pytest.raises(HubUploadError, match="HTTP 500") as caught:
        upload_folder(merged_dir, REPO, token=hub_server.token, **options)
    argv = _retry_command(str(caught.value))
    assert argv == ["peft-merge-ext", "upload", str(merged_dir.resolve()), REPO, *flags]

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    assert main(argv[1:]) == 0
    repo = hub_server.repo(REPO)
    assert repo.private is bool(options.get("private"))
    revision = "refs/pr/1" if options.get("create_pr") else options.get("revision", "main")
    head = repo.head(revision)
    assert head.message == options.get("commit_message", "Upload merged model with peft-merge-ext")
    assert _remote_files(repo, revision) == _snapshot(merged_dir)
    if options.get("create_pr"):
        assert repo.pull_requests[1].target_branch == options.get("revision", "main")


def test_retry_for_a_subset_is_not_the_folder_command(hub_server, merged_dir, monkeypatch):
    import peft_merge_ext.publish.hub as hub

    target = check_hub_access(REPO, token=hub_server.token, private=True, revision="dev")
    hub_server.fail("commit", 500)
    with pytest.raises(HubUploadError, match="HTTP 500") as caught:
        upload_files(merged_dir, MERGE_FILES, target, commit_message="Merge")
    message = str(caught.value)
    assert "peft-merge-ext upload" in message and "3 other file(s)" in message  # why the command is not offered
    assert not re.search(r"`peft-merge-ext upload", message)
    call = re.search(r"`(upload_files\(.*?\))`", message)[1]
    assert "private=True" in call and "revision='dev'" in call

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    eval(call, {"upload_files": hub.upload_files, "check_hub_access": hub.check_hub_access})
    repo = hub_server.repo(REPO)
    assert _remote_files(repo, "dev") == {name: (merged_dir / name).read_bytes() for name in MERGE_FILES}
    assert repo.head("dev").message == "Merge"


def test_upload_files_of_the_whole_folder_prints_the_folder_command(hub_server, merged_dir):
    names = sorted(_snapshot(merged_dir))
    hub_server.fail("commit", 500)
    target = HubTarget(REPO, token=hub_server.token, create_pr=True)
    with pytest.raises(HubUploadError) as caught:
        upload_files(merged_dir, names, target, commit_message=None)
    assert _retry_command(str(caught.value))[2:] == [str(merged_dir.resolve()), REPO, "--create-pr"]


# -- token=True / False through an upload ---------------------------------------------------------------------------


def test_token_true_with_an_upload_failure_gives_hub_upload_error_without_the_token(hub_server, merged_dir):
    import huggingface_hub

    huggingface_hub.login(token=hub_server.token)
    hub_server.fail("commit", 500)
    with pytest.raises(HubUploadError, match="server error") as caught:
        upload_folder(merged_dir, REPO, token=True)
    assert hub_server.token not in _full_text(caught.value)
    assert "peft-merge-ext upload" in str(caught.value)

    target = check_hub_access(REPO, token=True)
    hub_server.fail("commit", 500)
    with pytest.raises(HubUploadError, match="server error") as caught:
        upload_files(merged_dir, MERGE_FILES, target, commit_message="m")
    assert hub_server.token not in _full_text(caught.value)

    hub_server.fail("create_repo", 400, message=f"Bad request from Bearer {hub_server.token}")
    with pytest.raises(HubUploadError, match="HTTP 400") as caught:
        upload_files(merged_dir, MERGE_FILES, HubTarget(REPO, token=True), commit_message="m")
    assert "Bearer hf_***" in str(caught.value)
    assert hub_server.token not in _full_text(caught.value)
    assert _remote_files(hub_server.repo(REPO)) == {}


def test_token_false_cannot_upload(hub_server, merged_dir):
    import huggingface_hub

    huggingface_hub.login(token=hub_server.token)
    with pytest.raises(HubUploadError, match="token=False") as caught:
        upload_folder(merged_dir, REPO, token=False)
    assert "peft-merge-ext upload" in str(caught.value)
    with pytest.raises(HubUploadError, match="token=False"):
        upload_files(merged_dir, MERGE_FILES, HubTarget(REPO, token=False), commit_message="m")
    assert "create_repo" not in hub_server.state.operations() and _nothing_uploaded(hub_server)
