// gemv_q: y = x·Wᵀ (+ b) for few rows (M <= 16, substituted as {{M}}) with block-quantized W
// (see quant.wgsl; dequantised inside the loop, f32 activations and accumulation). Same grid
// as gemv.wgsl: a workgroup (256) owns 32 weight rows, 8 invocations per row take its
// 32-weight sub-blocks in turn (so each weight byte is read once for all M rows), and the 8
// partial sums meet in workgroup memory. Per sub-block: Σ x·w = d·Σ x·q + m·Σ x.
// W may be one chunk of a row-split tensor: `rows` local rows -> columns n_off.. of y.
// Requires K % 32 == 0 (K % 256 for Q4_K): rows are whole blocks.
// bindings: 0 uniform P, 1 x [M, K] f32 (vec4), 2 w raw blocks as u32 words, 3 bias [N] f32
//           (BIAS), 4 y [M, N] f32
#include common

const M: u32 = {{M}}u;
const TPR: u32 = 8u; // invocations per weight row
const RPW: u32 = 32u; // weight rows per workgroup

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
#if BIAS
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

#include quant

var<workgroup> part: array<f32, 256 * M>;

@compute @workgroup_size(256)
fn main(iv: Inv) {
    let lane = iv.lid % TPR;
    let r = flat_group(iv) * RPW + iv.lid / TPR;
    var acc: array<f32, M>;
    if (r < p.rows) {
        let nsub = p.k / 32u;
        let rb = r * (p.k / QBS) * QBB; // byte offset of the row
        let xv = p.k / 4u; // vec4 per activation row
        for (var s = lane; s < nsub; s += TPR) {
            let dm = sub_head(rb, s);
            var dq: array<f32, M>;
            var sx: array<vec4<f32>, M>;
            for (var t = 0u; t < 8u; t++) {
                let q = sub_q4(rb, s, t);
                for (var m = 0u; m < M; m++) {
                    let a = x[m * xv + s * 8u + t];
                    dq[m] += dot(a, q);
                    sx[m] += a;
                }
            }
            for (var m = 0u; m < M; m++) {
                acc[m] += dm.x * dq[m] + dm.y * (sx[m].x + sx[m].y + sx[m].z + sx[m].w);
            }
        }
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
