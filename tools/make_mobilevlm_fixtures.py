#!/usr/bin/env python3
"""Builds tiny random-weight MobileVLM V2 checkpoints in the authors' layout and their
reference outputs, computed with the authors' own modules (issue 23). CI never runs this:
its outputs are committed.

    /work/wt/venv-fix/bin/python tools/make_mobilevlm_fixtures.py          # write
    /work/wt/venv-fix/bin/python tools/make_mobilevlm_fixtures.py --check  # recompute, compare, write nothing

What the reference runs (nothing restated here):
  - image: the authors' `process_images` (`mobilevlm/utils.py`: `expand2square` with the
    processor mean x 255 as background, then `CLIPImageProcessor.preprocess`), config
    `image_aspect_ratio = "pad"`;
  - vision: transformers' `CLIPVisionModel`, hidden state `mm_vision_select_layer` (-2),
    `patch` features (CLS dropped), as `mobilevlm/model/vision_encoder.py` selects them;
  - projector: the authors' `LDPNetV2Projector` (`mobilevlm/model/vision_projector.py`);
  - prompt: `conv_templates["v1"]` of the authors' `mobilevlm/conversation.py`, the user
    turn `DEFAULT_IMAGE_TOKEN + "\\n" + question` as `scripts/inference.py` builds it, ids
    from the authors' `tokenizer_image_token` (chunks split at `<image>`, each tokenised
    with BOS, later chunks' first token dropped, `IMAGE_TOKEN_INDEX` spliced in);
  - decoder: transformers' `LlamaForCausalLM` over the spliced `inputs_embeds`, as
    `prepare_inputs_labels_for_multimodal` builds them; greedy, recomputing every step.
The four upstream files are vendored unedited under tools/upstream/mobilevlm/ and their
sha256 is checked before they are loaded. `vision_projector.py` imports timm and
torchvision at the top for the V1 projector (LDPBlock), which the V2 projector does not
use: empty stand-ins for those two imports are registered instead of installing them.

Writes under tests/fixtures/:
  tiny-mobilevlm-clip/        the vision tower as the authors load it (`mm_vision_tower`):
                              CLIPVisionModel.save_pretrained + preprocessor_config.json
  tiny-mobilevlm-v2/          MobileLlamaForCausalLM layout, tower inside the checkpoint
                              (`model.vision_tower.vision_tower.vision_model.*`), f16
  tiny-mobilevlm-v2-ext/      the same weights without the tower (read from
                              `mm_vision_tower`)
  reference-mobilevlm/expected.json, arrays.safetensors
"""

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types

import torch
import transformers
from safetensors.torch import save_file
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(ROOT, "tests", "fixtures")
UP = os.path.join(HERE, "upstream", "mobilevlm")
sys.path.insert(0, HERE)
import make_fixtures as mf  # noqa: E402  (images, tokenizer, init rules, CLIP mean/std)

UPSTREAM_SHA256 = {
    "constants.py": "e7af5c136052b661fee486db9c139ad86093fc5d6ec33c51fe2a92d0181dfde5",
    "conversation.py": "0a9574326b845c3ddbbcd141b329f261f3cebf965ce59fe77c460ffc509c0c25",
    "utils.py": "b849ff069859fd9034c51b57296b1b314961fb51e0fbd4e4378094fe5f9adaa9",
    "vision_projector.py": "fc8905e36ce53896af5de4cc7c5ad975cd2d6ac427a510c306e0d56ea288918a",
}
HEADER_END = "# " + "-" * 88 + "\n"


def _stub(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules.setdefault(name, m)


def _load(fname, modname):
    path = os.path.join(UP, fname)
    text = open(path, encoding="utf-8").read()
    got = hashlib.sha256(text.split(HEADER_END, 1)[1].encode("utf-8")).hexdigest()
    if got != UPSTREAM_SHA256[fname]:
        sys.exit(f"{path}: the vendored body is not upstream's file (sha256 {got})")
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


# Package skeleton so that `from mobilevlm.constants import ...` inside utils.py resolves to
# the vendored file; stand-ins for the V1 projector's timm/torchvision imports.
_stub("mobilevlm")
_stub("mobilevlm.model")
for _n in ("timm", "timm.layers", "torchvision", "torchvision.ops", "torchvision.models"):
    _stub(_n)
_stub("timm.layers.norm_act", LayerNormAct2d=None)
_stub("torchvision.ops.misc", SqueezeExcitation=None)
_stub("torchvision.models.mobilenetv3", InvertedResidual=None, InvertedResidualConfig=None)
constants = _load("constants.py", "mobilevlm.constants")
conversation = _load("conversation.py", "mobilevlm.conversation")
utils = _load("utils.py", "mobilevlm.utils")
vision_projector = _load("vision_projector.py", "mobilevlm.model.vision_projector")

QUESTION = "What is shown in this image?"
MAX_NEW_TOKENS = 16
SEED = 3003
VOCAB = mf.VOCAB  # the shared fixture tokenizer (Llama's 32000 + `<image>`, `<pad>`)
BOS, EOS = mf.BOS, mf.EOS
# A 22x22 patch grid (308 / 14): AdaptiveAvgPool2d((12, 12)) then has uneven, overlapping
# windows, so the general formula is what gets tested (the released models' 24 -> 12 is 2x2).
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=308,
              patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)
