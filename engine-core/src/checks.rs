//! Argument checks shared by every backend, so that all of them reject the same calls with
//! the same messages (the CPU backend is the reference for both).

use crate::backend::{AttentionParams, RopeParams};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::QuantType;
use crate::shape::Shape;
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

/// Checks an `upload`: `len` host elements must fill `shape`.
pub fn check_upload(len: usize, shape: &Shape) -> Result<()> {
    if len != shape.elem_count() {
        return Err(Error::shape(
            "upload",
            format!(
                "{len} elements given for shape {shape} ({} elements)",
                shape.elem_count()
            ),
        ));
    }
    Ok(())
}

/// Checks an `upload_quant`: `bytes` must be whole rows of `qt` blocks for `shape`.
/// Returns `(n, k)`: the element count and the row length (1 for a scalar).
pub fn check_upload_quant(qt: QuantType, bytes: usize, shape: &Shape) -> Result<(usize, usize)> {
    const OP: &str = "upload_quant";
    let n = shape.elem_count();
    let k = if shape.rank() == 0 {
        1
    } else {
        shape.last_dim()
    };
    qt.check(OP, n, k, bytes)
        .map_err(|e| Error::shape(OP, e.to_string()))?;
    Ok((n, k))
}

/// Checks a `zeros` dtype: bf16 and quantized tensors are never made empty.
pub fn check_zeros(dtype: DType) -> Result<()> {
    if matches!(dtype, DType::BF16 | DType::Quant(_)) {
        return Err(Error::DType { op: "zeros", dtype });
    }
    Ok(())
}

/// Checks a `linear` call: `x [.., K]`, `w [N, K]`, an optional `bias [N]`. Returns `(K, N)`.
pub fn check_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(usize, usize)> {
    const OP: &str = "linear";
    let k = check_rows(OP, x)?;
    let (n, wk) = w.dims2(OP)?;
    if wk != k {
        return Err(Error::shape(
            OP,
            format!(
                "x {} has {k} features but w {} expects {wk}",
                x.shape(),
                w.shape()
            ),
        ));
    }
    if let Some(b) = b {
        check_vec(OP, "bias", b, n)?;
    }
    Ok((k, n))
}

/// Checks a `silu_mul` call: `gate` and `up` of one shape.
pub fn check_silu_mul(gate: &Tensor, up: &Tensor) -> Result<()> {
    if gate.dims() != up.dims() {
        return Err(Error::shape(
            "silu_mul",
            format!("gate {} and up {} differ", gate.shape(), up.shape()),
        ));
    }
    Ok(())
}

/// Checks an `rms_norm` call: rows of `x` and a `weight [N]`. Returns `N`.
pub fn check_rms_norm(x: &Tensor, w: &Tensor) -> Result<usize> {
    const OP: &str = "rms_norm";
    let n = check_rows(OP, x)?;
    check_vec(OP, "weight", w, n)?;
    Ok(n)
}

/// Checks a `layer_norm` call: rows of `x`, `weight [N]` and `bias [N]`. Returns `N`.
pub fn check_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<usize> {
    const OP: &str = "layer_norm";
    let n = check_rows(OP, x)?;
    check_vec(OP, "weight", w, n)?;
    check_vec(OP, "bias", b, n)?;
    Ok(n)
}

/// Checks a `rope` call: `x [S, W]` with heads of an even `head_dim` dividing `W`, positive
/// finite `theta` and `scaling_factor`, `positions [S]`. Returns `(S, W)`.
pub fn check_rope(x: &Tensor, positions: &Tensor, p: &RopeParams) -> Result<(usize, usize)> {
    const OP: &str = "rope";
    let (s, w) = x.dims2(OP)?;
    if p.head_dim == 0 || !p.head_dim.is_multiple_of(2) || w % p.head_dim > 0 {
        return Err(Error::shape(
            OP,
            format!(
                "head_dim {} must be even, positive and divide the width {w}",
                p.head_dim
            ),
        ));
    }
    let positive = |v: f32| v > 0.0 && v.is_finite();
    if !positive(p.scaling_factor) || !positive(p.theta) {
        return Err(Error::msg(format!(
            "rope: theta ({}) and scaling_factor ({}) must be positive",
            p.theta, p.scaling_factor
        )));
    }
    if positions.dims() != [s] {
        return Err(Error::shape(
            OP,
            format!("positions must be [{s}], got {}", positions.shape()),
        ));
    }
    Ok((s, w))
}

/// Checks an `attention_last_row` call like [`check_attention`] (keys only) with at least
/// one query. Returns the number of queries.
pub fn check_attention_last_row(q: &Tensor, k: &Tensor, p: &AttentionParams) -> Result<usize> {
    const OP: &str = "attention_last_row";
    let sq = check_attention(OP, q.dims(), &[k.dims()], p)?;
    if sq == 0 {
        return Err(Error::shape(OP, "q has no rows"));
    }
    Ok(sq)
}

