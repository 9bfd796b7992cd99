"""Tiny, randomly initialised models saved exactly like real checkpoints.

    python -m synthpedes.tiny --family {qwen2_vl,qwen2_5_vl,qwen3_vl,clip} --out DIR

Tests and the demo load these folders with the same calls users make on real checkpoints
(``AutoModelForImageTextToText`` / ``AutoProcessor`` / ``CLIPModel`` / ``CLIPProcessor``), so
every code path is the real one. Nothing is downloaded: the tokenizer is a byte-level BPE
trained here on the SynthPEDES vocabulary and the project's prompts (whole words for colours
and garments, so no attribute is split into meaningless pieces), and the Qwen chat templates
are the ones TRL ships, byte for byte, so TRL's assistant-only loss recognises them.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "clip")

# Qwen2 pre-tokenizer split pattern (digits one by one, words with a leading space).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Defaults: small enough for seconds-long CPU tests; every value can be overridden. Head size 32
# (64 / 2 heads, grouped 2:1 like the real models): vLLM's CPU attention serves head sizes 32, 64,
# 80, ... only, and 16 fails with "Unsupported CPU attention configuration" (tests/test_vllm_real.py).
QWEN_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "vision_depth": 1, "vision_hidden": 32, "vision_heads": 1,
    "image_pixels": 112 * 56,  # min = max pixels: 8 visual tokens per image after the 2x2 merge
    # Larger than transformers' 0.02 so that a LoRA on the language model alone can move the answer
    # logits (with tied embeddings of std 0.02 they stay within ~±1.3 after the final norm, and a
    # few-step LoRA could not overfit a pair without training lm_head, which vLLM cannot serve).
    "initializer_range": 0.1,
}
# Named architectures: ``--preset synthpedes-vl`` is the shipped demo MLLM (0.90M parameters;
# docs/synthpedes_vl.md says why this size).
PRESETS: dict[str, dict[str, Any]] = {
    "synthpedes-vl": {
        "hidden_size": 128, "num_hidden_layers": 3, "intermediate_size": 384, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vision_depth": 1, "vision_hidden": 64, "vision_heads": 2, "image_pixels": 6272,
        "initializer_range": 0.02,
    },
}
CLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
    "projection_dim": 64, "image_size": (128, 64), "patch_size": 16, "max_text_len": 77,
}


def tokenizer_corpus(n_captions: int = 3000, seed: int = 0) -> list[str]:
    """Texts the tiny tokenizers are trained on: SynthPEDES captions and VQA answers, the
    project's prompts, and the generic words of chat and answers."""
    from synthpedes.dataset import make_caption, sample_attributes, vqa_answers
    from mllm_tune.core.prompts import DEFAULT_PROMPTS

    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n_captions // 2):
        a = sample_attributes(rng)
        texts.extend(make_caption(a, rng)[0] for _ in range(2))
        texts.extend(vqa_answers(a))
    p = DEFAULT_PROMPTS
    texts += [p.render_loc("x"), p.render_vqa(), p.render_aggr("x", ["y"]), p.render_dec("x"), p.render_rwt("x", 3)]
    texts += ["Yes", "No", "Yes.", "No.", "yes", "no", "system", "user", "assistant", "You are a helpful assistant."]
    texts += [str(i) for i in range(100)]
    return texts


