"""The vLLM backend without vLLM: optional import, the engine calls it makes (a stand-in engine),
the derived max_model_len, the error translation, and the adapter check. The real engine is in
tests/test_vllm_real.py (``make test-vllm``)."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest

from mllm_tune.core.backends import BackendError, MLLMRequest, make_backend
from mllm_tune.core.backends.adapter_check import (
    UnservableAdapterError,
    assert_servable,
    check_adapter,
    lora_rank_for_engine,
)
from mllm_tune.core.backends.adapter_check import main as check_main

IMAGE_TOKEN = 7


def test_missing_vllm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, whether installed or not
    with pytest.raises(BackendError, match="pip install 'mllm-tune\\[vllm\\]'"):
        make_backend("vllm", model=tmp_path)


# the stand-in engine's tokenizer: the Yes/No variants are single tokens, anything else two
VOCAB = {"Yes": 11, "No": 12, "yes": 13, "no": 14, " Yes": 15, " No": 16, "The": 17}
# T_loc prompts "say-yes" / "say-no" / "say-other": the first answer token and the first position's
# logprobs of the Yes/No ids (what vLLM returns for logprob_token_ids)
SCRIPT = {"say-yes": ("Yes", {11: -0.2, 12: -2.0, 13: -4.0, 14: -6.0, 15: -7.0, 16: -8.0}),
          "say-no": ("No", {11: -1.5, 12: -0.4, 13: -5.0, 14: -3.0, 15: -9.0, 16: -9.0}),
          "say-other": ("The", {11: -3.0, 12: -3.5, 13: -8.0, 14: -8.0, 15: -9.0, 16: -9.0})}


class FakeTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [VOCAB[text]] if text in VOCAB else [1, 2]}

    def decode(self, ids, skip_special_tokens=True):
        inv = {v: k for k, v in VOCAB.items()}
        return "".join(inv.get(i, "?") for i in ids)


def _fake_output(conv, params, lora_request, send_logprobs):
    ns = types.SimpleNamespace
    prompt_ids = [1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 2] if conv[0]["content"][0]["type"] == "image_url" else [1, 2]
    prompt = conv[0]["content"][-1]["text"]
    if prompt in SCRIPT:
        word, table = SCRIPT[prompt]
        out = ns(text=word, token_ids=[VOCAB[word]], finish_reason="stop", logprobs=None)
        want = params.get("logprob_token_ids")
        if want and send_logprobs:  # the sampled token first, then exactly the ids asked for
            first = {VOCAB[word]: ns(logprob=table.get(VOCAB[word], -0.1))}
            first.update({i: ns(logprob=table[i]) for i in want})
            out.logprobs = [first]
        return ns(outputs=[out], prompt_token_ids=prompt_ids)
    return ns(outputs=[ns(text=f" ans{'-lora' if lora_request else ''} ",
                          finish_reason="length" if params["max_tokens"] == 1 else "stop")],
              prompt_token_ids=prompt_ids)


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in ``vllm`` module that records engine starts and chat calls."""
    calls: list = []

    class LLM:
        fail_start: Exception | None = None
        fail_chat: Exception | None = None
        send_logprobs = True  # False: an engine that returns no logprobs
        visible_at_start: str | None = None

        def __init__(self, **kw):
            calls.append(("init", kw))
            LLM.visible_at_start = os.environ.get("CUDA_VISIBLE_DEVICES")
            if LLM.fail_start is not None:
                raise LLM.fail_start

        def get_tokenizer(self):
            return FakeTokenizer()

        def chat(self, convs, params, lora_request=None, use_tqdm=True):
            calls.append(("chat", len(convs), lora_request, params))
            if LLM.fail_chat is not None:
                raise LLM.fail_chat
            return [_fake_output(c, p, lora_request, LLM.send_logprobs) for c, p in zip(convs, params)]

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    vllm.SamplingParams = lambda **kw: kw
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, i, path: ("lora", name, i, path)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    return types.SimpleNamespace(calls=calls, LLM=LLM)


