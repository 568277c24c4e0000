// gemv_sg8: y = x·Wᵀ (+ b) for few rows (M <= 8, substituted as {{M}}) on software adapters
// (llvmpipe), f16 weights packed in u32, K % 8 == 0, subgroups of exactly 8 invocations.
// Why a separate kernel: llvmpipe runs a subgroup as one 8-lane SIMD vector and turns every
// storage load into 8 scalar loads, so gemv.wgsl (8 lanes per weight row, each loading its
// own 8 activations per 8 weights) spends more loads on x than on W. Here each invocation owns
// one weight row and streams it alone (4 loads per 8 halves); lane l loads activation k0 + l
// once and subgroupBroadcast (a register shuffle for a constant lane) shares it, so x costs
// one load per 8 weights per activation row. No workgroup memory, no barriers, no reduction.
// Dispatch: ceil(rows / 32) workgroups of 32 (flattened 2-D grid).
// bindings: 0 uniform P, 1 x [M, K] f32, 2 w [rows, K] f16 packed two per u32, 3 bias [N] f32
//           (BIAS), 4 y [M, N] f32
#include common

const M: u32 = {{M}}u;

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
#if BIAS
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(32)
fn main(iv: Inv) {
    let lane = iv.lid % 8u;
    let r = flat_group(iv) * 32u + iv.lid;
    let kv = p.k / 8u;
    // Rows past the end are clamped, not skipped: every lane must take part in the
    // broadcasts; their results are dropped at the store.
    let wr = min(r, p.rows - 1u) * kv;
    var acc: array<f32, M>;
    for (var i = 0u; i < kv; i++) {
        let q = w[wr + i];
        let w0 = unpack_pair(q.x);
        let w1 = unpack_pair(q.y);
        let w2 = unpack_pair(q.z);
        let w3 = unpack_pair(q.w);
        for (var m = 0u; m < M; m++) {
            let xl = x[m * p.k + i * 8u + lane];
            // A tree, not a chain: four independent products per step.
            let t0 = fma(subgroupBroadcast(xl, 0u), w0.x, subgroupBroadcast(xl, 1u) * w0.y);
            let t1 = fma(subgroupBroadcast(xl, 2u), w1.x, subgroupBroadcast(xl, 3u) * w1.y);
            let t2 = fma(subgroupBroadcast(xl, 4u), w2.x, subgroupBroadcast(xl, 5u) * w2.y);
            let t3 = fma(subgroupBroadcast(xl, 6u), w3.x, subgroupBroadcast(xl, 7u) * w3.y);
            acc[m] += (t0 + t1) + (t2 + t3);
        }
    }
    if (r < p.rows) {
        for (var m = 0u; m < M; m++) {
#if BIAS
            y[m * p.n + p.n_off + r] = acc[m] + bias[p.n_off + r];
#else
            y[m * p.n + p.n_off + r] = acc[m];
#endif
        }
    }
}
