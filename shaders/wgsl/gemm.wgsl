#if F16
enable f16;
#endif
// gemm: y = x·Wᵀ (+ b) for many rows. 64x64 output tile per workgroup (256 invocations, 4x4
// register block each), K in steps of 16 staged in workgroup memory; f16 weights are unpacked
// once per tile load. W may be one chunk of a row-split tensor (`rows` local rows -> columns
// n_off.. of y). Dispatch: (ceil(rows / 64), ceil(M / 64)).
// bindings: 0 uniform P, 1 x [M, K] f32, 2 w [rows, K] (f16 packed in u32 with W16, else f32),
//           3 bias [N] f32 (BIAS), 4 y [M, N] f32
#include common

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
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
#if BIAS
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// [k][m / 4] and [k][n / 4]: one vec4 read gives a thread its 4 rows (columns) at step k.
var<workgroup> As: array<vec4<f32>, 256>;
var<workgroup> Bs: array<vec4<f32>, 256>;

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

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let n0 = wid.x * 64u;
    let m0 = wid.y * 64u;
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        for (var t = 0u; t < 4u; t++) {
            let idx = lid + t * 256u;
            let r = idx / 16u;
            let kk = idx % 16u;
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
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            let a = As[kk * 16u + ty];
            let b = Bs[kk * 16u + tx];
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
        }
        workgroupBarrier();
    }
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + ty * 4u + i;
        if (m >= p.m) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + tx * 4u + j;
            if (n < p.rows) {
#if BIAS
                y[m * p.n + p.n_off + n] = accs[i][j] + bias[p.n_off + n];
#else
                y[m * p.n + p.n_off + n] = accs[i][j];
#endif
            }
        }
    }
}
