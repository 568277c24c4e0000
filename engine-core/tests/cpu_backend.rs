//! CpuBackend: memory ops, data movement, larger seeded linear/attention checks, and the
//! error paths (typed errors naming the op, never a panic).

mod common;

use common::{assert_close, assert_dtype_err, assert_shape_err, upload_f32, Rng, ACCUM};
use engine_core::cpu::CpuBackend;
use engine_core::{
    AttentionMask, AttentionParams, Backend, DType, Error, HostData, RopeParams, Shape,
};
use half::f16;

fn be() -> CpuBackend {
    CpuBackend::new()
}

fn u32s(be: &CpuBackend, v: &[u32]) -> engine_core::Tensor {
    be.upload(HostData::U32(v), Shape::new([v.len()])).unwrap()
}

fn params(h: usize, kvh: usize, d: usize, kv_len: usize) -> AttentionParams {
    AttentionParams {
        num_heads: h,
        num_kv_heads: kvh,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        causal: true,
        q_offset: 0,
        kv_len,
        mask: AttentionMask::None,
    }
}

#[test]
fn device_info_says_cpu() {
    let info = be().device_info();
    assert_eq!(info.backend, "cpu");
    assert_eq!(info.device_type, "cpu");
    assert_eq!(info.api, "native");
}

#[test]
fn upload_zeros_and_readback() {
    let be = be();
    let t = upload_f32(&be, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]);
    assert_eq!((t.dims(), t.dtype()), (&[2, 3][..], DType::F32));
    assert_eq!(
        be.to_vec_f32(&t).unwrap(),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
    let h: Vec<f16> = [0.5f32, -2.0].iter().map(|&x| f16::from_f32(x)).collect();
    let th = be.upload(HostData::F16(&h), Shape::new([2])).unwrap();
    assert_eq!(th.dtype(), DType::F16);
    assert_eq!(be.to_vec_f32(&th).unwrap(), vec![0.5, -2.0]);
    let z = be.zeros(Shape::new([3, 2]), DType::F16).unwrap();
    assert_eq!(be.to_vec_f32(&z).unwrap(), vec![0.0; 6]);
    let zu = be.zeros(Shape::new([4]), DType::U32).unwrap();
    assert_eq!(be.to_vec_u32(&zu).unwrap(), vec![0; 4]);
    be.sync().unwrap();
    // Reshape is a view over the same storage.
    let r = t.reshape([3, 2]).unwrap();
    assert_eq!(be.to_vec_f32(&r).unwrap(), be.to_vec_f32(&t).unwrap());
}

#[test]
fn write_rows_appends_to_a_cache_in_place() {
    let be = be();
    let cache = be.zeros(Shape::new([5, 2]), DType::F32).unwrap();
    let view = cache.clone(); // every handle sees the write
    be.write_rows(&cache, 1, &upload_f32(&be, &[1.0, 2.0, 3.0, 4.0], [2, 2]))
        .unwrap();
    be.write_rows(&cache, 4, &upload_f32(&be, &[9.0, 8.0], [1, 2]))
        .unwrap();
    assert_eq!(
        be.to_vec_f32(&view).unwrap(),
        vec![0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 9.0, 8.0]
    );
    let head = be.slice_rows(&cache, 1, 2).unwrap(); // a copy: later writes leave it alone
    be.write_rows(&cache, 3, &head).unwrap();
    let whole = be.to_vec_f32(&cache).unwrap();
    assert_eq!(
        &whole[6..10],
        &[1.0, 2.0, 3.0, 4.0],
        "rows 3..5 after copying rows 1..3"
    );
    // Source and destination sharing storage (a reshape of the cache) must not deadlock.
    let alias = cache.reshape([5, 2]).unwrap();
    be.write_rows(&cache, 0, &alias).unwrap();
    assert_eq!(be.to_vec_f32(&cache).unwrap(), whole);
    let top = alias.reshape([10]).unwrap();
    assert_shape_err(be.write_rows(&cache, 0, &top), "write_rows");
}

