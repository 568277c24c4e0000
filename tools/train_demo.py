#!/usr/bin/env python3
"""Trains visi-shapes-llava, the demo model of issue 29: the real LLaVA-1.5 layout at a tiny
size (CLIP ViT on 336 px with 14 px patches -> 576 image tokens, vision_feature_layer -2,
the two-layer GELU MLP projector, a Llama decoder), trained from scratch on CPU on the
procedural scenes of tools/make_shapes_data.py, saved with save_pretrained as a llava-hf
LlavaForConditionalGeneration checkpoint plus a small BPE tokenizer (tokenizers library,
`<image>` added, Llama's `<s>`/`</s>` ids 1/2).

    nice -n -10 /work/wt/venv-fix/bin/python tools/train_demo.py --out models/demo/visi-shapes-llava \
        --steps 1500 --max-minutes 24 2>&1 | tee models/demo/train.log

Seeded (torch, Python's random, data seeds from make_shapes_data.SPLIT_SEEDS), CPU only.
Training conversations are LLaVA's: one image, its questions as several turns of the
vicuna_v1 template rendered by LLaVA's own conversation.py (tools/upstream), loss on the
answer tokens only (the assistant turns, `</s>` included), as LLaVA's instruction tuning
masks the user turns. The first turn of every conversation is exactly the prompt that
`visi-cli eval` sends. Every `--eval-every` steps the model answers held-out `val` scenes
(greedy, first answer token teacher-free) and the best checkpoint so far is saved; the run
stops at `--steps` or after `--max-minutes`, whichever comes first.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_shapes_data as data  # noqa: E402
from render_upstream_prompts import conversation  # noqa: E402  (LLaVA's conversation.py, vendored)

from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors  # noqa: E402
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,  # noqa: E402
                          LlavaForConditionalGeneration, PreTrainedTokenizerFast, CLIPImageProcessor)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IMAGE_TOKENS = 576


def render_conversation(turns):
    """LLaVA's get_prompt() for [(q, a), ...] with `<image>\\n` before the first question."""
    conv = conversation.conv_templates["vicuna_v1"].copy()
    for i, (q, a) in enumerate(turns):
        conv.append_message(conv.roles[0], ("<image>\n" + q) if i == 0 else q)
        conv.append_message(conv.roles[1], a)
    return conv.get_prompt()


def single_turn_prompt(q):
    conv = conversation.conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + q)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def build_tokenizer(vocab_size):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list("\n?.,:'"), show_progress=False)
    corpus = data.vocabulary_text()
    sys_prompt = conversation.conv_templates["vicuna_v1"].system
    corpus += [render_conversation([("What color is the star?", "red")])] * 50 + [sys_prompt] * 50
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<image>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def save_tokenizer(tok, out):
    tok.save(os.path.join(out, "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   add_bos_token=True, add_eos_token=False, model_max_length=4096,
                                   padding_side="left")
    fast.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                       image_mean=CLIP_MEAN.tolist(), image_std=CLIP_STD.tolist()).save_pretrained(out)


def build_model(tok, args):
    vocab = tok.get_vocab_size()
    image_id, pad_id = tok.token_to_id("<image>"), tok.token_to_id("<pad>")
    vision = CLIPVisionConfig(hidden_size=args.vis_width, intermediate_size=args.vis_width * 4,
                              num_hidden_layers=args.vis_layers, num_attention_heads=args.vis_width // 32,
                              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              projection_dim=args.vis_width)
    text = LlamaConfig(vocab_size=vocab, hidden_size=args.width, intermediate_size=args.width * 8 // 3,
                       num_hidden_layers=args.layers, num_attention_heads=args.width // 32,
                       num_key_value_heads=args.width // 32, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=pad_id,
                       tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_id,
                      projector_hidden_act="gelu", vision_feature_select_strategy="default",
                      vision_feature_layer=-2, image_seq_length=IMAGE_TOKENS, pad_token_id=pad_id,
                      tie_word_embeddings=False)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(cfg)
    return model


