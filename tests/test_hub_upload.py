"""`publish.hub.upload_folder` end to end against the fake Hub (tests/hub_server.py) with the real client."""

from __future__ import annotations

import hashlib
import traceback
from pathlib import Path

import pytest

from peft_merge_ext.errors import HubUploadError
from peft_merge_ext.publish.hub import DEFAULT_COMMIT_MESSAGE, upload_folder

# huggingface_hub's own LFS upload passes a file object as `data=`, which httpx2 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

REPO = "test-user/merged"


def _weights(seed: int = 0) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save({"model.layers.0.q_proj.weight": rng.standard_normal((8, 8)).astype(np.float32)})


def _snapshot(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _uploadable(snapshot: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in snapshot.items() if not name.startswith((".git/", ".cache/"))}


def _remote_files(repo, revision: str = "main") -> dict[str, bytes]:
    return {name: data for name, data in repo.files(revision).items() if name != ".gitattributes"}


@pytest.fixture
def merged_dir(tmp_path):
    """A folder shaped like a saved merge: weights, config, card, a nested recipe, and git/cache metadata."""
    folder = tmp_path / "merged"
    (folder / "merge").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(_weights())
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 32}\n')
    (folder / "README.md").write_text("---\nlibrary_name: peft\ntags: [lora, merge]\n---\n# Merged\n")
    (folder / "merge" / "recipe.yaml").write_text("base: org/base\nmethod: slerp\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "meta").write_text("local metadata\n")
    return folder


def test_upload_sends_every_file_in_one_commit_with_lfs_for_weights(hub_server, merged_dir, tmp_path):
    from huggingface_hub import hf_hub_download

    before = _snapshot(merged_dir)
    url = upload_folder(
        merged_dir, REPO, token=hub_server.token, commit_message="Merge a+b", commit_description="slerp, t=0.3"
    )

    repo = hub_server.repo(REPO)
    head = repo.head()
    assert url == f"{hub_server.url}/{REPO}/commit/{head.oid}"
    assert repo.private is False
    assert [commit.message for commit in repo.history()] == ["Merge a+b", "initial commit"]
    assert head.description == "slerp, t=0.3"
    assert _remote_files(repo) == _uploadable(before)  # .git and .cache/huggingface stay local
    assert head.lfs_paths == {"model.safetensors"}
    weights = before["model.safetensors"]
    assert repo.lfs_objects == {hashlib.sha256(weights).hexdigest(): weights}
    downloaded = hf_hub_download(REPO, "model.safetensors", cache_dir=tmp_path / "cache")
    assert Path(downloaded).read_bytes() == weights
    assert _snapshot(merged_dir) == before


def test_private_flag_default_message_and_namespace_of_the_token(hub_server, merged_dir):
    url = upload_folder(str(merged_dir), "private-merge", token=hub_server.token, private=True)
    repo = hub_server.repo(f"{hub_server.user}/private-merge")
    assert repo.private is True
    assert repo.head().message == DEFAULT_COMMIT_MESSAGE
    assert url == f"{hub_server.url}/{hub_server.user}/private-merge/commit/{repo.head().oid}"


def test_existing_repo_is_reused_and_unchanged_files_make_no_commit(hub_server, merged_dir):
    upload_folder(merged_dir, REPO, token=hub_server.token, private=True, commit_message="first")
    (merged_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}\n')
    second = upload_folder(merged_dir, REPO, token=hub_server.token, private=False, commit_message="second")
    repo = hub_server.repo(REPO)
    assert repo.private is True  # visibility of an existing repo is left alone
    assert [commit.message for commit in repo.history()] == ["second", "first", "initial commit"]
    assert repo.head().added.keys() == {"config.json"}
    assert _remote_files(repo) == _uploadable(_snapshot(merged_dir))

    again = upload_folder(merged_dir, REPO, token=hub_server.token, commit_message="third")
    assert again == second  # nothing changed: the client skips the empty commit and returns the head
    assert len(repo.history()) == 3


def test_revision_names_a_new_branch_which_is_created_from_main(hub_server, merged_dir):
    upload_folder(merged_dir, REPO, token=hub_server.token, revision="merged-v2", commit_message="on branch")
    repo = hub_server.repo(REPO)
    assert set(repo.branches) == {"main", "merged-v2"}
    assert [commit.message for commit in repo.history("merged-v2")] == ["on branch", "initial commit"]
    assert _remote_files(repo, "merged-v2") == _uploadable(_snapshot(merged_dir))
    assert _remote_files(repo, "main") == {}

    (merged_dir / "config.json").write_text("{}\n")
    upload_folder(merged_dir, REPO, token=hub_server.token, revision="merged-v2", commit_message="update")
    assert hub_server.state.operations().count("create_branch") == 1  # existing branch: not created again
    assert [commit.message for commit in repo.history("merged-v2")] == ["update", "on branch", "initial commit"]


def test_full_branch_ref_is_accepted(hub_server, merged_dir):
    upload_folder(merged_dir, REPO, token=hub_server.token, revision="refs/heads/release", commit_message="release")
    repo = hub_server.repo(REPO)
    assert set(repo.branches) == {"main", "release"}
    assert repo.head("release").message == "release"


def test_create_pr_opens_a_pull_request_and_returns_its_url(hub_server, merged_dir):
    url = upload_folder(
        merged_dir, REPO, token=hub_server.token, create_pr=True, commit_message="Add merge", commit_description="Why"
    )
    repo = hub_server.repo(REPO)
    assert url == f"{hub_server.url}/{REPO}/discussions/1"
    pull = repo.pull_requests[1]
    assert (pull.title, pull.description, pull.target_branch) == ("Add merge", "Why", "main")
    assert _remote_files(repo, "refs/pr/1") == _uploadable(_snapshot(merged_dir))
    assert _remote_files(repo, "main") == {}

    (merged_dir / "config.json").write_text("{}\n")
    upload_folder(merged_dir, REPO, token=hub_server.token, revision="refs/pr/1", commit_message="Follow-up")
    assert [commit.message for commit in repo.history("refs/pr/1")][:2] == ["Follow-up", "Add merge"]
    assert "create_branch" not in hub_server.state.operations()


def test_create_pr_against_a_new_branch(hub_server, merged_dir):
    url = upload_folder(merged_dir, REPO, token=hub_server.token, revision="dev", create_pr=True)
    repo = hub_server.repo(REPO)
    assert url.endswith("/discussions/1")
    assert repo.pull_requests[1].target_branch == "dev"
    assert _remote_files(repo, "dev") == {}
    assert _remote_files(repo, "refs/pr/1") == _uploadable(_snapshot(merged_dir))


def test_token_comes_from_hf_token_then_the_stored_login(hub_server, merged_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    upload_folder(merged_dir, "test-user/from-env")
    assert hub_server.repo("test-user/from-env").head().message == DEFAULT_COMMIT_MESSAGE

    monkeypatch.delenv("HF_TOKEN")
    huggingface_hub.login(token=hub_server.token)
    upload_folder(merged_dir, "test-user/from-login")
    assert _remote_files(hub_server.repo("test-user/from-login")) == _uploadable(_snapshot(merged_dir))

    monkeypatch.setenv("HF_TOKEN", "hf_invalid_environment_token")
    upload_folder(merged_dir, "test-user/from-argument", token=hub_server.token)  # the argument wins
    assert "test-user/from-argument" in {repo_id for _, repo_id in hub_server.state.repos}


def test_endpoint_is_read_from_hf_endpoint_at_call_time(hub_server, merged_dir, monkeypatch):
    from hub_server import HubServer

    other = HubServer().start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", other.url)
        url = upload_folder(merged_dir, REPO, token=other.token)
        assert url.startswith(other.url)
        assert _remote_files(other.repo(REPO)) == _uploadable(_snapshot(merged_dir))
        assert hub_server.state.requests == []
    finally:
        other.stop()


def _assert_actionable(error: HubUploadError, folder, secret: str | None = None) -> None:
    text = str(error)
    assert str(folder.resolve()) in text
    assert "peft-merge-ext upload" in text and "push_merged(..., local_dir=" in text
    if secret is not None:
        assert secret not in "".join(traceback.format_exception(error))


def test_no_token_fails_before_any_network_call(hub_server, merged_dir):
    with pytest.raises(HubUploadError) as caught:
        upload_folder(merged_dir, REPO)
    assert "hf auth login" in str(caught.value) and "HF_TOKEN" in str(caught.value)
    _assert_actionable(caught.value, merged_dir)
    assert hub_server.state.requests == []


def test_retry_command_quotes_a_folder_with_spaces(hub_server, merged_dir):
    folder = merged_dir.rename(merged_dir.parent / "my merge")
    with pytest.raises(HubUploadError) as caught:
        upload_folder(folder, REPO)
    assert f"`peft-merge-ext upload '{folder.resolve()}' {REPO}`" in str(caught.value)


@pytest.mark.parametrize(
    "name",
    ["missing", "a file", "empty", "only git metadata"],
)
def test_bad_folders_fail_before_any_network_call(hub_server, tmp_path, name):
    folder = tmp_path / "out"
    if name == "a file":
        folder.write_text("not a folder")
    elif name == "empty":
        folder.mkdir()
    elif name == "only git metadata":
        (folder / ".git").mkdir(parents=True)
        (folder / ".git" / "HEAD").write_text("ref\n")
    with pytest.raises(HubUploadError, match="Cannot upload") as caught:
        upload_folder(folder, REPO, token=hub_server.token)
    _assert_actionable(caught.value, folder)
    assert hub_server.state.requests == []


def _invalid_token(server):
    return {"token": "hf_wrongSECRETtoken1234567890", "repo_id": REPO}


def _read_only_token(server):
    return {"token": server.read_token, "repo_id": REPO}


def _read_only_token_existing_repo(server):
    server.create_repo(REPO)  # create_repo(exist_ok=True) passes, the upload itself is refused
    return {"token": server.read_token, "repo_id": REPO}


def _foreign_namespace(server):
    return {"token": server.token, "repo_id": "someone-else/merged"}


def _repo_vanishes(server):
    server.fail("preupload", 404)
    return {"token": server.token, "repo_id": REPO}


def _missing_pull_request(server):
    return {"token": server.token, "repo_id": REPO, "revision": "refs/pr/9"}


def _server_error_on_commit(server):
    server.fail("commit", 500)
    return {"token": server.token, "repo_id": REPO}


def _server_down(server):
    server.stop()
    return {"token": server.token, "repo_id": REPO}


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (_invalid_token, "401 Unauthorized"),
        (_read_only_token, "403 Forbidden"),
        (_read_only_token_existing_repo, "403 Forbidden"),
        (_foreign_namespace, "403 Forbidden"),
        (_repo_vanishes, "was not found or is not visible"),
        (_missing_pull_request, "the revision 'refs/pr/9' does not exist"),
        (_server_error_on_commit, "server error (HTTP 500)"),
        (_server_down, "could not reach the Hub"),
    ],
    ids=[
        "invalid-token",
        "read-only-token",
        "read-only-token-existing-repo",
        "foreign-namespace",
        "not-found",
        "missing-revision",
        "500-on-commit",
        "server-down",
    ],
)
def test_failures_raise_one_actionable_error_and_keep_the_folder(hub_server, merged_dir, setup, expected):
    before = _snapshot(merged_dir)
    arguments = setup(hub_server)
    with pytest.raises(HubUploadError) as caught:
        upload_folder(merged_dir, commit_message="never lands", **arguments)
    assert expected in str(caught.value)
    assert arguments["repo_id"] in str(caught.value)
    _assert_actionable(caught.value, merged_dir, secret=arguments["token"])
    assert _snapshot(merged_dir) == before
    commits = [commit for repo in hub_server.state.repos.values() for commit in repo.commits.values()]
    assert all(commit.message != "never lands" for commit in commits)


