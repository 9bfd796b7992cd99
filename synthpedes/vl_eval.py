"""Held-out evaluation of a SynthPEDES-VL model on a SynthPEDES split (default: test identities).

    python -m synthpedes.vl_eval --model demo_models/synthpedes-vl --root SYNTH [--split test]

Measures, on identities the model never saw:
- T_loc Yes/No accuracy on balanced pairs: ``loc_easy`` (negative = a caption of another
  identity that contradicts the image) and ``loc_hard`` (negative = the identity's caption with
  one or two mentioned attributes changed); the prediction is the larger of the "Yes" and "No"
  logits at the first answer position, and ``*_greedy_valid`` is the share of rows whose greedy
  first token is "Yes" or "No" (so the score is what greedy decoding answers);
- ``loc_near``: the negative caption describes the most similar of a few other identities (a
  retriever's near miss);
- generic attribute yes/no accuracy (``attr_yesno``), colour yes/no (``color_yesno``), and the
  ``*_swap`` variants whose wrong colours are worn elsewhere on the same person;
- one-word colour answers (``color_word``: upper, lower, hair, shoes colour; chance 0.10-0.25);
- single-aspect VQA exact match per informative aspect, and optionally the full T_vqa prompt
  (``--nfull``): the numbered answer lines compared with the ground-truth sentences.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import Sequence


def evaluate(model_dir: str, root: str, split: str = "test", n: int = 400, nvqa: int = 180, nfull: int = 0,
             threads: int = 1, batch_size: int = 32) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from synthpedes.dataset import vqa_answers
    from synthpedes.vl_pretrain import INFORMATIVE_ASPECTS, Builder
    from mllm_tune.core.prompts import DEFAULT_PROMPTS

    torch.set_num_threads(threads)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    yes_id = proc.tokenizer.convert_tokens_to_ids("Yes")
    no_id = proc.tokenizer.convert_tokens_to_ids("No")

    def encode(rows):
        texts = [proc.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False) for r in rows]
        images = [[Image.open(p).convert("RGB") for p in r["images"]] for r in rows]
        return proc(text=texts, images=images, return_tensors="pt", padding=True)

    @torch.no_grad()
    def yesno(rows):
        correct = valid = 0
        for i in range(0, len(rows), batch_size):
            b = rows[i:i + batch_size]
            logits = model(**encode(b)).logits[:, -1]
            for r, l in zip(b, logits):
                correct += ("Yes" if l[yes_id] > l[no_id] else "No") == r["label"]
                valid += int(l.argmax()) in (yes_id, no_id)
        return correct / len(rows), valid / len(rows)

    @torch.no_grad()
    def generate(rows, max_new):
        outs = []
        for i in range(0, len(rows), batch_size):
            enc = encode(rows[i:i + batch_size])
            g = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
            outs += proc.batch_decode(g[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return outs

    t0 = time.time()
    res: dict = {"model": str(model_dir), "root": str(root), "split": split, "n": n}
    # *_swap: every wrong colour is one the person wears elsewhere (reading slot by slot needed)
    for name, task, swap in (("loc_easy", "loc_easy", 0.0), ("loc_hard", "loc_hard", 0.0), ("loc_near", "loc_near", 0.0),
                             ("loc_color", "loc_color", 0.0), ("loc_color_swap", "loc_color", 1.0),
                             ("attr_yesno", "attr_yesno", 0.0), ("color_yesno", "color_yesno", 0.0),
                             ("color_yesno_swap", "color_yesno", 1.0)):
        b = Builder(root, seed=123, split=split, max_groups=4, swap_p=swap)
        acc, valid = yesno([b.draw(task) for _ in range(n)])
        res[name] = round(acc, 4)
        res[name + "_greedy_valid"] = round(valid, 4)
    b = Builder(root, seed=7, split=split)
    rows = [b.draw("loc_hard") for _ in range(32)]
    gen = generate(rows, 3)
    res["loc_greedy_generate_acc"] = round(
        sum((g.strip().lower().startswith("yes")) == (r["label"] == "Yes") for g, r in zip(gen, rows)) / len(rows), 4)
    res["loc_greedy_examples"] = gen[:4]

    # one-word colour answers: does the model read the image at all
    b = Builder(root, seed=11, split=split)
    rows = [b.attr_color() for _ in range(nvqa)]
    hits: dict[str, list[bool]] = {}
    for r, g in zip(rows, generate(rows, 4)):
        q = r["messages"][0]["content"][-1]["text"]
        hits.setdefault(q.split("?")[0], []).append(g.strip() == r["label"] or g.strip() == r["messages"][1]["content"][0]["text"])
    res["color_word"] = {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}
    res["color_word_mean"] = round(sum(map(sum, hits.values())) / sum(map(len, hits.values())), 4)

    b = Builder(root, seed=5, split=split)
    rows = []
    for i in range(nvqa):
        path, _, _, _, att = b._pick()
        k = INFORMATIVE_ASPECTS[i % len(INFORMATIVE_ASPECTS)]
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPTS.vqa_aspects[k]}]}],
                     "images": [path], "k": k, "truth": vqa_answers(att)[k]})
    per: dict[int, list[bool]] = {}
    for r, g in zip(rows, generate(rows, 24)):
        per.setdefault(r["k"], []).append(g.strip() == r["truth"])
    res["vqa_single"] = {f"{k}:{DEFAULT_PROMPTS.vqa_aspects[k][:40]}": round(sum(v) / len(v), 3) for k, v in sorted(per.items())}
    res["vqa_single_mean"] = round(sum(map(sum, per.values())) / sum(map(len, per.values())), 4)
    if nfull:
        rows = []
        for _ in range(nfull):
            path, _, _, _, att = b._pick()
            rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPTS.render_vqa()}]}],
                         "images": [path], "truth": vqa_answers(att)})
        hit: dict[int, int] = {}
        well_formed = 0
        gen = generate(rows, 230)
        for r, g in zip(rows, gen):
            lines = [re.sub(r"^\s*\d+\.\s*", "", line).strip() for line in g.strip().splitlines()]
            well_formed += len(lines) == 15
            for k in INFORMATIVE_ASPECTS:
                hit[k] = hit.get(k, 0) + (k < len(lines) and lines[k] == r["truth"][k])
        res["vqa_full"] = {str(k): round(v / nfull, 3) for k, v in sorted(hit.items())}
        res["vqa_full_mean"] = round(sum(hit.values()) / (nfull * len(hit)), 4)
        res["vqa_full_15_lines"] = round(well_formed / nfull, 3)
        res["vqa_full_example"] = gen[0]
    res["eval_seconds"] = round(time.time() - t0, 1)
    return res


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--root", required=True, help="SynthPEDES folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=400, help="rows per Yes/No task")
    ap.add_argument("--nvqa", type=int, default=180)
    ap.add_argument("--nfull", type=int, default=0, help="full T_vqa prompts to generate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    res = evaluate(a.model, a.root, a.split, a.n, a.nvqa, a.nfull, a.threads)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