def _model(tmp_path, max_pos=32768):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps({
        "image_token_id": IMAGE_TOKEN, "vision_config": {"patch_size": 14, "spatial_merge_size": 2},
        "text_config": {"max_position_embeddings": max_pos}}))
    return tmp_path / "m"


def _adapter(tmp_path, name="a", **cfg):
    (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, **cfg}))
    return tmp_path / name


def test_engine_calls_with_lora_request(tmp_path, fake_vllm, synth_root):
    img = next((synth_root / "imgs").rglob("*.png"))
    adapter = _adapter(tmp_path, r=12)
    be = make_backend("vllm", model=_model(tmp_path), adapter=adapter, adapter_tasks=("loc",), max_pixels=6272,
                      min_pixels=6272, max_new_tokens={"aggr": 1}, gpu_memory_utilization=0.8, max_num_seqs=4,
                      engine_kwargs={"seed": 3})
    out = be.generate([MLLMRequest("aggr", "x"), MLLMRequest("loc", "y", str(img)), MLLMRequest("vqa", "z", str(img))])
    assert out == ["ans", "ans-lora", "ans"]
    init = fake_vllm.calls[0][1]
    assert init["enable_lora"] and init["max_lora_rank"] == 16  # the smallest rank vLLM accepts that holds 12
    assert init["mm_processor_kwargs"] == {"min_pixels": 6272, "max_pixels": 6272}
    assert init["gpu_memory_utilization"] == 0.8 and init["max_num_seqs"] == 4 and init["seed"] == 3
    assert "tensor_parallel_size" not in init and init["generation_config"] == "vllm"
    _, n, lora, params = fake_vllm.calls[1]
    assert (n, lora) == (1, ("lora", "thi_adapter", 1, str(adapter)))
    assert params[0]["temperature"] == 0.0 and params[0]["repetition_penalty"] == 1.0 and params[0]["top_k"] == 0
    assert params[0]["max_tokens"] == 64  # T_loc's default cap
    assert fake_vllm.calls[2][1:3] == (2, None) and [p["max_tokens"] for p in fake_vllm.calls[2][3]] == [1, 2048]
    assert be.identity()["adapter_tasks"] == ["loc"] and be.identity()["decoding"]["repetition_penalty"] == 1.0
    assert be.visual_token_stats()["mean_visual_tokens"] == 3 and be.capped["aggr"] == 1
    settings = be.engine_settings()
    assert settings["max_model_len_source"] == "derived" and settings["pixel_budget"]["source"] == "explicit"


def test_derived_max_model_len_follows_the_budget_and_the_model(tmp_path, fake_vllm):
    be = make_backend("vllm", model=_model(tmp_path))  # default budget 50,176 px, default caps (vqa 2048)
    # 50,176 px * 1.25 / 28^2 = 80 visual tokens + 1024 text + 2048 answer = 3152 -> 3328
    assert be.engine_kwargs_used()["max_model_len"] == 3328
    assert make_backend("vllm", model=_model(tmp_path), max_new_tokens=64).engine_kwargs_used()["max_model_len"] == 1280
    assert make_backend("vllm", model=_model(tmp_path, max_pos=2048)).engine_kwargs_used()["max_model_len"] == 2048
    explicit = make_backend("vllm", model=_model(tmp_path), max_model_len=900)
    assert explicit.engine_kwargs_used()["max_model_len"] == 900 and explicit.engine_settings()["max_model_len_source"] == "explicit"


def test_start_failure_carries_the_root_cause_and_a_fix(tmp_path, fake_vllm):
    try:
        try:
            raise ValueError("User-specified max_model_len (99999) is greater than the derived max_model_len (2048)")
        except ValueError as inner:
            raise RuntimeError("Engine core initialization failed. See root cause above.") from inner
    except RuntimeError as outer:
        fake_vllm.LLM.fail_start = outer
    be = make_backend("vllm", model=_model(tmp_path), max_model_len=99999)
    with pytest.raises(BackendError, match=r"ValueError: User-specified max_model_len \(99999\).*Fix: pass "
                                           r"--vllm-max-model-len"):
        be.generate([MLLMRequest("aggr", "x")])


