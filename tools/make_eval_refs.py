#!/usr/bin/env python3
"""Reference outputs of the official answer processing, for visi-cli's scorers.

Runs LLaVA's own scorer code (from a LLaVA checkout given with --llava; nothing of it is
copied here) on seeded synthetic answers and writes tests/fixtures/eval/official_refs.json:

* textvqa: m4c_evaluator.EvalAIAnswerProcessor on each string, and the soft score of
  TextVQAAccuracyEvaluator for a prediction against ten human answers;
* pope: eval_pope.eval_pope's yes/no reading of each answer (via its printed TP/FP/TN/FN on
  a one-answer call per label);
* textvqa_prompt: eval_textvqa.prompt_processor on LLaVA-style prompts.

No third-party packages: tqdm (imported by m4c_evaluator) is stubbed.

    python3 tools/make_eval_refs.py --llava /path/to/LLaVA
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import random
import sys
import types

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "eval", "official_refs.json")

PIECES = [
    "the", "a", "an", "The", "A", "two", "Two", "none", "ten", "zero", "dont", "isnt", "Im",
    "Id've", "yall", "wont", "coca-cola", "Coca - Cola", "it's", "What's", "won't", "3.5", "1,000",
    "10", "St.", "U.S.A.", "$5", "50%", "e-mail", "a/b", "(yes)", "no!", "what?", "x;y", "[1]",
    "{a}", "<tag>", "@home", "a_b", "c+d", "x=y", "back\\slash", "`q`", "\"quoted\"", "N.Y.",
    "...", "3.", ".5", "a . b", "tab\tsep", "line\nbreak", "café", "ÉCOLE", "stop", "STOP",
    "2,3", "1, 2", "ok.", "Yes", "no", "Not", "nope", "yes, it is", "No.", "not really",
]


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llava", required=True, help="a LLaVA checkout (haotian-liu/LLaVA)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    sys.modules["tqdm"] = types.SimpleNamespace(tqdm=lambda x, **k: x)
    m4c = load(os.path.join(args.llava, "llava/eval/m4c_evaluator.py"), "m4c_evaluator")
    sys.modules["llava.eval.m4c_evaluator"] = m4c
    pope = load(os.path.join(args.llava, "llava/eval/eval_pope.py"), "eval_pope")
    tvqa = load(os.path.join(args.llava, "llava/eval/eval_textvqa.py"), "eval_textvqa")

    rng = random.Random(0)
    seps = [" ", "", ", ", ". ", "  ", "\n", "-"]
    strings = []
    for _ in range(400):
        n = rng.randint(1, 4)
        s = ""
        for i in range(n):
            if i:
                s += rng.choice(seps)
            s += rng.choice(PIECES)
        strings.append(s)
    strings.append(" ".join(["a.b"] * 40))  # more periods than re.sub's accidental count of 32
    proc = m4c.EvalAIAnswerProcessor()
    normalise = [[s, proc(s)] for s in strings]

    ev = m4c.TextVQAAccuracyEvaluator()
    soft = []
    for _ in range(150):
        pool = rng.sample(PIECES, 4)
        gts = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool + [rng.choice(PIECES)])
        score = ev.eval_pred_list([{"pred_answer": pred, "gt_answers": gts}])
        soft.append({"pred": pred, "gts": gts, "score": score})

    pope_cases = []
    for s in strings[:200]:
        # One answer against label "yes": TP means eval_pope read yes, FN means no.
        path = "/tmp/_pope_label.json"
        with open(path, "w") as f:
            f.write(json.dumps({"label": "yes"}) + "\n")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                pope.eval_pope([{"text": s}], path)
            except ZeroDivisionError:
                pass  # precision/recall of a single answer may divide by zero after the counts
        counts = buf.getvalue().splitlines()[1].split("\t")
        tp = int(counts[0])
        pope_cases.append([s, bool(tp)])

    prompts = []
    for q in ["What is it?", "How many CARS are there?", "who made this"]:
        for p in [
            f"{q}\nAnswer the question using a single word or phrase.",
            f"{q}\nReference OCR token: Coca, Cola\nAnswer the question using a single word or phrase.",
            f"Reference OCR token: a, b\n{q}\nAnswer the question using a single word or phrase.",
            f"OCR tokens: x y Question: {q} Short answer:",
        ]:
            prompts.append([p, tvqa.prompt_processor(p)])

    out = {
        "generator": "tools/make_eval_refs.py",
        "source": "haotian-liu/LLaVA llava/eval/{m4c_evaluator,eval_pope,eval_textvqa}.py",
        "textvqa_normalise": normalise,
        "textvqa_soft_score": soft,
        "pope_says_yes": pope_cases,
        "textvqa_prompt": prompts,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"wrote {args.out}: {len(normalise)} strings, {len(soft)} soft scores, {len(pope_cases)} POPE readings")


if __name__ == "__main__":
    main()