def train_qwen_tokenizer(vocab_size: int = 1200, seed: int = 0):
    """A Qwen2-style byte-level BPE tokenizer with the Qwen special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    vocab = tok.get_vocab()
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    fast = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                              eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIAL if t not in ("<|endoftext|>", "<|im_end|>")]})
    return fast


def trl_chat_template(family: str) -> str:
    """The original Qwen-VL chat template as TRL ships it (TRL recognises it byte for byte and
    swaps in its training variant for assistant-only loss)."""
    import trl

    name = "qwen3_vl.jinja" if family == "qwen3_vl" else "qwen2_5_vl.jinja"
    return (Path(trl.__file__).parent / "chat_templates" / name).read_text(encoding="utf-8")


def _qwen_config(family: str, tokenizer, o: dict[str, Any]):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    vocab = len(tokenizer)
    h, heads = o["hidden_size"], o["num_attention_heads"]
    head_dim = h // heads
    # multimodal rope: the three sections must sum to head_dim / 2
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    text = {
        "vocab_size": vocab, "hidden_size": h, "intermediate_size": o["intermediate_size"],
        "num_hidden_layers": o["num_hidden_layers"], "num_attention_heads": heads,
        "num_key_value_heads": o["num_key_value_heads"], "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        "tie_word_embeddings": True, "pad_token_id": tokenizer.pad_token_id, "initializer_range": o["initializer_range"],
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"), "eos_token_id": tokenizer.eos_token_id,
    }
    vd, vh, vheads = o["vision_depth"], o["vision_hidden"], o["vision_heads"]
    common = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
              "tie_word_embeddings": True}
    if family == "qwen2_vl":
        vision = {"depth": vd, "embed_dim": vh, "hidden_size": h, "num_heads": vheads, "mlp_ratio": 2,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if family == "qwen2_5_vl":
        vision = {"depth": vd, "hidden_size": vh, "intermediate_size": 2 * vh, "num_heads": vheads,
                  "out_hidden_size": h, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "window_size": 56, "fullatt_block_indexes": [vd - 1]}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    text["head_dim"] = head_dim
    vision = {"depth": vd, "hidden_size": vh, "intermediate_size": 2 * vh, "num_heads": vheads,
              "out_hidden_size": h, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0] if vd > 1 else []}
    return Qwen3VLConfig(text_config=text, vision_config=vision, **common)


def _qwen_processor(family: str, tokenizer, pixels: int):
    from transformers import AutoImageProcessor, AutoProcessor, AutoVideoProcessor  # noqa: F401
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    size = {"shortest_edge": pixels, "longest_edge": pixels}
    if family == "qwen3_vl":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        image_proc = Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
        video_proc = Qwen3VLVideoProcessor(size={"shortest_edge": pixels, "longest_edge": pixels * 4}, patch_size=16)
        cls = Qwen3VLProcessor
    else:
        image_proc = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
        video_proc = Qwen2VLVideoProcessor(size={"shortest_edge": pixels, "longest_edge": pixels * 4})
        cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(image_processor=image_proc, tokenizer=tokenizer, video_processor=video_proc,
               chat_template=trl_chat_template(family))


def build_tiny(family: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny random model of ``family`` with its processor and save both to ``out_dir``."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family '{family}': choose one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family == "clip":
        return _build_clip(out, seed, {**CLIP_DEFAULTS, **overrides})
    unknown = set(overrides) - set(QWEN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tiny Qwen setting(s) {sorted(unknown)}; known: {sorted(QWEN_DEFAULTS)}")
    o = {**QWEN_DEFAULTS, **overrides}
    if family == "qwen3_vl" and "image_pixels" not in overrides:
        o["image_pixels"] = 128 * 64  # 16-px patches in multiples of 32: also 8 visual tokens
    from transformers import AutoModelForImageTextToText

    tokenizer = _cached_qwen_tokenizer(seed)
    config = _qwen_config(family, tokenizer, o)
    model = AutoModelForImageTextToText.from_config(config)
    processor = _qwen_processor(family, tokenizer, int(o["image_pixels"]))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    logger.info("tiny %s (%.2fM parameters) saved to %s", family, n / 1e6, out)
    return out


@lru_cache(maxsize=2)
def _cached_qwen_tokenizer(seed: int):
    return train_qwen_tokenizer(seed=seed)


def train_clip_tokenizer(vocab_size: int = 1000, seed: int = 0, max_len: int = 77):
    """A CLIP-style tokenizer (lower-cased, byte-level BPE, start/end of text) trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[(t, tok.token_to_id(t)) for t in specials])
    # pad with the end token, as OpenAI CLIP checkpoints on the hub do; CLIP's text model pools at
    # the first occurrence of eos_token_id (written into the config below).
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=max_len)


def _build_clip(out: Path, seed: int, o: dict[str, Any]) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = train_clip_tokenizer(seed=seed, max_len=int(o["max_text_len"]))
    h, w = o["image_size"]
    text = {"vocab_size": len(tokenizer), "hidden_size": o["hidden_size"], "intermediate_size": o["intermediate_size"],
            "num_hidden_layers": o["num_hidden_layers"], "num_attention_heads": o["num_attention_heads"],
            "max_position_embeddings": int(o["max_text_len"]), "projection_dim": o["projection_dim"],
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    # a square vision config of side max(h, w); the retriever interpolates to the 2:1 person crop
    vision = {"hidden_size": o["hidden_size"], "intermediate_size": o["intermediate_size"],
              "num_hidden_layers": o["num_hidden_layers"], "num_attention_heads": o["num_attention_heads"],
              "image_size": max(h, w), "patch_size": o["patch_size"], "projection_dim": o["projection_dim"]}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=o["projection_dim"])
    model = CLIPModel(config)
    image_proc = CLIPImageProcessor(size={"height": h, "width": w}, crop_size={"height": h, "width": w},
                                    do_center_crop=False, do_resize=True)
    processor = CLIPProcessor(image_processor=image_proc, tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("tiny CLIP (%.2fM parameters) saved to %s", sum(p.numel() for p in model.parameters()) / 1e6, out)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description="Build a tiny random model + processor and save_pretrained it.")
    ap.add_argument("--family", required=True, choices=FAMILIES)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden-size", type=int, default=None)
    ap.add_argument("--num-hidden-layers", type=int, default=None)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a named Qwen-VL architecture (synthpedes-vl: the demo MLLM, use with --family qwen2_vl)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.preset and args.family == "clip":
        ap.error(f"--preset {args.preset} is a Qwen-VL architecture; use --family qwen2_vl")
    over = dict(PRESETS[args.preset]) if args.preset else {}
    over.update({k: v for k, v in {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers}.items() if v})
    out = build_tiny(args.family, args.out, seed=args.seed, **over)
    print(f"tiny {args.family} saved to {out}")
    return out


if __name__ == "__main__":
    main()
