#if F16
enable f16;
#endif
// gemv: y = x·Wᵀ (+ b) for few rows (M <= 16, substituted as {{M}} so the accumulators stay in
// registers). A workgroup (256) owns 32 weight rows, 8 invocations per row stream it once for
// all M activation rows (128-byte runs per row per step), then the 8 partial sums meet in
// workgroup memory (one barrier; few, large workgroups also suit software rasterisers).
// W may be one chunk of a row-split tensor: `rows` local rows written to columns n_off.. of y.
// bindings: 0 uniform P, 1 x [M, K] f32, 2 w [rows, K] (f16: packed in u32, or native f16
//           with F16; f32 otherwise; vec4 loads with VEC: K % 8 == 0 for f16, K % 4 == 0
//           for f32), 3 bias [N] f32 (BIAS), 4 y [M, N] f32
#include common

const M: u32 = {{M}}u;
const TPR: u32 = 8u; // invocations per weight row
const RPW: u32 = 32u; // weight rows per workgroup

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

var<workgroup> part: array<f32, 256 * M>;

@compute @workgroup_size(256)
fn main(iv: Inv) {
    let lane = iv.lid % TPR;
    let r = flat_group(iv) * RPW + iv.lid / TPR;
    var acc: array<f32, M>;
    if (r < p.rows) {
#if VEC
#if W16
        let kv = p.k / 8u; // 8 halves per step
        let xv = p.k / 4u; // vec4<f32> per activation row
        for (var i = lane; i < kv; i += TPR) {
#if F16
            let w0 = vec4<f32>(w[2u * (r * kv + i)]);
            let w1 = vec4<f32>(w[2u * (r * kv + i) + 1u]);
#else
            let q = w[r * kv + i];
            let w0 = vec4<f32>(unpack_pair(q.x), unpack_pair(q.y));
            let w1 = vec4<f32>(unpack_pair(q.z), unpack_pair(q.w));
#endif
            for (var m = 0u; m < M; m++) {
                let xb = m * xv + 2u * i;
                acc[m] += dot(x[xb], w0) + dot(x[xb + 1u], w1);
            }
        }
#else
        let kv = p.k / 4u;
        for (var i = lane; i < kv; i += TPR) {
            let wv = w[r * kv + i];
            for (var m = 0u; m < M; m++) {
                acc[m] += dot(x[m * kv + i], wv);
            }
        }
#endif
#else
        for (var i = lane; i < p.k; i += TPR) {
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
            for (var m = 0u; m < M; m++) {
                acc[m] += x[m * p.k + i] * wv;
            }
        }
#endif
    }
    for (var m = 0u; m < M; m++) {
        part[m * 256u + iv.lid] = acc[m];
    }
    workgroupBarrier();
    if (lane == 0u && r < p.rows) {
        for (var m = 0u; m < M; m++) {
            var s = 0.0;
            for (var t = 0u; t < TPR; t++) {
                s += part[m * 256u + iv.lid + t];
            }
#if BIAS
            y[m * p.n + p.n_off + r] = s + bias[p.n_off + r];
#else
            y[m * p.n + p.n_off + r] = s;
#endif
        }
    }
}
