#!/usr/bin/env python3
"""visi-shapes: seeded procedural scenes and questions for the demo model (issue 29).

Every scene is a 336x336 RGB image (LLaVA-1.5's input size) with 1-5 shapes of 7 kinds in
10 colours, two sizes, at random non-overlapping positions, on a plain or textured
background with optional grey clutter. Each scene gets questions of six kinds, all with
one-word (or one short phrase) answers:

    color     What color is the star?                                  -> red
    shape     What shape is the blue object?                           -> circle
    position  Is the red circle to the left or to the right of the ... -> left
    count     How many triangles are there?                            -> 3
    exist     Is there a green square in the image?                    -> yes / no  (POPE's form)
    caption   Describe the image briefly.                              -> red circle, blue square

Everything derives from (split seed, scene index), so the same command always writes the
same files. The module is imported by tools/train_demo.py (training scenes are generated on
the fly from the `train` seed); run as a script it writes the held-out benchmark:

    /work/wt/venv-fix/bin/python tools/make_shapes_data.py --out models/demo/visi-shapes-bench \
        --scenes 250 --split test

which writes, in LLaVA's GQA evaluation formats (so `visi-cli eval` and `visi-cli score
--task gqa` read them unchanged):

    images/test_00000.png ...         the scenes (PNG, 336x336)
    questions.jsonl                   {"question_id", "image", "text", "category"} per line,
                                      text = question + "\\nAnswer the question using a single
                                      word or phrase." (LLaVA's GQA prompt suffix)
    annotations.json                  {question_id: {"answer", "isBalanced": true,
                                      "types": {"structural": "verify"|"query",
                                      "semantic": kind}}} (GQA's testdev_balanced layout)
    questions-ci.jsonl, annotations-ci.json   the first 100 questions (the CI subset)
"""

import argparse
import json
import math
import os
import random

from PIL import Image, ImageDraw

SIZE = 336
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross"]
PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "orange": (245, 130, 10),
    "purple": (130, 40, 170),
    "pink": (250, 120, 190),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
    "cyan": (20, 200, 220),
}
COLOR_NAMES = list(COLORS)
KINDS = ["color", "shape", "position", "count", "exist", "caption"]
# LLaVA's GQA question suffix (llava_gqa_testdev_balanced.jsonl, scripts/v1_5/eval/gqa.sh).
GQA_SUFFIX = "\nAnswer the question using a single word or phrase."
NUMBER_WORDS = ["0", "1", "2", "3", "4", "5"]
SPLIT_SEEDS = {"train": 1_000_003, "test": 2_000_003, "demo": 3_000_003}


def shape_points(kind, cx, cy, r):
    if kind == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if kind == "hexagon":
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in range(0, 360, 60)]
    if kind == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.42
            a = math.radians(-90 + 36 * i)
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if kind == "cross":
        w = r * 0.33
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(kind)


