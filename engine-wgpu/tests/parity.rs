//! Every op of the wgpu backend against the CPU reference on seeded random inputs, including
//! sizes that are not tile multiples, every attention mask, causal offsets and GQA, tensors split
//! over several bindings, and the no-f16 / no-subgroup fallbacks.
//!
//! Without an adapter each test prints SKIP and passes, unless `CI` is set (then it fails).

use std::sync::{Arc, OnceLock};

use engine_core::{
    AttentionMask, AttentionParams, Backend, CpuBackend, DType, Error, HostData, MaskAction,
    MaskRule, MaskRules, RopeParams, Shape, Tensor, OPEN_END,
};
use engine_wgpu::{GpuBackend, GpuOptions};

mod common;
use common::{backend, gpu, gpu_small_binding, Rng};
use half::f16;
use pruner::ShallowMask;

/// `|got - want| <= abs + rel * |want|`.
#[derive(Clone, Copy, Debug)]
struct Tol {
    abs: f32,
    rel: f32,
}

/// Elementwise ops: one or two roundings (plus the erf approximation's 1.5e-7).
const STRICT: Tol = Tol {
    abs: 1e-6,
    rel: 1e-5,
};
/// Row reductions (norms, softmax) in f32 against the CPU's f64/f32 sums.
const NORM: Tol = Tol {
    abs: 1e-5,
    rel: 1e-5,
};
/// Attention: online softmax rescaling reorders the f32 sums.
const ATTN: Tol = Tol {
    abs: 2e-5,
    rel: 1e-4,
};
/// Bit-exact (copies, gathers, f16 conversions of representable values).
const EXACT: Tol = Tol { abs: 0.0, rel: 0.0 };

/// Matmul: f32 accumulation error grows like sqrt(K) (values here are O(1)).
fn matmul_tol(k: usize) -> Tol {
    Tol {
        abs: 2e-6 * (k as f32).sqrt() * 4.0,
        rel: 1e-4,
    }
}

/// The portable fallbacks: no shader-f16, no subgroups.
fn gpu_fallback() -> Option<Arc<GpuBackend>> {
    static G: OnceLock<Option<Arc<GpuBackend>>> = OnceLock::new();
    backend(
        GpuOptions {
            no_f16: true,
            no_subgroups: true,
            ..Default::default()
        },
        &G,
    )
}

/// Compares `got` with `want` laid out in rows of `cols`; panics naming the first bad element.
fn check(what: &str, got: &[f32], want: &[f32], cols: usize, tol: Tol) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} values, want {}",
        got.len(),
        want.len()
    );
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let ok = err <= tol.abs + tol.rel * w.abs() || (g.is_nan() && w.is_nan()) || g == w;
        if !ok {
            let c = cols.max(1);
            panic!(
                "{what}: row {} col {}: got {g} want {w} (|err| {err}, tol {tol:?})",
                i / c,
                i % c
            );
        }
        worst = worst.max(err);
    }
    println!("{what}: ok, max |err| {worst:e}");
}

/// The same host data on both backends.
fn both(gpu: &dyn Backend, data: HostData<'_>, shape: &[usize]) -> (Tensor, Tensor) {
    let c = CpuBackend::new()
        .upload(data, Shape::from(shape))
        .expect("cpu upload");
    let g = gpu.upload(data, Shape::from(shape)).expect("gpu upload");
    (c, g)
}

fn f32s(b: &dyn Backend, t: &Tensor) -> Vec<f32> {
    b.to_vec_f32(t).expect("to_vec_f32")
}

/// Runs `f` on the CPU and the GPU tensors and compares.
fn same(
    what: &str,
    gpu: &dyn Backend,
    tol: Tol,
    f: impl Fn(&dyn Backend, bool) -> engine_core::Result<Tensor>,
) {
    let cpu = CpuBackend::new();
    let want = f(&cpu, false).unwrap_or_else(|e| panic!("{what}: cpu: {e}"));
    let got = f(gpu, true).unwrap_or_else(|e| panic!("{what}: gpu: {e}"));
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    let cols = want.shape().last_dim();
    if want.dtype() == DType::U32 {
        let (g, w) = (
            gpu.to_vec_u32(&got).expect("read"),
            cpu.to_vec_u32(&want).expect("read"),
        );
        if let Some(i) = g.iter().zip(&w).position(|(a, b)| a != b) {
            panic!(
                "{what}: row {} col {}: got {} want {}",
                i / cols,
                i % cols,
                g[i],
                w[i]
            );
        }
        println!("{what}: ok (exact)");
    } else {
        check(what, &f32s(gpu, &got), &f32s(&cpu, &want), cols, tol);
    }
}

// ---------------------------------------------------------------- op suites (any backend)

fn elementwise_suite(g: &dyn Backend, seed: u64) {
    let mut r = Rng::new(seed);
    for (m, n) in [(1, 7), (7, 33), (33, 4096), (577, 100)] {
        let a = r.vec(m * n, -4.0, 4.0);
        let b = r.vec(m * n, -4.0, 4.0);
        let row = r.vec(n, -2.0, 2.0);
        let (ca, ga) = both(g, HostData::F32(&a), &[m, n]);
        let (cb, gb) = both(g, HostData::F32(&b), &[m, n]);
        let (cr, gr) = both(g, HostData::F32(&row), &[n]);
        let pick = |gpu: bool, c: &Tensor, gt: &Tensor| if gpu { gt.clone() } else { c.clone() };
        let tag = format!("[{m}, {n}]");
        same(&format!("add {tag}"), g, STRICT, |be, gpu| {
            be.add(&pick(gpu, &ca, &ga), &pick(gpu, &cb, &gb))
        });
        same(&format!("add row {tag}"), g, STRICT, |be, gpu| {
            be.add(&pick(gpu, &ca, &ga), &pick(gpu, &cr, &gr))
        });
        same(&format!("mul {tag}"), g, STRICT, |be, gpu| {
            be.mul(&pick(gpu, &ca, &ga), &pick(gpu, &cb, &gb))
        });
        same(&format!("mul row {tag}"), g, STRICT, |be, gpu| {
            be.mul(&pick(gpu, &ca, &ga), &pick(gpu, &cr, &gr))
        });
        same(
            &format!("gelu {tag}"),
            g,
            Tol {
                abs: 2e-6,
                rel: 1e-5,
            },
            |be, gpu| be.gelu(&pick(gpu, &ca, &ga)),
        );
        same(&format!("quick_gelu {tag}"), g, STRICT, |be, gpu| {
            be.quick_gelu(&pick(gpu, &ca, &ga))
        });
        same(&format!("silu_mul {tag}"), g, STRICT, |be, gpu| {
            be.silu_mul(&pick(gpu, &ca, &ga), &pick(gpu, &cb, &gb))
        });
    }
}

