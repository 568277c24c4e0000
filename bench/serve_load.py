#!/usr/bin/env python3
"""Load generator for an OpenAI-compatible chat server (`visi-cli serve`, llama.cpp's server).

Standard library only. For each concurrency level (default 1, 2, 4, 8) it starts that many
clients at once; each sends `--requests` streaming chat completions back to back. It reports
per level: aggregate decode throughput (tokens after each answer's first, summed over all
answers, over the level's wall time), aggregate output tokens/s, TTFT p50/p99, and the ratio
of the aggregate decode throughput to one client's.

`--fit N` instead sends N streaming requests at once and reports the most sequences the
server held at the same time (polling visi's /metrics), for KV-budget admission: run it once
with `--prune none` and once with VisiPruner against the same `serve --kv-budget`.

    python3 bench/serve_load.py --url http://127.0.0.1:8080 --max-tokens 32
    python3 bench/serve_load.py --max-tokens 48 --requests 1 --server-pid "$(pgrep -f 'visi-cli serve')"
    python3 bench/serve_load.py --url http://127.0.0.1:8080 --fit 24 --image img.png --prune none
"""

import argparse
import base64
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse


def stream_request(url, body, api_key, timeout):
    """One streaming chat completion: (ttft seconds, total seconds, completion tokens, text,
    seconds to the last token's chunk)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = "Bearer " + api_key
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError("status %d: %s" % (resp.status, resp.read()[:300]))
    ttft = None
    last = None
    tokens = None
    text = []
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        ev = json.loads(data)
        if "error" in ev:
            raise RuntimeError(ev["error"].get("message"))
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        for ch in ev.get("choices", []):
            delta = ch.get("delta", {})
            # The first chunk after the role announcement carries the first token.
            if ttft is None and ("content" in delta and "role" not in delta or ch.get("finish_reason")):
                ttft = time.perf_counter() - t0
            if delta.get("content") or ch.get("finish_reason"):
                last = time.perf_counter() - t0
            if delta.get("content"):
                text.append(delta["content"])
    total = time.perf_counter() - t0
    conn.close()
    if tokens is None:
        # A server without `stream_options.include_usage`: one chunk per token.
        tokens = len(text)
    ttft = ttft if ttft is not None else total
    return ttft, total, tokens, "".join(text), last if last is not None else total


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def metrics(url, api_key):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=10)
    headers = {"Authorization": "Bearer " + api_key} if api_key else {}
    conn.request("GET", "/metrics", headers=headers)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def cpu_seconds(pid):
    """CPU time (user + system, all threads) process `pid` has used, from /proc (Linux);
    None without a pid or where /proc cannot say. On a software adapter (lavapipe) the
    server's threads do the device work too, so this is its whole cost, and unlike wall
    time it barely moves when other jobs share the cores."""
    if not pid:
        return None
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def make_body(a, i):
    content = [{"type": "text", "text": a.prompt}]
    if a.image:
        with open(a.image, "rb") as f:
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    body = {
        "model": a.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": a.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": a.temperature,
        "seed": 1000 + i,
    }
    if a.prune is not None:
        prune = a.prune if a.prune in ("none", "default") else json.loads(a.prune)
        body["visi"] = {"prune": prune}
    return body


def run_level(a, clients):
    results = []
    errors = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(ci):
        barrier.wait()
        for r in range(a.requests):
            try:
                res = stream_request(a.url, make_body(a, ci * 100 + r), a.api_key, a.timeout)
                with lock:
                    results.append(res)
            except Exception as e:  # noqa: BLE001 - reported, the level goes on
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    try:
        m0 = metrics(a.url, a.api_key)
    except Exception:  # noqa: BLE001 - a server without visi's /metrics
        m0 = {}
    load0 = os.getloadavg()[0]
    c0 = cpu_seconds(a.server_pid)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    c1 = cpu_seconds(a.server_pid)
    load1 = os.getloadavg()[0]
    try:
        m1 = metrics(a.url, a.api_key)
    except Exception:  # noqa: BLE001
        m1 = {}

    def delta(k):
        return m1.get(k, 0.0) - m0.get(k, 0.0)

    ttfts = [r[0] for r in results]
    decode_tokens = sum(max(r[2] - 1, 0) for r in results)
    out_tokens = sum(r[2] for r in results)
    # Each stream's own decode rate once its first token is out (tokens after the first over
    # the time from the first token to the last), summed over the streams: the decode steps'
    # throughput as the clients see it, without the prefills before the first tokens.
    after_first = sum(
        (r[2] - 1) / (r[4] - r[0]) for r in results if r[2] > 1 and r[4] > r[0]
    )
    cpu = c1 - c0 if c0 is not None and c1 is not None else None
    return {
        # The machine's 1-minute load average when the level started and ended.
        "load_avg_1m": [load0, load1],
        # The server's CPU seconds over the level (--server-pid), and its decode tokens
        # per CPU second: throughput that other jobs on the machine disturb little.
        "server_cpu_s": cpu,
        "decode_tok_per_cpu_s": decode_tokens / cpu if cpu else None,
        "clients": clients,
        "requests": len(results),
        "errors": errors,
        "wall_s": wall,
        "completion_tokens": out_tokens,
        "decode_tok_s": decode_tokens / wall if wall > 0 else 0.0,
        "output_tok_s": out_tokens / wall if wall > 0 else 0.0,
        "after_first_tok_s": after_first,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        # visi's own counters: tokens out of batched decode steps over the time spent in
        # them (prefill excluded), and the mean batch of a step.
        "server_decode_tok_s": delta("visi_decode_tokens_total") / delta("visi_decode_seconds_total")
        if delta("visi_decode_seconds_total") > 0
        else None,
        "server_prefill_s": delta("visi_prefill_seconds_total") if m1 else None,
        "mean_batch": delta("visi_decode_tokens_total") / delta("visi_decode_steps_total")
        if delta("visi_decode_steps_total") > 0
        else None,
    }


def fit(a):
    """N requests at once; the most sequences the server decoded together."""
    peak = [0.0]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                m = metrics(a.url, a.api_key)
                peak[0] = max(peak[0], m.get("visi_active_sequences", 0.0))
            except Exception:  # noqa: BLE001 - a missed poll only lowers the peak
                pass
            time.sleep(0.05)

    p = threading.Thread(target=poll)
    p.start()
    saved = a.requests
    a.requests = 1
    lvl = run_level(a, a.fit)
    a.requests = saved
    stop.set()
    p.join()
    m = metrics(a.url, a.api_key)
    return {
        "requests": a.fit,
        "prune": a.prune,
        "peak_active_sequences": peak[0],
        "kv_budget_bytes": m.get("visi_kv_budget_bytes"),
        "errors": lvl["errors"],
        "wall_s": lvl["wall_s"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="visi")
    ap.add_argument("--api-key")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    ap.add_argument("--image", help="a PNG sent as a data: URL with every request")
    ap.add_argument("--prune", help='"none", "default" or a pruning config JSON (visi only)')
    ap.add_argument("--fit", type=int, help="send N requests at once; report the peak of concurrent sequences")
    ap.add_argument("--warmup", type=int, default=1, help="requests sent alone first")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--server-pid", type=int, help="the server's process id (Linux): also report its CPU time per level")
    a = ap.parse_args()

    for i in range(a.warmup):
        stream_request(a.url, make_body(a, 99999 + i), a.api_key, a.timeout)
    if a.fit:
        res = fit(a)
        print(json.dumps(res, indent=1))
    else:
        levels = []
        for c in [int(x) for x in a.clients.split(",")]:
            lvl = run_level(a, c)
            levels.append(lvl)
            base = levels[0]["decode_tok_s"] or float("nan")
            sbase = levels[0]["server_decode_tok_s"]
            cbase = levels[0]["decode_tok_per_cpu_s"]
            if lvl["decode_tok_per_cpu_s"] and cbase:
                print(
                    "            server CPU: %.1f s, %.3f decode tokens per CPU second (%.2fx one client), load %.1f -> %.1f"
                    % (lvl["server_cpu_s"], lvl["decode_tok_per_cpu_s"], lvl["decode_tok_per_cpu_s"] / cbase, *lvl["load_avg_1m"]),
                    flush=True,
                )
            if lvl["server_decode_tok_s"] and sbase:
                print(
                    "            server side: decode steps %8.2f tok/s (%.2fx one client), mean batch %.2f, prefill %.1f s"
                    % (lvl["server_decode_tok_s"], lvl["server_decode_tok_s"] / sbase, lvl["mean_batch"] or 0, lvl["server_prefill_s"] or 0),
                    flush=True,
                )
            abase = levels[0]["after_first_tok_s"]
            if lvl["after_first_tok_s"] and abase:
                print(
                    "            after first token: %8.2f tok/s summed over streams (%.2fx one client)"
                    % (lvl["after_first_tok_s"], lvl["after_first_tok_s"] / abase),
                    flush=True,
                )
            print(
                "clients %2d: %3d requests, %5d tokens in %7.1f s | decode %8.2f tok/s (%.2fx one client) | "
                "output %8.2f tok/s | TTFT p50 %6.2f s p99 %6.2f s%s"
                % (
                    c,
                    lvl["requests"],
                    lvl["completion_tokens"],
                    lvl["wall_s"],
                    lvl["decode_tok_s"],
                    lvl["decode_tok_s"] / base,
                    lvl["output_tok_s"],
                    lvl["ttft_p50_s"],
                    lvl["ttft_p99_s"],
                    (" | %d errors: %s" % (len(lvl["errors"]), lvl["errors"][0])) if lvl["errors"] else "",
                ),
                flush=True,
            )
        res = {"levels": levels}
        for lvl in levels:
            lvl["ratio_to_one_client"] = lvl["decode_tok_s"] / levels[0]["decode_tok_s"] if levels[0]["decode_tok_s"] else None
            s0 = levels[0]["server_decode_tok_s"]
            lvl["server_ratio_to_one_client"] = lvl["server_decode_tok_s"] / s0 if s0 and lvl["server_decode_tok_s"] else None
            c0 = levels[0]["decode_tok_per_cpu_s"]
            lvl["cpu_ratio_to_one_client"] = lvl["decode_tok_per_cpu_s"] / c0 if c0 and lvl["decode_tok_per_cpu_s"] else None
            a0 = levels[0]["after_first_tok_s"]
            lvl["after_first_ratio_to_one_client"] = lvl["after_first_tok_s"] / a0 if a0 and lvl["after_first_tok_s"] else None
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