def test_dead_engine_is_reported_once_with_its_cause_then_refused(tmp_path, fake_vllm):
    class EngineDeadError(Exception):
        pass

    try:
        try:
            raise ValueError("vLLM only supports modules_to_save being either None or [classifier, score]")
        except ValueError as inner:
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.") from inner
    except EngineDeadError as exc:
        fake_vllm.LLM.fail_chat = exc
    be = make_backend("vllm", model=_model(tmp_path), adapter=_adapter(tmp_path))
    with pytest.raises(BackendError, match="modules_to_save.*Fix: the adapter .*adapter_check"):
        be.generate([MLLMRequest("loc", "x")])
    with pytest.raises(BackendError, match="died earlier .*modules_to_save.*start a new process"):
        be.generate([MLLMRequest("aggr", "x")])


def test_adapter_check_lists_what_vllm_refuses(tmp_path):
    bad = _adapter(tmp_path, "bad", r=600, modules_to_save=["lm_head"], use_dora=True, bias="all",
                   target_modules="model.visual.blocks.*.qkv", init_lora_weights="pissa")
    check = check_adapter(bad)
    assert not check.ok and len(check.problems) == 6
    msg = check.message()
    for needle in ("modules_to_save=['lm_head']", "vision tower", "DoRA", "bias", "pissa", "rank 600",
                   "python -m mllm_tune.merge"):
        assert needle in msg, needle
    ok = _adapter(tmp_path, "ok", r=8, target_modules=["q_proj", "v_proj"], modules_to_save=None)
    assert check_adapter(ok).ok and lora_rank_for_engine(8) == 8 and lora_rank_for_engine(9) == 16
    with pytest.raises(UnservableAdapterError, match="above the engine's max_lora_rank 8.*--max-lora-rank 16"):
        assert_servable(_adapter(tmp_path, "r12", r=12), max_lora_rank=8)
    with pytest.raises(UnservableAdapterError, match="no adapter_config.json"):
        check_adapter(tmp_path / "nothing")


def test_adapter_check_reads_vision_weights_from_the_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    a = _adapter(tmp_path, "w", target_modules="all-linear")
    save_file({"base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight": torch.zeros(8, 4),
               "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 4)},
              a / "adapter_model.safetensors")
    assert "1 weights such as base_model.model.model.visual.blocks.0" in check_adapter(a).message()


def test_vllm_backend_refuses_an_unservable_adapter_before_the_engine(tmp_path, fake_vllm, capsys):
    bad = _adapter(tmp_path, "bad", modules_to_save=["lm_head"])
    with pytest.raises(UnservableAdapterError, match="vllm backend: adapter .* cannot be served.*retrain"):
        make_backend("vllm", model=_model(tmp_path), adapter=bad)
    assert not fake_vllm.calls  # no engine was started
    assert check_main([str(bad)]) == 1 and "modules_to_save" in capsys.readouterr().err
    assert check_main([str(_adapter(tmp_path, "fine"))]) == 0 and "--max-lora-rank 8" in capsys.readouterr().out


def test_tiny_lora_recipe_trains_a_servable_adapter():
    """recipes/tiny_lora.yaml is what tests and CI train: vLLM must be able to serve its adapters."""
    import yaml
    from pathlib import Path

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "tiny_lora.yaml").read_text())
    assert not recipe.get("lora_modules_to_save")


def test_hub_id_resolves_to_a_snapshot_and_its_commit(tmp_path, fake_vllm, monkeypatch):
    """`--mllm vllm --model org/name@rev`: the engine gets the snapshot folder, the identity the commit."""
    import huggingface_hub

    commit = "a" * 40
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"image_token_id": IMAGE_TOKEN}))
    asked = []

    def fake_download(repo_id, revision=None, **kw):
        asked.append((repo_id, revision))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    be = make_backend("vllm", model="org/tiny@v1")
    be.generate([MLLMRequest("aggr", "x")])
    assert asked == [("org/tiny", "v1")] and fake_vllm.calls[0][1]["model"] == str(snap)
    assert be.identity()["model"] == f"org/tiny@{commit}"