/// A long chain of ops recorded without a sync point: spans several submitted batches (uniform
/// arena and pass limits) and reuses pooled buffers as tensors drop.
fn batching_suite(g: &dyn Backend) {
    let n = 33;
    let one = g
        .upload(HostData::F32(&vec![1.0; n]), Shape::from([n]))
        .expect("up");
    let mut acc = g.zeros(Shape::from([3, n]), DType::F32).expect("zeros");
    let steps = 3000;
    for _ in 0..steps {
        acc = g.add(&acc, &one).expect("add");
    }
    let got = f32s(g, &acc);
    check(
        "3000 chained adds",
        &got,
        &vec![steps as f32; 3 * n],
        n,
        EXACT,
    );
}

fn norm_suite(g: &dyn Backend, seed: u64) {
    let mut r = Rng::new(seed);
    for (m, n) in [(1, 4096), (7, 1024), (33, 33), (577, 64)] {
        let x = r.vec(m * n, -3.0, 3.0);
        let w = r.vec(n, 0.5, 1.5);
        let b = r.vec(n, -0.5, 0.5);
        let (cx, gx) = (
            CpuBackend::new()
                .upload(HostData::F32(&x), Shape::from([m, n]))
                .expect("up"),
            g.upload(HostData::F32(&x), Shape::from([m, n]))
                .expect("up"),
        );
        let (cw, gw) = both(g, HostData::F32(&w), &[n]);
        let (cb, gb) = both(g, HostData::F32(&b), &[n]);
        let p = |gpu: bool, c: &Tensor, t: &Tensor| if gpu { t.clone() } else { c.clone() };
        let tag = format!("[{m}, {n}]");
        same(&format!("rms_norm {tag}"), g, NORM, |be, gpu| {
            be.rms_norm(&p(gpu, &cx, &gx), &p(gpu, &cw, &gw), 1e-5)
        });
        same(&format!("layer_norm {tag}"), g, NORM, |be, gpu| {
            be.layer_norm(
                &p(gpu, &cx, &gx),
                &p(gpu, &cw, &gw),
                &p(gpu, &cb, &gb),
                1e-5,
            )
        });
        same(&format!("softmax {tag}"), g, NORM, |be, gpu| {
            be.softmax(&p(gpu, &cx, &gx))
        });
        same(&format!("argmax {tag}"), g, EXACT, |be, gpu| {
            be.argmax(&p(gpu, &cx, &gx))
        });
    }
    // argmax: ties take the first index, a NaN wins, the first NaN over later ones.
    let rows: Vec<f32> = [
        vec![1.0, 3.0, 3.0, 2.0, 3.0],
        vec![1.0, f32::NAN, 5.0, f32::NAN, 0.0],
        vec![-1.0, -1.0, -1.0, -1.0, -1.0],
        vec![0.0, -0.0, 0.0, 7.0, 7.0],
    ]
    .concat();
    let (cx, gx) = both(g, HostData::F32(&rows), &[4, 5]);
    same("argmax ties/NaN", g, EXACT, |be, gpu| {
        be.argmax(if gpu { &gx } else { &cx })
    });
}

fn linear_suite(g: &dyn Backend, seed: u64) {
    let mut r = Rng::new(seed);
    // (m, k, n, f16 weights, bias): gemv (m <= 8) with and without vector loads, gemm with
    // ragged tiles, LLaVA widths.
    let cases = [
        (1, 4096, 4096, true, false),
        (7, 4096, 11008, true, true),
        (1, 11008, 4096, true, false),
        (1, 7, 5, false, true),
        (3, 333, 77, true, true),
        (9, 130, 70, false, false),
        (33, 100, 257, true, true),
        (577, 64, 96, false, true),
        (577, 33, 65, true, false),
        (64, 128, 128, true, false),
        // f16 with K % 8 == 0, ragged M and N: the subgroup kernels on software adapters.
        (70, 136, 200, true, true),
        (8, 256, 37, true, true),
        (2, 64, 33, true, false),
        // gemm_sg8's 64 × 128 tiles: a partial second subgroup, a subgroup wholly past M,
        // partial weight tiles and lanes past N.
        (130, 264, 300, true, true),
        (33, 512, 129, true, false),
    ];
    for (m, k, n, w16, bias) in cases {
        let x = r.vec(m * k, -1.0, 1.0);
        let wv = r.vec(n * k, -1.0, 1.0);
        let bv = r.vec(n, -1.0, 1.0);
        let wh: Vec<f16> = wv.iter().map(|&v| f16::from_f32(v)).collect();
        let (cx, gx) = both(g, HostData::F32(&x), &[m, k]);
        let (cw, gw) = if w16 {
            both(g, HostData::F16(&wh), &[n, k])
        } else {
            both(g, HostData::F32(&wv), &[n, k])
        };
        let (cb, gb) = both(g, HostData::F32(&bv), &[n]);
        let what = format!(
            "linear m={m} k={k} n={n} {} bias={bias}",
            if w16 { "f16" } else { "f32" }
        );
        same(&what, g, matmul_tol(k), |be, gpu| {
            let (x, w, b) = if gpu {
                (&gx, &gw, &gb)
            } else {
                (&cx, &cw, &cb)
            };
            be.linear(x, w, bias.then_some(b))
        });
    }
    // Rank-3 activations keep their leading dims.
    let x = r.vec(2 * 3 * 16, -1.0, 1.0);
    let wv = r.vec(8 * 16, -1.0, 1.0);
    let (cx, gx) = both(g, HostData::F32(&x), &[2, 3, 16]);
    let (cw, gw) = both(g, HostData::F32(&wv), &[8, 16]);
    same("linear rank-3", g, matmul_tol(16), |be, gpu| {
        if gpu {
            be.linear(&gx, &gw, None)
        } else {
            be.linear(&cx, &cw, None)
        }
    });
}

