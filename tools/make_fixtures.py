#!/usr/bin/env python3
"""Builds the tiny random-weight llava-hf checkpoints under tests/fixtures/ and their
transformers reference outputs. CI never runs this: its outputs are committed.

Environment (exact versions in tools/requirements-fixtures.txt; torch 2.5.1, transformers 4.46.3):

    python3 -m venv /tmp/venv-fix
    /tmp/venv-fix/bin/pip install -r tools/requirements-fixtures.txt

Run from anywhere (paths are relative to this file), CPU only, deterministic (fixed seeds):

    /tmp/venv-fix/bin/python tools/make_fixtures.py            # images, both models, references
    /tmp/venv-fix/bin/python tools/make_fixtures.py --check     # recompute, compare to committed, write nothing

What it writes (tests/fixtures/README.md documents every file, array and key):
  images/square.png, images/wide.jpg     deterministic structured test images
  tiny-llava-mha/                        f16 checkpoint, transformers 4.46 tensor names, one file
  tiny-llava-gqa/                        bf16 checkpoint, newer tensor names, 3 shards + index
  reference/<model>/expected.json        prompts, ids, greedy tokens, margins, metadata
  reference/<model>/arrays.safetensors   pixel values, vision features, projector outputs, logits

Every reference is computed by reloading the saved checkpoint in float32 with
attn_implementation="eager", so the references use exactly the committed weights.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import transformers
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig,
                          LlavaConfig, LlavaForConditionalGeneration)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
TOKENIZER_DIR = os.path.join(FIX, "tokenizer")
IMAGES_DIR = os.path.join(FIX, "images")
REF_DIR = os.path.join(FIX, "reference")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# LLaVA's prompt strings come from its own llava/conversation.py (vendored unedited).
from render_upstream_prompts import vicuna_v1_prompt, vicuna_v1_system  # noqa: E402

SYSTEM = vicuna_v1_system()
IMAGE_QUESTION = "What is shown in this image?"
TEXT_QUESTION = "What is the capital of France?"
MAX_NEW_TOKENS = 16
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = 32000
PAD_TOKEN_ID = 32001
BOS, EOS = 1, 2
VOCAB = 32002
# Every greedy step should win by at least this much (top-1 minus top-2 logit, float32);
# below it the script warns, below HARD_MIN_MARGIN it fails. The committed tiny-llava-gqa
# checkpoint (seed 2002) has one text-case step at 0.0130: it is kept (the checkpoint is
# committed and regenerates byte for byte) and the step is listed in tests/fixtures/README.md.
MIN_MARGIN = 2e-2
HARD_MIN_MARGIN = 1e-2
# Accepted below HARD_MIN_MARGIN, by name: with LLaVA's real vicuna_v1 sentence (issue 27) the
# committed, unchanged tiny-llava-gqa checkpoint's square_crop case has greedy step 14 won by
# 0.0052, still 5x the engines' 1e-3 bound on f32 logits (tests/fixtures/README.md lists it).
ACCEPTED_LOW_MARGIN = {"tiny-llava-gqa": 5e-3}


def image_prompt(question=IMAGE_QUESTION):
    """vicuna_v1 prompt with one image placeholder, rendered by LLaVA's conv_vicuna_v1."""
    return vicuna_v1_prompt(question, 1)


def text_prompt(question=TEXT_QUESTION):
    return vicuna_v1_prompt(question, 0)


# ----------------------------------------------------------------------------------------
# Model specs. Weights come from init_weights() (not transformers' initialiser): seeded,
# with gains chosen so logits are peaky (greedy tokens vary, argmax margins are wide) and
# every norm weight / bias is non-trivial (an engine that skips one is caught).
# ----------------------------------------------------------------------------------------
SPECS = {
    "tiny-llava-mha": dict(
        seed=1001,
        save_dtype=torch.float16,
        naming="old",          # transformers 4.46 names, one model.safetensors
        shards=1,
        vision=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    projection_dim=32),
        text=dict(hidden_size=48, intermediate_size=128, num_hidden_layers=6, num_attention_heads=3,
                  num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        gains=dict(emb=1.0, qk=1.6, v=1.0, o=1.0, mlp=1.0, vis_qk=1.5, vis=1.0, proj=1.0,
                   logit_scale=6.0, norm_jitter=0.15, bias=0.05),
    ),
    "tiny-llava-gqa": dict(
        seed=2002,
        save_dtype=torch.bfloat16,
        naming="new",          # newer transformers names, sharded
        shards=3,
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    image_size=112, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
                    projection_dim=64),
        text=dict(hidden_size=32, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000.0,
                  rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=2048),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        gains=dict(emb=1.0, qk=1.6, v=1.0, o=1.0, mlp=1.0, vis_qk=1.5, vis=1.0, proj=1.0,
                   logit_scale=6.0, norm_jitter=0.15, bias=0.05),
    ),
}


