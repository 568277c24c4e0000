#!/usr/bin/env python3
"""transformers reference for a multi-turn conversation on the tiny LLaVA-NeXT Mistral fixture:
tests/fixtures/reference-next/tiny-next-mistral/conversation.json. CI never runs this.

    /tmp/venv-fix/bin/python tools/make_next_conversation_refs.py

The conversation (OpenAI-style messages, as `visi-cli run --messages` and `serve` read them)
is rendered by transformers' `apply_chat_template` with the chat template that llava-hf ships
with llava-v1.6-mistral-7b-hf (copied below verbatim from its processor), not by any code of
ours. The rendered prompt goes through LlavaNextProcessor and LlavaNextForConditionalGeneration
(float32, eager) on the landscape fixture, greedy, as tools/make_next_fixtures.py does.
"""

import json
import os
import sys

import torch
from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextProcessor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402
import make_next_fixtures as mn  # noqa: E402

# llava-hf/llava-v1.6-mistral-7b-hf's chat_template (processor and tokenizer).
LLAVA_NEXT_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

NAME = "tiny-next-mistral"
IMAGE = "landscape"

# OpenAI form (what visi reads); image URLs relative to the reference directory.
MESSAGES = [
    {"role": "system", "content": "You are a careful visual assistant."},
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "../../images/landscape.png"}},
        {"type": "text", "text": "What is shown in this image?"}]},
    {"role": "assistant", "content": "A wide picture with shapes on it."},
    {"role": "user", "content": [
        {"type": "text", "text": "What colour is the biggest shape?"},
        {"type": "text", "text": " One word."}]},
]


def to_hf(messages):
    """The same conversation in transformers' chat-template form ({"type": "image"} parts)."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, str):
            parts = [{"type": "text", "text": c}]
        else:
            parts = [{"type": "image"} if p["type"] == "image_url" else {"type": "text", "text": p["text"]}
                     for p in c]
        out.append({"role": m["role"], "content": parts})
    return out


@torch.no_grad()
def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or 1)
    spec = mn.SPECS[NAME]
    model_dir = os.path.join(mf.FIX, NAME)
    model = mn.load_reference_model(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ip = LlavaNextImageProcessor.from_pretrained(model_dir)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=spec["vision"]["patch_size"],
                              vision_feature_select_strategy="default", chat_template=LLAVA_NEXT_MISTRAL_TEMPLATE)
    prompt = proc.apply_chat_template(to_hf(MESSAGES), tokenize=False)
    res, _, logits = mn.run_case(model, proc, prompt, [mn.load(mf.IMAGES_DIR, IMAGE)], {})
    top5 = torch.topk(logits, 5)
    out = {
        "generator": "tools/make_next_conversation_refs.py",
        "chat_template": LLAVA_NEXT_MISTRAL_TEMPLATE,
        "messages": MESSAGES,
        "first_logits_top5": [[int(i), float(v)] for v, i in zip(top5.values, top5.indices)],
        **res,
    }
    path = os.path.join(mf.FIX, "reference-next", NAME, "conversation.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"{NAME}: {prompt!r}\n{len(res['input_ids_expanded'])} tokens, min margin {res['min_margin']:.4f}, "
          f"tokens {res['generated_ids']}")
    if res["min_margin"] < mf.HARD_MIN_MARGIN:
        print(f"ERROR: min margin below {mf.HARD_MIN_MARGIN}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
