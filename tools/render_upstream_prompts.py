#!/usr/bin/env python3
"""Renders prompts through LLaVA's own conversation templates (the vendored, unedited
`tools/upstream/llava_conversation.py`) and writes them to
`tests/fixtures/templates/upstream_prompts.json`, which `tests/tests/templates.rs` compares
with visi's rendering (`Template::render_images` and `chat::render`).

Also the one place the fixture tools take LLaVA's prompt strings from: `make_fixtures.py`,
`make_next_fixtures.py` and `gen_io_refs.py` import `vicuna_v1_system()` /
`vicuna_v1_prompt()` from here instead of restating the sentence.

Plain Python 3 plus Pillow (the upstream file imports PIL at the top); run from anywhere:

    /work/wt/venv-fix/bin/python tools/render_upstream_prompts.py            # write the JSON
    /work/wt/venv-fix/bin/python tools/render_upstream_prompts.py --check    # compare, write nothing

The way each case is built follows LLaVA's evaluation scripts (`llava/eval/model_vqa_loader.py`):
`conv = conv_templates[mode].copy()`, `conv.append_message(conv.roles[0], "<image>\\n" + qs)`,
`conv.append_message(conv.roles[1], None)`, `conv.get_prompt()`; a conversation appends its
earlier answers as the assistant's messages. A system message replaces `conv.system`.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENDORED = os.path.join(ROOT, "tools", "upstream", "llava_conversation.py")
OUT = os.path.join(ROOT, "tests", "fixtures", "templates", "upstream_prompts.json")
UPSTREAM_COMMIT = "c121f0432da27facab705978f83c4ada465e46fd"
# sha256 of haotian-liu/LLaVA's llava/conversation.py at UPSTREAM_COMMIT (`git show
# c121f04:llava/conversation.py | sha256sum`); the vendored copy must hold exactly it.
UPSTREAM_SHA256 = "5afd26fa231082cb6fdc100c3887d663f72d8c99a93dcdd285dac303ca72e45c"
HEADER_END = "# " + "-" * 88 + "\n"


def _load():
    text = open(VENDORED, encoding="utf-8").read()
    body = text.split(HEADER_END, 1)[1]
    got = hashlib.sha256(body.encode("utf-8")).hexdigest()
    if got != UPSTREAM_SHA256:
        sys.exit(f"{VENDORED}: the vendored body is not upstream's file (sha256 {got})")
    spec = importlib.util.spec_from_file_location("llava_conversation", VENDORED)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


conversation = _load()


def vicuna_v1_system():
    """`conv_templates["vicuna_v1"].system`, LLaVA-1.5's system sentence."""
    return conversation.conv_templates["vicuna_v1"].system


def render(mode, turns, n_images=0, system=None):
    """Upstream's `get_prompt()` for `turns` (user, assistant, user, ...; the last one a
    user turn) in `conv_templates[mode]`; `n_images` `<image>\\n` lines go before the first
    user turn's text, as LLaVA's eval scripts put them."""
    conv = conversation.conv_templates[mode].copy()
    if system is not None:
        conv.system = system
    for i, text in enumerate(turns):
        if i == 0:
            text = "<image>\n" * n_images + text
        conv.append_message(conv.roles[i % 2], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def vicuna_v1_prompt(question, n_images=1):
    """A single-turn vicuna_v1 prompt with `n_images` images (what `run` renders by default)."""
    return render("vicuna_v1", [question], n_images)


def openai_messages(turns, n_images, system):
    """The same conversation as OpenAI-style messages (what `run --messages` / serve read)."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        if i % 2 == 0:
            parts = [{"type": "image_url", "image_url": {"url": f"img{k}.png"}}
                     for k in range(n_images if i == 0 else 0)]
            msgs.append({"role": "user", "content": parts + [{"type": "text", "text": text}]})
        else:
            msgs.append({"role": "assistant", "content": text})
    return msgs


# (name, mode, turns, images in the first turn, system override, does visi follow upstream?)
CASES = [
    ("vicuna_v1_image", "vicuna_v1", ["What is shown in this image?"], 1, None, True),
    ("vicuna_v1_text", "vicuna_v1", ["What is the capital of France?"], 0, None, True),
    ("vicuna_v1_two_images", "vicuna_v1", ["What differs between these images?"], 2, None, True),
    ("vicuna_v1_multi_turn", "vicuna_v1",
     ["What is it?", "A cat.", "What colour is it?", "Black, with a white patch.", "Is it asleep?"], 1, None, True),
    ("vicuna_v1_multi_turn_text", "vicuna_v1", ["Hi.", "Hello! How can I help?", "Name a colour."], 0, None, True),
    ("vicuna_v1_system", "vicuna_v1", ["Describe the picture."], 1, "Answer in one word.", True),
    ("mistral_instruct_image", "mistral_instruct", ["What is shown in this image?"], 1, None, True),
    ("mistral_instruct_text", "mistral_instruct", ["What is the capital of France?"], 0, None, True),
    # visi renders mistral_instruct conversations with llava-hf's llava-v1.6-mistral chat
    # template (tests/tests/conversation.rs checks it against transformers); LLaVA's own
    # conv_mistral_instruct differs from it after the first turn (` A1 </s>[INST]` there,
    # ` A1</s> [INST]` in llava-hf's). Recorded for the record, not compared.
    ("mistral_instruct_multi_turn", "mistral_instruct", ["What is it?", "A cat.", "What colour is it?"], 1, None,
     False),
]


def build():
    cases = []
    for name, mode, turns, n_images, system, follows in CASES:
        c = {
            "name": name,
            "mode": mode,
            "messages": openai_messages(turns, n_images, system),
            "images": n_images,
            "upstream": render(mode, turns, n_images, system),
            "visi_follows_upstream": follows,
        }
        if len(turns) == 1 and system is None:
            c["question"] = turns[0]
        cases.append(c)
    return {
        "generator": "tools/render_upstream_prompts.py",
        "upstream": f"haotian-liu/LLaVA llava/conversation.py @ {UPSTREAM_COMMIT} (sha256 {UPSTREAM_SHA256})",
        "vicuna_v1_system": vicuna_v1_system(),
        "cases": cases,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed JSON, write nothing")
    args = ap.parse_args()
    text = json.dumps(build(), indent=1, ensure_ascii=False) + "\n"
    if args.check:
        same = os.path.exists(OUT) and open(OUT, encoding="utf-8").read() == text
        print("check: same" if same else "check: DIFFERENT")
        sys.exit(0 if same else 1)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
