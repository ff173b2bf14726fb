"""The fake Hub of tests/hub_server.py, driven by the real huggingface_hub client (no mocks)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

# huggingface_hub's own LFS upload passes a file object as `data=`, which httpx2 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def _write_folder(root, weights: bytes):
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(weights)
    (root / "README.md").write_text("---\nlicense: apache-2.0\ntags: [lora]\n---\n# Tiny merged model\n")
    (root / "nested").mkdir(exist_ok=True)
    (root / "nested" / "notes.txt").write_text("hello from a sub-folder\n")
    return root


def _safetensors_bytes(seed: int) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save({"weight": rng.standard_normal((16, 8)).astype(np.float32)})


def test_client_endpoint_points_at_the_server(hub_server):
    from huggingface_hub import constants, hf_api

    assert hub_server.url == constants.ENDPOINT
    assert hf_api.api.endpoint == hub_server.url  # HF_ENDPOINT was set before huggingface_hub was imported
    assert constants.HF_HUB_DISABLE_XET
    assert not constants.is_offline_mode()


def test_whoami_accepts_known_tokens_and_rejects_others(hub_server):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    info = api.whoami(token=hub_server.token)
    assert info["name"] == hub_server.user
    assert info["auth"]["accessToken"]["role"] == "write"
    assert [org["name"] for org in info["orgs"]] == [hub_server.org]
    assert api.whoami(token=hub_server.read_token)["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as caught:
        api.whoami(token="hf_not_a_valid_token")
    assert caught.value.response.status_code == 401


def test_create_repo_private_flag_conflict_and_permissions(hub_server):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=hub_server.token)
    url = api.create_repo("secret", private=True)
    assert url.repo_id == f"{hub_server.user}/secret"
    assert hub_server.repo(url.repo_id).private is True
    assert api.create_repo(f"{hub_server.org}/open").repo_id == f"{hub_server.org}/open"
    assert hub_server.repo(f"{hub_server.org}/open").private is False

    with pytest.raises(HfHubHTTPError) as caught:
        api.create_repo("secret")
    assert caught.value.response.status_code == 409
    assert api.create_repo("secret", exist_ok=True).repo_id == url.repo_id  # 409 swallowed, like on the Hub

    with pytest.raises(HfHubHTTPError) as caught:
        api.create_repo("someone-else/repo")
    assert caught.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as caught:
        HfApi(token=hub_server.read_token).create_repo("read-only-attempt")
    assert caught.value.response.status_code == 403


def test_upload_folder_regular_and_lfs_files_round_trip(hub_server, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download

    weights = _safetensors_bytes(0)
    folder = _write_folder(tmp_path / "out", weights)
    api = HfApi(token=hub_server.token)
    repo_id = api.create_repo("tiny").repo_id
    info = api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message="Add model", commit_description="Two files and a folder"
    )

    repo = hub_server.repo(repo_id)
    head = repo.head("main")
    assert info.oid == head.oid
    assert info.commit_url == f"{hub_server.url}/{repo_id}/commit/{head.oid}"
    assert (head.message, head.description) == ("Add model", "Two files and a folder")
    assert set(head.added) == {"model.safetensors", "README.md", "nested/notes.txt"}
    assert head.lfs_paths == {"model.safetensors"}
    assert repo.lfs_objects == {hashlib.sha256(weights).hexdigest(): weights}
    files = repo.files("main")
    assert files["model.safetensors"] == weights
    assert files["README.md"] == (folder / "README.md").read_bytes()
    assert ".gitattributes" in files  # the initial commit's file is still there
    assert [op for op in hub_server.state.operations() if op.startswith("lfs")] == [
        "lfs_batch",
        "lfs_upload",
        "lfs_verify",
    ]

    for name in ("model.safetensors", "nested/notes.txt"):
        path = hf_hub_download(repo_id, name, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == (folder / name).read_bytes()


def test_large_files_go_through_lfs_whatever_their_extension(hub_server, tmp_path):
    from huggingface_hub import HfApi

    hub_server.state.lfs_size_threshold = 1024
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "big.txt").write_bytes(b"x" * 2048)
    (folder / "small.txt").write_bytes(b"y" * 100)
    api = HfApi(token=hub_server.token)
    repo_id = api.create_repo("sizes").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert hub_server.repo(repo_id).head().lfs_paths == {"big.txt"}


def test_branches_refs_and_pull_requests(hub_server, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

    api = HfApi(token=hub_server.token)
    repo_id = api.create_repo("branching").repo_id
    api.create_branch(repo_id, branch="dev")
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    assert {ref.name for ref in api.list_repo_refs(repo_id).branches} == {"main", "dev"}

    api.create_commit(repo_id, [CommitOperationAdd("a.txt", b"on dev")], commit_message="dev commit", revision="dev")
    pr = api.create_commit(
        repo_id,
        [CommitOperationAdd("b.txt", b"in a PR")],
        commit_message="Open PR",
        commit_description="Please merge",
        create_pr=True,
    )
    repo = hub_server.repo(repo_id)
    assert pr.pr_url == f"{hub_server.url}/{repo_id}/discussions/1"
    assert pr.pr_revision == "refs/pr/1"
    assert repo.pull_requests[1].title == "Open PR"
    assert repo.pull_requests[1].description == "Please merge"
    assert repo.pull_requests[1].target_branch == "main"
    assert set(repo.files("main")) == {".gitattributes"}
    assert repo.files("dev")["a.txt"] == b"on dev"
    assert repo.files("refs/pr/1")["b.txt"] == b"in a PR"
    assert [commit.message for commit in repo.history("dev")] == ["dev commit", "initial commit"]
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [ref.ref for ref in refs.pull_requests] == ["refs/pr/1"]
    path = hf_hub_download(repo_id, "b.txt", revision="refs/pr/1", cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == b"in a PR"


def test_parent_commit_mismatch_and_invalid_card_metadata_are_rejected(hub_server):
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=hub_server.token)
    repo_id = api.create_repo("guarded").repo_id
    first = api.create_commit(repo_id, [CommitOperationAdd("x.txt", b"1")], commit_message="one")
    api.create_commit(repo_id, [CommitOperationAdd("x.txt", b"2")], commit_message="two")
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_commit(repo_id, [CommitOperationAdd("x.txt", b"3")], commit_message="late", parent_commit=first.oid)
    assert caught.value.response.status_code == 412
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.create_commit(repo_id, [CommitOperationAdd("README.md", b"---\n: [bad\n---\n")], commit_message="card")
    assert [commit.message for commit in hub_server.repo(repo_id).history()] == ["two", "one", "initial commit"]


def test_private_repos_are_invisible_without_their_owners_token(hub_server, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(token=hub_server.token)
    repo_id = api.create_repo("hidden", private=True).repo_id
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo_id)
    path = hf_hub_download(repo_id, "s.txt", token=hub_server.token, cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"secret"
    outsider = hub_server.add_token(user="outsider")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=outsider).model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "s.txt", token=False, cache_dir=tmp_path / "anonymous")


def test_injected_failures_and_server_down(hub_server):
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi(token=hub_server.token)
    repo_id = api.create_repo("flaky").repo_id
    hub_server.fail("commit", 500)
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_commit(repo_id, [CommitOperationAdd("w.bin", b"\0" * 64)], commit_message="boom")
    assert caught.value.response.status_code == 500
    repo = hub_server.repo(repo_id)
    assert hashlib.sha256(b"\0" * 64).hexdigest() in repo.lfs_objects  # the LFS upload went through first
    assert [commit.message for commit in repo.history()] == ["initial commit"]

    hub_server.fail("preupload", 404)
    with pytest.raises(RepositoryNotFoundError):
        api.create_commit(repo_id, [CommitOperationAdd("x.txt", b"1")], commit_message="gone")
    api.create_commit(repo_id, [CommitOperationAdd("x.txt", b"1")], commit_message="works again")  # times=1

    with hub_server.down(), pytest.raises(httpx2.ConnectError):
        api.whoami()
    assert api.whoami()["name"] == hub_server.user


def test_stored_login_is_isolated_per_test(hub_server):
    import huggingface_hub

    assert huggingface_hub.get_token() is None
    huggingface_hub.login(token=hub_server.token)  # validates the token with whoami, stores it in a temporary home
    assert huggingface_hub.get_token() == hub_server.token
    assert huggingface_hub.HfApi().whoami()["name"] == hub_server.user
