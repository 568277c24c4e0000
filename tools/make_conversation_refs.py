#!/usr/bin/env python3
"""transformers references for a multi-turn conversation on the committed tiny fixtures:
tests/fixtures/reference/<model>/conversation.json. CI never runs this.

    /tmp/venv-fix/bin/python tools/make_conversation_refs.py

The conversation (OpenAI-style messages, as `visi-cli run --messages` reads them) is
rendered by LLaVA's own conv_templates["vicuna_v1"].get_prompt() (the vendored, unedited
tools/upstream/llava_conversation.py, through tools/render_upstream_prompts.py), independently
of the Rust renderer:

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:

tokenised whole (as LLaVA and llava-hf do), run through LlavaForConditionalGeneration
(float32, eager) on the PNG fixture (pixel values from CLIPImageProcessor, crop), greedy.
"""

import json
import os

import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor

import make_fixtures as mf
import render_upstream_prompts as rup

MESSAGES = [
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "../../images/square.png"}},
        {"type": "text", "text": "What is shown in this image?"}]},
    {"role": "assistant", "content": "A red square and a blue circle on a white background."},
    {"role": "user", "content": "What colour is the circle?"},
]


def render_conv_vicuna_v1(messages):
    turns, n_images = [], 0
    for i, m in enumerate(messages):
        c = m["content"]
        if isinstance(c, str):
            turns.append(c)
        else:
            turns.append("\n".join(p["text"] for p in c if p["type"] == "text"))
            k = sum(p["type"] == "image_url" for p in c)
            assert i == 0 or k == 0, "images only in the first turn"
            n_images += k
    return rup.render("vicuna_v1", turns, n_images)


@torch.no_grad()
def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or 2)
    img = Image.open(os.path.join(mf.IMAGES_DIR, "square.png")).convert("RGB")
    for name, spec in mf.SPECS.items():
        model_dir = os.path.join(mf.FIX, name)
        model = mf.load_reference_model(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        proc = CLIPImageProcessor.from_pretrained(model_dir)
        pv = mf.pixel_values_for(proc, img, "crop")
        prompt = render_conv_vicuna_v1(MESSAGES)
        res, _ = mf.reference_case(model, tok, spec, prompt, pv)
        out = {
            "generator": "tools/make_conversation_refs.py",
            "messages": MESSAGES,
            "image": "images/square.png",
            "image_mode": "crop",
            **{k: res[k] for k in ("prompt", "input_ids_expanded", "image_span", "first_logits_top5",
                                   "generated_ids", "generated_text", "step_margins", "min_margin")},
        }
        path = os.path.join(mf.REF_DIR, name, "conversation.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        print(f"{name}: {len(res['input_ids_expanded'])} tokens, min margin {res['min_margin']:.4f}, "
              f"tokens {res['generated_ids']}")


if __name__ == "__main__":
    main()