fn rope_suite(g: &dyn Backend, seed: u64) {
    let mut r = Rng::new(seed);
    for (s, heads, d, scale) in [
        (1, 32, 128, 1.0),
        (7, 32, 128, 2.0),
        (33, 4, 64, 1.0),
        (577, 2, 16, 1.0),
    ] {
        let w = heads * d;
        let x = r.vec(s * w, -2.0, 2.0);
        let pos: Vec<u32> = (0..s).map(|_| r.below(4096)).collect();
        let (cx, gx) = both(g, HostData::F32(&x), &[s, w]);
        let (cp, gp) = both(g, HostData::U32(&pos), &[s]);
        let p = RopeParams {
            head_dim: d,
            theta: 10000.0,
            scaling_factor: scale,
        };
        // cos/sin of angles up to 4096 rad: f32 reduction keeps ~1e-6 relative.
        same(
            &format!("rope s={s} h={heads} d={d} scale={scale}"),
            g,
            Tol {
                abs: 1e-5,
                rel: 1e-5,
            },
            |be, gpu| {
                if gpu {
                    be.rope(&gx, &gp, &p)
                } else {
                    be.rope(&cx, &cp, &p)
                }
            },
        );
    }
}

struct AttnCase {
    sq: usize,
    l: usize,
    p: AttentionParams,
}

fn attn_cases() -> Vec<AttnCase> {
    let mk = |sq, l, kv_len, q_offset, causal, h, kvh, d, mask| AttnCase {
        sq,
        l,
        p: AttentionParams {
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            causal,
            q_offset,
            kv_len,
            mask,
        },
    };
    let none = AttentionMask::None;
    let (s, e) = (5, 40);
    let rule = |queries, keys, action| MaskRule {
        queries,
        keys,
        action,
    };
    let rules = AttentionMask::Rules(
        MaskRules::new(&[
            rule((20, 30), (8, 18), MaskAction::Zero),
            rule((30, OPEN_END), (8, 18), MaskAction::Sink { to: 13 }),
            rule((45, OPEN_END), (2, 6), MaskAction::Zero),
            rule((10, 50), (12, 16), MaskAction::Sink { to: 13 }),
        ])
        .expect("rules"),
    );
    vec![
        // CLIP: non-causal, 33 queries over 33 keys.
        mk(33, 33, 33, 0, false, 4, 4, 64, none),
        // CLIP-L/336 vision tower size: 577 tokens, non-causal (not a tile multiple).
        mk(577, 577, 577, 0, false, 2, 2, 64, none),
        // Causal prefill with GQA and a longer cache.
        mk(70, 80, 70, 0, true, 4, 2, 128, none),
        // Decode: one query at the end of the cache.
        mk(1, 80, 70, 69, true, 4, 2, 128, none),
        // A chunk of 7 queries after 30 cached rows.
        mk(7, 50, 37, 30, true, 2, 1, 80, none),
        // VisiPruner masks over an image span [5, 40) during prefill and decode.
        mk(
            60,
            64,
            60,
            0,
            true,
            4,
            4,
            64,
            AttentionMask::Layer0Sink {
                image_start: s,
                image_end: e,
            },
        ),
        mk(
            1,
            64,
            61,
            60,
            true,
            4,
            4,
            64,
            AttentionMask::Layer0Sink {
                image_start: s,
                image_end: e,
            },
        ),
        mk(
            60,
            64,
            60,
            0,
            true,
            4,
            2,
            64,
            AttentionMask::Layer0Split {
                image_start: s,
                image_end: e,
            },
        ),
        mk(
            60,
            64,
            60,
            0,
            true,
            4,
            4,
            64,
            AttentionMask::TextToImage {
                image_start: s,
                image_end: e,
            },
        ),
        mk(
            20,
            64,
            50,
            30,
            true,
            4,
            4,
            64,
            AttentionMask::TextToImage {
                image_start: s,
                image_end: e,
            },
        ),
        // An empty span: key s is text then.
        mk(
            30,
            30,
            30,
            0,
            true,
            2,
            2,
            64,
            AttentionMask::Layer0Sink {
                image_start: 10,
                image_end: 10,
            },
        ),
        // Long caches: several key passes on software adapters (llvmpipe's loop cap), with the
        // running softmax and the sink sum carried between passes.
        mk(
            70,
            640,
            600,
            530,
            true,
            4,
            2,
            128,
            AttentionMask::TextToImage {
                image_start: 5,
                image_end: 400,
            },
        ),
        mk(
            64,
            720,
            700,
            636,
            true,
            2,
            2,
            64,
            AttentionMask::Layer0Sink {
                image_start: 5,
                image_end: 581,
            },
        ),
        // Decode over long caches: flash-decoding splits the keys (64 per split) and combines,
        // the sink key in the first split and image keys across many.
        mk(
            1,
            720,
            700,
            699,
            true,
            4,
            2,
            128,
            AttentionMask::Layer0Sink {
                image_start: 5,
                image_end: 581,
            },
        ),
        mk(
            1,
            4096,
            4096,
            4095,
            true,
            8,
            2,
            128,
            AttentionMask::TextToImage {
                image_start: 35,
                image_end: 611,
            },
        ),
        // Head sizes of the test fixtures (8: two lanes per query) and one that is not a
        // multiple of 4 (the per-query fallback), prefill and decode.
        mk(19, 24, 19, 0, true, 4, 2, 8, none),
        mk(1, 24, 20, 19, true, 4, 2, 8, none),
        mk(9, 12, 9, 0, true, 2, 1, 6, none),
        mk(1, 12, 10, 9, true, 2, 1, 6, none),
        // VisiPruner's shallow masks over several separate images: `Keep` rules carve the
        // text between images out (8 images: 16 rules for the sink, 14 for the split).
        mk(
            60,
            64,
            60,
            0,
            true,
            4,
            2,
            64,
            multi(ShallowMask::Layer0Sink, 8),
        ),
        mk(
            60,
            64,
            60,
            0,
            true,
            4,
            4,
            64,
            multi(ShallowMask::TextToImage, 8),
        ),
        mk(
            60,
            64,
            60,
            0,
            true,
            2,
            2,
            64,
            multi(ShallowMask::Layer0Split, 5),
        ),
        mk(
            1,
            64,
            61,
            60,
            true,
            4,
            2,
            64,
            multi(ShallowMask::Layer0Sink, 3),
        ),
        // Non-causal with a mask (every query sees every key).
        mk(
            45,
            45,
            45,
            0,
            false,
            2,
            2,
            64,
            AttentionMask::Layer0Sink {
                image_start: 3,
                image_end: 20,
            },
        ),
        // Explicit rules (masks as data): a sink to a key in the middle of its span, a
        // zero rule with an open query range, and a rule that only later queries hit; the
        // first covering rule decides. Prefill and decode (the sink reaches decode).
        mk(60, 64, 60, 0, true, 4, 2, 64, rules),
        mk(1, 64, 61, 60, true, 4, 2, 64, rules),
        mk(70, 80, 70, 0, true, 2, 1, 128, rules),
    ]
}

