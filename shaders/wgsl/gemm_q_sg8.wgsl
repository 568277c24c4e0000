// gemm_q_sg8: y = x·Wᵀ (+ b) with block-quantized W (see quant.wgsl) on software adapters
// (llvmpipe) with subgroups of exactly 8: the layout of gemm_sg8.wgsl (64x64 output tile per
// workgroup of 64; subgroup s owns x rows m0 + 8s.., lane l owns weight rows n0 + 8l..; x
// values shared by subgroupBroadcast; no workgroup memory, no barriers). Each lane decodes
// its eight rows' weights itself, 8 k at a time, from the raw blocks (scale and offset once
// per 32-weight sub-block), so no weight byte is expanded anywhere but in registers.
// Dispatch: (ceil(rows / 64), ceil(M / 64)). Requires K % 32 == 0.
// bindings: 0 uniform P, 1 x [M, K] f32, 2 w raw blocks as u32 words, 3 bias [N] f32 (BIAS),
//           4 y [M, N] f32
#include common

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
#if BIAS
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

#include quant

// acc[2r + h] += a[r] * (h == 0 ? w0 : w1): one k step of the 8x8 block (rows of a = xa, xb).
fn rank1(acc: ptr<function, array<vec4<f32>, 16>>, xa: vec4<f32>, xb: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>) {
    for (var r = 0u; r < 4u; r++) {
        (*acc)[2u * r] = fma(vec4<f32>(xa[r]), w0, (*acc)[2u * r]);
        (*acc)[2u * r + 1u] = fma(vec4<f32>(xa[r]), w1, (*acc)[2u * r + 1u]);
        (*acc)[2u * r + 8u] = fma(vec4<f32>(xb[r]), w0, (*acc)[2u * r + 8u]);
        (*acc)[2u * r + 9u] = fma(vec4<f32>(xb[r]), w1, (*acc)[2u * r + 9u]);
    }
}

// Weight j (of the 8 at this step) of rows 0..4 (.0) and 4..8 (.1); wt[2c + h] holds
// weights 4h..4h+4 of row c.
fn col(wt: ptr<function, array<vec4<f32>, 16>>, j: u32) -> array<vec4<f32>, 2> {
    let h = j / 4u;
    let e = j % 4u;
    return array<vec4<f32>, 2>(
        vec4<f32>((*wt)[h][e], (*wt)[2u + h][e], (*wt)[4u + h][e], (*wt)[6u + h][e]),
        vec4<f32>((*wt)[8u + h][e], (*wt)[10u + h][e], (*wt)[12u + h][e], (*wt)[14u + h][e]),
    );
}

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let lane = lid % 8u;
    let m0 = wid.y * 64u + (lid / 8u) * 8u;
    let n0 = wid.x * 64u + lane * 8u;
    let row_bytes = (p.k / QBS) * QBB;
    // Out-of-range rows and columns are clamped, not skipped: every lane must take part in
    // the broadcasts; their results are dropped at the store.
    var xr: array<u32, 8>;
    var rb: array<u32, 8>;
    for (var i = 0u; i < 8u; i++) {
        xr[i] = min(m0 + i, p.m - 1u) * p.k + lane;
        rb[i] = min(n0 + i, p.rows - 1u) * row_bytes;
    }
    var acc: array<vec4<f32>, 16>; // [x row r][weight rows 4h..4h+3] at 2r + h
    let nsub = p.k / 32u;
    for (var s = 0u; s < nsub; s++) {
        var dm: array<vec2<f32>, 8>;
        for (var c = 0u; c < 8u; c++) {
            dm[c] = sub_head(rb[c], s);
        }
        for (var u = 0u; u < 4u; u++) {
            let k = s * 32u + u * 8u;
            let xa = vec4<f32>(x[xr[0] + k], x[xr[1] + k], x[xr[2] + k], x[xr[3] + k]);
            let xb = vec4<f32>(x[xr[4] + k], x[xr[5] + k], x[xr[6] + k], x[xr[7] + k]);
            var wt: array<vec4<f32>, 16>;
            for (var c = 0u; c < 8u; c++) {
                wt[2u * c] = fma(vec4<f32>(dm[c].x), sub_q4(rb[c], s, 2u * u), vec4<f32>(dm[c].y));
                wt[2u * c + 1u] = fma(vec4<f32>(dm[c].x), sub_q4(rb[c], s, 2u * u + 1u), vec4<f32>(dm[c].y));
            }
            var t = col(&wt, 0u);
            rank1(&acc, subgroupBroadcast(xa, 0u), subgroupBroadcast(xb, 0u), t[0], t[1]);
            t = col(&wt, 1u);
            rank1(&acc, subgroupBroadcast(xa, 1u), subgroupBroadcast(xb, 1u), t[0], t[1]);
            t = col(&wt, 2u);
            rank1(&acc, subgroupBroadcast(xa, 2u), subgroupBroadcast(xb, 2u), t[0], t[1]);
            t = col(&wt, 3u);
            rank1(&acc, subgroupBroadcast(xa, 3u), subgroupBroadcast(xb, 3u), t[0], t[1]);
            t = col(&wt, 4u);
            rank1(&acc, subgroupBroadcast(xa, 4u), subgroupBroadcast(xb, 4u), t[0], t[1]);
            t = col(&wt, 5u);
            rank1(&acc, subgroupBroadcast(xa, 5u), subgroupBroadcast(xb, 5u), t[0], t[1]);
            t = col(&wt, 6u);
            rank1(&acc, subgroupBroadcast(xa, 6u), subgroupBroadcast(xb, 6u), t[0], t[1]);
            t = col(&wt, 7u);
            rank1(&acc, subgroupBroadcast(xa, 7u), subgroupBroadcast(xb, 7u), t[0], t[1]);
        }
    }
    for (var r = 0u; r < 8u; r++) {
        let m = m0 + r;
        if (m >= p.m) {
            break;
        }
        for (var c = 0u; c < 8u; c++) {
            let n = n0 + c;
            if (n < p.rows) {
                let v = acc[2u * r + c / 4u][c % 4u];
#if BIAS
                y[m * p.n + p.n_off + n] = v + bias[p.n_off + n];
#else
                y[m * p.n + p.n_off + n] = v;
#endif
            }
        }
    }
}