def num_image_tokens(spec):
    grid = spec["vision"]["image_size"] // spec["vision"]["patch_size"]
    return grid * grid + (1 if spec["vision_feature_select_strategy"] == "full" else 0)


def build_config(spec):
    vision = CLIPVisionConfig(**spec["vision"])
    text = LlamaConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD_TOKEN_ID,
                       tie_word_embeddings=False, **spec["text"])
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                      image_token_index=IMAGE_TOKEN_INDEX,
                      projector_hidden_act=spec["projector_hidden_act"],
                      vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                      vision_feature_layer=spec["vision_feature_layer"],
                      image_seq_length=num_image_tokens(spec),
                      pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def init_weights(model, seed, g):
    """Deterministic init, parameter by parameter in name order, from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            leaf = name.split(".")[-2] if name.count(".") else name
            vision = "vision_tower" in name
            if name.endswith("norm.weight") or "layernorm" in name and name.endswith("weight") \
                    or "layrnorm" in name and name.endswith("weight") or "layer_norm" in name and name.endswith("weight"):
                v = normal(p.shape, g["norm_jitter"], 1.0)
            elif name.endswith("bias"):
                v = normal(p.shape, g["bias"])
            elif name.endswith("embed_tokens.weight"):
                v = normal(p.shape, g["emb"])
            elif name.endswith("lm_head.weight"):
                v = normal(p.shape, g["logit_scale"] / p.shape[1] ** 0.5)
            elif name.endswith("class_embedding"):
                v = normal(p.shape, 1.0)
            elif name.endswith("position_embedding.weight"):
                v = normal(p.shape, 0.5)
            elif name.endswith("patch_embedding.weight"):
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                v = normal(p.shape, 2.0 / fan_in ** 0.5)
            elif p.dim() == 2:
                fan_in = p.shape[1]
                if leaf in ("q_proj", "k_proj"):
                    gain = g["vis_qk"] if vision else g["qk"]
                elif "multi_modal_projector" in name:
                    gain = g["proj"]
                elif vision:
                    gain = g["vis"]
                elif leaf == "v_proj":
                    gain = g["v"]
                elif leaf == "o_proj":
                    gain = g["o"]
                else:
                    gain = g["mlp"]
                v = normal(p.shape, gain / fan_in ** 0.5)
            else:
                raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(v)


# ----------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------
def make_square_image():
    """400x400 RGB: a diagonal colour gradient with a disc, a bar, stripes and a triangle."""
    h = w = 400
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 40 + 180 * x / (w - 1)
    gch = 60 + 150 * y / (h - 1)
    b = 200 - 120 * (x + y) / (w + h - 2)
    arr = np.stack([r, gch, b], -1)
    # soft sinusoidal texture (structure, not noise)
    arr += 12 * np.sin(x / 9.0)[..., None] * np.cos(y / 13.0)[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.ellipse((60, 70, 200, 210), fill=(230, 40, 50), outline=(20, 20, 20), width=4)
    d.rectangle((230, 250, 370, 300), fill=(30, 60, 200))
    for k in range(8):
        d.line((240 + 16 * k, 40, 300 + 16 * k, 190), fill=(250, 250, 250), width=5)
    d.polygon([(70, 360), (180, 250), (200, 380)], fill=(40, 180, 70))
    return img


def make_wide_image():
    """500x320 RGB: sky/ground gradients, a sun, a house, a checker patch."""
    h, w = 320, 500
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    sky = np.stack([90 + 60 * y / h, 150 + 60 * y / h, 250 - 30 * y / h], -1)
    ground = np.stack([60 + 40 * x / w, 140 - 50 * (y - 200) / 120, 50 + 0 * x], -1)
    arr = np.where((y < 200)[..., None], sky, ground)
    img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.ellipse((390, 25, 470, 105), fill=(255, 220, 40))
    d.rectangle((120, 120, 260, 230), fill=(180, 90, 60), outline=(40, 20, 10), width=3)
    d.polygon([(105, 122), (190, 60), (275, 122)], fill=(120, 30, 30))
    d.rectangle((170, 170, 205, 230), fill=(70, 40, 20))
    for i in range(6):
        for j in range(4):
            if (i + j) % 2 == 0:
                d.rectangle((320 + 20 * i, 240 + 15 * j, 340 + 20 * i, 255 + 15 * j), fill=(240, 240, 240))
    return img


def write_images(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    make_square_image().save(os.path.join(out_dir, "square.png"), optimize=True)
    # 4:4:4 (no chroma subsampling): decoders then differ at most in the IDCT rounding.
    make_wide_image().save(os.path.join(out_dir, "wide.jpg"), quality=92, subsampling=0)


IMAGES = {"square": "square.png", "wide": "wide.jpg"}


def load_image(images_dir, key):
    with Image.open(os.path.join(images_dir, IMAGES[key])) as im:
        im.load()
        return im.convert("RGB")


def expand2square(pil_img, background_color):
    """LLaVA's original `pad` aspect-ratio mode (llava/mm_utils.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def image_processor_for(spec):
    size = spec["vision"]["image_size"]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
                              do_convert_rgb=True, resample=3, rescale_factor=1 / 255,
                              image_mean=CLIP_MEAN, image_std=CLIP_STD)