#[test]
fn gather_slice_concat_move_rows() {
    let be = be();
    let x = upload_f32(&be, &(0..12).map(|v| v as f32).collect::<Vec<_>>(), [4, 3]);
    let g = be.gather_rows(&x, &u32s(&be, &[3, 0, 3])).unwrap();
    assert_eq!(g.dims(), &[3, 3]);
    assert_eq!(
        be.to_vec_f32(&g).unwrap(),
        vec![9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 9.0, 10.0, 11.0]
    );
    let s = be.slice_rows(&x, 1, 2).unwrap();
    assert_eq!(s.dims(), &[2, 3]);
    assert_eq!(
        be.to_vec_f32(&s).unwrap(),
        vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    );
    let empty = be.slice_rows(&x, 4, 0).unwrap();
    assert_eq!(empty.dims(), &[0, 3]);
    let c = be.concat_rows(&[&s, &empty, &g]).unwrap();
    assert_eq!(c.dims(), &[5, 3]);
    let cv = be.to_vec_f32(&c).unwrap();
    assert_eq!(&cv[..6], &[3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_eq!(&cv[6..9], &[9.0, 10.0, 11.0]);
    // U32 rows (positions) move the same way.
    let p = u32s(&be, &[5, 6, 7]);
    let pc = be
        .concat_rows(&[&p, &be.slice_rows(&p, 0, 1).unwrap()])
        .unwrap();
    assert_eq!(be.to_vec_u32(&pc).unwrap(), vec![5, 6, 7, 5]);
}

/// Plain f64 `x·Wᵀ + b`, the test's own reference for shapes too big for a fixture.
fn naive_linear(x: &[f32], w: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            let s: f64 = (0..k)
                .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                .sum();
            y[r * n + c] = (s + b[c] as f64) as f32;
        }
    }
    y
}

#[test]
fn linear_large_shapes_against_f64() {
    // Several K blocks, several row tasks, ragged N; f16 and f32 weights.
    let be = be();
    let mut rng = Rng::new(11);
    for (m, k, n) in [(1, 1100, 75), (4, 513, 40), (130, 520, 200), (261, 70, 33)] {
        let x = rng.vec(m * k);
        let w = rng.vec(n * k);
        let b = rng.vec(n);
        let want = naive_linear(&x, &w, &b, m, k, n);
        let (xt, bt) = (upload_f32(&be, &x, [m, k]), upload_f32(&be, &b, [n]));
        let wt = upload_f32(&be, &w, [n, k]);
        let y = be.linear(&xt, &wt, Some(&bt)).unwrap();
        assert_eq!(y.dims(), &[m, n]);
        let tol = common::Tol {
            abs: 2e-5,
            rel: 2e-5,
        }; // K up to 1100 terms in f32
        assert_close(
            &format!("linear f32 {m}x{k}x{n}"),
            &be.to_vec_f32(&y).unwrap(),
            &want,
            &[m, n],
            tol,
        );

        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let w16f: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let want16 = naive_linear(&x, &w16f, &b, m, k, n);
        let wt16 = be.upload(HostData::F16(&w16), Shape::new([n, k])).unwrap();
        let y16 = be.linear(&xt, &wt16, Some(&bt)).unwrap();
        assert_close(
            &format!("linear f16 {m}x{k}x{n}"),
            &be.to_vec_f32(&y16).unwrap(),
            &want16,
            &[m, n],
            tol,
        );
    }
}

#[test]
fn linear_rows_are_independent_of_batch_size() {
    // The GEMM (many rows) and the matrix-vector kernel (one row) must agree.
    let be = be();
    let mut rng = Rng::new(12);
    let (m, k, n) = (40, 300, 50); // m above the matrix-vector limit (32)
    let x = rng.vec(m * k);
    let w: Vec<f16> = rng.vec(n * k).iter().map(|&v| f16::from_f32(v)).collect();
    let wt = be.upload(HostData::F16(&w), Shape::new([n, k])).unwrap();
    let all = be
        .to_vec_f32(&be.linear(&upload_f32(&be, &x, [m, k]), &wt, None).unwrap())
        .unwrap();
    for r in 0..m {
        let one = be
            .linear(&upload_f32(&be, &x[r * k..(r + 1) * k], [1, k]), &wt, None)
            .unwrap();
        assert_close(
            &format!("linear row {r} alone vs batched"),
            &be.to_vec_f32(&one).unwrap(),
            &all[r * n..(r + 1) * n],
            &[1, n],
            ACCUM,
        );
    }
}

