#!/usr/bin/env python3
"""Builds the tiny random-weight LLaVA-NeXT (llava-v1.6) checkpoints under tests/fixtures/
and their transformers references, plus a two-image reference for the LLaVA-1.5 fixture.
CI never runs this: its outputs are committed. Same environment as tools/make_fixtures.py
(torch 2.5.1, transformers 4.46.3), whose helpers (weight init, tokenizer, images) it reuses.

    /tmp/venv-fix/bin/python tools/make_next_fixtures.py          # write
    /tmp/venv-fix/bin/python tools/make_next_fixtures.py --check  # recompute, compare, write nothing

What it writes:
  images/portrait.png                     a 230x370 test image
  images/landscape.png                    make_fixtures' 500x320 wide image, lossless
  tiny-next-mistral/                      Mistral decoder (rope_theta 1e6, no sliding window),
                                          GQA, f16, transformers 4.46 names (`image_newline`)
  tiny-next-llama/                        Llama decoder, GQA, bf16, newer names
                                          (`model.image_newline`, `model.language_model.*`)
  reference-next/<model>/expected.json        per case: prompt, expanded ids, image spans, image
                                          sizes, best pinpoint, greedy tokens, margins
  reference-next/<model>/arrays.safetensors   <case>.pixel_values [n_images, tiles, 3, S, S] (the
                                          processor's batch, zero tiles past an image's own),
                                          <case>.image_features [tokens, H] (packed, newline
                                          rows included), <case>.logits [V]
  reference-next/tiny-llava-mha-two-images/   the LLaVA-1.5 fixture answering about two images

Every reference reloads the saved checkpoint in float32 with eager attention.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402
import render_upstream_prompts as rup  # noqa: E402

import transformers  # noqa: E402
from transformers import (AutoTokenizer, CLIPVisionConfig, GenerationConfig, LlamaConfig,  # noqa: E402
                          LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                          LlavaNextProcessor, MistralConfig)

MAX_NEW_TOKENS = 12

SPECS = {
    "tiny-next-mistral": dict(
        seed=3003,
        save_dtype=torch.float16,
        naming="old",
        decoder="mistral",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    image_size=56, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    projection_dim=32),
        text=dict(hidden_size=32, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1000000.0,
                  max_position_embeddings=4096, sliding_window=None),
        # the landscape image picks the 1x2 grid, the portrait one 2x1 (tiny-next-llama: 3x3)
        pinpoints=[[56, 112], [112, 56], [56, 168], [168, 56]],
        prompt="[INST] <image>\nWhat is shown in this image? [/INST]",
        two_prompt="[INST] <image>\n<image>\nWhat differs between these images? [/INST]",
    ),
    "tiny-next-llama": dict(
        seed=4004,
        save_dtype=torch.bfloat16,
        naming="new",
        decoder="llama",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=42, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
                    projection_dim=32),
        text=dict(hidden_size=32, intermediate_size=80, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=4096),
        pinpoints=[[42, 84], [84, 42], [84, 84], [126, 42], [42, 126], [126, 126]],
        prompt=mf.image_prompt(),
        two_prompt=mf.vicuna_v1_prompt("What differs between these images?", 2),
        # With LLaVA's real vicuna_v1 sentence the landscape case's step 2 is a near-tie
        # (0.0004): its steps' top-2 logits are recorded for a teacher-forced comparison.
        top2=True,
    ),
}
# LLaVA-v1.6's own pinpoints at its 336-pixel tiles (issue 27's portrait divergence): the
# decoder as the issue describes it (Llama, hidden 64, 8 layers, 4 heads, 2 KV heads,
# head_dim 16) and a Mistral twin; small CLIP towers at the real 336 px / 14 geometry
# (576 patches per tile), f16 weights.
PIN336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
VISION336 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 projection_dim=32)
QUESTION336 = "Describe the picture."
SPECS336 = {
    "tiny-next336-llama": dict(
        seed=5005,
        save_dtype=torch.float16,
        naming="old",
        decoder="llama",
        vision=VISION336,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=4096),
        pinpoints=PIN336,
        mode="vicuna_v1",
    ),
    "tiny-next336-mistral": dict(
        seed=6006,
        save_dtype=torch.float16,
        naming="new",
        decoder="mistral",
        vision=VISION336,
        text=dict(hidden_size=32, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1000000.0,
                  max_position_embeddings=4096, sliding_window=None),
        pinpoints=PIN336,
        mode="mistral_instruct",
    ),
}
# (case, width, height): the 300x560 portrait (best 672x336, resized to 336x628, 22
# rows of padding each side, unpadded to 44 of 48 feature rows: 1,676 tokens), and odd sizes
# that take each of the other pinpoints (tall 1008x336, wide and landscape 336x1008 (h x w),
# odd 672x672, short 336x672).
CASES336 = [("portrait", 300, 560), ("tall", 331, 1003), ("wide", 1003, 331), ("odd", 517, 389),
            ("landscape", 701, 347), ("short", 641, 331)]

GAINS = dict(emb=1.0, qk=1.6, v=1.0, o=1.0, mlp=1.0, vis_qk=1.5, vis=1.0, proj=1.0,
             logit_scale=6.0, norm_jitter=0.15, bias=0.05)
FEATURE_LAYER = -2
# Lossless both: pixel values are compared exactly (a JPEG decodes differently in Pillow).
IMAGES = {"landscape": "landscape.png", "portrait": "portrait.png"}


def make_portrait_image():
    """230x370 RGB (odd sizes exercise the one-pixel-short padding): a tower and a moon."""
    h, w = 370, 230
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    arr = np.stack([30 + 100 * y / h, 40 + 60 * x / w, 120 + 100 * (1 - y / h)], -1)
    arr += 10 * np.sin(x / 7.0)[..., None] * np.sin(y / 11.0)[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle((80, 120, 150, 360), fill=(150, 150, 160), outline=(20, 20, 20), width=3)
    d.polygon([(70, 122), (115, 50), (160, 122)], fill=(170, 40, 40))
    d.ellipse((160, 20, 210, 70), fill=(250, 250, 210))
    for k in range(5):
        d.rectangle((100, 140 + 40 * k, 130, 160 + 40 * k), fill=(250, 210, 60))
    return img


def make_sized_image(w, h, seed):
    """A deterministic w x h RGB test image (gradients, a ripple, shapes placed relative to
    the size, so every size has structure everywhere)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a, b, c = rng.uniform(0.5, 1.5, 3)
    arr = np.stack([40 + 150 * y / h, 30 + 170 * x / w * a, 200 - 120 * (x + y) / (w + h) * b], -1)
    arr += 18 * c * np.sin(x / (5.0 + 4 * a))[..., None] * np.cos(y / (7.0 + 3 * b))[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, w, 2).tolist())
        y0, y1 = sorted(rng.integers(0, h, 2).tolist())
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.rectangle((x0, y0, x1, y1), fill=col, outline=(10, 10, 10), width=2)
        else:
            d.ellipse((x0, y0, x1, y1), fill=col)
    return img


