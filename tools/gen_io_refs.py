#!/usr/bin/env python3
"""Regenerates tests/fixtures/io/: references for image preprocessing and tokenisation.

Needs transformers 4.46.3, Pillow, numpy and safetensors (CI never runs this; the outputs
are committed). Run from the repository root:

    /tmp/venv-fix/bin/python tools/gen_io_refs.py

Outputs (all small):
  images/*.png                 deterministic test inputs (RGB, grey, grey+alpha, RGBA,
                               palette, 16-bit RGB), including one 400x300 for the 336 px case
  configs/*.json               preprocessor_config.json variants (CLIPImageProcessor)
  expected/*.png               the uint8 stage (after resize + center crop), one per case
  pixel_values.safetensors     final pixel values [3, H, W] f32 for every small case
  preprocess_cases.json        the case list: image, config, mode, expected files
  tokenizer_cases.json         ids and decodes from the fast Llama tokenizer
"""

import json
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers import AutoTokenizer, CLIPImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "io")
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizer")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_png16_rgb(path, arr):
    """Writes a 16-bit RGB PNG by hand (Pillow cannot write 16-bit RGB)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        c = struct.pack(">I", len(data)) + tag + data
        return c + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def pattern(rng, h, w, c, noise):
    """Smooth gradients and a few hard edges plus seeded noise: exercises every filter tap."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for k in range(c):
        base = 127.5 + 100 * np.sin(x / (3.0 + k) + y / (5.0 + 2 * k)) * np.cos(y / (7.0 + k))
        base += np.where((x // 6 + y // 5 + k) % 2 == 0, 40.0, -40.0)
        base += rng.normal(0, noise, size=(h, w))
        chans.append(base)
    return np.clip(np.stack(chans, axis=-1), 0, 255).round().astype(np.uint8)


def make_images(img_dir):
    rng = np.random.default_rng(1234)
    imgs = {}
    imgs["square"] = Image.fromarray(pattern(rng, 64, 64, 3, 30), "RGB")
    imgs["landscape"] = Image.fromarray(pattern(rng, 50, 80, 3, 30), "RGB")
    imgs["portrait"] = Image.fromarray(pattern(rng, 70, 45, 3, 30), "RGB")
    imgs["tiny"] = Image.fromarray(pattern(rng, 5, 7, 3, 60), "RGB")
    imgs["grey"] = Image.fromarray(pattern(rng, 30, 40, 1, 20)[..., 0], "L")
    la = pattern(rng, 24, 20, 2, 20)
    imgs["grey_alpha"] = Image.fromarray(la, "LA")
    rgba = pattern(rng, 40, 50, 4, 20)
    imgs["rgba"] = Image.fromarray(rgba, "RGBA")
    imgs["palette"] = Image.fromarray(pattern(rng, 36, 28, 3, 10), "RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    imgs["photo400"] = Image.fromarray(pattern(rng, 300, 400, 3, 4), "RGB")
    for name, im in imgs.items():
        im.save(os.path.join(img_dir, f"{name}.png"), optimize=True)
    # 16-bit RGB: Pillow reads it as 8-bit RGB keeping the high byte of each sample.
    a16 = (pattern(rng, 44, 30, 3, 30).astype(np.uint16) * 257 + rng.integers(0, 257, size=(44, 30, 3))).astype(np.uint16)
    write_png16_rgb(os.path.join(img_dir, "rgb16.png"), a16)
    names = list(imgs) + ["rgb16"]
    return names


def make_configs(cfg_dir):
    base = {
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
        "resample": 3,
        "image_processor_type": "CLIPImageProcessor",
        "feature_extractor_type": "CLIPFeatureExtractor",
    }
    cfgs = {
        # The llava-hf/llava-1.5-7b-hf config.
        "clip336": dict(base, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        # openai/clip-vit-large-patch14-336 style: plain ints.
        "s32": dict(base, size=32, crop_size=32),
        # crop smaller than the resized short side: non-trivial offsets on both axes
        "s48c40": dict(base, size={"shortest_edge": 48}, crop_size={"height": 40, "width": 36}),
        # crop larger than the resized image: zero padding
        "s24c32": dict(base, size={"shortest_edge": 24}, crop_size={"height": 32, "width": 28}),
        # exact size, no crop, bilinear, other mean/std
        "hw_bilinear": dict(base, size={"height": 30, "width": 44}, do_center_crop=False, resample=2,
                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        "s40_lanczos": dict(base, size=40, crop_size=40, resample=1),
        "s36_box": dict(base, size=36, crop_size=36, resample=4),
        "s36_hamming": dict(base, size=36, crop_size=36, resample=5),
        # no rescale (normalise raw 0..255 values)
        "s32_norescale": dict(base, size=32, crop_size=32, do_rescale=False, image_mean=[120.0, 110.0, 100.0],
                              image_std=[60.0, 50.0, 40.0]),
    }
    for name, cfg in cfgs.items():
        with open(os.path.join(cfg_dir, f"{name}.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    return cfgs


def expand2square(pil_img, background_color):
    """LLaVA's expand2square, verbatim in behaviour."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def gen_preprocess(img_names):
    img_dir = os.path.join(OUT, "images")
    cfg_dir = os.path.join(OUT, "configs")
    exp_dir = os.path.join(OUT, "expected")
    cfgs = make_configs(cfg_dir)
    small = [n for n in img_names if n != "photo400"]
    plan = []
    for img in small:
        for mode in ("crop", "pad"):
            plan.append((img, "s32", mode))
    for img in ("landscape", "portrait", "tiny", "square"):
        for cfg in ("s48c40", "s24c32", "hw_bilinear", "s40_lanczos", "s36_box", "s36_hamming", "s32_norescale"):
            plan.append((img, cfg, "crop"))
    plan.append(("portrait", "s48c40", "pad"))
    plan.append(("photo400", "clip336", "crop"))
    plan.append(("photo400", "clip336", "pad"))

    tensors = {}
    cases = []
    for img_name, cfg_name, mode in plan:
        cfg = cfgs[cfg_name]
        proc = CLIPImageProcessor(**cfg)
        im = Image.open(os.path.join(img_dir, f"{img_name}.png")).convert("RGB")
        if mode == "pad":
            im = expand2square(im, tuple(int(x * 255) for x in proc.image_mean))
        u8 = proc.preprocess(im, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
        u8 = np.asarray(u8)
        assert u8.dtype == np.uint8, u8.dtype
        case_id = f"{img_name}__{cfg_name}__{mode}"
        exp_png = f"{case_id}.png"
        Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0)), "RGB").save(os.path.join(exp_dir, exp_png))
        pv = proc.preprocess(im, return_tensors="np")["pixel_values"][0].astype(np.float32)
        has_pv = cfg_name != "clip336"
        if has_pv:
            tensors[case_id] = np.ascontiguousarray(pv)
        cases.append({
            "id": case_id,
            "image": f"images/{img_name}.png",
            "config": f"configs/{cfg_name}.json",
            "mode": mode,
            "expected_rgb": f"expected/{exp_png}",
            "height": int(pv.shape[1]),
            "width": int(pv.shape[2]),
            "pixel_values": case_id if has_pv else None,
        })
    save_file(tensors, os.path.join(OUT, "pixel_values.safetensors"))
    with open(os.path.join(OUT, "preprocess_cases.json"), "w") as f:
        json.dump({"generator": "tools/gen_io_refs.py", "transformers": __import__("transformers").__version__,
                   "pillow": Image.__version__, "cases": cases}, f, indent=1)
    return len(cases)


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from render_upstream_prompts import vicuna_v1_prompt  # noqa: E402


def gen_tokenizer():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tok.is_fast
    prompts = [
        "Hello world",
        "What is shown in this image?",
        vicuna_v1_prompt("What is shown in this image?", 1),
        vicuna_v1_prompt("Describe a cat.", 0),
        "  leading and  double  spaces ",
        "Café crème, naïve façade, Zürich – “quotes” and ‘single’…",
        "日本語のテキストと中文",
        "Emoji: 😀🎉👍🏽 and 🤖!",
        "Line one\nLine two\n\n\ttabbed",
        "<image>\nDescribe.",
        "Numbers 1234567890 and symbols #$%^&*()[]{}<>",
        "",
    ]
    encodes = []
    for p in prompts:
        ids = tok(p)["input_ids"]
        encodes.append({"text": p, "ids": ids,
                        "decode": tok.decode(ids, skip_special_tokens=True),
                        "decode_no_bos": tok.decode(ids[1:], skip_special_tokens=True)})
    # Seeded id sequences heavy in byte-fallback tokens (ids 3..258), pieces and specials:
    # streaming must reproduce the full decode exactly.
    rng = np.random.default_rng(99)
    emoji_ids = tok("😀🎉 ok", add_special_tokens=False)["input_ids"]
    sequences = []
    for i in range(24):
        n = int(rng.integers(1, 40))
        seq = []
        for _ in range(n):
            r = rng.random()
            if r < 0.35:
                seq.append(int(rng.integers(3, 259)))          # byte tokens
            elif r < 0.45:
                seq.extend(emoji_ids)
            elif r < 0.5:
                seq.append(int(rng.choice([0, 1, 2, 32000, 32001])))  # special tokens
            else:
                seq.append(int(rng.integers(259, 32000)))      # ordinary pieces
        sequences.append({"ids": seq, "decode": tok.decode(seq, skip_special_tokens=True)})
    for p in prompts[4:9]:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        sequences.append({"ids": ids, "decode": tok.decode(ids, skip_special_tokens=True)})
    with open(os.path.join(OUT, "tokenizer_cases.json"), "w") as f:
        json.dump({"generator": "tools/gen_io_refs.py", "transformers": __import__("transformers").__version__,
                   "tokenizer": "tests/fixtures/tokenizer", "encode": encodes, "decode": sequences},
                  f, indent=1, ensure_ascii=False)
    return len(encodes), len(sequences)


def main():
    for sub in ("images", "configs", "expected"):
        os.makedirs(os.path.join(OUT, sub), exist_ok=True)
    names = make_images(os.path.join(OUT, "images"))
    n = gen_preprocess(names)
    ne, nd = gen_tokenizer()
    print(f"{n} preprocessing cases, {ne} encodes, {nd} decodes -> {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