#[test]
fn attention_long_cache_matches_chunked_queries() {
    // One causal pass over 40 queries equals two passes of 25 + 15 with q_offset, and the
    // last row of the probabilities sums to 1.
    let be = be();
    let mut rng = Rng::new(13);
    let (h, kvh, d, s) = (4, 2, 16, 40);
    let q = rng.vec(s * h * d);
    let k = upload_f32(&be, &rng.vec(s * kvh * d), [s, kvh * d]);
    let v = upload_f32(&be, &rng.vec(s * kvh * d), [s, kvh * d]);
    let p = params(h, kvh, d, s);
    let full = be
        .to_vec_f32(
            &be.attention(&upload_f32(&be, &q, [s, h * d]), &k, &v, &p)
                .unwrap(),
        )
        .unwrap();
    let q2 = upload_f32(&be, &q[25 * h * d..], [15, h * d]);
    let part = be
        .attention(&q2, &k, &v, &AttentionParams { q_offset: 25, ..p })
        .unwrap();
    assert_close(
        "attention chunk 25..40",
        &be.to_vec_f32(&part).unwrap(),
        &full[25 * h * d..],
        &[15, h * d],
        ACCUM,
    );
    let last = be
        .to_vec_f32(
            &be.attention_last_row(&q2, &k, &AttentionParams { q_offset: 25, ..p })
                .unwrap(),
        )
        .unwrap();
    for hh in 0..h {
        let sum: f32 = last[hh * s..(hh + 1) * s].iter().sum();
        assert!(
            (sum - 1.0).abs() < 1e-5,
            "last_row head {hh}: probabilities sum to {sum}"
        );
    }
    // Decode with a cache longer than kv_len ignores the rows past it.
    let p10 = AttentionParams {
        q_offset: 9,
        kv_len: 10,
        ..p
    };
    let q1 = upload_f32(&be, &q[9 * h * d..10 * h * d], [1, h * d]);
    let dec = be.attention(&q1, &k, &v, &p10).unwrap();
    assert_close(
        "decode row 9",
        &be.to_vec_f32(&dec).unwrap(),
        &full[9 * h * d..10 * h * d],
        &[1, h * d],
        ACCUM,
    );
}

#[test]
fn attention_with_no_queries_is_empty() {
    let be = be();
    let q = be.zeros(Shape::new([0, 8]), DType::F32).unwrap();
    let kv = be.zeros(Shape::new([3, 8]), DType::F32).unwrap();
    let out = be.attention(&q, &kv, &kv, &params(1, 1, 8, 3)).unwrap();
    assert_eq!(out.dims(), &[0, 8]);
}

// ----- error paths -----------------------------------------------------------------------

#[test]
fn memory_op_errors() {
    let be = be();
    assert_shape_err(
        be.upload(HostData::F32(&[1.0, 2.0]), Shape::new([3])),
        "upload",
    );
    assert_dtype_err(be.zeros(Shape::new([2]), DType::BF16), "zeros", DType::BF16);
    let u = u32s(&be, &[1, 2]);
    let f = upload_f32(&be, &[1.0, 2.0], [2]);
    assert_dtype_err(be.to_vec_f32(&u), "to_vec_f32", DType::U32);
    assert_dtype_err(be.to_vec_u32(&f), "to_vec_u32", DType::F32);
    assert_dtype_err(be.cast(&u, DType::F32), "cast", DType::U32);
    assert_dtype_err(be.cast(&f, DType::U32), "cast", DType::U32);
    assert!(matches!(
        f.reshape([3]),
        Err(Error::Shape { op: "reshape", .. })
    ));
}

