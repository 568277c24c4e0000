#!/usr/bin/env python3
"""Accuracy per question kind of visi-shapes answers (issue 29), beside the majority-answer
baseline of each kind (what a model that ignores the image and always gives the commonest
answer of the kind would score). Plain Python 3, no packages.

    python3 tools/shapes_accuracy.py --annotations models/demo/visi-shapes-bench/annotations.json \
        ANSWERS.jsonl [MORE.jsonl ...] [--markdown]

Scoring is GQA's exact match as `visi-cli score --task gqa` computes it (LLaVA's
convert_gqa_for_eval.py: `text.rstrip('.').lower()`), so the "all" column equals score's
accuracy on the same file. Per answers file it also prints mean kept image tokens and mean
time to first token from the answers' metadata.
"""

import argparse
import collections
import json
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--annotations", required=True)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("answers", nargs="+")
    args = ap.parse_args()
    ann = json.load(open(args.annotations))
    kinds = sorted({a["types"]["semantic"] for a in ann.values()})
    by_kind = collections.defaultdict(list)
    for a in ann.values():
        by_kind[a["types"]["semantic"]].append(a["answer"])
    majority = {k: collections.Counter(v).most_common(1)[0][1] / len(v) for k, v in by_kind.items()}
    majority_all = sum(collections.Counter(v).most_common(1)[0][1] for v in by_kind.values()) / len(ann)
    cols = ["answers", "n", "all"] + kinds + ["kept", "ttft ms"]
    rows = [["majority baseline", str(len(ann)), f"{100 * majority_all:.1f}"]
            + [f"{100 * majority[k]:.1f}" for k in kinds] + ["", ""]]
    for path in args.answers:
        hit = collections.Counter()
        tot = collections.Counter()
        kept, ttft = [], []
        for line in open(path):
            a = json.loads(line)
            g = ann.get(a["question_id"])
            if g is None:
                continue
            k = g["types"]["semantic"]
            ok = a["text"].rstrip(".").lower() == g["answer"]
            hit[k] += ok
            tot[k] += 1
            md = a.get("metadata", {})
            if "kept_image_tokens" in md:
                kept.append(md["kept_image_tokens"])
            if "ttft_ms" in md:
                ttft.append(md["ttft_ms"])
        n = sum(tot.values())
        rows.append([os.path.basename(path), str(n), f"{100 * sum(hit.values()) / max(1, n):.1f}"]
                    + [f"{100 * hit[k] / tot[k]:.1f}" if tot[k] else "-" for k in kinds]
                    + [f"{sum(kept) / len(kept):.0f}" if kept else "-", f"{sum(ttft) / len(ttft):.0f}" if ttft else "-"])
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(cols)))
        for r in rows:
            print("  ".join(x.ljust(w[i]) for i, x in enumerate(r)))


if __name__ == "__main__":
    main()
