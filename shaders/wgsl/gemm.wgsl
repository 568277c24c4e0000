#if F16
enable f16;
#endif
// gemm: y = x·Wᵀ (+ b) for many rows. 64x64 output tile per workgroup of 64 invocations, each
// accumulating an 8x8 register block; K in steps of 32 staged in workgroup memory (16 KiB), so
// a workgroup meets few barriers per FLOP. f16 weights are unpacked once per tile load.
// W may be one chunk of a row-split tensor (`rows` local rows -> columns n_off.. of y).
// Dispatch: (ceil(rows / 64), ceil(M / 64)).
// bindings: 0 uniform P, 1 x [M, K] f32, 2 w [rows, K] (f16: packed in u32, or native f16
//           with F16; else f32; vec4 loads along K with VEC, K % 4 == 0), 3 bias [N] f32
//           (BIAS), 4 y [M, N] f32
#include common

const TK: u32 = 32u;

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
#if VEC
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
#if W16
#if F16
@group(0) @binding(2) var<storage, read> w: array<vec4<f16>>;
#else
@group(0) @binding(2) var<storage, read> w: array<vec2<u32>>;
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

// [k][m / 4] and [k][n / 4]: two vec4 reads give a thread its 8 rows (columns) at step k.
var<workgroup> As: array<vec4<f32>, 512>;
var<workgroup> Bs: array<vec4<f32>, 512>;

#if VEC
// Four weights of `row` from column k (k % 4 == 0; K % 4 == 0).
fn w4_at(row: u32, k: u32) -> vec4<f32> {
    let e4 = (row * p.k + k) / 4u;
#if W16
#if F16
    return vec4<f32>(w[e4]);
#else
    let q = w[e4];
    return vec4<f32>(unpack_pair(q.x), unpack_pair(q.y));
#endif
#else
    return w[e4];
#endif
}
#else
fn w_at(row: u32, k: u32) -> f32 {
#if W16
    let e = row * p.k + k;
#if F16
    return f32(w[e]);
#else
    return half_at(w[e >> 1u], (e & 1u) == 1u);
#endif
#else
    return w[row * p.k + k];
#endif
}
#endif

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let n0 = wid.x * 64u;
    let m0 = wid.y * 64u;
    let tx = lid % 8u;
    let ty = lid / 8u;
    var acc: array<vec4<f32>, 16>; // [row i][column half]
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
#if VEC
        // 64 rows x 32 k of x and of W as vec4 along k: 8 loads each per invocation.
        for (var t = 0u; t < 8u; t++) {
            let idx = lid + t * 64u;
            let r = idx / 8u;
            let kq = 4u * (idx % 8u);
            let k = k0 + kq;
            var av = vec4<f32>(0.0);
            if (m0 + r < p.m && k < p.k) {
                av = x[((m0 + r) * p.k + k) / 4u];
            }
            var bv = vec4<f32>(0.0);
            if (n0 + r < p.rows && k < p.k) {
                bv = w4_at(n0 + r, k);
            }
            for (var c = 0u; c < 4u; c++) {
                As[(kq + c) * 16u + r / 4u][r % 4u] = av[c];
                Bs[(kq + c) * 16u + r / 4u][r % 4u] = bv[c];
            }
        }
#else
        // 64 rows x 32 k of x and of W: 32 elements each per invocation.
        for (var t = 0u; t < 32u; t++) {
            let idx = lid + t * 64u;
            let r = idx / TK;
            let kk = idx % TK;
            let k = k0 + kk;
            var av = 0.0;
            if (m0 + r < p.m && k < p.k) {
                av = x[(m0 + r) * p.k + k];
            }
            As[kk * 16u + r / 4u][r % 4u] = av;
            var bv = 0.0;
            if (n0 + r < p.rows && k < p.k) {
                bv = w_at(n0 + r, k);
            }
            Bs[kk * 16u + r / 4u][r % 4u] = bv;
        }
#endif
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a0 = As[kk * 16u + 2u * ty];
            let a1 = As[kk * 16u + 2u * ty + 1u];
            let b0 = Bs[kk * 16u + 2u * tx];
            let b1 = Bs[kk * 16u + 2u * tx + 1u];
            let a = array<f32, 8>(a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w);
            for (var i = 0u; i < 8u; i++) {
                acc[2u * i] += a[i] * b0;
                acc[2u * i + 1u] += a[i] * b1;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 8u; i++) {
        let m = m0 + ty * 8u + i;
        if (m >= p.m) {
            break;
        }
        for (var j = 0u; j < 8u; j++) {
            let n = n0 + tx * 8u + j;
            if (n < p.rows) {
                let v = acc[2u * i + j / 4u][j % 4u];
#if BIAS
                y[m * p.n + p.n_off + n] = v + bias[p.n_off + n];
#else
                y[m * p.n + p.n_off + n] = v;
#endif
            }
        }
    }
}
