"""The vLLM backend: optional import, and the engine calls it makes (with a stand-in engine)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from mllm_tune.core.backends import BackendError, MLLMRequest, make_backend


def test_missing_vllm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, whether installed or not
    with pytest.raises(BackendError, match="pip install 'mllm-tune\\[vllm\\]'"):
        make_backend("vllm", model=tmp_path)


def test_engine_calls_with_lora_request(tmp_path, monkeypatch, synth_root):
    calls = []

    class LLM:
        def __init__(self, **kw):
            calls.append(("init", kw))

        def chat(self, convs, params, lora_request=None, use_tqdm=True):
            calls.append(("chat", len(convs), lora_request))
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f" ans{'-lora' if lora_request else ''} ")]) for _ in convs]

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    vllm.SamplingParams = lambda **kw: kw
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, i, path: ("lora", name, i, path)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 12}))
    img = next((synth_root / "imgs").rglob("*.png"))
    be = make_backend("vllm", model=tmp_path / "m", adapter=tmp_path / "a", adapter_tasks=("loc",), max_pixels=6272)
    out = be.generate([MLLMRequest("aggr", "x"), MLLMRequest("loc", "y", str(img)), MLLMRequest("vqa", "z", str(img))])
    assert out == ["ans", "ans-lora", "ans"]
    init = calls[0][1]
    assert init["enable_lora"] and init["max_lora_rank"] == 16 and init["mm_processor_kwargs"] == {"max_pixels": 6272}
    assert calls[1] == ("chat", 1, ("lora", "thi_adapter", 1, str(tmp_path / "a"))) and calls[2][1:] == (2, None)
    assert be.identity()["adapter_tasks"] == ["loc"]
