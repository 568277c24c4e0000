// gemv_sg8: y = x·Wᵀ (+ b) for few rows (M <= 16, substituted as {{M}}) on software adapters
// (llvmpipe), f16 weights packed in u32, K % 8 == 0, subgroups of exactly 8 invocations.
// Why a separate kernel: llvmpipe runs a subgroup as one 8-lane SIMD vector and turns every
// storage load into 8 scalar loads, so gemv.wgsl (8 lanes per weight row, each loading its
// own 8 activations per 8 weights) spends more loads on x than on W. Here each invocation owns
// four weight rows and streams them alone (4 loads per 8 halves each); lane l loads activation
// k0 + l once and subgroupBroadcast (a register shuffle for a constant lane) shares it, so x
// costs one load per 32 weights per activation row. No workgroup memory, no barriers, no
// reduction. Each output is one fma chain over K in order, as in gemm_sg8, so rows agree
// bit for bit between the two kernels (a conversation's reused rows equal a fresh run's). A workgroup is one subgroup: invocation t owns rows 32g + t + 8j, j < 4.
// Dispatch: ceil(rows / 32) workgroups of 8 (flattened 2-D grid).
// TILE: instead gemm_sg8's generated body with RS = M x rows and CL weight rows per
// lane, one subgroup per workgroup (dispatch (1, ceil(rows / (8·CL)))): CL / 4 times the FMAs
// per x broadcast, which pays from about M = 6 on llvmpipe. Its outputs take the same fma
// chains (so the same bits) as the default body and gemm_sg8.
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

// The halves packed in q: weights 8i..8i+8 of one row, in K order.
fn halves(q: vec4<u32>) -> array<f32, 8> {
    let w0 = unpack_pair(q.x);
    let w1 = unpack_pair(q.y);
    let w2 = unpack_pair(q.z);
    let w3 = unpack_pair(q.w);
    return array<f32, 8>(w0.x, w0.y, w1.x, w1.y, w2.x, w2.y, w3.x, w3.y);
}

#if TILE
#gen gemm_sg8_main:{{M}}:{{CL}}:1
#else
@compute @workgroup_size(8)
fn main(iv: Inv) {
    let lane = iv.lid;
    let r = vec4<u32>(flat_group(iv) * 32u + lane) + vec4<u32>(0u, 8u, 16u, 24u);
    let kv = p.k / 8u;
    // Rows past the end are clamped, not skipped: every lane must take part in the
    // broadcasts; their results are dropped at the store.
    let wr = min(r, vec4<u32>(p.rows - 1u)) * kv;
    var acc: array<vec4<f32>, M>; // [activation row][weight row j]
    for (var i = 0u; i < kv; i++) {
        let h0 = halves(w[wr.x + i]);
        let h1 = halves(w[wr.y + i]);
        let h2 = halves(w[wr.z + i]);
        let h3 = halves(w[wr.w + i]);
        for (var m = 0u; m < M; m++) {
            let xl = x[m * p.k + i * 8u + lane];
            let b = array<f32, 8>(
                subgroupBroadcast(xl, 0u), subgroupBroadcast(xl, 1u),
                subgroupBroadcast(xl, 2u), subgroupBroadcast(xl, 3u),
                subgroupBroadcast(xl, 4u), subgroupBroadcast(xl, 5u),
                subgroupBroadcast(xl, 6u), subgroupBroadcast(xl, 7u),
            );
            // One fma chain per output in K order, exactly gemm_sg8's (unrolled.rs): a row's
            // result is the same whichever kernel and however many rows (batch invariance).
            var a = acc[m];
            a = fma(vec4<f32>(b[0]), vec4<f32>(h0[0], h1[0], h2[0], h3[0]), a);
            a = fma(vec4<f32>(b[1]), vec4<f32>(h0[1], h1[1], h2[1], h3[1]), a);
            a = fma(vec4<f32>(b[2]), vec4<f32>(h0[2], h1[2], h2[2], h3[2]), a);
            a = fma(vec4<f32>(b[3]), vec4<f32>(h0[3], h1[3], h2[3], h3[3]), a);
            a = fma(vec4<f32>(b[4]), vec4<f32>(h0[4], h1[4], h2[4], h3[4]), a);
            a = fma(vec4<f32>(b[5]), vec4<f32>(h0[5], h1[5], h2[5], h3[5]), a);
            a = fma(vec4<f32>(b[6]), vec4<f32>(h0[6], h1[6], h2[6], h3[6]), a);
            a = fma(vec4<f32>(b[7]), vec4<f32>(h0[7], h1[7], h2[7], h3[7]), a);
            acc[m] = a;
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
#endif
