#!/usr/bin/env python3
"""Makes the llama.cpp LLaVA GGUF pair fixture from tests/fixtures/tiny-llava-mha with
llama.cpp's OWN converters (vendored in the llama-cpp-python 0.3.8 sdist), following
examples/llava/README.md step by step:

  1. text model: the README's note for llava-hf checkpoints ("export only the LLM from the
     llava model" with transformers, then `convert_hf_to_gguf.py`):
         model.language_model.save_pretrained(llm); tokenizer.save_pretrained(llm)
         python convert_hf_to_gguf.py llm --outtype f16 --outfile <out>/tiny-llava-mha.f16.gguf
  2. vision tower + projector: the README's LLaVA 1.6 / llava-hf route:
         python examples/llava/llava_surgery_v2.py -C -m <copy of the checkpoint>
         mkdir vit; cp llava.clip vit/pytorch_model.bin; cp llava.projector vit/
         vit/config.json = the checkpoint's vision_config (a CLIPVisionConfig)
         python examples/llava/convert_image_encoder_to_gguf.py -m vit \
             --llava-projector vit/llava.projector --output-dir vit --clip-model-is-vision
     then vit/mmproj-model-f16.gguf is renamed to <out>/mmproj-tiny-llava-mha.f16.gguf.

Adaptations (minimal, here and not in the outputs):
  * the exported LLM's tokenizer_config.json has `"add_prefix_space": null`, which the
    converter would write as `tokenizer.ggml.add_space_prefix = false` (None packed as a
    bool); the unset key is deleted first so llama.cpp's default (true) applies;
  * the checkpoint is copied to a temp dir first (surgery writes next to it), symlinked
    tokenizer files resolved;
  * `vit/config.json` is the fixture's own `vision_config` (the README downloads a
    `config_vit.json` for the real 336px CLIP-L; ours is a tiny CLIP);
  * no `vision_feature_layer` in vit/config.json (as the README's config_vit.json), so the
    converter drops the last CLIP layer: identical to llava-hf's feature layer -2 here.

Environment: /tmp/venv-fix (torch 2.5.1, transformers 4.46.3) plus `sentencepiece==0.2.0`
(gguf-py imports it). The vendored gguf-py is used via PYTHONPATH, not a pip `gguf`.

    pip download llama-cpp-python==0.3.8 --no-deps --no-binary :all: -d /tmp/ggufpair-dl
    tar xzf /tmp/ggufpair-dl/llama_cpp_python-0.3.8.tar.gz -C /tmp/ggufpair-dl
    OMP_NUM_THREADS=1 /tmp/venv-fix/bin/python tools/make_gguf_pair.py \
        --llama-cpp /tmp/ggufpair-dl/llama_cpp_python-0.3.8/vendor/llama.cpp

Writes tests/fixtures/gguf/tiny-llava-mha/{tiny-llava-mha.f16.gguf,mmproj-tiny-llava-mha.f16.gguf}.

With `--next` the same steps make the LLaVA-1.6 pair of tests/fixtures/tiny-next-mistral
(LlavaNextForConditionalGeneration, Mistral decoder), following the README's "LLaVA 1.6 gguf
conversion" and its llava-hf note: the LLM exported with transformers and converted by
`convert_hf_to_gguf.py`; `llava_surgery_v2.py` puts `image_newline` into llava.projector
beside the projector; vit/config.json is the checkpoint's vision_config plus what the README's
LLaVA-1.6 `config_vit.json` adds (defaults filled in by `CLIPVisionConfig`, `image_grid_pinpoints` from the checkpoint,
`image_aspect_ratio: anyres`, `mm_patch_merge_type: spatial_unpad`), which the converter
writes as `clip.vision.*` keys. Writes tests/fixtures/gguf/tiny-next-mistral/.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd, env):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, env=env)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, type=Path, help="vendor/llama.cpp of the sdist")
    ap.add_argument("--next", action="store_true", help="the LLaVA-1.6 pair of tiny-next-mistral")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    name = "tiny-next-mistral" if args.next else "tiny-llava-mha"
    src = ROOT / "tests/fixtures" / name
    args.out = args.out or ROOT / "tests/fixtures/gguf" / name
    lc = args.llama_cpp.resolve()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(lc / "gguf-py") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    py = sys.executable
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / name
        ckpt.mkdir()
        for f in src.iterdir():
            shutil.copyfile(f.resolve(), ckpt / f.name)

        # 1. text model
        import torch
        from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

        llm = tmp / "llm"
        cls = LlavaNextForConditionalGeneration if args.next else LlavaForConditionalGeneration
        model = cls.from_pretrained(ckpt, torch_dtype=torch.float16)
        model.language_model.save_pretrained(llm)
        AutoTokenizer.from_pretrained(ckpt).save_pretrained(llm)
        # transformers writes `"add_prefix_space": null` (= unset: the Llama default, a
        # leading "▁"); the converter passes that None to GGUFWriter.add_bool, which packs
        # it as False, and llama.cpp would then drop the leading space. Remove the unset key
        # so the converter writes nothing and llama.cpp keeps its default (true).
        tc_path = llm / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        if tc.get("add_prefix_space", 0) is None:
            del tc["add_prefix_space"]
            tc_path.write_text(json.dumps(tc, indent=2))
        del model
        text_out = args.out / f"{name}.f16.gguf"
        run([py, lc / "convert_hf_to_gguf.py", llm, "--outtype", "f16", "--outfile", text_out], env)

        # 2. vision tower and projector
        run([py, lc / "examples/llava/llava_surgery_v2.py", "-C", "-m", ckpt], env)
        vit = tmp / "vit"
        vit.mkdir()
        shutil.copyfile(ckpt / "llava.clip", vit / "pytorch_model.bin")
        shutil.copyfile(ckpt / "llava.projector", vit / "llava.projector")
        cfg = json.loads((ckpt / "config.json").read_text())
        vcfg = dict(cfg["vision_config"])
        if args.next:
            # The checkpoint's vision_config leaves defaults out (transformers writes only
            # what differs); config_vit.json is a complete CLIP vision config.
            from transformers import CLIPVisionConfig
            vcfg = CLIPVisionConfig(**vcfg).to_dict()
            # What the README's LLaVA-1.6 config_vit.json adds to a CLIP vision config.
            vcfg["image_grid_pinpoints"] = cfg["image_grid_pinpoints"]
            vcfg["image_aspect_ratio"] = "anyres"
            vcfg["mm_patch_merge_type"] = "spatial_unpad"
        (vit / "config.json").write_text(json.dumps(vcfg, indent=2))
        run(
            [
                py,
                lc / "examples/llava/convert_image_encoder_to_gguf.py",
                "-m",
                vit,
                "--llava-projector",
                vit / "llava.projector",
                "--output-dir",
                vit,
                "--clip-model-is-vision",
            ],
            env,
        )
        shutil.copyfile(vit / "mmproj-model-f16.gguf", args.out / f"mmproj-{name}.f16.gguf")

    for f in sorted(args.out.iterdir()):
        print(f"{f}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