def background(rng):
    base = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), base)
    d = ImageDraw.Draw(img)
    style = rng.random()
    if style < 0.2:  # stripes
        step = rng.randint(10, 24)
        shade = tuple(max(0, c - rng.randint(12, 30)) for c in base)
        for x in range(-SIZE, SIZE, step):
            d.line([(x, 0), (x + SIZE, SIZE)], fill=shade, width=step // 3)
    elif style < 0.35:  # checker
        step = rng.randint(16, 42)
        shade = tuple(max(0, c - rng.randint(10, 25)) for c in base)
        for y in range(0, SIZE, step):
            for x in range(0, SIZE, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=shade)
    elif style < 0.5:  # speckle
        for _ in range(400):
            x, y = rng.randrange(SIZE), rng.randrange(SIZE)
            g = rng.randint(150, 235)
            d.point((x, y), fill=(g, g, g))
    return img, d


def clutter(rng, d):
    for _ in range(rng.randint(3, 10)):
        g = rng.randint(110, 190)
        x, y = rng.randrange(SIZE), rng.randrange(SIZE)
        if rng.random() < 0.5:
            d.line([(x, y), (x + rng.randint(-30, 30), y + rng.randint(-30, 30))], fill=(g, g, g), width=2)
        else:
            s = rng.randint(2, 5)
            d.ellipse([x - s, y - s, x + s, y + s], fill=(g, g, g))


def make_scene(seed, with_mask=False):
    """One scene: (PIL image, list of objects {shape, color, size, x, y, r}); with
    `with_mask`, also an "L" image holding 1 + the index of the object at each pixel
    (0: background), which tools/train_demo.py turns into per-patch training targets."""
    rng = random.Random(seed)
    img, d = background(rng)
    if rng.random() < 0.3:
        clutter(rng, d)
    n = rng.choice([1, 1, 2, 2, 3, 3, 4, 5])
    # Half the multi-object scenes repeat one shape, so counts above 1 are common.
    repeat = rng.choice(SHAPES) if n >= 2 and rng.random() < 0.5 else None
    k_repeat = rng.randint(2, n) if repeat else 0
    objs = []
    tries = 0
    while len(objs) < n and tries < 2000:
        tries += 1
        size = rng.choice(["small", "large"])
        r = rng.randint(22, 32) if size == "small" else rng.randint(38, 52)
        x, y = rng.randint(r + 4, SIZE - r - 4), rng.randint(r + 4, SIZE - r - 4)
        if any(math.hypot(x - o["x"], y - o["y"]) < r + o["r"] + 8 for o in objs):
            continue
        if len(objs) < k_repeat:
            shape = repeat
        else:
            shape = rng.choice([s for s in SHAPES if s != repeat])
        objs.append(dict(shape=shape, color=rng.choice(COLOR_NAMES), size=size, x=x, y=y, r=r))
    mask = Image.new("L", (SIZE, SIZE), 0) if with_mask else None
    md = ImageDraw.Draw(mask) if with_mask else None
    for i, o in enumerate(objs):
        pts = None if o["shape"] == "circle" else shape_points(o["shape"], o["x"], o["y"], o["r"])
        for dr, fill in ((d, COLORS[o["color"]]), (md, i + 1)):
            if dr is None:
                continue
            if pts is None:
                dr.ellipse([o["x"] - o["r"], o["y"] - o["r"], o["x"] + o["r"], o["y"] + o["r"]], fill=fill)
            else:
                dr.polygon(pts, fill=fill)
    return (img, objs, mask) if with_mask else (img, objs)


def caption(objs):
    return ", ".join(f"{o['color']} {o['shape']}" for o in sorted(objs, key=lambda o: o["x"]))


def questions(objs, rng):
    """All question kinds that the scene supports, as {kind: (question, answer)} (one of each)."""
    out = {}
    shape_count = {s: sum(o["shape"] == s for o in objs) for s in SHAPES}
    color_count = {c: sum(o["color"] == c for o in objs) for c in COLOR_NAMES}
    uniq_shape = [o for o in objs if shape_count[o["shape"]] == 1]
    if uniq_shape:
        o = rng.choice(uniq_shape)
        out["color"] = (f"What color is the {o['shape']}?", o["color"])
    uniq_color = [o for o in objs if color_count[o["color"]] == 1]
    if uniq_color:
        o = rng.choice(uniq_color)
        out["shape"] = (f"What shape is the {o['color']} object?", o["shape"])
    named = [o for o in objs if sum(p["shape"] == o["shape"] and p["color"] == o["color"] for p in objs) == 1]
    pairs = [(a, b) for a in named for b in named if a is not b and abs(a["x"] - b["x"]) > 40]
    if pairs:
        a, b = rng.choice(pairs)
        out["position"] = (f"Is the {a['color']} {a['shape']} to the left or to the right of the {b['color']} {b['shape']}?",
                           "left" if a["x"] < b["x"] else "right")
    s = rng.choice([o["shape"] for o in objs])
    out["count"] = (f"How many {PLURAL[s]} are there?", NUMBER_WORDS[shape_count[s]])
    present = {(o["color"], o["shape"]) for o in objs}
    if rng.random() < 0.5:
        c, sh = rng.choice(sorted(present))
        ans = "yes"
    else:
        # Absent objects, as POPE's adversarial split does half the time: a present colour
        # or a present shape, combined so that the pair itself is absent.
        while True:
            if rng.random() < 0.5:
                c, sh = rng.choice(sorted(present))[0], rng.choice(SHAPES)
            else:
                c, sh = rng.choice(COLOR_NAMES), rng.choice(sorted(present))[1]
            if rng.random() < 0.3:
                c, sh = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
            if (c, sh) not in present:
                break
        ans = "no"
    out["exist"] = (f"Is there a {c} {sh} in the image?", ans)
    if len(objs) <= 3:
        out["caption"] = ("Describe the image briefly.", caption(objs))
    return out


def scene_and_questions(split, index, with_mask=False):
    seed = SPLIT_SEEDS[split] * 100_003 + index
    scene = make_scene(seed, with_mask)
    qs = questions(scene[1], random.Random(seed ^ 0x5EED))
    return (scene[0], scene[1], qs) + tuple(scene[2:])


def vocabulary_text():
    """Every word a question or answer can use (the tokenizer is trained on this)."""
    lines = []
    for i in range(3000):
        _, _, qs = scene_and_questions("train", i)
        for q, a in qs.values():
            lines.append(q + GQA_SUFFIX)
            lines.append(a)
    lines += [" ".join(SHAPES), " ".join(PLURAL.values()), " ".join(COLOR_NAMES), " ".join(NUMBER_WORDS), "yes no left right"]
    return lines


def write_benchmark(out, split, scenes, ci):
    img_dir = os.path.join(out, "images")
    os.makedirs(img_dir, exist_ok=True)
    qlines, ann = [], {}
    for i in range(scenes):
        img, objs, qs = scene_and_questions(split, i)
        name = f"{split}_{i:05d}.png"
        img.save(os.path.join(img_dir, name), optimize=True)
        for kind in KINDS:
            if kind not in qs:
                continue
            q, a = qs[kind]
            qid = f"{split}{i:05d}_{kind}"
            qlines.append(dict(question_id=qid, image=name, text=q + GQA_SUFFIX, category=kind))
            ann[qid] = dict(answer=a, isBalanced=True,
                            types=dict(structural="verify" if kind == "exist" else "query", semantic=kind),
                            question=q, objects=objs)
    with open(os.path.join(out, "questions.jsonl"), "w") as f:
        for q in qlines:
            f.write(json.dumps(q) + "\n")
    with open(os.path.join(out, "annotations.json"), "w") as f:
        json.dump(ann, f, indent=0)
    sub = qlines[:ci]
    with open(os.path.join(out, "questions-ci.jsonl"), "w") as f:
        for q in sub:
            f.write(json.dumps(q) + "\n")
    with open(os.path.join(out, "annotations-ci.json"), "w") as f:
        json.dump({q["question_id"]: ann[q["question_id"]] for q in sub}, f, indent=0)
    return len(qlines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="test", choices=sorted(SPLIT_SEEDS))
    ap.add_argument("--scenes", type=int, default=250)
    ap.add_argument("--ci", type=int, default=100, help="questions in the CI subset (the first N)")
    args = ap.parse_args()
    n = write_benchmark(args.out, args.split, args.scenes, args.ci)
    print(f"wrote {n} questions over {args.scenes} scenes to {args.out}")


if __name__ == "__main__":
    main()