/// Checks an `embedding` call's shapes: `table [vocab, D]`, `ids [S]`. Returns `(vocab, D)`;
/// the id values are checked by [`check_ids`] where the backend has them on the host.
pub fn check_embedding(table: &Tensor, ids: &Tensor) -> Result<(usize, usize)> {
    const OP: &str = "embedding";
    let dims = table.dims2(OP)?;
    if ids.dims().len() != 1 {
        return Err(Error::shape(
            OP,
            format!("ids must be [S], got {}", ids.shape()),
        ));
    }
    Ok(dims)
}

/// Every id of an `embedding` must be inside the vocabulary.
pub fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(Error::shape(
            "embedding",
            format!("ids[{i}] = {id} is outside the vocabulary of {vocab}"),
        ));
    }
    Ok(())
}

/// Checks a `gather_rows` call's shapes: `x [M, N]`, `idx [R]`. Returns `(M, N)`; the index
/// values are checked by [`check_row_indices`] where the backend has them on the host.
pub fn check_gather_rows(x: &Tensor, idx: &Tensor) -> Result<(usize, usize)> {
    const OP: &str = "gather_rows";
    let dims = x.dims2(OP)?;
    if idx.dims().len() != 1 {
        return Err(Error::shape(
            OP,
            format!("idx must be [R], got {}", idx.shape()),
        ));
    }
    Ok(dims)
}

/// Every index of a `gather_rows` must name one of the `m` rows of `x`.
pub fn check_row_indices(idx: &[u32], m: usize) -> Result<()> {
    if let Some((i, &r)) = idx.iter().enumerate().find(|(_, &r)| r as usize >= m) {
        return Err(Error::shape(
            "gather_rows",
            format!("idx[{i}] = {r} is outside the {m} rows of x"),
        ));
    }
    Ok(())
}

/// Checks a `slice_rows` call: rows `start..start + len` inside `x`'s first dim. Returns it.
pub fn check_slice_rows(x: &Tensor, start: usize, len: usize) -> Result<usize> {
    const OP: &str = "slice_rows";
    let Some(&m) = x.dims().first() else {
        return Err(Error::shape(OP, "cannot slice the rows of a scalar"));
    };
    if start.checked_add(len).is_none_or(|e| e > m) {
        return Err(Error::shape(
            OP,
            format!(
                "rows {start}..{} are outside the {m} rows of x",
                start.saturating_add(len)
            ),
        ));
    }
    Ok(m)
}

/// Checks a `concat_rows` call: at least one part, none a scalar or quantized, all of part
/// 0's trailing dims and dtype. Returns the total number of rows.
pub fn check_concat_rows(parts: &[&Tensor]) -> Result<usize> {
    const OP: &str = "concat_rows";
    let Some(first) = parts.first() else {
        return Err(Error::shape(OP, "nothing to concatenate"));
    };
    if first.dims().is_empty() {
        return Err(Error::shape(OP, "cannot concatenate scalars"));
    }
    let tail = &first.dims()[1..];
    let mut rows = 0;
    for (i, t) in parts.iter().enumerate() {
        if t.dims().is_empty() || &t.dims()[1..] != tail {
            return Err(Error::shape(
                OP,
                format!(
                    "part {i} {} does not share the trailing dims of part 0 {}",
                    t.shape(),
                    first.shape()
                ),
            ));
        }
        if matches!(t.dtype(), DType::Quant(_)) || t.dtype() != first.dtype() {
            return Err(Error::DType {
                op: OP,
                dtype: t.dtype(),
            });
        }
        rows += t.dims()[0];
    }
    Ok(rows)
}

/// Checks a `write_rows` call's shapes: `src [R, N]` fits `dst [L, N]` from `row`. Returns
/// `(R, N)`.
pub fn check_write_rows(dst: &Tensor, row: usize, src: &Tensor) -> Result<(usize, usize)> {
    const OP: &str = "write_rows";
    let (l, n) = dst.dims2(OP)?;
    let (r, sn) = src.dims2(OP)?;
    if sn != n || row.checked_add(r).is_none_or(|e| e > l) {
        return Err(Error::shape(
            OP,
            format!(
                "cannot write {} at row {row} of {}",
                src.shape(),
                dst.shape()
            ),
        ));
    }
    Ok((r, n))
}

/// Checks an `argmax` call: rows of `x`, not empty. Returns the row length.
pub fn check_argmax(x: &Tensor) -> Result<usize> {
    const OP: &str = "argmax";
    let n = check_rows(OP, x)?;
    if n == 0 {
        return Err(Error::shape(OP, format!("rows of {} are empty", x.shape())));
    }
    Ok(n)
}