def test_offline_mode_is_reported_as_unreachable_hub(hub_server, merged_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUploadError, match="HF_HUB_OFFLINE") as caught:
        upload_folder(merged_dir, REPO, token=hub_server.token)
    assert "OfflineModeIsEnabled" in str(caught.value)
    _assert_actionable(caught.value, merged_dir, secret=hub_server.token)
    assert hub_server.state.requests == []


def test_a_token_echoed_by_the_server_is_masked(hub_server, merged_dir):
    hub_server.fail("create_repo", 400, message=f"Bad request from Bearer {hub_server.token}")
    with pytest.raises(HubUploadError, match="HTTP 400") as caught:
        upload_folder(merged_dir, REPO, token=hub_server.token)
    assert "Bearer hf_***" in str(caught.value)
    _assert_actionable(caught.value, merged_dir, secret=hub_server.token)


def test_retry_after_a_server_error_on_commit_does_not_resend_lfs_files(hub_server, merged_dir):
    hub_server.fail("commit", 500)
    with pytest.raises(HubUploadError, match="HTTP 500"):
        upload_folder(merged_dir, REPO, token=hub_server.token)
    weights = (merged_dir / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() in hub_server.repo(REPO).lfs_objects  # uploaded before the failure
    assert hub_server.state.operations().count("lfs_upload") == 1

    url = upload_folder(merged_dir, REPO, token=hub_server.token)
    assert url.endswith(hub_server.repo(REPO).head().oid)
    assert hub_server.state.operations().count("lfs_upload") == 1
    assert _remote_files(hub_server.repo(REPO)) == _uploadable(_snapshot(merged_dir))


def test_invalid_card_metadata_is_reported_with_the_folder(hub_server, merged_dir):
    (merged_dir / "README.md").write_text("---\n: [unclosed\n---\n# Card\n")
    with pytest.raises(HubUploadError, match=r"Invalid metadata in README\.md") as caught:
        upload_folder(merged_dir, REPO, token=hub_server.token)
    _assert_actionable(caught.value, merged_dir, secret=hub_server.token)
    assert len(hub_server.repo(REPO).history()) == 1
