enable wgpu_cooperative_matrix;
// gemm_coop: y = x·Wᵀ (+ b) on the adapter's matrix units (wgpu's
// EXPERIMENTAL_COOPERATIVE_MATRIX: Vulkan VK_KHR_cooperative_matrix, Metal simdgroup
// matrices), 8×8×8 f32 tiles (the configuration wgpu exposes). A workgroup of 32 invocations
// (one subgroup on the adapters that have the feature) owns a TM×TN block of y as
// (TM/8)·(TN/8) accumulator tiles; per K step of 8 it stages the x rows and the W rows of
// the block (f16 weights widened to f32) in workgroup memory, then multiplies every tile pair.
// Each output's K sum runs in steps of 8 in K order whatever M is, so a row's result does
// not depend on how many rows the call has. Cooperative operations need subgroup-uniform
// control flow: every loop bound here is uniform; out-of-range rows and K are zero-filled.
// The backend uses it only where the adapter reports the feature and a parity check against
// the tiled gemm passes when the device opens.
// W may be one chunk of a row-split tensor: `rows` local rows written to columns n_off.. of y.
// bindings: 0 uniform P, 1 x [M, K] f32, 2 w [rows, K] (W16: f16 packed two per u32; else
//           f32), 3 bias [N] f32 (BIAS), 4 y [M, N] f32
#include common

const TM: u32 = 32u;
const TN: u32 = 32u;
const WG: u32 = 32u;

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
#if W16
@group(0) @binding(2) var<storage, read> w: array<u32>;
fn w_at(e: u32) -> f32 {
    return half_at(w[e >> 1u], (e & 1u) == 1u);
}
#else
@group(0) @binding(2) var<storage, read> w: array<f32>;
fn w_at(e: u32) -> f32 {
    return w[e];
}
#endif
#if BIAS
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> xs: array<f32, TM * 8u>; // [TM rows][8 k], row-major
var<workgroup> ws: array<f32, 8u * TN>; // [8 k][TN weight rows]: Wᵀ, row-major
var<workgroup> cs: array<f32, TM * TN>; // the finished block, row-major

@compute @workgroup_size(32)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    var acc: array<coop_mat8x8<f32, C>, 16>; // (TM/8)·(TN/8) tiles, [tile row][tile col]
    for (var t = 0u; t < 16u; t++) {
        acc[t] = coop_mat8x8<f32, C>();
    }
    for (var k0 = 0u; k0 < p.k; k0 += 8u) {
        for (var e = lid; e < TM * 8u; e += WG) {
            let r = row0 + e / 8u;
            let kk = k0 + e % 8u;
            var v = 0.0;
            if (r < p.m && kk < p.k) {
                v = x[r * p.k + kk];
            }
            xs[e] = v;
        }
        for (var e = lid; e < 8u * TN; e += WG) {
            let c = col0 + e / 8u;
            let kk = e % 8u;
            var v = 0.0;
            if (c < p.rows && k0 + kk < p.k) {
                v = w_at(c * p.k + k0 + kk);
            }
            ws[kk * TN + e / 8u] = v;
        }
        workgroupBarrier();
        for (var tr = 0u; tr < TM / 8u; tr++) {
            let a = coopLoadT<coop_mat8x8<f32, A>>(&xs[tr * 64u], 8u);
            for (var tc = 0u; tc < TN / 8u; tc++) {
                let b = coopLoadT<coop_mat8x8<f32, B>>(&ws[tc * 8u], TN);
                acc[tr * 4u + tc] = coopMultiplyAdd(a, b, acc[tr * 4u + tc]);
            }
        }
        workgroupBarrier();
    }
    for (var tr = 0u; tr < TM / 8u; tr++) {
        for (var tc = 0u; tc < TN / 8u; tc++) {
            coopStoreT(acc[tr * 4u + tc], &cs[tr * 8u * TN + tc * 8u], TN);
        }
    }
    workgroupBarrier();
    for (var e = lid; e < TM * TN; e += WG) {
        let r = row0 + e / TN;
        let c = col0 + e % TN;
        if (r < p.m && c < p.rows) {
#if BIAS
            y[r * p.n + p.n_off + c] = cs[e] + bias[p.n_off + c];
#else
            y[r * p.n + p.n_off + c] = cs[e];
#endif
        }
    }
}