TEXT = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048)
GAINS = dict(emb=1.0, qk=1.6, v=1.0, o=1.0, mlp=1.0, vis_qk=1.5, vis=1.0, proj=1.0, logit_scale=6.0,
             norm_jitter=0.15, bias=0.05)
SELECT_LAYER = -2
CLIP_DIR, INSIDE, EXT = "tiny-mobilevlm-clip", "tiny-mobilevlm-v2", "tiny-mobilevlm-v2-ext"
REF = "reference-mobilevlm"


def mobilevlm_config(with_tower_dir):
    """config.json as MobileVLM V2's released repos write it (Llama keys plus the mm_* keys)."""
    t = LlamaConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0,
                    tie_word_embeddings=False, **TEXT).to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures", "model_type"):
        t.pop(k, None)
    t.update({
        "architectures": ["MobileLlamaForCausalLM"],
        "model_type": "mobilevlm",
        "mm_projector_type": "ldpnetv2",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_vision_tower": with_tower_dir,
        "mm_vision_select_layer": SELECT_LAYER,
        "mm_vision_select_feature": "patch",
        "vision_tower_type": "clip",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "torch_dtype": "float16",
    })
    return dict(sorted(t.items()))


def build_modules():
    torch.manual_seed(SEED)
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION, attn_implementation="eager"))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS,
                                         tie_word_embeddings=False, attn_implementation="eager", **TEXT))
    proj = vision_projector.build_vision_projector(types.SimpleNamespace(
        mm_projector_type="ldpnetv2", mm_hidden_size=VISION["hidden_size"], hidden_size=TEXT["hidden_size"]))
    assert type(proj).__name__ == "LDPNetV2Projector"
    # make_fixtures' seeded init for the tower and decoder (a holder named `vision_tower`
    # gives the tower its vision gains), then the projector's own rules.
    holder = torch.nn.Module()
    holder.vision_tower = clip
    holder.language = llama
    mf.init_weights(holder, SEED, GAINS)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in sorted(proj.named_parameters()):
            if name.endswith("bias"):
                v = torch.randn(p.shape, generator=gen) * 0.05
            elif name.startswith("peg"):  # depthwise 3x3: [C, 1, 3, 3]
                v = torch.randn(p.shape, generator=gen) * 0.35
            else:
                v = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
            p.copy_(v)
    # The checkpoints are f16: the reference runs the f16-rounded weights in float32. The
    # parameters only: `.half()` would also round buffers such as Llama's rotary `inv_freq`.
    with torch.no_grad():
        for m in (clip, llama, proj):
            for p in m.parameters():
                p.copy_(p.half().float())
            m.eval()
    return clip, llama, proj


def save_tower(clip, out):
    d = os.path.join(out, CLIP_DIR)
    os.makedirs(d)
    clip.save_pretrained(d, safe_serialization=True, state_dict={
        k: v.half() if v.is_floating_point() else v for k, v in clip.state_dict().items()})
    mf.image_processor_for({"vision": VISION}).save_pretrained(d)
    return d


def save_model(name, llama, proj, clip, out, tower_inside):
    d = os.path.join(out, name)
    os.makedirs(d)
    sd = {k: v for k, v in llama.state_dict().items()}
    sd.update({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()})
    if tower_inside:
        sd.update({f"model.vision_tower.vision_tower.{k}": v for k, v in clip.state_dict().items()
                   if not k.endswith("position_ids")})
    sd = {k: v.to(torch.float16).contiguous() for k, v in sorted(sd.items())}
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(mobilevlm_config(os.path.join("..", CLIP_DIR)), f, indent=2)
        f.write("\n")
    mf.link_tokenizer(d)
    return d


def prompt_text(question):
    conv = conversation.conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], constants.DEFAULT_IMAGE_TOKEN + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@torch.no_grad()