/// The engine mask of `mask` over `images` separate image runs of 4 rows with 2 text rows
/// between them, from row 3.
fn multi(mask: ShallowMask, images: usize) -> AttentionMask {
    let runs: Vec<(usize, usize)> = (0..images).map(|i| (3 + 6 * i, 7 + 6 * i)).collect();
    mask.attention_mask_runs(&runs)
        .expect("fits the rule budget")
}

/// Every attention case with K and V of `kv` (`F32`, or `F16` as an f16 KV cache holds them:
/// the same f16 values on both backends, so the tolerance is the f32 one).
fn attention_suite(g: &dyn Backend, seed: u64, kv: DType) {
    let mut r = Rng::new(seed);
    for (ci, c) in attn_cases().into_iter().enumerate() {
        let p = c.p;
        let (qw, kw) = (p.num_heads * p.head_dim, p.num_kv_heads * p.head_dim);
        let q = r.vec(c.sq * qw, -2.0, 2.0);
        let k = r.vec(c.l * kw, -2.0, 2.0);
        let v = r.vec(c.l * kw, -1.0, 1.0);
        let (cq, gq) = both(g, HostData::F32(&q), &[c.sq, qw]);
        let (kh, vh): (Vec<f16>, Vec<f16>) = (
            k.iter().map(|&x| f16::from_f32(x)).collect(),
            v.iter().map(|&x| f16::from_f32(x)).collect(),
        );
        let ((ck, gk), (cv, gv)) = if kv == DType::F16 {
            (
                both(g, HostData::F16(&kh), &[c.l, kw]),
                both(g, HostData::F16(&vh), &[c.l, kw]),
            )
        } else {
            (
                both(g, HostData::F32(&k), &[c.l, kw]),
                both(g, HostData::F32(&v), &[c.l, kw]),
            )
        };
        let tag = format!(
            "case {ci} (KV {kv}): sq={} kv_len={} q_offset={} causal={} H={} KvH={} D={} {:?}",
            c.sq, p.kv_len, p.q_offset, p.causal, p.num_heads, p.num_kv_heads, p.head_dim, p.mask
        );
        same(&format!("attention {tag}"), g, ATTN, |be, gpu| {
            if gpu {
                be.attention(&gq, &gk, &gv, &p)
            } else {
                be.attention(&cq, &ck, &cv, &p)
            }
        });
        same(&format!("attention_last_row {tag}"), g, ATTN, |be, gpu| {
            if gpu {
                be.attention_last_row(&gq, &gk, &p)
            } else {
                be.attention_last_row(&cq, &ck, &p)
            }
        });
        // Contributions from the CPU's probabilities (the same input on both backends).
        let cpu = CpuBackend::new();
        let probs = cpu
            .to_vec_f32(&cpu.attention_last_row(&cq, &ck, &p).expect("probs"))
            .expect("read");
        let (cp, gp) = both(g, HostData::F32(&probs), &[p.num_heads, p.kv_len]);
        let (a, b) = (p.kv_len / 4, p.kv_len);
        same(
            &format!("token_contributions {a}..{b} {tag}"),
            g,
            Tol {
                abs: 1e-5,
                rel: 1e-4,
            },
            |be, gpu| {
                if gpu {
                    be.token_contributions(&gp, &gv, &p, a, b)
                } else {
                    be.token_contributions(&cp, &cv, &p, a, b)
                }
            },
        );
    }
}

