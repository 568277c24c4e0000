//! `/metrics`: Prometheus text exposition of the server's counters, gauges and latency
//! histograms. The engine thread and the HTTP handlers both write here.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        if let Ok(mut g) = self.inner.lock() {
            for (i, b) in self.bounds.iter().enumerate() {
                if v <= *b {
                    g.0[i] += 1;
                }
            }
            g.1 += v;
            g.2 += 1;
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        if let Ok(g) = self.inner.lock() {
            for (i, b) in self.bounds.iter().enumerate() {
                let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", g.0[i]);
            }
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.2);
            let _ = writeln!(out, "{name}_sum {}", g.1);
            let _ = writeln!(out, "{name}_count {}", g.2);
        }
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const TOKEN_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Everything `/metrics` reports.
pub struct Metrics {
    /// Requests answered, by outcome.
    pub ok: AtomicU64,
    /// Requests refused as malformed (4xx other than 429).
    pub bad: AtomicU64,
    /// Requests refused because the queue was full (429).
    pub rejected: AtomicU64,
    /// Requests that failed inside the server (500) or were cancelled.
    pub failed: AtomicU64,
    /// Requests whose client went away before the answer ended.
    pub disconnected: AtomicU64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub completion_tokens: AtomicU64,
    /// Requests waiting for admission (sent to the engine, not yet prefilled).
    pub queued: AtomicU64,
    /// Sequences decoding.
    pub active: AtomicU64,
    /// KV bytes the active sequences hold.
    pub kv_bytes: AtomicU64,
    /// KV bytes they hold plus the rows still reserved for their answers.
    pub kv_reserved: AtomicU64,
    /// Most sequences active at once so far.
    pub max_active: AtomicU64,
    /// Decode steps run.
    pub steps: AtomicU64,
    /// Tokens that came out of decode steps (an answer's first token comes from its prefill).
    pub decode_tokens: AtomicU64,
    /// Microseconds spent in decode steps.
    pub decode_us: AtomicU64,
    /// Microseconds spent in prefill units (image encoding included).
    pub prefill_us: AtomicU64,
    /// Time to first token, from the request's arrival.
    pub ttft: Histogram,
    /// Time between two tokens of one answer.
    pub token_latency: Histogram,
    /// The KV budget (bytes; `u64::MAX` when none was set).
    pub kv_budget: u64,
    /// Image tokens the answered prompts held before pruning.
    pub image_tokens: AtomicU64,
    /// Image tokens kept by pruning (all of them when a request was dense).
    pub kept_image_tokens: AtomicU64,
    /// Prefill FLOPs spent (pruned).
    pub prefill_flops: AtomicU64,
    /// Prefill FLOPs the same prompts would have cost dense.
    pub prefill_flops_dense: AtomicU64,
}

impl Metrics {
    /// All zero, with the KV budget.
    pub fn new(kv_budget: u64) -> Self {
        Metrics {
            ok: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            disconnected: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            active: AtomicU64::new(0),
            kv_bytes: AtomicU64::new(0),
            kv_reserved: AtomicU64::new(0),
            max_active: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            decode_tokens: AtomicU64::new(0),
            decode_us: AtomicU64::new(0),
            prefill_us: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            token_latency: Histogram::new(TOKEN_BOUNDS),
            kv_budget,
            image_tokens: AtomicU64::new(0),
            kept_image_tokens: AtomicU64::new(0),
            prefill_flops: AtomicU64::new(0),
            prefill_flops_dense: AtomicU64::new(0),
        }
    }

    /// Adds one to `c`.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP visi_requests_total Chat-completion requests by outcome.\n# TYPE visi_requests_total counter"
        );
        for (what, c) in [
            ("ok", &self.ok),
            ("bad_request", &self.bad),
            ("rejected", &self.rejected),
            ("failed", &self.failed),
            ("disconnected", &self.disconnected),
        ] {
            let _ = writeln!(out, "visi_requests_total{{outcome=\"{what}\"}} {}", g(c));
        }
        for (name, kind, help, v) in [
            (
                "visi_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                g(&self.prompt_tokens),
            ),
            (
                "visi_completion_tokens_total",
                "counter",
                "Tokens generated.",
                g(&self.completion_tokens),
            ),
            (
                "visi_decode_steps_total",
                "counter",
                "Batched decode steps.",
                g(&self.steps),
            ),
            (
                "visi_decode_tokens_total",
                "counter",
                "Tokens out of decode steps (not an answer's first).",
                g(&self.decode_tokens),
            ),
            (
                "visi_queue_depth",
                "gauge",
                "Requests waiting for admission.",
                g(&self.queued),
            ),
            (
                "visi_active_sequences",
                "gauge",
                "Sequences decoding.",
                g(&self.active),
            ),
            (
                "visi_active_sequences_max",
                "gauge",
                "Most sequences decoding at once since start.",
                g(&self.max_active),
            ),
            (
                "visi_kv_bytes_in_use",
                "gauge",
                "KV cache bytes the active sequences hold.",
                g(&self.kv_bytes),
            ),
            (
                "visi_kv_bytes_reserved",
                "gauge",
                "KV bytes held plus rows reserved for the answers still decoding.",
                g(&self.kv_reserved),
            ),
            (
                "visi_image_tokens_total",
                "counter",
                "Image tokens in answered prompts, before pruning.",
                g(&self.image_tokens),
            ),
            (
                "visi_kept_image_tokens_total",
                "counter",
                "Image tokens kept by pruning (all of a dense request's).",
                g(&self.kept_image_tokens),
            ),
            (
                "visi_prefill_flops_total",
                "counter",
                "Prefill FLOPs spent (pruned).",
                g(&self.prefill_flops),
            ),
            (
                "visi_prefill_flops_saved_total",
                "counter",
                "Prefill FLOPs pruning saved against dense prefills of the same prompts.",
                g(&self.prefill_flops_dense).saturating_sub(g(&self.prefill_flops)),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        // No budget is no gauge: u64::MAX bytes would read as a real (absurd) limit.
        if self.kv_budget != u64::MAX {
            let _ = writeln!(
                out,
                "# HELP visi_kv_budget_bytes The KV budget admission control keeps to (--kv-budget).\n# TYPE visi_kv_budget_bytes gauge\nvisi_kv_budget_bytes {}",
                self.kv_budget
            );
        }
        for (name, help, us) in [
            (
                "visi_decode_seconds_total",
                "Time in batched decode steps.",
                g(&self.decode_us),
            ),
            (
                "visi_prefill_seconds_total",
                "Time in prefill units (image encoding included).",
                g(&self.prefill_us),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                us as f64 / 1e6
            );
        }
        self.ttft.render(
            &mut out,
            "visi_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
        );
        self.token_latency.render(
            &mut out,
            "visi_time_per_output_token_seconds",
            "Between two tokens of one answer.",
        );
        out
    }
}
