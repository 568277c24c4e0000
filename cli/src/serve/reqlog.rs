//! One stderr line per chat-completion request, when it ends (answered, refused, failed or
//! abandoned by its client):
//!
//! ```text
//! serve: request chatcmpl-1f2e… status=200 stream=true prompt_tokens=612 completion_tokens=12 ttft_ms=153 total_ms=820 prune=visipruner kept_image_tokens=144/576 finish=stop
//! serve: request chatcmpl-9a0b… status=400 total_ms=0 error="`tools` is not supported by this server: …"
//! ```
//!
//! Answered requests also add their image tokens, kept tokens and prefill FLOPs (spent and
//! dense) to the pruning metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::api::Finished;
use super::metrics::Metrics;

/// A request's log line in the making.
pub struct ReqLog {
    pub id: String,
    arrived: Instant,
    first: Option<Instant>,
    pub stream: bool,
    metrics: Arc<Metrics>,
    logged: bool,
}

impl ReqLog {
    pub fn new(id: String, arrived: Instant, metrics: Arc<Metrics>) -> Self {
        ReqLog {
            id,
            arrived,
            first: None,
            stream: false,
            metrics,
            logged: false,
        }
    }

    /// The answer's first text arrived (time to first token).
    pub fn text(&mut self) {
        self.first.get_or_insert_with(Instant::now);
    }

    /// The answer is complete: the line, and the pruning metrics.
    pub fn done(&mut self, f: &Finished) {
        self.text();
        let v = &f.visi;
        let image_tokens = v["image_tokens"].as_u64().unwrap_or(0);
        let kept = v["pruning"]["kept_image_tokens"]
            .as_array()
            .map_or(image_tokens, |k| k.len() as u64);
        let method = v["pruning"]["method"].as_str().unwrap_or("none");
        let m = &self.metrics;
        m.image_tokens.fetch_add(image_tokens, Ordering::Relaxed);
        m.kept_image_tokens.fetch_add(kept, Ordering::Relaxed);
        m.prefill_flops.fetch_add(
            v["flops"]["prefill"].as_u64().unwrap_or(0),
            Ordering::Relaxed,
        );
        m.prefill_flops_dense.fetch_add(
            v["flops"]["prefill_dense"].as_u64().unwrap_or(0),
            Ordering::Relaxed,
        );
        let extra = format!(
            "prompt_tokens={} completion_tokens={} ttft_ms={} total_ms={} prune={method} kept_image_tokens={kept}/{image_tokens} finish={}",
            f.prompt_tokens,
            f.completion_tokens,
            self.ttft_ms(),
            self.arrived.elapsed().as_millis(),
            f.finish_reason.name(),
        );
        self.line(200, &extra);
    }

    /// The request ended with an error status.
    pub fn error(&mut self, status: u16, message: &str) {
        let extra = format!(
            "total_ms={} error={:?}",
            self.arrived.elapsed().as_millis(),
            message
        );
        self.line(status, &extra);
    }

    fn ttft_ms(&self) -> u128 {
        self.first
            .map_or(0, |t| t.saturating_duration_since(self.arrived).as_millis())
    }

    fn line(&mut self, status: u16, extra: &str) {
        if self.logged {
            return;
        }
        self.logged = true;
        eprintln!(
            "serve: request {} status={status} stream={} {extra}",
            self.id, self.stream
        );
    }
}

impl Drop for ReqLog {
    /// A stream whose client went away before the end (nginx's 499).
    fn drop(&mut self) {
        if !self.logged {
            let extra = format!(
                "ttft_ms={} total_ms={} error=\"the client went away\"",
                self.ttft_ms(),
                self.arrived.elapsed().as_millis()
            );
            self.line(499, &extra);
        }
    }
}