fn data_suite(g: &dyn Backend, seed: u64) {
    let mut r = Rng::new(seed);
    let cpu = CpuBackend::new();
    // embedding: f32 and f16 tables, odd width (f16 halves straddle words).
    for (vocab, d, w16) in [(100, 64, false), (100, 33, true), (1000, 4096, true)] {
        let t = r.vec(vocab * d, -1.0, 1.0);
        let th: Vec<f16> = t.iter().map(|&v| f16::from_f32(v)).collect();
        let (ct, gt) = if w16 {
            both(g, HostData::F16(&th), &[vocab, d])
        } else {
            both(g, HostData::F32(&t), &[vocab, d])
        };
        let ids: Vec<u32> = (0..9)
            .map(|i| if i == 3 { 0 } else { r.below(vocab as u32) })
            .chain([vocab as u32 - 1, 5, 5])
            .collect();
        let (ci, gi) = both(g, HostData::U32(&ids), &[ids.len()]);
        same(
            &format!("embedding [{vocab}, {d}] f16={w16}"),
            g,
            EXACT,
            |be, gpu| {
                if gpu {
                    be.embedding(&gt, &gi)
                } else {
                    be.embedding(&ct, &ci)
                }
            },
        );
    }
    // gather/slice/concat/write on f32, u32 and f16 (odd offsets).
    let (m, n) = (33, 7);
    let x = r.vec(m * n, -1.0, 1.0);
    let (cx, gx) = both(g, HostData::F32(&x), &[m, n]);
    let idx: Vec<u32> = vec![0, 32, 5, 5, 17];
    let (ci, gi) = both(g, HostData::U32(&idx), &[5]);
    same("gather_rows f32", g, EXACT, |be, gpu| {
        if gpu {
            be.gather_rows(&gx, &gi)
        } else {
            be.gather_rows(&cx, &ci)
        }
    });
    same("slice_rows f32", g, EXACT, |be, gpu| {
        if gpu {
            be.slice_rows(&gx, 3, 11)
        } else {
            be.slice_rows(&cx, 3, 11)
        }
    });
    let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let (chx, ghx) = both(g, HostData::F16(&xh), &[m, n]);
    for (s, l) in [(3, 11), (0, 33), (4, 1), (1, 2)] {
        same(
            &format!("slice_rows f16 {s}..{}", s + l),
            g,
            EXACT,
            |be, gpu| {
                if gpu {
                    be.slice_rows(&ghx, s, l)
                } else {
                    be.slice_rows(&chx, s, l)
                }
            },
        );
    }
    let y = r.vec(5 * n, -1.0, 1.0);
    let (cy, gy) = both(g, HostData::F32(&y), &[5, n]);
    same("concat_rows f32", g, EXACT, |be, gpu| {
        if gpu {
            be.concat_rows(&[&gx, &gy, &gx])
        } else {
            be.concat_rows(&[&cx, &cy, &cx])
        }
    });
    let yh: Vec<f16> = y.iter().map(|&v| f16::from_f32(v)).collect();
    let (chy, ghy) = both(g, HostData::F16(&yh), &[5, n]);
    same("concat_rows f16 (odd offsets)", g, EXACT, |be, gpu| {
        if gpu {
            be.concat_rows(&[&ghy, &ghx, &ghy])
        } else {
            be.concat_rows(&[&chy, &chx, &chy])
        }
    });
    let u: Vec<u32> = (0..(4 * n) as u32).collect();
    let (cu, gu) = both(g, HostData::U32(&u), &[4, n]);
    same("concat_rows u32", g, EXACT, |be, gpu| {
        if gpu {
            be.concat_rows(&[&gu, &gu])
        } else {
            be.concat_rows(&[&cu, &cu])
        }
    });
    // write_rows into a cache (KV append), f32 and f16 at odd offsets, and into itself.
    for dt in [DType::F32, DType::F16] {
        let c_cache = cpu.zeros(Shape::from([40, n]), dt).expect("zeros");
        let g_cache = g.zeros(Shape::from([40, n]), dt).expect("zeros");
        let (cs, gs) = if dt == DType::F16 {
            (&chy, &ghy)
        } else {
            (&cy, &gy)
        };
        for row in [0, 3, 35] {
            cpu.write_rows(&c_cache, row, cs).expect("cpu write");
            g.write_rows(&g_cache, row, gs).expect("gpu write");
        }
        let part_c = cpu.slice_rows(&c_cache, 0, 5).expect("slice");
        let part_g = g.slice_rows(&g_cache, 0, 5).expect("slice");
        cpu.write_rows(&c_cache, 20, &part_c)
            .expect("cpu self write");
        g.write_rows(&g_cache, 20, &part_g).expect("gpu self write");
        check(
            &format!("write_rows {dt}"),
            &f32s(g, &g_cache),
            &f32s(&cpu, &c_cache),
            n,
            EXACT,
        );
    }
    // f32 rows into an f16 cache (the f16 KV cache's append): rounded to nearest on both
    // backends, at odd row offsets (n is odd) too.
    let c_cache = cpu.zeros(Shape::from([40, n]), DType::F16).expect("zeros");
    let g_cache = g.zeros(Shape::from([40, n]), DType::F16).expect("zeros");
    for row in [0, 3, 35] {
        cpu.write_rows(&c_cache, row, &cy).expect("cpu write");
        g.write_rows(&g_cache, row, &gy).expect("gpu write");
    }
    check(
        "write_rows f32 into f16",
        &f32s(g, &g_cache),
        &f32s(&cpu, &c_cache),
        n,
        EXACT,
    );
    // cast: f32 -> f16 -> f32 (round to nearest; values here are normal f16 numbers).
    let big = r.vec(577 * 9, -100.0, 100.0);
    let (cb, gb) = both(g, HostData::F32(&big), &[577, 9]);
    same("cast f32->f16", g, EXACT, |be, gpu| {
        be.cast(if gpu { &gb } else { &cb }, DType::F16)
    });
    same("cast f16->f32", g, EXACT, |be, gpu| {
        be.cast(if gpu { &ghx } else { &chx }, DType::F32)
    });
    same("cast f32->f32", g, EXACT, |be, gpu| {
        be.cast(if gpu { &gb } else { &cb }, DType::F32)
    });
    let (cs, gs) = both(g, HostData::F32(&[2.5]), &[]);
    same("cast scalar f32->f32", g, EXACT, |be, gpu| {
        be.cast(if gpu { &gs } else { &cs }, DType::F32)
    });
    same("cast scalar f32->f16", g, EXACT, |be, gpu| {
        be.cast(if gpu { &gs } else { &cs }, DType::F16)
    });
    same("zeros f32", g, EXACT, |be, _| {
        be.zeros(Shape::from([7, 5]), DType::F32)
    });
    same("zeros f16", g, EXACT, |be, _| {
        be.zeros(Shape::from([3, 3]), DType::F16)
    });
    // patch_embed: 3x30x30 image, patch 14 (the border is dropped), f16 and f32 weights.
    let px = r.vec(3 * 30 * 30, -1.0, 1.0);
    let (cp, gp) = both(g, HostData::F32(&px), &[3, 30, 30]);
    for w16 in [false, true] {
        let wv = r.vec(48 * 3 * 14 * 14, -0.1, 0.1);
        let wh: Vec<f16> = wv.iter().map(|&v| f16::from_f32(v)).collect();
        let (cw, gw) = if w16 {
            both(g, HostData::F16(&wh), &[48, 3, 14, 14])
        } else {
            both(g, HostData::F32(&wv), &[48, 3, 14, 14])
        };
        same(
            &format!("patch_embed f16={w16}"),
            g,
            matmul_tol(588),
            |be, gpu| {
                if gpu {
                    be.patch_embed(&gp, &gw, 14)
                } else {
                    be.patch_embed(&cp, &cw, 14)
                }
            },
        );
    }
    // BF16 uploads convert like the CPU backend.
    let bf: Vec<half::bf16> = r
        .vec(64, -3.0, 3.0)
        .iter()
        .map(|&v| half::bf16::from_f32(v))
        .collect();
    let (cbf, gbf) = both(g, HostData::BF16(&bf), &[8, 8]);
    assert_eq!(gbf.dtype(), cbf.dtype(), "bf16 upload dtype");
    check("bf16 upload", &f32s(g, &gbf), &f32s(&cpu, &cbf), 8, EXACT);
}