def reference_case(clip, llama, proj, tok, proc, img):
    model_cfg = types.SimpleNamespace(image_aspect_ratio="pad")
    pixels = utils.process_images([img], proc, model_cfg)  # [1, 3, S, S]
    hs = clip(pixels, output_hidden_states=True).hidden_states[SELECT_LAYER]
    feats = hs[:, 1:]  # `patch`
    emb_img = proj(feats)[0]  # [144, H]
    prompt = prompt_text(QUESTION)
    ids = utils.tokenizer_image_token(prompt, tok, constants.IMAGE_TOKEN_INDEX)
    s = ids.index(constants.IMAGE_TOKEN_INDEX)
    assert ids.count(constants.IMAGE_TOKEN_INDEX) == 1
    embed = llama.get_input_embeddings()
    pre, post = torch.tensor(ids[:s]), torch.tensor(ids[s + 1:])
    n_img = emb_img.shape[0]
    gen, margins, first_top5 = [], [], None
    for step in range(MAX_NEW_TOKENS):
        x = torch.cat([embed(pre), emb_img, embed(torch.tensor(list(post) + gen, dtype=torch.long))], 0)
        logits = llama(inputs_embeds=x[None], use_cache=False).logits[0, -1]
        top = torch.topk(logits, 5)
        if step == 0:
            first_top5 = [[int(i), float(v)] for v, i in zip(top.values, top.indices)]
        margins.append(float(top.values[0] - top.values[1]))
        t = int(top.indices[0])
        gen.append(t)
        if t == EOS:
            break
    res = {
        "prompt": prompt,
        "input_ids": ids,
        "image_span": [s, s + n_img],
        "prompt_len_expanded": len(ids) - 1 + n_img,
        "first_logits_top5": first_top5,
        "generated_ids": gen,
        "generated_text": tok.decode(gen, skip_special_tokens=True),
        "step_margins": [round(m, 6) for m in margins],
        "min_margin": round(min(margins), 6),
    }
    arrays = {"pixel_values": pixels[0].contiguous(), "projector_out": emb_img.contiguous()}
    return res, arrays


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    # Two threads always: the float32 logits' last bits depend on torch's thread count.
    torch.set_num_threads(2)
    out = tempfile.mkdtemp() if args.check else FIX
    if args.check:
        os.symlink(os.path.join(FIX, "tokenizer"), os.path.join(out, "tokenizer"))
        shutil.copytree(os.path.join(FIX, "images"), os.path.join(out, "images"))
    for n in (CLIP_DIR, INSIDE, EXT, REF):
        if os.path.exists(os.path.join(out, n)):
            shutil.rmtree(os.path.join(out, n))
    clip, llama, proj = build_modules()
    tower_dir = save_tower(clip, out)
    save_model(INSIDE, llama, proj, clip, out, True)
    save_model(EXT, llama, proj, clip, out, False)
    tok = AutoTokenizer.from_pretrained(os.path.join(out, INSIDE))
    proc = CLIPImageProcessor.from_pretrained(tower_dir)
    cases, arrays = {}, {}
    for key in ("square", "wide"):
        img = mf.load_image(os.path.join(out, "images"), key)
        res, arr = reference_case(clip, llama, proj, tok, proc, img)
        cases[key] = {"image": f"images/{mf.IMAGES[key]}", "image_size_wh": list(img.size), **res}
        arrays.update({f"{key}.{k}": v for k, v in arr.items()})
        print(f"{key}: len {res['prompt_len_expanded']} min margin {res['min_margin']:.4f} tokens {res['generated_ids']}")
    expected = {
        "generator": "tools/make_mobilevlm_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "upstream": "Meituan-AutoML/MobileVLM@688fdec914810485c8766da96c63d9d2ce15f750",
        "models": [INSIDE, EXT],
        "vision_tower_dir": CLIP_DIR,
        "reference_dtype": "float32",
        "image_token_index": constants.IMAGE_TOKEN_INDEX,
        "num_image_tokens": 144,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": EOS,
        "question": QUESTION,
        "conv_mode": "v1",
        "min_margin": min(c["min_margin"] for c in cases.values()),
        "cases": cases,
    }
    ref = os.path.join(out, REF)
    os.makedirs(ref)
    with open(os.path.join(ref, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    save_file(arrays, os.path.join(ref, "arrays.safetensors"), metadata={"generator": "tools/make_mobilevlm_fixtures.py"})
    if args.check:
        bad = []
        for n in (CLIP_DIR, INSIDE, EXT, REF):
            for root, _, files in os.walk(os.path.join(out, n)):
                for f in files:
                    r = os.path.relpath(os.path.join(root, f), out)
                    pa, pb = os.path.join(out, r), os.path.join(FIX, r)
                    if os.path.islink(pa):
                        continue
                    if not os.path.exists(pb) or mf.file_sha256(pa) != mf.file_sha256(pb):
                        bad.append(r)
        shutil.rmtree(out)
        if bad:
            sys.exit("DIFFERENT:\n  " + "\n  ".join(bad))
        print("check: regenerated fixtures match the committed ones")
    if expected["min_margin"] < mf.HARD_MIN_MARGIN:
        sys.exit(f"ERROR: min margin {expected['min_margin']} < {mf.HARD_MIN_MARGIN}")


if __name__ == "__main__":
    main()
