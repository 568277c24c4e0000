#!/usr/bin/env python3
"""Driver of bench/peer_llamacpp.sh: llama.cpp (llama-cpp-python) next to visi-cli bench.

Subcommands:
  extract  LLAVA_DIR OUT_DIR   the text decoder of a llava-hf checkpoint as a
                               LlamaForCausalLM directory (config, safetensors, tokenizer)
  llama    GGUF                time llama.cpp prefill and greedy decode; one JSON line
  table    VISI.json LLAMA.json...   the side-by-side markdown table
  gguf-run GGUF --prompt-file F   one llama.cpp greedy generation on a GGUF text model
  gguf-bench GGUF --visi-cli BIN  visi and llama.cpp, CPU and Vulkan, short and long
                               prompts, interleaved reps, each run its own process (RSS);
                               JSON lines, a summary JSON and a markdown table

`extract` copies tensor bytes unchanged (no torch, no dtype conversion), so the GGUF that
the converter makes from it holds the same f16 values visi loads from the LLaVA dir.
"""

import argparse
import json
import os
import random
import shutil
import struct
import sys
import time

# Tokens before the image in visi's bench prompt (cli/src/bench.rs PREFIX_TOKENS).
PREFIX_TOKENS = 35

TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
]


def read_header(path):
    """The JSON header of a safetensors file and the byte offset its data starts at."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def text_name(name):
    """The LlamaForCausalLM name of a LLaVA tensor, or None for vision/projector ones.

    Two llava-hf layouts exist: `language_model.model.layers...` / `language_model.lm_head`
    (transformers < 4.52) and `model.language_model.layers...` / `lm_head` (newer)."""
    if name.startswith("language_model."):
        return name[len("language_model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("lm_head."):
        return name
    return None


def verify(src_path, src_base, keep, out_path):
    """Re-reads the written file: every kept tensor's dtype, shape and bytes must match."""
    header, base = read_header(out_path)
    with open(src_path, "rb") as fa, open(out_path, "rb") as fb:
        for k, info in keep.items():
            w = header.get(k)
            if w is None or w["dtype"] != info["dtype"] or w["shape"] != info["shape"]:
                sys.exit(f"extract: {k}: header {w} does not match the source {info}")
            a0, a1 = info["data_offsets"]
            b0, _ = w["data_offsets"]
            fa.seek(src_base + a0)
            fb.seek(base + b0)
            if fa.read(a1 - a0) != fb.read(a1 - a0):
                sys.exit(f"extract: {k}: bytes differ from the source")


def extract(src, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    text = dict(cfg["text_config"])
    text["architectures"] = ["LlamaForCausalLM"]
    text["model_type"] = "llama"
    text.setdefault("torch_dtype", cfg.get("torch_dtype", "float16"))
    text.setdefault("vocab_size", cfg.get("vocab_size", text.get("vocab_size")))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(text, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))

    shards = sorted(p for p in os.listdir(src) if p.endswith(".safetensors"))
    if not shards:
        sys.exit(f"extract: no *.safetensors in {src}")
    weight_map = {}
    total = 0
    for shard in shards:
        header, base = read_header(os.path.join(src, shard))
        keep = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            new = text_name(name)
            if new is not None:
                keep[new] = info
        if not keep:
            continue
        # Re-pack the kept tensors contiguously, in their original order.
        order = sorted(keep, key=lambda k: keep[k]["data_offsets"][0])
        out_header = {"__metadata__": {"format": "pt"}}
        off = 0
        for k in order:
            a, b = keep[k]["data_offsets"]
            out_header[k] = {
                "dtype": keep[k]["dtype"],
                "shape": keep[k]["shape"],
                "data_offsets": [off, off + (b - a)],
            }
            off += b - a
        hb = json.dumps(out_header, separators=(",", ":")).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        out_name = shard if len(shards) > 1 else "model.safetensors"
        with open(os.path.join(src, shard), "rb") as fi, open(
            os.path.join(out, out_name), "wb"
        ) as fo:
            fo.write(struct.pack("<Q", len(hb)))
            fo.write(hb)
            for k in order:
                a, b = keep[k]["data_offsets"]
                fi.seek(base + a)
                left = b - a
                while left:
                    chunk = fi.read(min(left, 64 << 20))
                    fo.write(chunk)
                    left -= len(chunk)
        verify(os.path.join(src, shard), base, keep, os.path.join(out, out_name))
        for k in order:
            weight_map[k] = out_name
        total += off
    if len(shards) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    print(f"extract: {len(weight_map)} text tensors, {total / 2**20:.1f} MiB -> {out}")