fn errors_suite(g: &dyn Backend) {
    let x = g
        .upload(HostData::F32(&[0.0; 12]), Shape::from([3, 4]))
        .expect("up");
    let w = g
        .upload(HostData::F32(&[0.0; 15]), Shape::from([3, 5]))
        .expect("up");
    assert!(
        matches!(g.linear(&x, &w, None), Err(Error::Shape { .. })),
        "linear K mismatch"
    );
    let ids = g
        .upload(HostData::U32(&[0, 7]), Shape::from([2]))
        .expect("up");
    assert!(
        matches!(g.embedding(&x, &ids), Err(Error::Shape { .. })),
        "embedding id out of range"
    );
    assert!(
        matches!(g.cast(&ids, DType::F32), Err(Error::DType { .. })),
        "cast u32"
    );
    assert!(
        matches!(g.add(&x, &w), Err(Error::Shape { .. })),
        "add shapes"
    );
    assert!(
        matches!(g.to_vec_u32(&x), Err(Error::DType { .. })),
        "to_vec_u32 of f32"
    );
    assert!(
        matches!(g.slice_rows(&x, 2, 2), Err(Error::Shape { .. })),
        "slice past the end"
    );
    assert!(
        matches!(
            g.upload(HostData::F32(&[0.0; 3]), Shape::from([2, 2])),
            Err(Error::Shape { .. })
        ),
        "upload count"
    );
    let huge = Shape::from([1usize << 20, 1 << 20]);
    assert!(
        matches!(g.zeros(huge, DType::F32), Err(Error::TooLarge { .. })),
        "4 TiB tensor"
    );
    g.sync()
        .expect("device still healthy after the rejected calls");
    println!("errors: ok");
}

/// The CPU and GPU backends reject the same bad calls with the same message: both call
/// one `engine_core::checks` function per op, so a check edited in one backend only (or
/// a backend-specific check running first) shows here.
fn same_errors_suite(g: &dyn Backend) {
    let cpu = CpuBackend::new();
    type Call = fn(&dyn Backend) -> engine_core::Result<Tensor>;
    let cases: Vec<(&str, Call)> = vec![
        ("upload count", |b| {
            b.upload(HostData::F32(&[0.0; 3]), Shape::from([2, 2]))
        }),
        ("upload_quant bytes", |b| {
            b.upload_quant(engine_core::QuantType::Q8_0, &[0; 33], Shape::from([1, 32]))
        }),
        ("zeros bf16", |b| b.zeros(Shape::from([2]), DType::BF16)),
        ("linear K", |b| {
            let (x, w) = (up(b, &[3, 4]), up(b, &[3, 5]));
            b.linear(&x, &w, None)
        }),
        ("linear bias", |b| {
            let (x, w, bias) = (up(b, &[3, 4]), up(b, &[3, 4]), up(b, &[4]));
            b.linear(&x, &w, Some(&bias))
        }),
        ("silu_mul", |b| b.silu_mul(&up(b, &[2, 4]), &up(b, &[4, 2]))),
        ("rms_norm weight", |b| {
            b.rms_norm(&up(b, &[2, 4]), &up(b, &[3]), 1e-5)
        }),
        ("layer_norm bias", |b| {
            b.layer_norm(&up(b, &[2, 4]), &up(b, &[4]), &up(b, &[5]), 1e-5)
        }),
        ("softmax scalar", |b| b.softmax(&up(b, &[]))),
        ("rope head_dim", |b| {
            let p = RopeParams {
                head_dim: 3,
                theta: 10000.0,
                scaling_factor: 1.0,
            };
            b.rope(&up(b, &[2, 6]), &ids(b, &[0, 1]), &p)
        }),
        ("rope theta", |b| {
            let p = RopeParams {
                head_dim: 2,
                theta: -1.0,
                scaling_factor: 1.0,
            };
            b.rope(&up(b, &[2, 4]), &ids(b, &[0, 1]), &p)
        }),
        ("rope positions", |b| {
            let p = RopeParams {
                head_dim: 2,
                theta: 10000.0,
                scaling_factor: 1.0,
            };
            b.rope(&up(b, &[2, 4]), &ids(b, &[0, 1, 2]), &p)
        }),
        ("attention_last_row no rows", |b| {
            let p = AttentionParams {
                num_heads: 1,
                num_kv_heads: 1,
                head_dim: 4,
                scale: 0.5,
                kv_len: 2,
                q_offset: 0,
                causal: false,
                mask: AttentionMask::None,
            };
            b.attention_last_row(&up(b, &[0, 4]), &up(b, &[2, 4]), &p)
        }),
        ("embedding ids rank", |b| {
            let i = b
                .upload(HostData::U32(&[0, 1]), Shape::from([1, 2]))
                .expect("upload");
            b.embedding(&up(b, &[3, 4]), &i)
        }),
        ("embedding id range", |b| {
            b.embedding(&up(b, &[3, 4]), &ids(b, &[0, 7]))
        }),
        ("gather_rows idx rank", |b| {
            let i = b
                .upload(HostData::U32(&[0, 1]), Shape::from([2, 1]))
                .expect("upload");
            b.gather_rows(&up(b, &[3, 4]), &i)
        }),
        ("gather_rows idx range", |b| {
            b.gather_rows(&up(b, &[3, 4]), &ids(b, &[2, 3]))
        }),
        ("slice_rows scalar", |b| b.slice_rows(&up(b, &[]), 0, 1)),
        ("slice_rows end", |b| b.slice_rows(&up(b, &[3, 4]), 2, 2)),
        ("concat_rows none", |b| b.concat_rows(&[])),
        ("concat_rows tail", |b| {
            b.concat_rows(&[&up(b, &[1, 4]), &up(b, &[1, 3])])
        }),
        ("concat_rows dtype", |b| {
            b.concat_rows(&[&up(b, &[1, 2]), &ids(b, &[1, 2]).reshape([1, 2])?])
        }),
        ("concat_rows quant first", |b| {
            let q = b.upload_quant(engine_core::QuantType::Q8_0, &[0; 34], Shape::from([1, 32]))?;
            b.concat_rows(&[&q, &up(b, &[1, 32])])
        }),
        ("write_rows past the end", |b| {
            b.write_rows(&up(b, &[2, 4]), 1, &up(b, &[2, 4]))
                .map(|()| up(b, &[1]))
        }),
        ("argmax empty rows", |b| b.argmax(&up(b, &[2, 0]))),
    ];
    for (what, call) in cases {
        let want = call(&cpu).err().map(|e| e.to_string());
        let got = call(g).err().map(|e| e.to_string());
        assert!(want.is_some(), "{what}: the CPU backend accepted the call");
        assert_eq!(got, want, "{what}: GPU and CPU errors differ");
    }
    g.sync()
        .expect("device still healthy after the rejected calls");
    println!("same errors: ok");
}

fn up(b: &dyn Backend, dims: &[usize]) -> Tensor {
    let n = dims.iter().product::<usize>();
    b.upload(HostData::F32(&vec![0.5; n]), Shape::from(dims))
        .expect("upload")
}

fn ids(b: &dyn Backend, v: &[u32]) -> Tensor {
    b.upload(HostData::U32(v), Shape::from([v.len()]))
        .expect("upload")
}

