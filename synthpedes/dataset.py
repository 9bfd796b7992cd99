"""SynthPEDES: a procedural pedestrian dataset in the CUHK-PEDES layout.

    python -m synthpedes.dataset --out DIR --num-ids 300 --seed 0

writes ``DIR/reid_raw.json`` (CUHK-PEDES records: split, id (1-based), file_path under
``imgs/``, captions), ``DIR/imgs/*.png`` and ``DIR/attributes.json`` (the ground truth: every
identity's attributes, and per caption the attributes it mentions). Captions mention a random
subset of the attributes, so many queries fit several identities: the ambiguity that THI is
meant to resolve. Everything is deterministic for a seed.

The ground truth also feeds the oracle MLLM backend and the SynthPEDES-VL pre-training data,
so the attribute vocabulary and the ground-truth VQA answers live here.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

IMAGE_SIZE = (64, 128)  # width, height: the 1:2-3 aspect of pedestrian crops

COLORS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
    "red": (200, 30, 30),
    "blue": (30, 60, 200),
    "green": (30, 150, 50),
    "yellow": (230, 210, 40),
    "purple": (130, 40, 160),
    "orange": (240, 130, 20),
    "pink": (240, 150, 190),
    "brown": (120, 70, 30),
}
HAIR_COLORS = ("black", "brown", "blonde", "gray")
HAIR_RGB = {"black": (20, 20, 20), "brown": (100, 60, 25), "blonde": (225, 200, 110), "gray": (160, 160, 160)}
UPPER_TYPES = ("t-shirt", "shirt", "jacket", "coat", "sweater")
UPPER_COLORS = ("black", "white", "gray", "red", "blue", "green", "yellow", "purple", "orange", "pink")
LOWER_TYPES = ("trousers", "jeans", "shorts", "skirt")
LOWER_COLORS = ("black", "blue", "gray", "white", "brown", "red", "green")
SHOE_COLORS = ("black", "white", "brown", "red", "blue")
BAG_TYPES = ("none", "backpack", "handbag", "shoulder bag")
BAG_COLORS = ("black", "brown", "red", "blue", "gray")
SKIN = ((240, 200, 170), (200, 150, 110), (140, 95, 60))

# Attribute keys, in the order captions and VQA answers mention them.
ATTRIBUTE_KEYS = (
    "gender", "hair_length", "hair_color", "upper_type", "upper_color", "sleeve",
    "lower_type", "lower_color", "lower_length", "shoes_color", "bag", "bag_color", "hat", "glasses",
)


@dataclass(frozen=True)
class PersonAttributes:
    gender: str
    hair_length: str
    hair_color: str
    upper_type: str
    upper_color: str
    sleeve: str
    lower_type: str
    lower_color: str
    lower_length: str
    shoes_color: str
    bag: str
    bag_color: str  # "" when bag == "none"
    hat: bool
    glasses: bool


def sample_attributes(rng: random.Random) -> PersonAttributes:
    gender = rng.choice(("man", "woman"))
    hair_length = rng.choices(("short", "long"), weights=(8, 2) if gender == "man" else (3, 7))[0]
    upper_type = rng.choice(UPPER_TYPES)
    sleeve = "long" if upper_type in ("jacket", "coat", "sweater") else rng.choice(("short", "long"))
    lower_type = rng.choices(LOWER_TYPES, weights=(4, 4, 2, 0.3 if gender == "man" else 3))[0]
    lower_length = {"shorts": "short", "skirt": rng.choice(("short", "long"))}.get(lower_type, "long")
    bag = rng.choices(BAG_TYPES, weights=(4, 3, 2, 2))[0]
    return PersonAttributes(
        gender=gender,
        hair_length=hair_length,
        hair_color=rng.choices(HAIR_COLORS, weights=(6, 3, 1.5, 1))[0],
        upper_type=upper_type,
        upper_color=rng.choice(UPPER_COLORS),
        sleeve=sleeve,
        lower_type=lower_type,
        lower_color=rng.choice(LOWER_COLORS),
        lower_length=lower_length,
        shoes_color=rng.choice(SHOE_COLORS),
        bag=bag,
        bag_color="" if bag == "none" else rng.choice(BAG_COLORS),
        hat=rng.random() < 0.2,
        glasses=rng.random() < 0.25,
    )


# -- drawing ---------------------------------------------------------------------------------

def render_person(a: PersonAttributes, rng: random.Random, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """Draw one view of a person: position, scale, background, light and occlusion vary."""
    W, H = size
    nprng = np.random.default_rng(rng.getrandbits(32))
    # background: a vertical gradient between two random dull colours, plus a ground band
    top = np.array([rng.randint(60, 200) for _ in range(3)], dtype=np.float32)
    bot = np.array([rng.randint(40, 160) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
    bg = (top * (1 - t) + bot * t) * np.ones((1, W, 1), dtype=np.float32)
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = rng.uniform(0.82, 1.0) * H / 128.0
    cx = W / 2 + rng.uniform(-5, 5) * W / 64
    y0 = rng.uniform(2, 10) * H / 128
    skin = rng.choice(SKIN)

    def box(x0, y0_, x1, y1, col):
        d.rectangle([cx + x0 * s, y0 + y0_ * s, cx + x1 * s, y0 + y1 * s], fill=col)

    hair = HAIR_RGB[a.hair_color]
    upper = COLORS[a.upper_color]
    lower = COLORS[a.lower_color]
    # long hair falls behind the shoulders
    if a.hair_length == "long":
        box(-9, 4, 9, 38, hair)
    d.ellipse([cx - 7 * s, y0 + 4 * s, cx + 7 * s, y0 + 20 * s], fill=skin)  # head
    box(-7, 3, 7, 8, hair)  # hair on top
    if a.hat:
        box(-9, 0, 9, 6, COLORS["black"] if a.upper_color != "black" else COLORS["red"])
    if a.glasses:
        box(-6, 10, 6, 12, (10, 10, 10))
    # torso and arms
    torso_bot = 62 if a.upper_type != "coat" else 72
    box(-11, 21, 11, torso_bot, upper)
    arm_len = 40 if a.sleeve == "long" else 14
    box(-16, 22, -11, 22 + arm_len, upper)
    box(11, 22, 16, 22 + arm_len, upper)
    if a.sleeve == "short":
        box(-16, 36, -11, 62, skin)
        box(11, 36, 16, 62, skin)
    if a.upper_type in ("jacket", "coat"):
        box(-1, 21, 1, torso_bot, tuple(max(0, c - 60) for c in upper))  # zip line
    if a.upper_type == "shirt":
        box(-4, 21, 4, 25, (240, 240, 240))  # collar
    # lower body
    if a.lower_type == "skirt":
        bot_y = 90 if a.lower_length == "short" else 108
        d.polygon([(cx - 11 * s, y0 + 62 * s), (cx + 11 * s, y0 + 62 * s), (cx + 15 * s, y0 + bot_y * s),
                   (cx - 15 * s, y0 + bot_y * s)], fill=lower)
        box(-8, bot_y, -2, 114, skin)
        box(2, bot_y, 8, 114, skin)
    else:
        leg_end = 86 if a.lower_length == "short" else 114
        box(-10, 62, -1, leg_end, lower)
        box(1, 62, 10, leg_end, lower)
        if leg_end < 114:
            box(-9, leg_end, -2, 114, skin)
            box(2, leg_end, 9, 114, skin)
        if a.lower_type == "jeans":
            box(-10, 62, 10, 64, tuple(max(0, c - 50) for c in lower))  # waistband seam
    shoes = COLORS[a.shoes_color]
    box(-11, 114, -1, 119, shoes)
    box(1, 114, 11, 119, shoes)
    # bag
    if a.bag != "none":
        bc = COLORS[a.bag_color]
        if a.bag == "backpack":
            box(11, 24, 18, 50, bc)
            box(-11, 24, -8, 50, bc)  # straps visible in front
        elif a.bag == "handbag":
            box(16, 56, 24, 68, bc)
        else:
            box(-20, 44, -12, 58, bc)
            d.line([cx - 16 * s, y0 + 44 * s, cx + 8 * s, y0 + 22 * s], fill=bc, width=max(1, int(2 * s)))
    # occasional occlusion by a passer-by or an object
    if rng.random() < 0.12:
        ox = rng.choice((0, W * 0.65))
        col = tuple(rng.randint(40, 200) for _ in range(3))
        d.rectangle([ox, H * rng.uniform(0.4, 0.7), ox + W * 0.35, H], fill=col)
    # light and sensor noise
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.8, 1.15)
    arr += nprng.normal(0, 6, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


# -- language --------------------------------------------------------------------------------

def _phrases(a: PersonAttributes) -> dict[str, str]:
    """One noun/verb phrase per mentionable attribute group."""
    sleeve = "short-sleeved " if a.sleeve == "short" else "long-sleeved "
    p = {
        "hair": f"{a.hair_length} {a.hair_color} hair",
        "upper": f"a {a.upper_color} {sleeve if a.upper_type in ('t-shirt', 'shirt') else ''}{a.upper_type}",
        "lower": (f"a {a.lower_length} {a.lower_color} skirt" if a.lower_type == "skirt"
                  else f"{a.lower_color} {a.lower_type}"),
        "shoes": f"{a.shoes_color} shoes",
        # vaguer clothing mentions (colour only), as real captions often are
        "upper_color": f"a {a.upper_color} top",
        "lower_color": f"{a.lower_color} bottoms",
    }
    if a.bag != "none":
        p["bag"] = f"a {a.bag_color} {a.bag}"
    if a.hat:
        p["hat"] = "a hat"
    if a.glasses:
        p["glasses"] = "glasses"
    return p


# which attribute keys each phrase group asserts
GROUP_KEYS = {
    "gender": ("gender",),
    "hair": ("hair_length", "hair_color"),
    "upper": ("upper_type", "upper_color", "sleeve"),
    "upper_color": ("upper_color",),
    "lower_color": ("lower_color",),
    "lower": ("lower_type", "lower_color", "lower_length"),
    "shoes": ("shoes_color",),
    "bag": ("bag", "bag_color"),
    "hat": ("hat",),
    "glasses": ("glasses",),
}


def make_caption(a: PersonAttributes, rng: random.Random) -> tuple[str, list[str]]:
    """A caption mentioning a random subset of attribute groups; returns (text, groups)."""
    p = _phrases(a)
    optional = [g for g in ("hair", "upper", "lower", "shoes", "bag", "hat", "glasses") if g in p]
    # at least one clothing group, so every caption says something visual
    # mostly short captions, so that many of them fit several identities
    k = min(len(optional), rng.choices((1, 2, 3, 4), weights=(3, 4, 2, 1))[0])
    chosen = rng.sample(optional, k)
    if not any(g in chosen for g in ("upper", "lower")):
        chosen[0] = rng.choice(("upper", "lower"))
    chosen = list(dict.fromkeys(chosen))
    chosen = [f"{g}_color" if g in ("upper", "lower") and rng.random() < 0.35 else g for g in chosen]
    with_gender = rng.random() < 0.6
    subj = rng.choice((f"A {a.gender}", f"The {a.gender}", f"This {a.gender}")) if with_gender else rng.choice(
        ("A person", "A pedestrian", "The pedestrian", "Someone"))
    wear = [g for g in chosen if g in ("upper", "lower", "upper_color", "lower_color", "shoes", "hat", "glasses")]
    has = [g for g in chosen if g == "hair"]
    carry = [g for g in chosen if g == "bag"]
    clauses = []
    if has:
        clauses.append("has " + p["hair"])
    if wear:
        items = [p[g] for g in wear]
        lst = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        clauses.append(rng.choice(("is wearing ", "wears ", "is dressed in ")) + lst)
    if carry:
        clauses.append(rng.choice(("carries ", "is carrying ", "has ")) + p["bag"])
    rng.shuffle(clauses)
    if len(clauses) == 1:
        body = clauses[0]
    else:
        body = ", ".join(clauses[:-1]) + " and " + clauses[-1]
    if rng.random() < 0.3:
        text = f"{subj} {body}. {rng.choice(('The person is walking.', 'The person is standing.', 'Seen from the front.'))}"
    else:
        text = f"{subj} {body}."
    groups = (["gender"] if with_gender else []) + chosen
    return text, groups


def mentioned_facts(a: PersonAttributes, groups: Sequence[str]) -> dict[str, object]:
    """The attribute values a caption asserts (used to measure ambiguity and by the oracle)."""
    d = asdict(a)
    return {k: d[k] for g in groups for k in GROUP_KEYS[g]}


def consistent(a: PersonAttributes, facts: dict[str, object]) -> bool:
    d = asdict(a)
    return all(d[k] == v for k, v in facts.items())


def vqa_answers(a: PersonAttributes) -> list[str]:
    """Ground-truth answers to the 15 T_vqa aspects (prompts.VQA_ASPECTS), one sentence each."""
    pron = "He" if a.gender == "man" else "She"
    upper = f"{a.upper_color} {a.upper_type} with {a.sleeve} sleeves"
    lower = f"{a.lower_color} {a.lower_type}" + (f" ({a.lower_length})" if a.lower_type == "skirt" else "")
    return [
        f"The person is a {a.gender}.",
        f"{pron} has {a.hair_length} {a.hair_color} hair.",
        f"{pron} wears a {upper}.",
        f"{pron} wears {lower}, {a.lower_length} in length.",
        "There are no patterns on the clothes.",
        f"{pron} wears {a.shoes_color} shoes.",
        f"{pron} wears glasses." if a.glasses else "No, there are no glasses.",
        "No, there is no scarf.",
        f"{pron} holds a {a.bag_color} handbag." if a.bag == "handbag" else "No, the hands are empty.",
        f"{pron} carries a {a.bag_color} {a.bag}." if a.bag in ("backpack", "shoulder bag") else (
            f"{pron} carries a {a.bag_color} handbag." if a.bag == "handbag" else "No, there is no bag."),
        f"{pron} wears a hat." if a.hat else "No, there is no hat.",
        "No belt is visible.",
        f"{pron} is walking.",
        "A plain street background.",
        "No, there are no other people.",
    ]


# -- the dataset -----------------------------------------------------------------------------

def split_ids(num_ids: int, fractions: tuple[float, float, float], rng: random.Random) -> dict[int, str]:
    ids = list(range(num_ids))
    rng.shuffle(ids)
    n_test = max(1, round(num_ids * fractions[2]))
    n_val = max(1, round(num_ids * fractions[1])) if fractions[1] > 0 else 0
    out = {}
    for j, pid in enumerate(ids):
        out[pid] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    return out


def generate(
    out: str | Path,
    num_ids: int = 300,
    seed: int = 0,
    images_per_id: tuple[int, int] = (2, 4),
    captions_per_image: int = 2,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    progress: bool = True,
) -> dict:
    """Write SynthPEDES to ``out`` and return its statistics."""
    if num_ids < 3:
        raise ValueError("SynthPEDES needs at least 3 identities (one per split)")
    out = Path(out)
    (out / "imgs").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    split_of = split_ids(num_ids, fractions, random.Random(seed + 1))
    people = [sample_attributes(rng) for _ in range(num_ids)]
    records, cap_meta = [], []
    it = range(num_ids)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="SynthPEDES identities", unit="id")
    for pid in it:
        a = people[pid]
        prng = random.Random(f"{seed}-{pid}")  # per-id stream: an identity does not depend on others
        for v in range(prng.randint(*images_per_id)):
            rel = f"{split_of[pid]}/{pid + 1:05d}_{v}.png"
            (out / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
            render_person(a, prng).save(out / "imgs" / rel, optimize=False, compress_level=1)
            caps = [make_caption(a, prng) for _ in range(captions_per_image)]
            records.append({"split": split_of[pid], "id": pid + 1, "file_path": rel,
                            "captions": [c for c, _ in caps], "processed_tokens": [c.lower().rstrip(".").split() for c, _ in caps]})
            cap_meta.append({"file_path": rel, "mentions": [g for _, g in caps]})
    (out / "reid_raw.json").write_text(json.dumps(records, indent=0), encoding="utf-8")
    truth = {
        "generator": "synthpedes.dataset",
        "seed": seed,
        "num_ids": num_ids,
        "ids": {str(pid + 1): asdict(a) for pid, a in enumerate(people)},
        "images": cap_meta,
    }
    (out / "attributes.json").write_text(json.dumps(truth), encoding="utf-8")
    stats = statistics(out)
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return stats


def load_ground_truth(root: str | Path) -> dict:
    """Read ``attributes.json``: ids (1-based, as in reid_raw.json) -> PersonAttributes, and
    image file_path -> the groups each of its captions mentions."""
    path = Path(root) / "attributes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the oracle and the VL builders need a SynthPEDES folder "
                                "written by `python -m synthpedes.dataset`")
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {
        "ids": {int(k): PersonAttributes(**v) for k, v in raw["ids"].items()},
        "mentions": {m["file_path"]: m["mentions"] for m in raw["images"]},
    }


def write_truth_rda(root: str | Path, path: str | Path) -> int:
    """An RDA file (data_builders.rda's JSONL format) for every training caption, from ground
    truth the way an MLLM would enrich it: one group per true attribute sentence, two
    paraphrases each. Returns the lines written."""
    root = Path(root)
    records = json.loads((root / "reid_raw.json").read_text(encoding="utf-8"))
    truth = load_ground_truth(root)["ids"]
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for ri, rec in enumerate(records):
            if rec["split"] != "train":
                continue
            answers = vqa_answers(truth[rec["id"]])
            facts = [answers[i] for i in (0, 1, 2, 3, 5, 6, 9, 10) if not answers[i].startswith("No")]
            groups = [[s, "The person: " + s[0].lower() + s[1:]] for s in facts]
            for ci, cap in enumerate(rec["captions"]):
                f.write(json.dumps({"record_index": ri, "caption_index": ci, "caption": cap,
                                    "enriched": " ".join(facts), "groups": groups}) + "\n")
                n += 1
    return n


def caption_ambiguity(root: str | Path, split: str = "test") -> dict[str, float]:
    """How many identities of a split each caption fits: the share of captions that fit more
    than one identity, and the mean number of identities a caption fits."""
    records = json.loads((Path(root) / "reid_raw.json").read_text(encoding="utf-8"))
    gt = load_ground_truth(root)
    ids = sorted({r["id"] for r in records if r["split"] == split})
    fits = []
    for r in records:
        if r["split"] != split:
            continue
        for groups in gt["mentions"][r["file_path"]]:
            facts = mentioned_facts(gt["ids"][r["id"]], groups)
            fits.append(sum(consistent(gt["ids"][i], facts) for i in ids))
    fits_arr = np.asarray(fits)
    return {"captions": int(fits_arr.size), "ambiguous_fraction": float((fits_arr > 1).mean()),
            "mean_ids_per_caption": float(fits_arr.mean())}


def statistics(root: str | Path) -> dict:
    records = json.loads((Path(root) / "reid_raw.json").read_text(encoding="utf-8"))
    by_split: dict[str, Counter] = {}
    for r in records:
        c = by_split.setdefault(r["split"], Counter())
        c["images"] += 1
        c["captions"] += len(r["captions"])
    ids = {s: len({r["id"] for r in records if r["split"] == s}) for s in by_split}
    stats = {s: {"ids": ids[s], **dict(c)} for s, c in sorted(by_split.items())}
    stats["test_ambiguity"] = caption_ambiguity(root, "test")
    return stats


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (CUHK-PEDES layout)")
    ap.add_argument("--num-ids", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--captions-per-image", type=int, default=2)
    ap.add_argument("--min-images", type=int, default=2)
    ap.add_argument("--max-images", type=int, default=4)
    ap.add_argument("--split-fractions", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stats = generate(args.out, args.num_ids, args.seed, (args.min_images, args.max_images),
                     args.captions_per_image, tuple(args.split_fractions))
    print(format_stats(stats, args.out))
    return stats


def format_stats(stats: dict, out: str | Path) -> str:
    lines = [f"SynthPEDES written to {out}", f"{'split':<7}{'ids':>6}{'images':>8}{'captions':>10}"]
    for s in ("train", "val", "test"):
        if s in stats:
            lines.append(f"{s:<7}{stats[s]['ids']:>6}{stats[s]['images']:>8}{stats[s]['captions']:>10}")
    amb = stats["test_ambiguity"]
    lines.append(f"test captions fitting more than one identity: {100 * amb['ambiguous_fraction']:.1f}% "
                 f"(mean {amb['mean_ids_per_caption']:.2f} identities per caption)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
