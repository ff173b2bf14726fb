"""push_merged end to end against the local Hub-compatible server (real huggingface_hub client)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from peft_merge_ext.errors import HubUploadError

INPUT = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(INPUT).logits


def _model_from_bytes(files: dict[str, bytes]):
    from safetensors.torch import load

    state = load(files["model.safetensors"])
    config = json.loads(files["config.json"])
    model = tiny_llama()
    assert config["dtype"] == "float32"
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


def test_push_uploads_weights_card_and_commit_details(llama_two_adapters, hub_server):
    from huggingface_hub import ModelCard

    model = llama_two_adapters
    expected = _logits(model)
    url = model.push_merged(
        "test-user/merged",
        token=hub_server.token,
        private=True,
        commit_message="Merge a",
        commit_description="two tiny adapters",
    )
    repo = hub_server.state.repo("test-user/merged")
    commit = repo.head("main")
    assert commit.oid in url and commit.message == "Merge a" and commit.description == "two tiny adapters"
    assert repo.private
    files = repo.files("main")
    assert {"model.safetensors", "config.json", "README.md", "generation_config.json"} <= set(files)
    torch.testing.assert_close(_logits(_model_from_bytes(files)), expected, rtol=1e-5, atol=1e-5)
    card = ModelCard(files["README.md"].decode())
    assert "peft-merge-ext" in card.data.tags and card.data.library_name == "transformers"
    assert hub_server.token not in files["README.md"].decode()


def test_push_to_branch_and_pull_request(llama_two_adapters, hub_server):
    model = llama_two_adapters
    model.push_merged("test-user/merged", token=hub_server.token)
    model.push_merged(
        "test-user/merged",
        token=hub_server.token,
        revision="v2",
        combination_type="weighted",
        adapters=["a", "b"],
        weights=[0.5, 0.5],
    )
    repo = hub_server.state.repo("test-user/merged")
    assert "v2" in repo.branches and "weighted" in repo.files("v2")["README.md"].decode()
    url = model.push_merged("test-user/merged", token=hub_server.token, create_pr=True, merge_into_base=False)
    assert "/discussions/" in url or "refs/pr" in url or "pull" in url
    assert repo.pull_requests


def test_failed_upload_keeps_local_copy_and_retry_reuses_it(llama_two_adapters, hub_server, tmp_path):
    model = llama_two_adapters
    expected = _logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hub_server.fail("commit", 500)
    with pytest.raises(HubUploadError) as caught:
        model.push_merged("test-user/merged", token=hub_server.token)
    message = str(caught.value)
    kept = [part for part in message.split() if "peft-merge-ext-push-" in part]
    assert kept, message
    from pathlib import Path

    folder = Path(kept[0].strip("'\"`.,()"))
    assert list(model.active_adapters) == ["a"] and sorted(model.peft_config) == ["a", "b"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model), expected)
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
    before = (folder / "model.safetensors").stat().st_mtime_ns
    # Retry from the kept folder: uploaded as is, nothing recomputed (the folder is not rewritten).
    model.push_merged("test-user/merged", token=hub_server.token, local_dir=folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    files = hub_server.state.repo("test-user/merged").files("main")
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_unauthorized_push_fails_before_merging(llama_two_adapters, hub_server, tmp_path):
    """A bad token is found by the pre-flight check: nothing is merged or written, no temporary folder is left."""
    import tempfile
    from pathlib import Path

    before = set(Path(tempfile.gettempdir()).glob("peft-merge-ext-push-*"))
    with pytest.raises(HubUploadError):
        llama_two_adapters.push_merged("test-user/merged", token="hf_invalid", local_dir=tmp_path / "kept")
    assert not (tmp_path / "kept").exists()
    with pytest.raises(HubUploadError):
        llama_two_adapters.push_merged("test-user/merged", token="hf_invalid")
    assert set(Path(tempfile.gettempdir()).glob("peft-merge-ext-push-*")) == before
    with pytest.raises(KeyError):  # not even the repository was created
        hub_server.state.repo("test-user/merged")


def test_local_dir_with_foreign_files_is_refused(llama_two_adapters, hub_server, tmp_path):
    """Only the files the merge wrote are uploaded: a local_dir holding anything else is refused before merging."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / ".env").write_text("SECRET=1")
    (folder / "README.md").write_text("---\n---\nmine")
    with pytest.raises(Exception, match="not an earlier output of this same merge"):
        llama_two_adapters.push_merged("test-user/merged", token=hub_server.token, local_dir=folder)
    assert (folder / ".env").read_text() == "SECRET=1"
    # An earlier push's folder of a different merge is refused too (its files would not be this merge's).
    model = llama_two_adapters
    model.push_merged("test-user/merged", token=hub_server.token, local_dir=tmp_path / "first")
    with pytest.raises(Exception, match="not an earlier output of this same merge"):
        model.push_merged("test-user/merged", token=hub_server.token, local_dir=tmp_path / "first", adapters=["b"])
    uploaded = set(hub_server.state.repo("test-user/merged").files("main"))
    assert not any(name.startswith((".peft-merge-ext", ".env")) for name in uploaded), uploaded
    assert "README.md" in uploaded and "model.safetensors" in uploaded