def extract_mm(src, out):
    """The CLIP tower (CLIPVisionModel dir) and the projector (llava.projector) of a
    llava-hf dir, the inputs of llama.cpp's examples/llava/convert_image_encoder_to_gguf.py."""
    import torch
    from safetensors.torch import load_file, save_file

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    vis, proj = {}, {}
    for shard in sorted(p for p in os.listdir(src) if p.endswith(".safetensors")):
        for k, v in load_file(os.path.join(src, shard)).items():
            for pre in ("vision_tower.", "model.vision_tower."):
                if k.startswith(pre):
                    vis[k[len(pre):]] = v
            for pre in ("multi_modal_projector.", "model.multi_modal_projector."):
                if k.startswith(pre):
                    proj["multi_modal_projector." + k[len(pre):]] = v.float()
    if not vis or len(proj) != 4:
        sys.exit(f"extract-mm: {src}: {len(vis)} vision and {len(proj)} projector tensors")
    vc = dict(cfg["vision_config"])
    vc["architectures"] = ["CLIPVisionModel"]
    vc["model_type"] = "clip_vision_model"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(vc, f, indent=2)
    shutil.copy(os.path.join(src, "preprocessor_config.json"), out)
    save_file(vis, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    torch.save(proj, os.path.join(out, "llava.projector"))
    print(f"extract-mm: {len(vis)} vision tensors, projector -> {out}")


def noise_ppm(size, seed):
    """A seeded noise image as binary PPM bytes (stb_image, inside clip.cpp, reads PNM)."""
    rng = random.Random(seed)
    return f"P6 {size} {size} 255\n".encode() + bytes(rng.randrange(256) for _ in range(3 * size * size))


def prompt_ids(n, vocab, seed):
    """BOS then seeded ids below the vocabulary's added tokens (no <image>, no specials)."""
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, min(vocab, 32000)) for _ in range(n - 1)]


def last_argmax(llm, n_vocab):
    """Greedy choice from the last logits row. llama_get_logits_ith synchronises the
    backends: the same point at which visi reads its argmax back."""
    import ctypes

    import numpy as np
    import llama_cpp

    p = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    row = np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_float)), (n_vocab,))
    return int(row.argmax())


def time_llama(a):
    import ctypes

    import numpy as np
    import llama_cpp

    n_ctx = a.prompt_len + a.decode_tokens + 8
    llm = llama_cpp.Llama(
        model_path=a.gguf,
        n_gpu_layers=a.n_gpu_layers,
        n_ctx=n_ctx,
        # One batch and one micro-batch for the whole prompt, like visi's single prefill.
        n_batch=a.prompt_len,
        n_ubatch=a.prompt_len,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        seed=a.seed,
        verbose=True,
    )
    n_vocab = llm.n_vocab()
    ids = prompt_ids(a.prompt_len, n_vocab, a.seed)

    def next_id():
        return last_argmax(llm, n_vocab)

    clip, image = None, None
    if a.mmproj:
        from llama_cpp import llava_cpp

        clip = llava_cpp.clip_model_load(a.mmproj.encode(), 0)
        if not clip:
            sys.exit(f"llava: clip_model_load({a.mmproj}) failed")
        image = noise_ppm(a.image_size, a.seed)
    prefill, decode, vision, tokens, n_img = [], [], [], None, None
    for rep in range(a.warmup + a.reps):
        llm.reset()
        if clip:
            # LLaVA: vision (CLIP + projector in clip.cpp), then prefill = 35 prefix ids,
            # the image embeddings, the suffix ids, as visi's bench lays them out.
            tv = time.perf_counter()
            buf = (ctypes.c_uint8 * len(image)).from_buffer(bytearray(image))
            embed = llava_cpp.llava_image_embed_make_with_bytes(clip, a.threads, buf, len(image))
            n_img = embed.contents.n_image_pos
            t0 = time.perf_counter()
            llm.eval(ids[:PREFIX_TOKENS])
            n_past = ctypes.c_int(llm.n_tokens)
            llava_cpp.llava_eval_image_embed(llm.ctx, embed, llm.n_batch, ctypes.pointer(n_past))
            llm.n_tokens = n_past.value
            llm.eval(ids[PREFIX_TOKENS + n_img:])
            llava_cpp.llava_image_embed_free(embed)
        else:
            tv = t0 = time.perf_counter()
            llm.eval(ids)
        tok = next_id()
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(a.decode_tokens):
            llm.eval([tok])
            tok = next_id()
            out.append(tok)
        t2 = time.perf_counter()
        if rep >= a.warmup:
            if clip:
                vision.append((t0 - tv) * 1e3)
            prefill.append((t1 - t0) * 1e3)
            decode.append((t2 - t1) * 1e3)
        tokens = out

    finish(a, prefill, decode, tokens, vision, n_img)