def pad_color(proc):
    return tuple(int(x * 255) for x in proc.image_mean)


def pixel_values_for(proc, img, mode):
    if mode == "pad":
        img = expand2square(img, pad_color(proc))
    return proc(images=img, return_tensors="pt")["pixel_values"]  # [1, 3, S, S] float32


# ----------------------------------------------------------------------------------------
# Checkpoint writing / reading
# ----------------------------------------------------------------------------------------
OLD_TO_NEW = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]


def old_to_new(name):
    for a, b in OLD_TO_NEW:
        if name.startswith(a):
            return b + name[len(a):]
    raise ValueError(name)


def new_to_old(name):
    for a, b in OLD_TO_NEW:
        if name.startswith(b):
            return a + name[len(b):]
    raise ValueError(name)


def link_tokenizer(model_dir):
    for f in TOKENIZER_FILES:
        dst = os.path.join(model_dir, f)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.join("..", "tokenizer", f), dst)


def write_sharded_new_naming(old_dir, model_dir, n_shards):
    """Rewrites transformers 4.46's single model.safetensors to the newer names, sharded."""
    sd = load_file(os.path.join(old_dir, "model.safetensors"))
    # keep the model's own order (embedding first, lm_head last), split by bytes
    names = list(sd.keys())
    order = sorted(names, key=lambda n: (0 if "embed_tokens" in n else 2 if "lm_head" in n else 1, n))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    shards, cur, cur_bytes = [], [], 0
    budget = total / n_shards
    for n in order:
        b = sd[n].numel() * sd[n].element_size()
        if cur and cur_bytes + b > budget * 1.05 and len(shards) < n_shards - 1:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(n)
        cur_bytes += b
    shards.append(cur)
    assert len(shards) == n_shards, [len(s) for s in shards]
    weight_map = {}
    for i, names_i in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({old_to_new(n): sd[n].contiguous() for n in names_i}, os.path.join(model_dir, fname),
                  metadata={"format": "pt"})
        for n in names_i:
            weight_map[old_to_new(n)] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def read_checkpoint_old_names(model_dir):
    """Every tensor of a fixture checkpoint (either naming, sharded or not) under 4.46 names."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd = {}
    for fn in files:
        sd.update(load_file(os.path.join(model_dir, fn)))
    if any(k.startswith("model.") or k == "lm_head.weight" for k in sd):
        sd = {new_to_old(k): v for k, v in sd.items()}
    return sd


def load_reference_model(model_dir):
    """The saved checkpoint, upcast to float32, eager attention: what every reference uses."""
    cfg = LlavaConfig.from_pretrained(model_dir)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg)
    sd = {k: v.to(torch.float32) for k, v in read_checkpoint_old_names(model_dir).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # CLIP's position_ids is a non-persistent buffer; nothing else may be missing.
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"{model_dir}: missing {missing} unexpected {unexpected}")
    model.to(torch.float32).eval()
    model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model


def build_checkpoint(name, spec, out_dir):
    cfg = build_config(spec)
    torch.manual_seed(spec["seed"])
    model = LlavaForConditionalGeneration(cfg)
    init_weights(model, spec["seed"], spec["gains"])
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD_TOKEN_ID)
    model = model.to(spec["save_dtype"])
    model_dir = os.path.join(out_dir, name)
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    os.makedirs(model_dir)
    if spec["naming"] == "old":
        model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="1GB")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1GB")
            for f in ("config.json", "generation_config.json"):
                shutil.copy(os.path.join(tmp, f), os.path.join(model_dir, f))
            write_sharded_new_naming(tmp, model_dir, spec["shards"])
            # the rewrite must hold exactly the tensors transformers saved
            a = load_file(os.path.join(tmp, "model.safetensors"))
            b = read_checkpoint_old_names(model_dir)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    image_processor_for(spec).save_pretrained(model_dir)
    link_tokenizer(model_dir)
    return model_dir


# ----------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------
def top2_margin(row):
    v, i = torch.topk(row.float(), 2)
    return float(v[0] - v[1]), int(i[0])


@torch.no_grad()
def greedy_no_cache(model, input_ids, kw, steps):
    """Greedy decode recomputing the full sequence each step (cross-check of generate)."""
    ids = input_ids
    out = []
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False, **kw).logits[0, -1]
        t = int(logits.argmax())
        out.append(t)
        if t == EOS:
            break
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out


@torch.no_grad()
def reference_case(model, tok, spec, prompt, pixel_values):
    """One prompt (with or without an image): ids, features, logits, greedy tokens, margins."""
    n_img = num_image_tokens(spec)
    ids = tok(prompt)["input_ids"]
    res = {"prompt": prompt, "input_ids": ids}
    arrays = {}
    if pixel_values is not None:
        assert ids.count(IMAGE_TOKEN_INDEX) == 1
        s = ids.index(IMAGE_TOKEN_INDEX)
        expanded = ids[:s] + [IMAGE_TOKEN_INDEX] * n_img + ids[s + 1:]
        res["image_span"] = [s, s + n_img]
        vt = model.vision_tower(pixel_values, output_hidden_states=True)
        sel = vt.hidden_states[spec["vision_feature_layer"]][0]
        if spec["vision_feature_select_strategy"] == "default":
            sel = sel[1:]
        proj = model.multi_modal_projector(sel)
        proj_hf = model.get_image_features(pixel_values, spec["vision_feature_layer"],
                                           spec["vision_feature_select_strategy"])[0]
        assert torch.equal(proj, proj_hf)
        arrays["pixel_values"] = pixel_values[0].contiguous()
        arrays["vision_features"] = sel.contiguous()
        arrays["projector_out"] = proj.contiguous()
    else:
        expanded = ids
        res["image_span"] = None
    res["input_ids_expanded"] = expanded
    res["prompt_len_expanded"] = len(expanded)
    input_ids = torch.tensor([expanded])
    # transformers 4.46's Llava takes a prompt without image tokens for its legacy path and
    # fails; a text-only prompt goes straight to the language model (what Llava runs anyway).
    if pixel_values is None:
        model = model.language_model
    kw = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False, **kw)
    logits = out.logits[0, -1].contiguous()
    arrays["logits"] = logits
    # hidden state of the last prompt token entering each layer; the last row is after the final norm
    arrays["lm_hidden_last"] = torch.stack([h[0, -1] for h in out.hidden_states]).contiguous()
    top = torch.topk(logits, 5)
    res["first_logits_top5"] = [[int(i), float(v)] for v, i in zip(top.values, top.indices)]

    gen = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw,
                         do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=EOS, pad_token_id=PAD_TOKEN_ID)
    new = gen.sequences[0, input_ids.shape[1]:].tolist()
    margins = []
    for step, row in enumerate(gen.logits):
        m, am = top2_margin(row[0])
        assert am == new[step], (step, am, new[step])
        margins.append(m)
    assert torch.allclose(gen.logits[0][0], logits, atol=1e-4, rtol=1e-5)
    nc = greedy_no_cache(model, input_ids, kw, MAX_NEW_TOKENS)
    assert nc == new, f"cache/no-cache greedy disagree: {nc} vs {new}"
    res["generated_ids"] = new
    res["generated_text"] = tok.decode(new, skip_special_tokens=True)
    res["stopped_by_eos"] = bool(new and new[-1] == EOS and len(new) <= MAX_NEW_TOKENS)
    res["step_margins"] = [round(m, 6) for m in margins]
    res["min_margin"] = round(min(margins), 6)
    return res, arrays


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_references(name, spec, model_dir, images_dir):
    model = load_reference_model(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    cases, arrays = {}, {}
    for img_key in ("square", "wide"):
        img = load_image(images_dir, img_key)
        for mode in ("crop", "pad"):
            case = f"{img_key}_{mode}"
            if mode == "pad" and img.size[0] == img.size[1]:
                continue  # expand2square is the identity on a square image: same as crop
            pv = pixel_values_for(proc, img, mode)
            res, arr = reference_case(model, tok, spec, image_prompt(), pv)
            res = {"image": f"images/{IMAGES[img_key]}", "image_size_wh": list(img.size), "image_mode": mode,
                   "pad_color": list(pad_color(proc)) if mode == "pad" else None, **res}
            cases[case] = res
            arrays.update({f"{case}.{k}": v for k, v in arr.items()})
    res, arr = reference_case(model, tok, spec, text_prompt(), None)
    cases["text"] = {"image": None, "image_mode": None, **res}
    arrays.update({f"text.{k}": v for k, v in arr.items()})

    v, t = spec["vision"], spec["text"]
    expected = {
        "generator": "tools/make_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": name,
        "model_dir": name,
        "saved_dtype": str(spec["save_dtype"]).replace("torch.", ""),
        "tensor_naming": spec["naming"],
        "shards": spec["shards"],
        "reference_dtype": "float32",
        "attn_implementation": "eager",
        "seed": spec["seed"],
        "image_token_index": IMAGE_TOKEN_INDEX,
        "num_image_tokens": num_image_tokens(spec),
        "vision_feature_layer": spec["vision_feature_layer"],
        "vision_feature_select_strategy": spec["vision_feature_select_strategy"],
        "text_layers": t["num_hidden_layers"],
        "vision_layers": v["num_hidden_layers"],
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": EOS,
        "image_sha256": {f"images/{f}": file_sha256(os.path.join(images_dir, f)) for f in IMAGES.values()},
        "min_margin": min(c["min_margin"] for c in cases.values()),
        "arrays_file": "arrays.safetensors",
        "cases": cases,
    }
    return expected, {k: v.contiguous() for k, v in arrays.items()}


def decoded_image_sha(images_dir):
    """sha256 of the RGB bytes Pillow decodes (a JPEG decoder that differs shows up here first)."""
    return {f"images/{f}": hashlib.sha256(load_image(images_dir, k).tobytes()).hexdigest()
            for k, f in IMAGES.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare")
    ap.add_argument("--only", choices=sorted(SPECS), help="one model only")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    # OMP_NUM_THREADS, when set, wins (the build machine is shared); results do not depend on it.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, min(2, os.cpu_count() or 1)))
    out = tempfile.mkdtemp() if args.check else FIX
    if args.check:
        os.symlink(TOKENIZER_DIR, os.path.join(out, "tokenizer"))
    images_dir = os.path.join(out, "images")
    write_images(images_dir)
    summary, low = {}, []
    for name, spec in SPECS.items():
        if args.only and name != args.only:
            continue
        model_dir = build_checkpoint(name, spec, out)
        expected, arrays = make_references(name, spec, model_dir, images_dir)
        expected["decoded_rgb_sha256"] = decoded_image_sha(images_dir)
        ref = os.path.join(out, "reference", name)
        os.makedirs(ref, exist_ok=True)
        with open(os.path.join(ref, "expected.json"), "w") as f:
            json.dump(expected, f, indent=1)
            f.write("\n")
        save_file(arrays, os.path.join(ref, "arrays.safetensors"), metadata={"generator": "tools/make_fixtures.py"})
        summary[name] = expected["min_margin"]
        for c, r in expected["cases"].items():
            print(f"{name} {c}: len {r['prompt_len_expanded']} min margin {r['min_margin']:.4f} "
                  f"eos {r['stopped_by_eos']} tokens {r['generated_ids']}")
        if expected["min_margin"] < min(HARD_MIN_MARGIN, ACCEPTED_LOW_MARGIN.get(name, HARD_MIN_MARGIN)):
            low.append(name)
            print(f"ERROR: {name} min margin {expected['min_margin']} < {HARD_MIN_MARGIN}", file=sys.stderr)
        elif expected["min_margin"] < MIN_MARGIN:
            print(f"WARNING: {name} min margin {expected['min_margin']} < {MIN_MARGIN}", file=sys.stderr)
    if args.check:
        bad = compare_trees(out, FIX, [n for n in SPECS if not args.only or n == args.only])
        shutil.rmtree(out)
        if bad:
            print("DIFFERENT:\n  " + "\n  ".join(bad))
            sys.exit(1)
        print("check: regenerated fixtures match the committed ones")
    print("min margins:", summary)
    # Checked last so that --check still compares every file (an early exit used to hide it).
    if low:
        sys.exit(1)


def compare_trees(a, b, names):
    bad = []
    rels = ["images/square.png", "images/wide.jpg"]
    for n in names:
        for root, _, files in os.walk(os.path.join(a, n)):
            rels += [os.path.relpath(os.path.join(root, f), a) for f in files]
        rels += [f"reference/{n}/expected.json", f"reference/{n}/arrays.safetensors"]
    for r in rels:
        pa, pb = os.path.join(a, r), os.path.join(b, r)
        if not os.path.exists(pb) or file_sha256(pa) != file_sha256(pb):
            bad.append(r)
    return bad


if __name__ == "__main__":
    main()
