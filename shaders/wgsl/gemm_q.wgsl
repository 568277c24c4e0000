// gemm_q: y = x·Wᵀ (+ b) for many rows with block-quantized W (see quant.wgsl). The tiling
// of gemm.wgsl (64x64 output tile per workgroup of 64, 8x8 register blocks, K in steps of
// 32): a K step is exactly one 32-weight sub-block per weight row, so invocation t decodes
// the sub-block of tile row t into workgroup memory once per tile, then the inner loop is
// gemm.wgsl's. Requires K % 32 == 0 (K % 256 for Q4_K).
// W may be one chunk of a row-split tensor (`rows` local rows -> columns n_off.. of y).
// Dispatch: (ceil(rows / 64), ceil(M / 64)).
// bindings: 0 uniform P, 1 x [M, K] f32 (vec4), 2 w raw blocks as u32 words, 3 bias [N] f32
//           (BIAS), 4 y [M, N] f32
#include common

const TK: u32 = 32u;

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
#if BIAS
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

#include quant

// [k][m / 4] and [k][n / 4]: two vec4 reads give a thread its 8 rows (columns) at step k.
var<workgroup> As: array<vec4<f32>, 512>;
var<workgroup> Bs: array<vec4<f32>, 512>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let n0 = wid.x * 64u;
    let m0 = wid.y * 64u;
    let tx = lid % 8u;
    let ty = lid / 8u;
    let row_bytes = (p.k / QBS) * QBB;
    var acc: array<vec4<f32>, 16>; // [row i][column half]
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // 64 rows x 32 k of x as vec4 along k: 8 loads per invocation.
        for (var t = 0u; t < 8u; t++) {
            let idx = lid + t * 64u;
            let r = idx / 8u;
            let kq = 4u * (idx % 8u);
            var av = vec4<f32>(0.0);
            if (m0 + r < p.m) {
                av = x[((m0 + r) * p.k + k0 + kq) / 4u];
            }
            for (var c = 0u; c < 4u; c++) {
                As[(kq + c) * 16u + r / 4u][r % 4u] = av[c];
            }
        }
        // Tile row `lid` of W: one sub-block, decoded once.
        let n = n0 + lid;
        if (n < p.rows) {
            let dm = sub_head(n * row_bytes, k0 / 32u);
            for (var t = 0u; t < 8u; t++) {
                let v = dm.x * sub_q4(n * row_bytes, k0 / 32u, t) + vec4<f32>(dm.y);
                for (var c = 0u; c < 4u; c++) {
                    Bs[(4u * t + c) * 16u + lid / 4u][lid % 4u] = v[c];
                }
            }
        } else {
            for (var kk = 0u; kk < TK; kk++) {
                Bs[kk * 16u + lid / 4u][lid % 4u] = 0.0;
            }
        }
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