def finish(a, prefill, decode, tokens, vision, n_img=None):
    import llama_cpp

    def stat(v):
        s = sorted(v)
        return {"min": s[0], "median": s[len(s) // 2], "all": v}

    pm, dm = stat(prefill), stat(decode)
    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "llama_cpp_python": llama_cpp.__version__,
                "gguf": a.gguf,
                "n_gpu_layers": a.n_gpu_layers,
                "label": a.label,
                "threads": a.threads,
                "prompt_len": a.prompt_len,
                "decode_tokens": a.decode_tokens,
                "reps": a.reps,
                "warmup": a.warmup,
                "vision_ms": stat(vision) if vision else None,
                "image_tokens": n_img,
                "prefill_ms": pm,
                "decode_ms": dm,
                "prefill_tokens_per_s": a.prompt_len / (pm["median"] / 1e3),
                "decode_tokens_per_s": a.decode_tokens / (dm["median"] / 1e3)
                if a.decode_tokens
                else None,
                "greedy_tokens": tokens,
            }
        ),
        flush=True,
    )


def seq_lens(m):
    """Run-length form of the per-layer sequence lengths, e.g. `640×3 64×3`."""
    out = []
    for n in m.get("layer_seq_lens", []):
        if out and out[-1][0] == n:
            out[-1][1] += 1
        else:
            out.append([n, 1])
    return " ".join(f"{n}×{c}" for n, c in out)