// ---------------------------------------------------------------- tests

macro_rules! suite_tests {
    ($($name:ident => $body:expr;)*) => {$(
        #[test]
        fn $name() {
            let Some(g) = gpu() else { return };
            let f: fn(&dyn Backend) = $body;
            f(&*g);
        }
    )*};
}

suite_tests! {
    elementwise => |g| elementwise_suite(g, 1);
    norms_softmax_argmax => |g| norm_suite(g, 2);
    linear => |g| linear_suite(g, 3);
    rope => |g| rope_suite(g, 4);
    attention => |g| attention_suite(g, 5, DType::F32);
    attention_f16_kv => |g| attention_suite(g, 7, DType::F16);
    data_movement => |g| data_suite(g, 6);
    errors => |g| errors_suite(g);
    same_errors => |g| same_errors_suite(g);
    batching => |g| batching_suite(g);
}

#[test]
fn fallbacks_no_f16_no_subgroups() {
    let Some(g) = gpu_fallback() else { return };
    let i = g.device_info();
    assert!(
        !i.shader_f16 && !i.subgroups,
        "fallback backend still uses f16/subgroups: {i:?}"
    );
    elementwise_suite(&*g, 11);
    norm_suite(&*g, 12);
    linear_suite(&*g, 13);
    attention_suite(&*g, 15, DType::F32);
    attention_suite(&*g, 17, DType::F16);
    data_suite(&*g, 16);
}

