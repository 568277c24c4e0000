#!/usr/bin/env python3
"""Compares LLaVA-NeXT's image geometry in LLaVA's own code (haotian-liu/LLaVA:
`llava/model/llava_arch.py` `unpad_image`, `llava/mm_utils.py` `select_best_resolution`,
`resize_and_pad_image`) with transformers 4.46.3's (`LlavaNextImageProcessor`,
`unpad_image`, `LlavaNextProcessor`'s token count) for the 336-pixel fixtures' sizes and a
sweep of odd sizes. The functions are taken from the upstream files by name (`ast`), not
restated here. Needs a LLaVA checkout and the fixture environment:

    git clone https://github.com/haotian-liu/LLaVA /tmp/LLaVA
    /work/wt/venv-fix/bin/python tools/check_unpad_upstream.py /tmp/LLaVA

Prints every size where the two disagree (feature rows/cols kept, best resolution, resized
size, or the token count), and exits 1 if a fixture size is among them.
"""
import ast
import math
import os
import sys

import torch
from transformers.image_processing_utils import select_best_resolution as hf_best
from transformers.models.llava_next.image_processing_llava_next import _get_patch_output_size
from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

PIN = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
FIXTURE_SIZES = [(300, 560), (331, 1003), (1003, 331), (517, 389), (701, 347), (641, 331)]  # (w, h)


def upstream(path, names):
    src = open(path).read()
    tree = ast.parse(src)
    ns = {"math": math, "torch": torch}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            exec(compile(ast.Module([node], []), path, "exec"), ns)
    return ns


def main():
    llava = sys.argv[1]
    up = upstream(os.path.join(llava, "llava/model/llava_arch.py"), {"unpad_image"})
    up.update(upstream(os.path.join(llava, "llava/mm_utils.py"), {"select_best_resolution"}))
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
    proc.patch_size, proc.vision_feature_select_strategy = 14, "default"

    class IP:
        image_grid_pinpoints = PIN
        size = {"shortest_edge": 336}
        crop_size = {"height": 336, "width": 336}
    proc.image_processor = IP()
    grid = 24
    sizes = FIXTURE_SIZES + [(w, h) for w in range(97, 1400, 37) for h in range(101, 1400, 41)]
    bad_fixture, bad, ties = False, 0, 0
    for w, h in sizes:
        # LLaVA takes (width, height) pairs; the pinpoint set is symmetric.
        bw, bh = up["select_best_resolution"]((w, h), [tuple(p) for p in PIN])
        hh, hw = hf_best((h, w), PIN)
        canvas = torch.zeros(1, hh // 336 * grid, hw // 336 * grid)
        hf = hf_unpad(canvas, [h, w]).shape[1:]
        upc = torch.zeros(1, bh // 336 * grid, bw // 336 * grid)
        ups = up["unpad_image"](upc, (w, h)).shape[1:]
        tokens_model = grid * grid + hf[0] * (hf[1] + 1)
        # LlavaNextProcessor.__call__: the count, less one for the "default" strategy (CLS).
        tokens_proc = proc._get_number_of_features(h, w, 336, 336) - 1
        resized = _get_patch_output_size(torch.zeros(h, w, 3).numpy(), (hh, hw), "channels_last")
        # LLaVA reads the pinpoints as (width, height), transformers as (height, width): the
        # set is symmetric, but on a tie the first listed wins, so the two may pick
        # transposed canvases. Counted apart.
        if (bh, bw) != (hh, hw):
            ties += 1
            continue
        same = tuple(hf) == tuple(ups)
        if not same or (tokens_proc is not None and tokens_proc != tokens_model):
            bad += 1
            fx = (w, h) in FIXTURE_SIZES
            bad_fixture |= fx
            if fx or bad <= 20:
                print(f"{w}x{h}: best LLaVA {bh}x{bw} / HF {hh}x{hw}; kept LLaVA {tuple(ups)} HF {tuple(hf)}; "
                      f"tokens model {tokens_model} processor {tokens_proc}; resized {resized}")
        elif (w, h) in FIXTURE_SIZES:
            print(f"{w}x{h}: agree: best {hh}x{hw}, resized {resized}, kept {tuple(hf)}, {tokens_model} tokens")
    print(f"{len(sizes)} sizes: {ties} pick a transposed pinpoint on a tie (LLaVA vs transformers), "
          f"{bad} of the rest disagree on the kept rows/columns or the processor's count")
    sys.exit(1 if bad_fixture else 0)


if __name__ == "__main__":
    main()