def tile_checksum(a):
    """Order-sensitive checksum of a float32 array's bits: sum_i bits[i] * (i + 1) mod 2^64
    (tests/tests/next_reference.rs computes the same with wrapping u64 arithmetic)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    idx = np.arange(1, bits.size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return int(np.sum(bits * idx, dtype=np.uint64))


def load(images_dir, key):
    with Image.open(os.path.join(images_dir, IMAGES[key])) as im:
        im.load()
        return im.convert("RGB")


def build_config(spec):
    vision = CLIPVisionConfig(**spec["vision"])
    kw = dict(vocab_size=mf.VOCAB, bos_token_id=mf.BOS, eos_token_id=mf.EOS, pad_token_id=mf.PAD_TOKEN_ID,
              tie_word_embeddings=False, **spec["text"])
    text = MistralConfig(**kw) if spec["decoder"] == "mistral" else LlamaConfig(**kw)
    grid = spec["vision"]["image_size"] // spec["vision"]["patch_size"]
    cfg = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          image_token_index=mf.IMAGE_TOKEN_INDEX, projector_hidden_act="gelu",
                          vision_feature_select_strategy="default", vision_feature_layer=FEATURE_LAYER,
                          image_grid_pinpoints=spec["pinpoints"],
                          # below every expanded count, so the model never takes its legacy path
                          image_seq_length=grid * grid,
                          pad_token_id=mf.PAD_TOKEN_ID, tie_word_embeddings=False)
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    return cfg


def image_processor_for(spec):
    s = spec["vision"]["image_size"]
    return LlavaNextImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                   image_grid_pinpoints=spec["pinpoints"], resample=3,
                                   image_mean=mf.CLIP_MEAN, image_std=mf.CLIP_STD, do_pad=True)


def init_weights(model, seed):
    """make_fixtures' rules, plus image_newline (a vector in the text width)."""
    newline = model.image_newline
    mf.init_weights(_WithoutNewline(model), seed, GAINS)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        newline.copy_(torch.randn(newline.shape, generator=gen))