def table(a):
    with open(a.visi) as f:
        v = json.load(f)
    rows = []
    dev = v.get("device", {})
    adapter = dev.get("adapter", dev) if isinstance(dev, dict) else dev
    plen = v["prompt"]["len"] if isinstance(v.get("prompt"), dict) and "len" in v["prompt"] else None
    vimg = v["prompt"].get("image_tokens", 576) if isinstance(v.get("prompt"), dict) else 576
    for name in ("dense", "visipruner"):
        m = v["methods"][name]
        pre = m["prefill_ms"]["median"]
        n = plen or a.prompt_len
        rows.append(
            (
                f"visi {name}" + ("" if name == "dense" else f" ({seq_lens(m)})"),
                f"wgpu: {adapter}",
                f"LLaVA: {n} ({vimg} image)",
                f"{m['vision_ms']['median']:.1f}",
                f"{pre:.1f}",
                f"{n / (pre / 1e3):.1f}",
                f"{m['decode_tokens_per_s']['median']:.2f}",
            )
        )
    for path in a.llama:
        with open(path) as f:
            lines = [l for l in f if l.startswith("{")]
        if not lines:
            rows.append((f"llama.cpp ({path})", "failed: see its .err log", "", "", "", "", ""))
            continue
        r = json.loads(lines[-1])
        rows.append(
            (
                f"llama.cpp f16, n_gpu_layers={r['n_gpu_layers']}",
                r["label"],
                f"LLaVA: {r['prompt_len']} ({r.get('image_tokens') or 576} image)" if r.get("vision_ms") else
                f"text: {r['prompt_len']}",
                f"{r['vision_ms']['median']:.1f}" if r.get("vision_ms") else "",
                f"{r['prefill_ms']['median']:.1f}",
                f"{r['prefill_tokens_per_s']:.1f}",
                f"{r['decode_tokens_per_s']:.2f}" if r["decode_tokens_per_s"] else "",
            )
        )
    print(
        "| engine / method | what ran the decoder | prompt | vision ms (med) | prefill ms (med) "
        "| prefill tok/s | decode tok/s (med) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


# ---- GGUF text model: visi-cli run vs llama.cpp, one process per run ----

# ~20 tokens, and a paragraph that bench makes ~512 tokens long by repetition and trimming.
SHORT_PROMPT = "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz"
LONG_PARAGRAPH = (
    "Rivers have shaped human settlement for as long as people have farmed. The floods of "
    "the Nile left fertile silt along its banks every summer, and the calendar of ancient "
    "Egypt followed the rise and fall of the water. In Mesopotamia, canals carried the "
    "Tigris and the Euphrates into fields far from their beds, and the work of keeping "
    "them open required records, taxes and officials. Along the Yellow River, dikes rose "
    "higher each generation as the riverbed filled with loess, until a single breach could "
    "drown a province. Trade followed the same paths: boats moved grain, timber and stone "
    "more cheaply than any cart, and towns grew where rivers met or where a ford made a "
    "crossing possible. "
)


def gguf_run(a):
    """One greedy generation with llama.cpp; one JSON line (times in ms)."""
    import llama_cpp

    text = open(a.prompt_file, encoding="utf-8").read()
    t_load = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=a.gguf,
        n_gpu_layers=a.n_gpu_layers,
        n_ctx=2048,
        n_batch=1024,
        n_ubatch=1024,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
    )
    load_ms = (time.perf_counter() - t_load) * 1e3
    # add_bos=True lets the model's own flag decide (SmolLM2: no BOS), as visi does.
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    n_vocab = llm.n_vocab()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = last_argmax(llm, n_vocab)
    t1 = time.perf_counter()
    out = [tok]
    eos = llm.token_eos()
    while len(out) < a.new_tokens and tok != eos:
        llm.eval([tok])
        tok = last_argmax(llm, n_vocab)
        out.append(tok)
    t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "prompt_tokens": len(ids),
                "tokens": out,
                "decode_steps": len(out) - 1,
                "timings_ms": {"load": load_ms, "prefill": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3},
                "llama_cpp_python": llama_cpp.__version__,
            }
        ),
        flush=True,
    )


