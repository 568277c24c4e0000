//! Argument checks shared by every backend, so that all of them reject the same calls with
//! the same messages (the CPU backend is the reference for both).

use crate::backend::AttentionParams;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Tensor byte ranges `(name, begin, end)` of one file must not overlap: overlapping ranges
/// alias two tensors onto the same bytes (a corrupt or hostile file). `what` names the
/// offsets in the message (`data_offsets`, `data offsets`).
pub fn check_disjoint<'a>(
    ranges: impl Iterator<Item = (&'a str, u64, u64)>,
    what: &str,
) -> std::result::Result<(), String> {
    // Empty tensors occupy no bytes.
    let mut ranges: Vec<(&str, u64, u64)> = ranges.filter(|r| r.1 < r.2).collect();
    ranges.sort_unstable_by(|a, b| (a.1, a.2, a.0).cmp(&(b.1, b.2, b.0)));
    // The range reaching furthest so far: a later range starting before its end overlaps it.
    let mut reach: Option<(&str, u64, u64)> = None;
    for &(nb, sb, eb) in &ranges {
        if let Some((na, sa, ea)) = reach {
            if sb < ea {
                return Err(format!(
                    "tensors `{na}` and `{nb}` overlap ({what} [{sa}, {ea}] and [{sb}, {eb}])"
                ));
            }
        }
        if reach.is_none_or(|(_, _, ea)| eb > ea) {
            reach = Some((nb, sb, eb));
        }
    }
    Ok(())
}

/// `b` must have `a`'s shape, or be a row `[N]` with `N` = `a`'s last dim.
pub fn check_broadcast(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    let row = b.dims().len() == 1 && b.dims()[0] == a.shape().last_dim();
    if a.dims() == b.dims() || row {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("cannot broadcast {} onto {}", b.shape(), a.shape()),
        ))
    }
}

/// A per-column parameter vector (norm weight, bias) must be `[n]`.
pub fn check_vec(op: &'static str, what: &str, t: &Tensor, n: usize) -> Result<()> {
    if t.dims() == [n] {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{what} must be [{n}], got {}", t.shape()),
        ))
    }
}

/// Rank >= 1 with its last dim; scalars have no rows to work on.
pub fn check_rows(op: &'static str, t: &Tensor) -> Result<usize> {
    if t.dims().is_empty() {
        return Err(Error::shape(
            op,
            "expected at least one dimension, got a scalar",
        ));
    }
    Ok(t.shape().last_dim())
}

/// Checks an attention call's shapes and parameters; returns the number of queries.
///
/// `q` is `[Sq, num_heads*head_dim]`; `kv` are the dims of `k` (and `v`), `[L, num_kv_heads*head_dim]`.
pub fn check_attention(
    op: &'static str,
    q: &[usize],
    kv: &[&[usize]],
    p: &AttentionParams,
) -> Result<usize> {
    if p.num_heads == 0 || p.num_kv_heads == 0 || p.head_dim == 0 {
        return Err(Error::shape(
            op,
            format!(
                "num_heads ({}), num_kv_heads ({}) and head_dim ({}) must be positive",
                p.num_heads, p.num_kv_heads, p.head_dim
            ),
        ));
    }
    if !p.num_heads.is_multiple_of(p.num_kv_heads) {
        return Err(Error::shape(
            op,
            format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                p.num_heads, p.num_kv_heads
            ),
        ));
    }
    let qw = p.num_heads * p.head_dim;
    let kw = p.num_kv_heads * p.head_dim;
    let sq = match q {
        [s, w] if *w == qw => *s,
        _ => {
            return Err(Error::shape(
                op,
                format!("q must be [Sq, {qw}] (num_heads*head_dim), got {q:?}"),
            ))
        }
    };
    for (name, dims) in ["k", "v"].iter().zip(kv) {
        match dims {
            [l, w] if *w == kw && *l >= p.kv_len => {}
            _ => {
                return Err(Error::shape(
                    op,
                    format!(
                    "{name} must be [L >= kv_len {}, {kw}] (num_kv_heads*head_dim), got {dims:?}",
                    p.kv_len
                ),
                ))
            }
        }
    }
    if p.causal && p.q_offset + sq > p.kv_len {
        return Err(Error::shape(
            op,
            format!(
                "causal queries reach cache row {} but kv_len is {}",
                p.q_offset + sq,
                p.kv_len
            ),
        ));
    }
    if sq > 0 && p.kv_len == 0 {
        return Err(Error::shape(op, "kv_len is 0: no keys to attend to"));
    }
    if let Some((s, e)) = p.mask.image_span() {
        if s > e {
            return Err(Error::shape(
                op,
                format!("mask image span [{s}, {e}) is reversed"),
            ));
        }
    }
    Ok(sq)
}

/// Checks a `token_contributions` call: `probs [num_heads, kv_len]`, `v` a cache of
/// `[L >= kv_len, num_kv_heads*head_dim]`, and keys `start..end` inside `0..kv_len`.
pub fn check_token_contributions(
    op: &'static str,
    probs: &Tensor,
    v: &Tensor,
    p: &AttentionParams,
    start: usize,
    end: usize,
) -> Result<()> {
    // Only the head layout and kv_len matter here; a one-row query stands in for q.
    let q_dims = [1, p.num_heads * p.head_dim];
    let p_any = AttentionParams {
        causal: false,
        ..*p
    };
    check_attention(op, &q_dims, &[v.dims()], &p_any)?;
    if probs.dims() != [p.num_heads, p.kv_len] {
        return Err(Error::shape(
            op,
            format!(
                "probs must be [{}, {}], got {}",
                p.num_heads,
                p.kv_len,
                probs.shape()
            ),
        ));
    }
    if start > end || end > p.kv_len {
        return Err(Error::shape(
            op,
            format!("keys {start}..{end} are not inside 0..{}", p.kv_len),
        ));
    }
    Ok(())
}

/// Checks a `patch_embed` call: `pixels [C, H, W]`, `w [D, C, patch, patch]`, and a patch
/// that fits the image. Returns `(C, H, W, D)`.
pub fn check_patch_embed(
    op: &'static str,
    pixels: &Tensor,
    w: &Tensor,
    patch: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (c, h, wd) = match pixels.dims() {
        [c, h, w] => (*c, *h, *w),
        d => {
            return Err(Error::shape(
                op,
                format!("pixels must be [C, H, W], got {d:?}"),
            ))
        }
    };
    let d = match w.dims() {
        [d, wc, p1, p2] if *wc == c && *p1 == patch && *p2 == patch => *d,
        dims => {
            return Err(Error::shape(
                op,
                format!("w must be [D, {c}, {patch}, {patch}], got {dims:?}"),
            ))
        }
    };
    if patch == 0 || h < patch || wd < patch {
        return Err(Error::shape(
            op,
            format!("patch {patch} does not fit in a {h}x{wd} image"),
        ));
    }
    Ok((c, h, wd, d))
}
