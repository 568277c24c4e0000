//! JSON bodies for the requests hyper refuses itself.
//!
//! hyper answers a request it cannot parse (a bad request line, two different
//! `Content-Length`s, headers over its buffer, a URI too long) on its own, before any
//! handler runs, with a bare status and `content-length: 0`, then closes the connection; it
//! has no hook for that answer. [`JsonRejections`] wraps the connection's socket and, when
//! what hyper writes ends with such a head (status 400, 414 or 431 with an empty body: the
//! handlers here never send one, every error of theirs has a JSON body), writes the same
//! head with the OpenAI-shaped error body instead. The wrapper reports itself as not
//! vectored, so hyper flattens each message into one buffer and a head arrives whole.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::api::ApiError;
use super::metrics::Metrics;

/// A socket whose bare hyper rejections get a JSON error body.
pub struct JsonRejections<T> {
    inner: T,
    /// Bytes accepted from hyper but not yet written (a rewritten rejection).
    pending: Vec<u8>,
    sent: usize,
    metrics: Arc<Metrics>,
}

impl<T> JsonRejections<T> {
    /// Wraps `inner`; rejections count as bad requests in `metrics`.
    pub fn new(inner: T, metrics: Arc<Metrics>) -> Self {
        JsonRejections {
            inner,
            pending: Vec::new(),
            sent: 0,
            metrics,
        }
    }
}

/// Where in `buf` a trailing bare rejection head starts, and its status.
fn bare_rejection(buf: &[u8]) -> Option<(usize, StatusCode)> {
    if !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let start = buf.windows(9).rposition(|w| w == b"HTTP/1.1 ")?;
    if start > 0 && !buf[..start].ends_with(b"\r\n") {
        return None;
    }
    let head = &buf[start..];
    // One head, nothing after it.
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    if end + 4 != head.len() {
        return None;
    }
    let code: u16 = std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()?;
    let status = StatusCode::from_u16(code).ok()?;
    if !matches!(code, 400 | 414 | 431) {
        return None;
    }
    let lower = head.to_ascii_lowercase();
    let empty = lower.windows(19).any(|w| w == b"\r\ncontent-length: 0")
        && !lower.windows(14).any(|w| w == b"\r\ncontent-type");
    empty.then_some((start, status))
}

/// The head hyper wrote, with a JSON body of the same status.
fn with_json_body(head: &[u8], status: StatusCode) -> Vec<u8> {
    let message = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            "the request headers are too large".to_string()
        }
        StatusCode::URI_TOO_LONG => "the request URI is too long".to_string(),
        _ => "malformed HTTP request (request line, header syntax or conflicting Content-Length)"
            .to_string(),
    };
    let body = ApiError::status(status, "invalid_request_error", message)
        .code("malformed_request")
        .body()
        .to_string();
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(head.len() + body.len() + 64);
    for line in text.trim_end_matches("\r\n").split("\r\n") {
        let l = line.to_ascii_lowercase();
        if l.starts_with("content-length:") || l.starts_with("connection:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("content-type: application/json\r\n");
    out.push_str(&format!("content-length: {}\r\n", body.len()));
    out.push_str("connection: close\r\n\r\n");
    out.push_str(&body);
    out.into_bytes()
}

impl<T: AsyncWrite + Unpin> JsonRejections<T> {
    /// Writes what is pending; ready once nothing is.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonRejections<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonRejections<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some((start, status)) = bare_rejection(buf) {
            Metrics::inc(&self.metrics.bad);
            let mut out = buf[..start].to_vec();
            out.extend(with_json_body(&buf[start..], status));
            self.pending = out;
            self.sent = 0;
            // The bytes are ours now; flush and shutdown write them out first.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        // hyper then flattens each message into one buffer: a head arrives in one write.
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_rejection_heads_are_rewritten() {
        let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(bare_rejection(bare), Some((0, StatusCode::BAD_REQUEST)));
        let big = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            bare_rejection(big).map(|r| r.1),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        // After the end of an earlier message.
        let mut two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec();
        two.extend_from_slice(b"\r\n");
        two.extend_from_slice(bare);
        assert!(bare_rejection(&two).is_some());
        for keep in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 10\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            b"0\r\n\r\n",
            b"data: HTTP/1.1 400 x\r\ncontent-length: 0\r\n\r\n",
        ] {
            assert_eq!(bare_rejection(keep), None, "{}", String::from_utf8_lossy(keep));
        }
        let out = with_json_body(bare, StatusCode::BAD_REQUEST);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(!head.contains("content-length: 0"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
}
