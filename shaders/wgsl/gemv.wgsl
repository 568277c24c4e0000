#if F16
enable f16;
#endif
// gemv: y = x·Wᵀ (+ b) for few rows (M <= 8): one workgroup (64) per weight row streams it
// once for all M activation rows, then a workgroup reduction per row.
// W may be one chunk of a row-split tensor: `rows` local rows written to columns n_off.. of y.
// bindings: 0 uniform P, 1 x [M, K] f32, 2 w [rows, K] (f16 packed in u32 with W16, else f32;
//           vec4 loads with VEC: K % 8 == 0 for f16, K % 4 == 0 for f32), 3 bias [N] f32 (BIAS),
//           4 y [M, N] f32
#include common
const WG: u32 = 64u;
#include reduce

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
#if VEC
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
#if W16
#if F16
@group(0) @binding(2) var<storage, read> w: array<vec4<f16>>;
#else
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
#endif
#else
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
#endif
#else
@group(0) @binding(1) var<storage, read> x: array<f32>;
#if W16
#if F16
@group(0) @binding(2) var<storage, read> w: array<f16>;
#else
@group(0) @binding(2) var<storage, read> w: array<u32>;
#endif
#else
@group(0) @binding(2) var<storage, read> w: array<f32>;
#endif
#endif
#if BIAS
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(iv: Inv) {
    let r = flat_group(iv);
    if (r >= p.rows) {
        return;
    }
    var acc: array<f32, 8>;
#if VEC
#if W16
    let kv = p.k / 8u; // vec4<u32> (8 halves) per weight row
    let xv = p.k / 4u; // vec4<f32> per activation row
    for (var i = iv.lid; i < kv; i += WG) {
#if F16
        let w0 = vec4<f32>(w[2u * (r * kv + i)]);
        let w1 = vec4<f32>(w[2u * (r * kv + i) + 1u]);
#else
        let q = w[r * kv + i];
        let w0 = vec4<f32>(unpack_pair(q.x), unpack_pair(q.y));
        let w1 = vec4<f32>(unpack_pair(q.z), unpack_pair(q.w));
#endif
        for (var m = 0u; m < p.m; m++) {
            let xb = m * xv + 2u * i;
            acc[m] += dot(x[xb], w0) + dot(x[xb + 1u], w1);
        }
    }
#else
    let kv = p.k / 4u;
    for (var i = iv.lid; i < kv; i += WG) {
        let wv = w[r * kv + i];
        for (var m = 0u; m < p.m; m++) {
            acc[m] += dot(x[m * kv + i], wv);
        }
    }
#endif
#else
    for (var i = iv.lid; i < p.k; i += WG) {
#if W16
        let e = r * p.k + i;
#if F16
        let wv = f32(w[e]);
#else
        let wv = half_at(w[e >> 1u], (e & 1u) == 1u);
#endif
#else
        let wv = w[r * p.k + i];
#endif
        for (var m = 0u; m < p.m; m++) {
            acc[m] += x[m * p.k + i] * wv;
        }
    }
#endif
    for (var m = 0u; m < p.m; m++) {
        let s = wg_sum(acc[m], iv.lid, sg_of(iv));
        if (iv.lid == 0u) {
#if BIAS
            y[m * p.n + p.n_off + r] = s + bias[p.n_off + r];
#else
            y[m * p.n + p.n_off + r] = s;
#endif
        }
    }
}