#[test]
fn linear_and_elementwise_errors() {
    let be = be();
    let x = upload_f32(&be, &[0.0; 6], [2, 3]);
    let w = upload_f32(&be, &[0.0; 8], [2, 4]);
    assert_shape_err(be.linear(&x, &w, None), "linear");
    let w3 = upload_f32(&be, &[0.0; 6], [2, 3]);
    assert_shape_err(
        be.linear(&x, &w3, Some(&upload_f32(&be, &[0.0; 3], [3]))),
        "linear",
    );
    assert_shape_err(be.linear(&x, &w3.reshape([6]).unwrap(), None), "linear");
    let wu = be
        .upload(HostData::U32(&[0; 6]), Shape::new([2, 3]))
        .unwrap();
    assert_dtype_err(be.linear(&x, &wu, None), "linear", DType::U32);
    let xh = be.cast(&x, DType::F16).unwrap();
    assert_dtype_err(be.linear(&xh, &w3, None), "linear", DType::F16);

    let row2 = upload_f32(&be, &[0.0; 2], [2]);
    assert_shape_err(be.add(&x, &row2), "add");
    assert_shape_err(be.mul(&x, &x.reshape([3, 2]).unwrap()), "mul");
    assert_shape_err(be.silu_mul(&x, &x.reshape([6]).unwrap()), "silu_mul");
    assert_dtype_err(be.gelu(&xh), "gelu", DType::F16);
    assert_dtype_err(be.quick_gelu(&u32s(&be, &[1])), "quick_gelu", DType::U32);
}

#[test]
fn norm_rope_softmax_errors() {
    let be = be();
    let x = upload_f32(&be, &[0.0; 8], [2, 4]);
    let w3 = upload_f32(&be, &[1.0; 3], [3]);
    let w4 = upload_f32(&be, &[1.0; 4], [4]);
    assert_shape_err(be.rms_norm(&x, &w3, 1e-6), "rms_norm");
    assert_shape_err(be.layer_norm(&x, &w4, &w3, 1e-6), "layer_norm");
    assert_dtype_err(be.softmax(&u32s(&be, &[1, 2])), "softmax", DType::U32);

    let rp = RopeParams {
        head_dim: 4,
        theta: 10000.0,
        scaling_factor: 1.0,
    };
    assert_shape_err(be.rope(&x, &u32s(&be, &[0, 1, 2]), &rp), "rope");
    assert_shape_err(
        be.rope(&x, &u32s(&be, &[0, 1]), &RopeParams { head_dim: 3, ..rp }),
        "rope",
    );
    assert_shape_err(
        be.rope(&x, &u32s(&be, &[0, 1]), &RopeParams { head_dim: 8, ..rp }),
        "rope",
    );
    let fpos = upload_f32(&be, &[0.0, 1.0], [2]);
    assert_dtype_err(be.rope(&x, &fpos, &rp), "rope", DType::F32);
    assert!(be
        .rope(&x, &u32s(&be, &[0, 1]), &RopeParams { theta: 0.0, ..rp })
        .is_err());
}

#[test]
fn attention_errors() {
    let be = be();
    let q = upload_f32(&be, &[0.0; 16], [2, 8]);
    let kv = upload_f32(&be, &[0.0; 24], [3, 8]);
    let p = params(2, 2, 4, 3);
    assert!(be.attention(&q, &kv, &kv, &p).is_ok());
    assert_shape_err(be.attention(&q, &kv, &kv, &params(3, 2, 4, 3)), "attention");
    assert_shape_err(be.attention(&q, &kv, &kv, &params(2, 2, 0, 3)), "attention");
    assert_shape_err(
        be.attention(&q, &kv, &kv, &AttentionParams { kv_len: 4, ..p }),
        "attention",
    );
    assert_shape_err(
        be.attention(&q, &kv, &kv, &AttentionParams { q_offset: 2, ..p }),
        "attention",
    );
    assert_shape_err(be.attention(&q, &kv, &kv, &params(4, 2, 2, 3)), "attention");
    let short_v = upload_f32(&be, &[0.0; 16], [2, 8]);
    assert_shape_err(be.attention(&q, &kv, &short_v, &p), "attention");
    let reversed = AttentionMask::Layer0Sink {
        image_start: 2,
        image_end: 1,
    };
    assert_shape_err(
        be.attention(
            &q,
            &kv,
            &kv,
            &AttentionParams {
                mask: reversed,
                ..p
            },
        ),
        "attention",
    );
    let nq = AttentionParams {
        causal: false,
        kv_len: 0,
        ..p
    };
    assert_shape_err(be.attention(&q, &kv, &kv, &nq), "attention");
    assert_dtype_err(
        be.attention(&be.cast(&q, DType::F16).unwrap(), &kv, &kv, &p),
        "attention",
        DType::F16,
    );

    let empty_q = be.zeros(Shape::new([0, 8]), DType::F32).unwrap();
    assert_shape_err(
        be.attention_last_row(&empty_q, &kv, &p),
        "attention_last_row",
    );
    assert_shape_err(
        be.attention_last_row(&q, &kv, &params(2, 2, 4, 5)),
        "attention_last_row",
    );

    let probs = be.attention_last_row(&q, &kv, &p).unwrap();
    assert_eq!(probs.dims(), &[2, 3]);
    assert!(be.token_contributions(&probs, &kv, &p, 0, 3).is_ok());
    assert_shape_err(
        be.token_contributions(&probs, &kv, &p, 2, 4),
        "token_contributions",
    );
    assert_shape_err(
        be.token_contributions(&probs, &kv, &p, 2, 1),
        "token_contributions",
    );
    assert_shape_err(
        be.token_contributions(&q, &kv, &p, 0, 1),
        "token_contributions",
    );
    assert_shape_err(
        be.token_contributions(&probs, &q, &AttentionParams { kv_len: 3, ..p }, 0, 1),
        "token_contributions",
    );
}