class _WithoutNewline:
    def __init__(self, model):
        self.model = model

    def named_parameters(self):
        return [(n, p) for n, p in self.model.named_parameters() if n != "image_newline"]


def to_new(name):
    return "model.image_newline" if name == "image_newline" else mf.old_to_new(name)


def to_old(name):
    return "image_newline" if name == "model.image_newline" else mf.new_to_old(name)


def read_old_names(model_dir):
    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    if any(k.startswith("model.") or k == "lm_head.weight" for k in sd):
        sd = {to_old(k): v for k, v in sd.items()}
    return sd


def build_checkpoint(name, spec, out_dir):
    cfg = build_config(spec)
    torch.manual_seed(spec["seed"])
    model = LlavaNextForConditionalGeneration(cfg)
    init_weights(model, spec["seed"])
    model.generation_config = GenerationConfig(bos_token_id=mf.BOS, eos_token_id=mf.EOS,
                                               pad_token_id=mf.PAD_TOKEN_ID)
    model = model.to(spec["save_dtype"])
    model_dir = os.path.join(out_dir, name)
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    os.makedirs(model_dir)
    if spec["naming"] == "old":
        model.save_pretrained(model_dir, safe_serialization=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            for f in ("config.json", "generation_config.json"):
                shutil.copy(os.path.join(tmp, f), os.path.join(model_dir, f))
            sd = load_file(os.path.join(tmp, "model.safetensors"))
            save_file({to_new(k): v.contiguous() for k, v in sd.items()},
                      os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    proc = image_processor_for(spec)
    proc.save_pretrained(model_dir)
    with open(os.path.join(model_dir, "processor_config.json"), "w") as f:
        json.dump({"image_token": "<image>", "patch_size": spec["vision"]["patch_size"],
                   "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default"},
                  f, indent=2)
        f.write("\n")
    mf.link_tokenizer(model_dir)
    return model_dir


def load_reference_model(model_dir):
    cfg = LlavaNextConfig.from_pretrained(model_dir)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    model = LlavaNextForConditionalGeneration(cfg)
    sd = {k: v.to(torch.float32) for k, v in read_old_names(model_dir).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"{model_dir}: missing {missing} unexpected {unexpected}")
    model.to(torch.float32).eval()
    return model


@torch.no_grad()
def run_case(model, proc, prompt, images, kw_extra, top2=False, no_cache_check=True):
    """Greedy reference for one prompt over `images` through the HF processor."""
    inputs = proc(images=images, text=prompt, return_tensors="pt")
    ids = inputs["input_ids"]
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    kw.update(kw_extra)
    out = model(input_ids=ids, use_cache=False, **kw)
    logits = out.logits[0, -1].contiguous()
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw, do_sample=False,
                         max_new_tokens=MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=mf.EOS, pad_token_id=mf.PAD_TOKEN_ID)
    new = gen.sequences[0, ids.shape[1]:].tolist()
    margins, steps_top2 = [], []
    for step, row in enumerate(gen.logits):
        m, am = mf.top2_margin(row[0])
        assert am == new[step], (step, am, new[step])
        margins.append(m)
        v, i = torch.topk(row[0].float(), 2)
        steps_top2.append([[int(i[k]), float(v[k])] for k in range(2)])
    if no_cache_check:
        # (The 336-pixel cases skip it, as 12 full forwards of ~2,000-2,900 tokens each;
        # their test teacher-forces every step against the logits of generate instead.)
        nc = mf.greedy_no_cache(model, ids, kw, MAX_NEW_TOKENS)
        assert nc == new, f"cache/no-cache greedy disagree: {nc} vs {new}"
    flat = ids[0].tolist()
    spans, i = [], 0
    while i < len(flat):
        if flat[i] == mf.IMAGE_TOKEN_INDEX:
            j = i
            while j < len(flat) and flat[j] == mf.IMAGE_TOKEN_INDEX:
                j += 1
            spans.append([i, j])
            i = j
        else:
            i += 1
    res = {"prompt": prompt, "input_ids_expanded": flat, "image_spans": spans,
           "generated_ids": new, "step_margins": [round(m, 6) for m in margins],
           "min_margin": round(min(margins), 6)}
    if top2:
        # The greedy steps' two best (id, logit): a test can teacher-force each step.
        res["steps_top2"] = steps_top2
    return res, inputs, logits


@torch.no_grad()
def next_references(name, spec, model_dir, images_dir):
    model = load_reference_model(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ip = LlavaNextImageProcessor.from_pretrained(model_dir)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=spec["vision"]["patch_size"],
                              vision_feature_select_strategy="default")
    from transformers.image_processing_utils import select_best_resolution
    cases, arrays = {}, {}
    plan = [("landscape", ["landscape"], spec["prompt"]), ("portrait", ["portrait"], spec["prompt"]),
            ("two", ["landscape", "portrait"], spec["two_prompt"])]
    for case, keys, prompt in plan:
        imgs = [load(images_dir, k) for k in keys]
        res, inputs, logits = run_case(model, proc, prompt, imgs, {}, top2=spec.get("top2", False))
        pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
        per_image = model.get_image_features(pv, sizes, FEATURE_LAYER, "default")
        feats, lens = model.pack_image_features(per_image, sizes, "default", image_newline=model.image_newline)
        assert [e - s for s, e in res["image_spans"]] == lens.tolist(), (res["image_spans"], lens)
        res["images"] = [f"images/{IMAGES[k]}" for k in keys]
        res["image_sizes_hw"] = sizes.tolist()
        res["best_resolution_hw"] = [list(select_best_resolution(s.tolist(), spec["pinpoints"])) for s in sizes]
        res["image_tokens"] = lens.tolist()
        cases[case] = res
        arrays[f"{case}.pixel_values"] = pv.contiguous()
        arrays[f"{case}.image_features"] = feats.contiguous()
        arrays[f"{case}.logits"] = logits
    expected = {
        "generator": "tools/make_next_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": name, "decoder": spec["decoder"], "tensor_naming": spec["naming"],
        "saved_dtype": str(spec["save_dtype"]).replace("torch.", ""),
        "image_grid_pinpoints": spec["pinpoints"], "max_new_tokens": MAX_NEW_TOKENS,
        "min_margin": min(c["min_margin"] for c in cases.values()),
        "cases": cases,
    }
    return expected, arrays


@torch.no_grad()
def llava15_two_images(images_dir, fix_dir):
    """tiny-llava-mha (LLaVA-1.5) answering one prompt about two images (crop mode)."""
    model_dir = os.path.join(fix_dir, "tiny-llava-mha")
    model = mf.load_reference_model(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    from transformers import CLIPImageProcessor
    ip = CLIPImageProcessor.from_pretrained(model_dir)
    spec = mf.SPECS["tiny-llava-mha"]
    n = mf.num_image_tokens(spec)
    prompt = mf.vicuna_v1_prompt("What differs between these images?", 2)
    ids = tok(prompt)["input_ids"]
    expanded = []
    for t in ids:
        expanded += [t] * n if t == mf.IMAGE_TOKEN_INDEX else [t]
    imgs = [mf.load_image(images_dir, "square"), load(images_dir, "landscape")]
    pv = ip(images=imgs, return_tensors="pt")["pixel_values"]
    input_ids = torch.tensor([expanded])
    logits = model(input_ids=input_ids, pixel_values=pv, use_cache=False).logits[0, -1].contiguous()
    gen = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pv,
                         do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=mf.EOS, pad_token_id=mf.PAD_TOKEN_ID)
    new = gen.sequences[0, input_ids.shape[1]:].tolist()
    margins = [mf.top2_margin(r[0])[0] for r in gen.logits]
    # Step 3 is a near-tie (0.0025) with the real vicuna_v1 sentence: record every step's
    # top-2 logits for a teacher-forced comparison.
    steps_top2 = []
    for r in gen.logits:
        v, i = torch.topk(r[0].float(), 2)
        steps_top2.append([[int(i[k]), float(v[k])] for k in range(2)])
    nc = mf.greedy_no_cache(model, input_ids, {"pixel_values": pv}, MAX_NEW_TOKENS)
    assert nc == new
    starts = [i for i, t in enumerate(expanded) if t == mf.IMAGE_TOKEN_INDEX and
              (i == 0 or expanded[i - 1] != mf.IMAGE_TOKEN_INDEX)]
    case = {"prompt": prompt, "images": ["images/square.png", "images/landscape.png"], "image_mode": "crop",
            "input_ids_expanded": expanded, "image_spans": [[s, s + n] for s in starts],
            "generated_ids": new, "step_margins": [round(m, 6) for m in margins],
            "min_margin": round(min(margins), 6), "steps_top2": steps_top2}
    expected = {"generator": "tools/make_next_fixtures.py", "model": "tiny-llava-mha",
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "max_new_tokens": MAX_NEW_TOKENS, "min_margin": case["min_margin"], "cases": {"two": case}}
    # The pixel values are those of the single-image references (kept out: 2.7 MB).
    return expected, {"two.logits": logits}


@torch.no_grad()
def next336_references(name, spec, model_dir, images_dir):
    """The 336-pixel models on CASES336: ids, spans, layout, per-tile pixel checksums (the
    full tiles would be megabytes), packed features, the unpadded feature-canvas shape,
    first logits, greedy tokens. Sizes whose processor count and model feature count
    disagree (transformers raises) are recorded as refused."""
    model = load_reference_model(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ip = LlavaNextImageProcessor.from_pretrained(model_dir)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=spec["vision"]["patch_size"],
                              vision_feature_select_strategy="default")
    from transformers.image_processing_utils import select_best_resolution
    prompt = rup.render(spec["mode"], [QUESTION336], 1)
    cases, arrays = {}, {}
    for case, w, h in CASES336:
        img = load(images_dir, f"next336_{case}")
        assert img.size == (w, h)
        try:
            res, inputs, logits = run_case(model, proc, prompt, [img], {}, top2=True, no_cache_check=False)
        except ValueError as e:
            cases[case] = {"image": f"images/next336/{case}.png", "size_wh": [w, h], "refused": str(e)}
            print(f"{name} {case}: transformers refuses: {e}")
            continue
        pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
        per_image = model.get_image_features(pv, sizes, FEATURE_LAYER, "default")
        feats, lens = model.pack_image_features(per_image, sizes, "default", image_newline=model.image_newline)
        assert [e - s for s, e in res["image_spans"]] == lens.tolist()
        res["images"] = [f"images/next336/{case}.png"]
        res["size_wh"] = [w, h]
        res["image_sizes_hw"] = sizes.tolist()
        res["best_resolution_hw"] = [list(select_best_resolution(s.tolist(), spec["pinpoints"])) for s in sizes]
        res["image_tokens"] = lens.tolist()
        res["tiles"] = int(pv.shape[1])
        res["pixel_checksums"] = [str(tile_checksum(pv[0, t].numpy())) for t in range(pv.shape[1])]
        cases[case] = res
        arrays[f"{case}.image_features"] = feats.contiguous()
        arrays[f"{case}.logits"] = logits
    expected = {
        "generator": "tools/make_next_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": name, "decoder": spec["decoder"], "tensor_naming": spec["naming"],
        "saved_dtype": str(spec["save_dtype"]).replace("torch.", ""), "template": spec["mode"],
        "question": QUESTION336, "image_grid_pinpoints": spec["pinpoints"], "max_new_tokens": MAX_NEW_TOKENS,
        "min_margin": min(c["min_margin"] for c in cases.values() if "min_margin" in c),
        "cases": cases,
    }
    return expected, arrays


def near_ties_recorded(expected):
    """A case under the margin gate is accepted when its steps' top-2 logits are recorded:
    tests/tests/next_reference.rs then compares tokens only up to the near-tie and every
    step's logits teacher-forced."""
    return all("steps_top2" in c for c in expected["cases"].values() if "refused" not in c)


def write_ref(out, name, expected, arrays):
    ref = os.path.join(out, "reference-next", name)
    os.makedirs(ref, exist_ok=True)
    with open(os.path.join(ref, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    save_file(arrays, os.path.join(ref, "arrays.safetensors"), metadata={"generator": "tools/make_next_fixtures.py"})
    for c, r in expected["cases"].items():
        if "refused" in r:
            continue
        print(f"{name} {c}: len {len(r['input_ids_expanded'])} spans {r['image_spans']} "
              f"min margin {r['min_margin']:.4f} tokens {r['generated_ids']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare")
    ap.add_argument("--only", choices=["next", "next336", "two-images", *SPECS],
                    help="one group: the 56/42-pixel NeXT models, the 336-pixel ones, or the LLaVA-1.5 two-image"
                         " reference")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or 1)
    out = tempfile.mkdtemp() if args.check else mf.FIX
    if args.check:
        os.symlink(mf.TOKENIZER_DIR, os.path.join(out, "tokenizer"))
        os.symlink(os.path.join(mf.FIX, "tiny-llava-mha"), os.path.join(out, "tiny-llava-mha"))
    images_dir = os.path.join(out, "images")
    os.makedirs(images_dir, exist_ok=True)
    if args.check:
        shutil.copy(os.path.join(mf.IMAGES_DIR, "square.png"), images_dir)
    make_portrait_image().save(os.path.join(images_dir, "portrait.png"), optimize=True)
    mf.make_wide_image().save(os.path.join(images_dir, "landscape.png"), optimize=True)
    os.makedirs(os.path.join(images_dir, "next336"), exist_ok=True)
    for k, (case, w, h) in enumerate(CASES336):
        make_sized_image(w, h, 700 + k).save(os.path.join(images_dir, "next336", f"{case}.png"), optimize=True)
        IMAGES[f"next336_{case}"] = f"next336/{case}.png"
    low = []
    names, models = [], []
    groups = [("next", SPECS, next_references), ("next336", SPECS336, next336_references)]
    for group, specs, refs in groups:
        if args.only and args.only not in (group, *specs):
            continue
        for name, spec in specs.items():
            if args.only in SPECS and name != args.only:
                continue
            model_dir = build_checkpoint(name, spec, out)
            expected, arrays = refs(name, spec, model_dir, images_dir)
            write_ref(out, name, expected, arrays)
            names.append(name)
            models.append(name)
            if expected["min_margin"] < mf.HARD_MIN_MARGIN and not near_ties_recorded(expected):
                low.append(name)
    if not args.only or args.only == "two-images":
        expected, arrays = llava15_two_images(images_dir, out)
        write_ref(out, "tiny-llava-mha-two-images", expected, arrays)
        names.append("tiny-llava-mha-two-images")
        if expected["min_margin"] < mf.HARD_MIN_MARGIN and not near_ties_recorded(expected):
            low.append("tiny-llava-mha-two-images")
    if args.check:
        bad = []
        images = ["images/portrait.png", "images/landscape.png"] + [f"images/next336/{c}.png" for c, _, _ in CASES336]
        for rel in images + [f"reference-next/{n}/{f}" for n in names
                             for f in ("expected.json", "arrays.safetensors")] + \
                [os.path.join(n, f) for n in models for f in os.listdir(os.path.join(out, n))]:
            pa, pb = os.path.join(out, rel), os.path.join(mf.FIX, rel)
            if os.path.islink(pa):
                continue
            if not os.path.exists(pb) or mf.file_sha256(pa) != mf.file_sha256(pb):
                bad.append(rel)
        shutil.rmtree(out)
        if bad:
            print("DIFFERENT:\n  " + "\n  ".join(bad))
            sys.exit(1)
        print("check: regenerated fixtures match the committed ones")
    if low:
        print(f"ERROR: min margin below {mf.HARD_MIN_MARGIN}: {low}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
