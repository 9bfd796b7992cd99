"""Model arguments given as hub ids (issue 11, item 2), against a real HTTP hub on 127.0.0.1.

huggingface_hub downloads for real from tests/hub_server.py. HF_HUB_OFFLINE=1 would also block
127.0.0.1, so the server tests leave it unset and set it only for the offline cases;
resolve_model reads HF_ENDPOINT and HF_HUB_OFFLINE at call time.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from hub_server import HubServer

from mllm_tune.core.backends import BackendError, MLLMRequest, make_backend
from mllm_tune.core.hub import ModelResolveError, parse_hub_id, resolve_model


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture(scope="module")
def tiny_adapter(tiny_qwen2_vl, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q|v)_proj", init_lora_weights=False))
    out = tmp_path_factory.mktemp("hub_adapter") / "a"
    peft.save_pretrained(out)
    return out


def test_hf_backend_loads_model_and_adapter_by_hub_id(hub, tiny_qwen2_vl, tiny_adapter):
    commit = hub.add_repo("org/tiny-vl", tiny_qwen2_vl)
    a_commit = hub.add_repo("org/tiny-lora", tiny_adapter)
    req = [MLLMRequest("aggr", "A man in a red coat.")]
    by_id = make_backend("hf", model="org/tiny-vl", adapter="org/tiny-lora@main", max_new_tokens=4)
    local = make_backend("hf", model=tiny_qwen2_vl, adapter=tiny_adapter, max_new_tokens=4)
    assert by_id.model_resolved.commit == commit and by_id.adapter_resolved.commit == a_commit
    assert by_id.generate(req) == local.generate(req)
    ident = by_id.identity()
    assert ident["model"] == f"org/tiny-vl@{commit}" and ident["adapter"] == f"org/tiny-lora@{a_commit}"
    assert ident["adapter_sha256"] == local.identity()["adapter_sha256"]
    # a new commit on main is another model for the answer cache
    hub.add_repo("org/tiny-vl", tiny_qwen2_vl, files={"README.md": b"v2"})
    again = make_backend("hf", model="org/tiny-vl", max_new_tokens=4)
    assert again.model_resolved.commit != commit and again.identity()["model"] != ident["model"]


def test_unknown_repo_bad_revision_missing_path(hub, tiny_qwen2_vl):
    hub.add_repo("org/tiny-vl", tiny_qwen2_vl)
    with pytest.raises(BackendError, match="neither a local folder .* nor a repo on the hub"):
        make_backend("hf", model="org/does-not-exist")
    with pytest.raises(BackendError, match="has no revision 'v9'"):
        make_backend("hf", model="org/tiny-vl@v9")
    with pytest.raises(BackendError, match="folder /no/such/model does not exist"):
        make_backend("hf", model="/no/such/model")  # a path, not "an invalid repo id"
    with pytest.raises(BackendError, match="adapter folder ./no-adapter does not exist"):
        make_backend("hf", model=str(tiny_qwen2_vl), adapter="./no-adapter")
    with pytest.raises(ModelResolveError, match="not a local folder and not a hub id"):
        resolve_model("not a repo")
    assert parse_hub_id("Qwen/Qwen2-VL-7B-Instruct@refs/pr/1") == ("Qwen/Qwen2-VL-7B-Instruct", "refs/pr/1")
    assert not [r for r in hub.requests if "no-adapter" in r[1] or "no/such" in r[1]]  # paths never asked the hub


def test_offline_uses_the_cache_or_says_why_not(hub, tiny_qwen2_vl, monkeypatch):
    commit = hub.add_repo("org/tiny-vl", tiny_qwen2_vl)
    online = resolve_model("org/tiny-vl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    cached = resolve_model("org/tiny-vl")
    assert (cached.path, cached.commit) == (online.path, commit)
    assert resolve_model(f"org/tiny-vl@{commit}").path == online.path
    assert make_backend("hf", model="org/tiny-vl", max_new_tokens=2).identity()["model"] == f"org/tiny-vl@{commit}"
    with pytest.raises(ModelResolveError, match="not in the HF cache and HF_HUB_OFFLINE=1"):
        resolve_model("org/never-downloaded")
    assert len(hub.requests) == n  # offline means no request at all


def test_unreachable_hub_and_nothing_cached(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ModelResolveError, match="could not be downloaded .* not in the HF cache"):
        resolve_model("org/anything")


def test_clip_retriever_spec_by_hub_id(hub, tiny_clip, synth_root):
    from mllm_tune.core.pedes import load_split
    from mllm_tune.core.retrievers import RetrieverLoadError, load_retriever

    hub.add_repo("org/tiny-clip", tiny_clip)
    split = load_split(synth_root, "cuhk-pedes", "test")
    by_id, local = load_retriever("org/tiny-clip"), load_retriever(str(tiny_clip))
    texts = split.query_texts[:3]
    assert torch.allclose(by_id.encode_texts(texts), local.encode_texts(texts), atol=1e-6)
    with pytest.raises(RetrieverLoadError, match="neither a local folder"):
        load_retriever("org/no-clip")
    with pytest.raises(RetrieverLoadError, match="does not exist"):
        load_retriever("./no/clip/here")