#[test]
fn attention_long_calls() {
    // Calls whose scores do not fit one score buffer of the sg8 attention (64 MiB on
    // software adapters with 8-wide subgroups): heads in chunks (2100 queries x 2104 keys, 4
    // heads: 3 + 1) and queries in chunks (4100 x 4104, one head: 4064 + 36 queries), with
    // masks.
    let Some(g) = gpu() else { return };
    let mut r = Rng::new(31);
    for (sq, h, kvh, mask) in [
        (
            2100usize,
            4usize,
            2usize,
            AttentionMask::Layer0Sink {
                image_start: 5,
                image_end: 581,
            },
        ),
        (
            4100,
            1,
            1,
            AttentionMask::TextToImage {
                image_start: 35,
                image_end: 611,
            },
        ),
    ] {
        let d = 64;
        let p = AttentionParams {
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            causal: true,
            q_offset: 0,
            kv_len: sq,
            mask,
        };
        let q = r.vec(sq * h * d, -2.0, 2.0);
        let kh: Vec<f16> = r
            .vec(sq * kvh * d, -2.0, 2.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let vh: Vec<f16> = r
            .vec(sq * kvh * d, -1.0, 1.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let (cq, gq) = both(&*g, HostData::F32(&q), &[sq, h * d]);
        let (ck, gk) = both(&*g, HostData::F16(&kh), &[sq, kvh * d]);
        let (cv, gv) = both(&*g, HostData::F16(&vh), &[sq, kvh * d]);
        same(
            &format!("attention {sq} queries, {h} heads, {mask:?}"),
            &*g,
            ATTN,
            |be, gpu| {
                if gpu {
                    be.attention(&gq, &gk, &gv, &p)
                } else {
                    be.attention(&cq, &ck, &cv, &p)
                }
            },
        );
    }
}

/// A backend forced onto one prefill attention variant.
fn gpu_variant(
    v: &str,
    cell: &'static OnceLock<Option<Arc<GpuBackend>>>,
) -> Option<Arc<GpuBackend>> {
    backend(
        GpuOptions {
            prefill_variant: Some(v.to_string()),
            ..Default::default()
        },
        cell,
    )
}

#[test]
fn attention_variants() {
    // Both flash prefill kernels (whichever the adapter tunes to), with tiles other than the
    // defaults, on f32 and f16 caches: flash_attn (K/V tiles in workgroup memory, 8 and 4
    // lanes per query) and flash_attn_k (lanes split the keys, then the columns). The sg8
    // passes are the default on software adapters with 8-wide subgroups (`attention` above).
    static A: OnceLock<Option<Arc<GpuBackend>>> = OnceLock::new();
    static B: OnceLock<Option<Arc<GpuBackend>>> = OnceLock::new();
    static C: OnceLock<Option<Arc<GpuBackend>>> = OnceLock::new();
    for (v, cell) in [
        ("tiled:16,32,8", &A),
        ("tiled:8,16,4", &B),
        ("keys:8,64", &C),
    ] {
        let Some(g) = gpu_variant(v, cell) else {
            return;
        };
        println!("variant {v}");
        attention_suite(&*g, 21, DType::F32);
        attention_suite(&*g, 23, DType::F16);
    }
}

#[test]
fn split_bindings() {
    let Some(g) = gpu_small_binding() else { return };
    assert_eq!(g.device_info().max_binding_size, 64 << 10);
    let mut r = Rng::new(21);
    let cpu = CpuBackend::new();
    // [1000, 77] f16 = 154 KB over 64 KiB bindings: odd rows, so chunks hold an even number.
    // (600, 64): f16 rows with K % 8 == 0 (the subgroup kernels on software adapters).
    for (vocab, d, w16) in [(1000, 77, true), (300, 128, false), (600, 64, true)] {
        let t = r.vec(vocab * d, -1.0, 1.0);
        let th: Vec<f16> = t.iter().map(|&v| f16::from_f32(v)).collect();
        let (ct, gt) = if w16 {
            both(&*g, HostData::F16(&th), &[vocab, d])
        } else {
            both(&*g, HostData::F32(&t), &[vocab, d])
        };
        let parts = gt
            .storage_as::<engine_wgpu::GpuStorage>("test")
            .expect("gpu storage")
            .buffers();
        assert!(
            parts >= 2,
            "[{vocab}, {d}] should be split over 64 KiB bindings, got {parts} buffer(s)"
        );
        check(
            &format!("split to_vec [{vocab}, {d}] ({parts} buffers)"),
            &f32s(&*g, &gt),
            &f32s(&cpu, &ct),
            d,
            EXACT,
        );
        let ids: Vec<u32> = (0..17)
            .map(|_| r.below(vocab as u32))
            .chain([0, vocab as u32 - 1])
            .collect();
        let (ci, gi) = both(&*g, HostData::U32(&ids), &[ids.len()]);
        same(
            &format!("split embedding [{vocab}, {d}]"),
            &*g,
            EXACT,
            |be, gpu| {
                if gpu {
                    be.embedding(&gt, &gi)
                } else {
                    be.embedding(&ct, &ci)
                }
            },
        );
        let bv = r.vec(vocab, -1.0, 1.0);
        let (cb, gb) = both(&*g, HostData::F32(&bv), &[vocab]);
        // 16 rows take the tiled kernel; the [16, 1000] f32 result still fits one binding.
        for m in [1, 3, 16] {
            let x = r.vec(m * d, -1.0, 1.0);
            let (cx, gx) = both(&*g, HostData::F32(&x), &[m, d]);
            same(
                &format!("split linear m={m} [{vocab}, {d}] f16={w16}"),
                &*g,
                matmul_tol(d),
                |be, gpu| {
                    if gpu {
                        be.linear(&gx, &gt, Some(&gb))
                    } else {
                        be.linear(&cx, &ct, Some(&cb))
                    }
                },
            );
        }
    }
}

#[test]
fn adapters_listed() {
    let list = engine_wgpu::list_adapters();
    if list.is_empty() {
        if std::env::var_os("CI").is_some() {
            panic!("no wgpu adapter and CI is set");
        }
        println!("SKIP: no wgpu adapter");
        return;
    }
    for a in &list {
        println!("{}", serde_json::to_string(a).expect("json"));
    }
    // `--device gpu` picks exactly one adapter; `auto` picks at most one, never a
    // software one (it runs the CPU backend instead).
    assert_eq!(
        list.iter().filter(|a| a.gpu_pick).count(),
        1,
        "exactly one gpu pick"
    );
    let auto: Vec<_> = list.iter().filter(|a| a.auto_pick).collect();
    assert!(auto.len() <= 1, "at most one auto pick");
    assert!(
        auto.iter().all(|a| a.device_type != "cpu"),
        "auto picked a software adapter"
    );
    // Selecting by index and by name substring reaches the same adapter.
    let name = list[0].name.to_uppercase();
    let by_name = engine_wgpu::open(&GpuOptions {
        adapter: Some(name),
        ..Default::default()
    })
    .expect("by name");
    assert_eq!(by_name.device_info().adapter, list[0].name);
    let bad = engine_wgpu::open(&GpuOptions {
        adapter: Some("no such adapter".into()),
        ..Default::default()
    });
    match bad {
        Err(Error::NoAdapter(msg)) => assert!(msg.contains("--device cpu"), "hint missing: {msg}"),
        other => panic!("want NoAdapter, got {:?}", other.map(|b| b.device_info())),
    }
    if list.iter().all(|a| a.device_type == "cpu") {
        let r = engine_wgpu::open(&GpuOptions {
            require_gpu: true,
            ..Default::default()
        });
        assert!(
            matches!(r, Err(Error::NoAdapter(_))),
            "require_gpu must refuse software adapters"
        );
    }
}

#[test]
fn kernel_bench_quick() {
    if gpu().is_none() {
        return;
    }
    let v = engine_wgpu::bench::kernel_bench(&GpuOptions::default(), true).expect("bench");
    println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    for key in ["adapter", "timing", "peak", "linear"] {
        assert!(v.get(key).is_some(), "bench JSON lacks `{key}`");
    }
    assert!(
        v["peak"]["fma_gflops"].as_f64().is_some_and(|x| x > 0.0),
        "fma peak"
    );
    assert!(
        v["peak"]["copy_gbps"].as_f64().is_some_and(|x| x > 0.0),
        "copy peak"
    );
    let rows = v["linear"].as_array().expect("linear rows");
    let f16_rows = rows.iter().filter(|r| r["weights"] == "f16").count();
    assert_eq!(f16_rows, 6, "f16: 2 row counts x 3 shapes");
    // Quick: each quantized format on the first shape only.
    for q in ["q8_0", "q4_0", "q4_1", "q4_k"] {
        let n = rows.iter().filter(|r| r["weights"] == q).count();
        assert_eq!(n, 2, "{q}: 2 row counts x 1 shape, got {n}");
    }
    for r in rows {
        for key in [
            "m",
            "k",
            "n",
            "min_s",
            "median_s",
            "gflops",
            "gbps",
            "frac_of_fma_peak",
            "frac_of_copy_peak",
        ] {
            assert!(r.get(key).is_some(), "linear row lacks `{key}`: {r}");
        }
    }
    // Attention at the 7B head shape: prefill 640x640, decode over 640 and 4096 keys.
    let attn = v["attention"].as_array().expect("attention rows");
    let got: Vec<(u64, u64)> = attn
        .iter()
        .map(|r| {
            (
                r["queries"].as_u64().unwrap_or(0),
                r["keys"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(got, [(640, 640), (1, 640), (1, 4096)], "attention rows");
    for r in attn {
        for key in ["gflops", "gbps", "frac_of_fma_peak", "frac_of_copy_peak"] {
            assert!(
                r[key].as_f64().is_some_and(|x| x > 0.0),
                "attention row lacks a positive `{key}`: {r}"
            );
        }
    }
}

/// Uploads past the staged-bytes limit (256 MiB) are submitted on the way, with recorded work
/// between them too; every tensor reads back intact (the path that keeps a 7B load from
/// holding every weight twice in host memory).
#[test]
fn large_uploads_are_submitted_on_the_way_and_intact() {
    let Some(g) = gpu() else { return };
    let n = 20 << 20; // 80 MiB of f32 per tensor; four cross the limit
    let (mut tensors, mut sums) = (Vec::new(), Vec::new());
    for i in 0..4usize {
        let v: Vec<f32> = (0..n).map(|j| ((j * 7 + i) % 1000) as f32).collect();
        tensors.push(g.upload(HostData::F32(&v), Shape::from([n])).unwrap());
        // Recorded but unsubmitted work between uploads.
        let a = g
            .upload(HostData::F32(&[i as f32; 4]), Shape::from([4]))
            .unwrap();
        sums.push(g.add(&a, &a).unwrap());
    }
    for (i, s) in sums.iter().enumerate() {
        assert_eq!(g.to_vec_f32(s).unwrap(), vec![2.0 * i as f32; 4], "sum {i}");
    }
    for (i, t) in tensors.iter().enumerate() {
        let got = g.to_vec_f32(t).unwrap();
        for (j, &x) in got.iter().enumerate() {
            let want = ((j * 7 + i) % 1000) as f32;
            assert!(x == want, "tensor {i} elem {j}: got {x} want {want}");
        }
    }
}