def test_pixel_budget_is_the_adapters_else_the_training_default(tmp_path, fake_vllm, caplog):
    adapter = _adapter(tmp_path)
    (adapter / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"size": {"shortest_edge": 3136, "longest_edge": 12544}}}))
    be = make_backend("vllm", model=_model(tmp_path), adapter=adapter)
    assert be.engine_kwargs_used()["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 12544}
    assert be.engine_settings()["pixel_budget"]["source"].startswith("adapter")
    plain = make_backend("vllm", model=_model(tmp_path))
    assert plain.engine_kwargs_used()["mm_processor_kwargs"] == {"min_pixels": 50176, "max_pixels": 50176}
    with caplog.at_level("WARNING"):
        make_backend("vllm", model=_model(tmp_path), adapter=adapter, max_pixels=50176)
    assert "differs from the one adapter" in caplog.text  # inference would not see what training saw


# -- T_loc as a probability (issue 13) ---------------------------------------------------------------

def _p(table, yes=(11, 13, 15), no=(12, 14, 16)):
    y = math.log(sum(math.exp(table[i]) for i in yes))
    n = math.log(sum(math.exp(table[i]) for i in no))
    return 1 / (1 + math.exp(n - y))


def test_localize_gives_generates_text_and_p_yes_from_the_first_tokens_logprobs(tmp_path, fake_vllm, synth_root):
    from mllm_tune.core.backends import LocAnswer

    img = str(next((synth_root / "imgs").rglob("*.png")))
    be = make_backend("vllm", model=_model(tmp_path), adapter=_adapter(tmp_path), adapter_tasks=("loc",),
                      max_new_tokens={"loc": 5})
    assert be.scores_loc is True
    ident = be.identity()
    reqs = [MLLMRequest("loc", "say-yes", img), MLLMRequest("loc", "say-no", img), MLLMRequest("loc", "say-other")]
    scored = be.localize(reqs)
    texts = be.generate(reqs)
    assert [a.text for a in scored] == texts == ["Yes", "No", "The"]  # the text generate() gives
    assert all(isinstance(a, LocAnswer) and 0.0 <= a.p_yes <= 1.0 for a in scored)
    for a, r in zip(scored, reqs):
        assert a.p_yes == pytest.approx(_p(SCRIPT[r.prompt][1]), abs=1e-12)
    assert scored[0].p_yes > 0.5 > scored[1].p_yes  # agrees with the text when the first token is Yes/No
    assert be.loc_first_not_yes_no == 1  # "The": p_yes still from the Yes/No logprobs
    chats = [c for c in fake_vllm.calls if c[0] == "chat"]
    loc_params, gen_params = chats[0][3], chats[-1][3]
    assert [p["logprob_token_ids"] for p in loc_params] == [[11, 13, 15, 12, 14, 16]] * 2 + [[11, 13, 15, 12, 14, 16]]
    assert all("logprob_token_ids" not in p for p in gen_params)
    # the same request otherwise: greedy fields and the T_loc cap
    assert [{k: v for k, v in p.items() if k != "logprob_token_ids"} for p in loc_params] == gen_params
    assert chats[0][2] is not None and gen_params[0]["max_tokens"] == 5  # loc through the adapter
    assert be.identity() == ident  # scoring does not change what the answers are cached under
    assert fake_vllm.calls[0][1]["logprobs_mode"] == "raw_logprobs"
    assert be.yes_no().as_dict() == {"yes": {"Yes": 11, "yes": 13, " Yes": 15}, "no": {"No": 12, "no": 14, " No": 16}}
    with pytest.raises(ValueError, match="T_loc requests only"):
        be.localize([MLLMRequest("vqa", "say-yes", img)])
    assert be.localize([]) == []


def test_localize_without_logprobs_from_the_engine_keeps_the_text(tmp_path, fake_vllm):
    fake_vllm.LLM.send_logprobs = False
    be = make_backend("vllm", model=_model(tmp_path))
    out = be.localize([MLLMRequest("loc", "say-yes"), MLLMRequest("loc", "say-no")])
    assert [(a.text, a.p_yes) for a in out] == [("Yes", None), ("No", None)]


# -- one GPU block per process (issue 18) ------------------------------------------------------------

def test_engine_gpus_gives_every_local_rank_a_disjoint_block():
    from mllm_tune.core.backends.vllm import engine_gpus

    eight = [str(i) for i in range(8)]
    assert [engine_gpus(r, 8, 1, eight) for r in range(8)] == [[g] for g in eight]
    blocks = [engine_gpus(r, 4, 2, eight) for r in range(4)]
    assert blocks == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert engine_gpus(1, 2, 4, eight) == ["4", "5", "6", "7"]
    assert engine_gpus(1, 2, 1, ["GPU-aa", "GPU-bb", "GPU-cc"]) == ["GPU-bb"]  # UUIDs work alike
    assert engine_gpus(0, 2, 2, ["4", "5", "6", "7"]) == ["4", "5"]  # within CUDA_VISIBLE_DEVICES
    # the launcher gave this process its own GPU (srun --gpus-per-task=1: every task sees "0")
    assert engine_gpus(3, 4, 1, ["0"], per_process=True) == ["0"]
    with pytest.raises(BackendError, match="4 processes on this node with --vllm-tensor-parallel-size 2 need 8 GPUs, "
                                           "but 4 are visible"):
        engine_gpus(0, 4, 2, eight[:4])
    with pytest.raises(BackendError, match="need 2 GPUs, but 1 are visible"):
        engine_gpus(1, 2, 1, ["0"])  # one GPU seen by the whole node, not set per process
    with pytest.raises(BackendError, match="impossible process layout"):
        engine_gpus(2, 2, 1, eight)


def test_pin_engine_gpus_sets_cuda_visible_devices_from_the_local_rank():
    from mllm_tune.core.backends.vllm import pin_engine_gpus

    env = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    got = pin_engine_gpus(None, env=env, gpu_count=2)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and got["cuda_visible_devices"] == "1"
    assert got["visible_before"] == "unset (2 GPUs)" and got["source"] == "pinned by local rank"
    env = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert pin_engine_gpus(2, env=env)["cuda_visible_devices"] == "6,7" and env["CUDA_VISIBLE_DEVICES"] == "6,7"
    env = {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "0"}  # srun --gpus-per-task=1
    assert pin_engine_gpus(1, env=env)["source"] == "as given by the launcher" and env["CUDA_VISIBLE_DEVICES"] == "0"
    for env in ({}, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):  # one process on the node: nothing to do
        assert pin_engine_gpus(1, env=env, gpu_count=8) is None and "CUDA_VISIBLE_DEVICES" not in env
    env = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert pin_engine_gpus(1, env=env, gpu_count=0) is None and env == {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    # an in-process engine cannot move once this process initialised CUDA with every GPU visible
    env = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with pytest.raises(BackendError, match="unset VLLM_ENABLE_V1_MULTIPROCESSING"):
        pin_engine_gpus(1, env=env, gpu_count=2, cuda_initialised=True)
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert pin_engine_gpus(1, env=env, gpu_count=2, cuda_initialised=False)["cuda_visible_devices"] == "1"


def test_backend_pins_its_engine_before_starting_it(tmp_path, fake_vllm, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    be = make_backend("vllm", model=_model(tmp_path), tensor_parallel_size=2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # nothing changes before the engine starts
    be.generate([MLLMRequest("aggr", "x")])
    assert fake_vllm.LLM.visible_at_start == "2,3" and fake_vllm.calls[0][1]["tensor_parallel_size"] == 2
    assert be.engine_settings()["gpus"]["cuda_visible_devices"] == "2,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    off = make_backend("vllm", model=_model(tmp_path), pin_gpus=False)
    off.generate([MLLMRequest("aggr", "x")])
    assert fake_vllm.LLM.visible_at_start == "0,1,2,3" and "gpus" not in off.engine_settings()