def pixels(img):
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def encode_conversation(tok, turns, image_id):
    text = render_conversation(turns)
    enc = tok.encode(text)
    ids, offs = enc.ids, enc.offsets
    # Answer spans: from after each "ASSISTANT:" to the end of its "</s>".
    spans, pos = [], 0
    for _, a in turns:
        s = text.index("ASSISTANT:", pos) + len("ASSISTANT:")
        e = text.index("</s>", s) + len("</s>")
        spans.append((s, e))
        pos = e
    labels = [t if any(s <= o[0] < e for s, e in spans) else -100 for t, o in zip(ids, offs)]
    labels[0] = -100  # BOS (offset (0, 0))
    at = ids.index(image_id)
    ids = ids[:at] + [image_id] * IMAGE_TOKENS + ids[at + 1:]
    labels = labels[:at] + [-100] * IMAGE_TOKENS + labels[at + 1:]
    return ids, labels


def patch_targets(objs, mask):
    """Per-patch colour and shape classes (0: background) at the 24x24 patch centres."""
    idx = np.asarray(mask)[7::14, 7::14].reshape(-1).astype(np.int64)
    col = np.array([0] + [1 + data.COLOR_NAMES.index(o["color"]) for o in objs])[idx]
    shp = np.array([0] + [1 + data.SHAPES.index(o["shape"]) for o in objs])[idx]
    return torch.from_numpy(col), torch.from_numpy(shp)


def sample(split, index, rng, tok, image_id, max_turns, max_objects=5):
    img, objs, qs, mask = data.scene_and_questions(split, index, with_mask=True)
    if len(objs) > max_objects:
        return None
    kinds = list(qs)
    rng.shuffle(kinds)
    turns = [(qs[k][0] + data.GQA_SUFFIX, qs[k][1]) for k in kinds[:max_turns]]
    ids, labels = encode_conversation(tok, turns, image_id)
    return pixels(img), ids, labels, patch_targets(objs, mask)