#[test]
fn gather_and_copy_errors() {
    let be = be();
    let table = upload_f32(&be, &[0.0; 12], [4, 3]);
    assert_shape_err(be.embedding(&table, &u32s(&be, &[0, 4])), "embedding");
    assert_dtype_err(
        be.embedding(&table, &upload_f32(&be, &[0.0], [1])),
        "embedding",
        DType::F32,
    );
    assert_shape_err(
        be.embedding(&table.reshape([12]).unwrap(), &u32s(&be, &[0])),
        "embedding",
    );
    assert_shape_err(be.gather_rows(&table, &u32s(&be, &[1, 9])), "gather_rows");
    assert_shape_err(be.slice_rows(&table, 3, 2), "slice_rows");
    assert_shape_err(be.slice_rows(&table, usize::MAX, 2), "slice_rows");
    assert_shape_err(be.concat_rows(&[]), "concat_rows");
    let other = upload_f32(&be, &[0.0; 4], [2, 2]);
    assert_shape_err(be.concat_rows(&[&table, &other]), "concat_rows");
    let table16 = be.cast(&table, DType::F16).unwrap();
    assert_dtype_err(
        be.concat_rows(&[&table, &table16]),
        "concat_rows",
        DType::F16,
    );
    assert_shape_err(
        be.write_rows(&table, 3, &other.reshape([1, 4]).unwrap()),
        "write_rows",
    );
    assert_shape_err(
        be.write_rows(&table, 3, &upload_f32(&be, &[0.0; 6], [2, 3])),
        "write_rows",
    );
    assert_dtype_err(
        be.write_rows(&table, 0, &be.slice_rows(&table16, 0, 1).unwrap()),
        "write_rows",
        DType::F16,
    );
    assert_shape_err(
        be.argmax(&be.zeros(Shape::new([2, 0]), DType::F32).unwrap()),
        "argmax",
    );
    assert_dtype_err(be.argmax(&u32s(&be, &[1])), "argmax", DType::U32);
}

#[test]
fn patch_embed_errors() {
    let be = be();
    let px = upload_f32(&be, &[0.0; 3 * 8 * 8], [3, 8, 8]);
    let w = upload_f32(&be, &[0.0; 2 * 3 * 4 * 4], [2, 3, 4, 4]);
    assert_eq!(be.patch_embed(&px, &w, 4).unwrap().dims(), &[4, 2]);
    assert_shape_err(be.patch_embed(&px, &w, 2), "patch_embed");
    assert_shape_err(
        be.patch_embed(&px.reshape([3, 64]).unwrap(), &w, 4),
        "patch_embed",
    );
    let w2 = upload_f32(&be, &[0.0; 2 * 2 * 4 * 4], [2, 2, 4, 4]);
    assert_shape_err(be.patch_embed(&px, &w2, 4), "patch_embed");
    let big = upload_f32(&be, &[0.0; 2 * 3 * 16 * 16], [2, 3, 16, 16]);
    assert_shape_err(be.patch_embed(&px, &big, 16), "patch_embed");
}
