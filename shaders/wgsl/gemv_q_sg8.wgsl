// gemv_q_sg8: y = x·Wᵀ (+ b) for few rows (M <= 16, substituted as {{M}}) with block-quantized
// W (see quant.wgsl) on software adapters (llvmpipe) with subgroups of exactly 8: the layout
// of gemv_sg8.wgsl. Each invocation owns four weight rows (32g + lane + 8j, j < 4) and streams
// their blocks alone; per 8 weights lane l loads activation k0 + l once and subgroupBroadcast
// shares it, so x costs one load per 32 weights per activation row instead of one per weight.
// Per 32-weight sub-block Σ x·w = d·Σ x·q + m·Σ x (Σ x is shared by the four rows).
// Dispatch: ceil(rows / 32) workgroups of 8 (flattened 2-D). Requires K % 32 == 0.
// bindings: 0 uniform P, 1 x [M, K] f32, 2 w raw blocks as u32 words, 3 bias [N] f32 (BIAS),
//           4 y [M, N] f32
#include common

const M: u32 = {{M}}u;

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
#if BIAS
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

#include quant

@compute @workgroup_size(8)
fn main(iv: Inv) {
    let lane = iv.lid;
    let r = vec4<u32>(flat_group(iv) * 32u + lane) + vec4<u32>(0u, 8u, 16u, 24u);
    // Rows past the end are clamped, not skipped: every lane must take part in the
    // broadcasts; their results are dropped at the store.
    let rb = min(r, vec4<u32>(p.rows - 1u)) * ((p.k / QBS) * QBB);
    var acc: array<vec4<f32>, M>; // [activation row][weight row j]
    let nsub = p.k / 32u;
    for (var s = 0u; s < nsub; s++) {
        let h0 = sub_head(rb.x, s);
        let h1 = sub_head(rb.y, s);
        let h2 = sub_head(rb.z, s);
        let h3 = sub_head(rb.w, s);
        var dq: array<vec4<f32>, M>;
        var sx: array<f32, M>;
        for (var u = 0u; u < 4u; u++) {
            // Raw quants of weights 8u..8u+8 of the four rows.
            let a0 = sub_q4(rb.x, s, 2u * u);
            let a1 = sub_q4(rb.x, s, 2u * u + 1u);
            let b0 = sub_q4(rb.y, s, 2u * u);
            let b1 = sub_q4(rb.y, s, 2u * u + 1u);
            let c0 = sub_q4(rb.z, s, 2u * u);
            let c1 = sub_q4(rb.z, s, 2u * u + 1u);
            let d0 = sub_q4(rb.w, s, 2u * u);
            let d1 = sub_q4(rb.w, s, 2u * u + 1u);
            for (var m = 0u; m < M; m++) {
                let xl = x[m * p.k + s * 32u + u * 8u + lane];
                let lo = vec4<f32>(
                    subgroupBroadcast(xl, 0u), subgroupBroadcast(xl, 1u),
                    subgroupBroadcast(xl, 2u), subgroupBroadcast(xl, 3u),
                );
                let hi = vec4<f32>(
                    subgroupBroadcast(xl, 4u), subgroupBroadcast(xl, 5u),
                    subgroupBroadcast(xl, 6u), subgroupBroadcast(xl, 7u),
                );
                dq[m] += vec4<f32>(
                    dot(lo, a0) + dot(hi, a1),
                    dot(lo, b0) + dot(hi, b1),
                    dot(lo, c0) + dot(hi, c1),
                    dot(lo, d0) + dot(hi, d1),
                );
                sx[m] += dot(lo + hi, vec4<f32>(1.0));
            }
        }
        let d = vec4<f32>(h0.x, h1.x, h2.x, h3.x);
        let mn = vec4<f32>(h0.y, h1.y, h2.y, h3.y);
        for (var m = 0u; m < M; m++) {
            acc[m] += d * dq[m] + mn * sx[m];
        }
    }
    for (var j = 0u; j < 4u; j++) {
        if (r[j] < p.rows) {
            for (var m = 0u; m < M; m++) {
#if BIAS
                y[m * p.n + p.n_off + r[j]] = acc[m][j] + bias[p.n_off + r[j]];
#else
                y[m * p.n + p.n_off + r[j]] = acc[m][j];
#endif
            }
        }
    }
}