def collate(batch, pad_id):
    n = max(len(b[1]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    lab = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (_, x, y, _) in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        lab[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    col = torch.stack([b[3][0] for b in batch])
    shp = torch.stack([b[3][1] for b in batch])
    return torch.stack([b[0] for b in batch]), ids, lab, col, shp


@torch.no_grad()
def evaluate(model, tok, image_id, n_scenes):
    """Greedy answers (up to 6 tokens) to the single-turn questions of `val` scenes;
    returns accuracy overall and per kind."""
    model.eval()
    hits, per = 0, {}
    total = 0
    for i in range(n_scenes):
        img, _, qs = data.scene_and_questions("val", i)
        pv = pixels(img)[None]
        for kind, (q, a) in qs.items():
            ids = tok.encode(single_turn_prompt(q + data.GQA_SUFFIX)).ids
            at = ids.index(image_id)
            ids = ids[:at] + [image_id] * IMAGE_TOKENS + ids[at + 1:]
            out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pv, max_new_tokens=8,
                                 do_sample=False, pad_token_id=tok.token_to_id("<pad>"), eos_token_id=2)
            ans = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()
            ok = ans.rstrip(".").lower() == a
            hits += ok
            total += 1
            p = per.setdefault(kind, [0, 0])
            p[0] += ok
            p[1] += 1
    model.train()
    return hits / total, {k: round(v[0] / v[1], 3) for k, v in per.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=29)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--max-turns", type=int, default=6)
    ap.add_argument("--vis-width", type=int, default=64)
    ap.add_argument("--vis-layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch colour/shape loss")
    ap.add_argument("--init", help="continue from this checkpoint (its weights; optimizer state starts fresh)")
    ap.add_argument("--curriculum", action="store_true", help="1-object scenes, then 2, then all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--eval-scenes", type=int, default=12)
    ap.add_argument("--max-minutes", type=float, default=24.0)
    ap.add_argument("--measure", type=int, default=0, help="time this many steps, save nothing")
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    data.SPLIT_SEEDS.setdefault("val", 4_000_003)

    tok = build_tokenizer(args.vocab)
    image_id, pad_id = tok.token_to_id("<image>"), tok.token_to_id("<pad>")
    # The first turn of a training conversation must tokenise exactly as eval's prompt.
    q = "What color is the star?" + data.GQA_SUFFIX
    single = tok.encode(single_turn_prompt(q)).ids
    multi = tok.encode(render_conversation([(q, "red"), ("How many stars are there?", "2")])).ids
    assert multi[:len(single)] == single, "single-turn prompt is not a prefix of the conversation"
    assert tok.token_to_id("<unk>") not in single, tok.encode(single_turn_prompt(q)).tokens
    if args.init:
        model = LlavaForConditionalGeneration.from_pretrained(args.init, torch_dtype=torch.float32)
        assert model.config.text_config.vocab_size == tok.get_vocab_size()
    else:
        model = build_model(tok, args)
    model.config.text_config._attn_implementation = "sdpa"
    model.config.vision_config._attn_implementation = "sdpa"
    nparams = sum(p.numel() for p in model.parameters())
    print(f"vocab {tok.get_vocab_size()} (image {image_id}, pad {pad_id}); {nparams} parameters; "
          f"prompt {len(single)} tokens + {IMAGE_TOKENS - 1} image", flush=True)
    print("args", json.dumps(vars(args)), flush=True)
    print("single-turn prompt tokens:", tok.encode(single_turn_prompt(q)).tokens, flush=True)

    # Training-only auxiliary heads (not saved; the checkpoint is the plain LLaVA layout):
    # from the vision features the projector reads (vision_feature_layer -2), predict each
    # patch's object colour and shape, so the tiny ViT learns dense features in minutes.
    feats = {}
    layers = model.vision_tower.vision_model.encoder.layers
    layers[len(layers) - 2].register_forward_hook(lambda m, i, o: feats.__setitem__("f", o[0]))
    aux = torch.nn.ModuleDict(dict(color=torch.nn.Linear(args.vis_width, 1 + len(data.COLOR_NAMES)),
                                   shape=torch.nn.Linear(args.vis_width, 1 + len(data.SHAPES))))
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    rng = random.Random(args.seed)
    best = -1.0
    model.train()
    index = 0
    ema = None
    steps = args.measure or args.steps
    deadline = t0 + args.max_minutes * 60
    tstep = time.time()
    for step in range(steps):
        batch = []
        # Curriculum (--curriculum): one-object scenes for the first third of the steps,
        # up to two objects for the second, every scene after.
        max_objects = 5
        if args.curriculum:
            max_objects = 1 if step < steps // 3 else 2 if step < 2 * steps // 3 else 5
        while len(batch) < args.batch:
            s = sample("train", index, rng, tok, image_id, args.max_turns, max_objects)
            index += 1
            if s is not None:
                batch.append(s)
        pv, ids, lab, col, shp = collate(batch, pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            # Right padding under a causal mask changes nothing before it, so no attention mask is
            # passed (sdpa then takes its causal fast path); padded positions carry no loss.
            out = model(input_ids=ids, pixel_values=pv, labels=lab)
        loss = out.loss
        if args.aux_weight > 0:
            f = feats["f"][:, 1:].float()
            aux_loss = (torch.nn.functional.cross_entropy(aux["color"](f).flatten(0, 1), col.flatten())
                        + torch.nn.functional.cross_entropy(aux["shape"](f).flatten(0, 1), shp.flatten()))
        else:
            aux_loss = torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 10 == 0 or args.measure:
            now = time.time()
            print(f"step {step} loss {loss.item():.4f} ema {ema:.4f} aux {aux_loss.item():.3f} lr {lr_at(step):.2e} "
                  f"{(now - tstep) / (1 if args.measure else 10 if step else 1):.2f}s/step elapsed {now - t0:.0f}s",
                  flush=True)
            tstep = now
        if args.measure:
            continue
        last = step == steps - 1 or time.time() > deadline
        if (step + 1) % args.eval_every == 0 or last:
            acc, per = evaluate(model, tok, image_id, args.eval_scenes)
            print(f"eval step {step + 1}: val accuracy {acc:.3f} {json.dumps(per)} elapsed {time.time() - t0:.0f}s",
                  flush=True)
            if acc > best:
                best = acc
                save(model, tok, args.out, step + 1, acc, per, args)
                print(f"saved best checkpoint (step {step + 1}, val accuracy {acc:.3f})", flush=True)
        if last:
            if time.time() > deadline:
                print(f"wall-clock cap of {args.max_minutes} min reached at step {step + 1}", flush=True)
            break
    print(f"done in {time.time() - t0:.0f}s, best val accuracy {best:.3f}", flush=True)


def save(model, tok, out, step, acc, per, args):
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-ckpt-")
    model.config.text_config._attn_implementation = None
    model.save_pretrained(tmp, safe_serialization=True)
    model.config.text_config._attn_implementation = "sdpa"
    save_tokenizer(tok, tmp)
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(dict(step=step, val_accuracy=acc, val_per_kind=per, args=vars(args),
                       command=" ".join(sys.argv)), f, indent=1)
    os.chmod(tmp, 0o755)
    for f in os.listdir(tmp):
        os.chmod(os.path.join(tmp, f), 0o644)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)


if __name__ == "__main__":
    main()