def long_prompt(gguf, target):
    """LONG_PARAGRAPH repeated and cut at a word so llama.cpp's tokenizer counts ~target."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_gpu_layers=0, vocab_only=True, verbose=False)
    words = (LONG_PARAGRAPH * (target // 100 + 2)).split(" ")
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose token count is <= target
        mid = (lo + hi + 1) // 2
        n = len(llm.tokenize(" ".join(words[:mid]).encode(), add_bos=True, special=False))
        lo, hi = (mid, hi) if n <= target else (lo, mid - 1)
    return " ".join(words[:lo])


def run_child(cmd, env_extra):
    """Runs cmd; returns (last JSON line of stdout, its peak RSS in MiB, stderr)."""
    import subprocess
    import tempfile

    env = dict(os.environ, **env_extra)
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, text=True)
        # wait4 (not Popen.wait) for the child's own rusage: its peak resident set.
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    rss = ru.ru_maxrss / 1024
    if p.returncode != 0:
        return None, rss, err
    lines = [l for l in out.splitlines() if l.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), rss, err


def gguf_bench(a):
    import subprocess

    os.makedirs(a.work, exist_ok=True)
    prompts = {"short": SHORT_PROMPT, "long": long_prompt(a.gguf, a.long_tokens)}
    files = {}
    for k, v in prompts.items():
        files[k] = os.path.join(a.work, f"prompt-{k}.txt")
        with open(files[k], "w", encoding="utf-8") as f:
            f.write(v)
    no_vk = {"VK_ICD_FILENAMES": "/nonexistent.json", "VK_DRIVER_FILES": "/nonexistent.json"}
    me = lambda t: [sys.executable, os.path.abspath(__file__), "gguf-run", a.gguf, "--threads", str(t)]
    visi = lambda t: [a.visi_cli, "--threads", str(t), "run", "--model", a.gguf, "--template", "raw", "--json"]
    configs = []
    # Device labels carry the thread count when several are compared.
    for t in [a.threads] + a.extra_threads:
        cpu = "cpu" if t == a.threads else f"cpu {t}t"
        configs += [
            ("visi", cpu, lambda p, n, t=t: visi(t) + ["--device", "cpu", "--max-new-tokens", str(n), "--prompt", prompts[p]], {}),
            ("llama.cpp", cpu, lambda p, n, t=t: me(t) + ["--n-gpu-layers", "0", "--new-tokens", str(n), "--prompt-file", files[p]], no_vk),
        ]
    if not a.no_vulkan:
        configs += [
            ("visi", "vulkan", lambda p, n, t=a.threads: visi(t) + ["--device", "gpu", "--max-new-tokens", str(n), "--prompt", prompts[p]], {}),
            ("llama.cpp", "vulkan", lambda p, n, t=a.threads: me(t) + ["--n-gpu-layers", "-1", "--new-tokens", str(n), "--prompt-file", files[p]], {}),
        ]
    auto = subprocess.run([a.visi_cli, "devices", "--json"], capture_output=True, text=True)
    try:
        auto = json.loads(auto.stdout)["auto"]
    except (ValueError, KeyError):
        auto = "?"
    runs = []
    log = open(os.path.join(a.work, "runs.jsonl"), "w")
    for rep in range(a.warmup + a.reps):
        # Interleaved: every configuration once per repetition, so drift and the load of
        # other processes hit all of them alike.
        for engine, dev, cmd, env in configs:
            for p in ("short", "long"):
                n = a.vulkan_new_tokens if dev == "vulkan" else a.new_tokens
                j, rss, err = run_child(cmd(p, n), env)
                r = {"rep": rep, "warmup": rep < a.warmup, "engine": engine, "device": dev, "prompt": p, "rss_mib": rss}
                if j is None:
                    r["error"] = err.strip().splitlines()[-1:] if err else "no output"
                else:
                    tm = j["timings_ms"]
                    r.update(
                        prompt_tokens=j["prompt_tokens"],
                        ttft_ms=tm["prefill"],
                        prefill_tok_s=j["prompt_tokens"] / (tm["prefill"] / 1e3),
                        decode_steps=j["decode_steps"],
                        decode_tok_s=j["decode_steps"] / (tm["decode"] / 1e3) if j["decode_steps"] else None,
                        tokens=j["tokens"],
                    )
                    if "device" in j:
                        r["adapter"] = j["device"].get("adapter")
                log.write(json.dumps(r) + "\n")
                log.flush()
                print(f"gguf-bench: rep {rep} {engine} {dev} {p}: "
                      + (f"prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s'] or 0:.1f} tok/s, rss {rss:.0f} MiB"
                         if "error" not in r else f"error {r['error']}"), file=sys.stderr, flush=True)
                runs.append(r)
    summary = summarize(runs)
    summary.update(gguf=a.gguf, threads=a.threads, reps=a.reps, warmup=a.warmup, auto=auto,
                   loadavg=os.getloadavg(), cpus=os.cpu_count(),
                   prompts={k: {"chars": len(v)} for k, v in prompts.items()})
    with open(os.path.join(a.work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    print_gguf_table(summary)


def summarize(runs):
    def med(v):
        v = sorted(x for x in v if x is not None)
        return v[len(v) // 2] if v else None

    rows = {}
    for r in runs:
        if r["warmup"] or "error" in r:
            continue
        rows.setdefault((r["engine"], r["device"], r["prompt"]), []).append(r)
    out = {"rows": []}
    for (e, d, p), rs in sorted(rows.items()):
        out["rows"].append(
            {
                "engine": e, "device": d, "prompt": p,
                "prompt_tokens": rs[0]["prompt_tokens"],
                "adapter": rs[0].get("adapter"),
                "runs": len(rs),
                "prefill_tok_s": med([x["prefill_tok_s"] for x in rs]),
                "ttft_ms": med([x["ttft_ms"] for x in rs]),
                "decode_tok_s": med([x["decode_tok_s"] for x in rs]),
                "decode_steps": rs[0]["decode_steps"],
                "rss_mib": med([x["rss_mib"] for x in rs]),
                "all_prefill_tok_s": [x["prefill_tok_s"] for x in rs],
                "all_decode_tok_s": [x["decode_tok_s"] for x in rs],
            }
        )
    by = {(r["engine"], r["device"], r["prompt"]): r for r in out["rows"]}
    ratios = {}
    for (e, d, p) in by:
        if e != "visi" or not d.startswith("cpu"):
            continue
        v, l = by.get(("visi", d, p)), by.get(("llama.cpp", d, p))
        if v and l:
            ratios[f"{p} prompt, {d}"] = {
                "cpu_prefill_visi_over_llama": v["prefill_tok_s"] / l["prefill_tok_s"],
                "cpu_decode_visi_over_llama": (v["decode_tok_s"] or 0) / (l["decode_tok_s"] or 1),
            }
    out["ratios"] = ratios
    return out


def print_gguf_table(s):
    print()
    print(f"GGUF {s['gguf']}, {s['threads']} threads, {s['reps']} interleaved reps (+{s['warmup']} warm-up), "
          f"load average at the end {s['loadavg'][0]:.1f} on {s['cpus']} CPUs; visi --device auto picks {s['auto']}")
    print()
    print("| engine, device | prompt tokens | prefill tok/s | TTFT ms | decode tok/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    f = lambda x, d=1: "" if x is None else f"{x:.{d}f}"
    for r in s["rows"]:
        print(f"| {r['engine']}, {r['device']} | {r['prompt_tokens']} | {f(r['prefill_tok_s'])} | {f(r['ttft_ms'])} "
              f"| {f(r['decode_tok_s'])} | {f(r['rss_mib'], 0)} |")
    for p, r in s["ratios"].items():
        print(f"\n{p}: visi/llama.cpp prefill {r['cpu_prefill_visi_over_llama']:.2f}x, "
              f"decode {r['cpu_decode_visi_over_llama']:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("llava_dir")
    e.add_argument("out_dir")
    m = sub.add_parser("extract-mm")
    m.add_argument("llava_dir")
    m.add_argument("out_dir")
    t = sub.add_parser("llama")
    t.add_argument("gguf")
    t.add_argument("--mmproj", help="LLaVA: clip/projector GGUF; the prompt gets an image")
    t.add_argument("--image-size", type=int, default=336)
    t.add_argument("--n-gpu-layers", type=int, default=-1)
    t.add_argument("--label", default="")
    t.add_argument("--prompt-len", type=int, default=640)
    t.add_argument("--decode-tokens", type=int, default=16)
    t.add_argument("--reps", type=int, default=3)
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("table")
    s.add_argument("visi")
    s.add_argument("llama", nargs="*")
    s.add_argument("--prompt-len", type=int, default=640)
    g = sub.add_parser("gguf-run")
    g.add_argument("gguf")
    g.add_argument("--prompt-file", required=True)
    g.add_argument("--n-gpu-layers", type=int, default=0)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("gguf-bench")
    b.add_argument("gguf")
    b.add_argument("--visi-cli", required=True)
    b.add_argument("--work", default="/tmp/peer-gguf")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--vulkan-new-tokens", type=int, default=16,
                   help="new tokens on Vulkan rows (software adapters decode at a few tok/s)")
    b.add_argument("--long-tokens", type=int, default=512)
    b.add_argument("--no-vulkan", action="store_true")
    b.add_argument("--extra-threads", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                   help="more CPU thread counts to run both engines with, e.g. 1")
    a = ap.parse_args()
    if a.cmd == "extract":
        extract(a.llava_dir, a.out_dir)
    elif a.cmd == "extract-mm":
        extract_mm(a.llava_dir, a.out_dir)
    elif a.cmd == "llama":
        time_llama(a)
    elif a.cmd == "gguf-run":
        gguf_run(a)
    elif a.cmd == "gguf-bench":
        gguf_bench(a)
    else:
        table(a)


if __name__ == "__main__":
    main()
