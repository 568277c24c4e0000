// gemm_sg8: y = x·Wᵀ (+ b) for software adapters (llvmpipe), f16 weights packed in u32,
// K % 8 == 0, subgroups of exactly 8 invocations. Why a separate kernel: llvmpipe runs a
// subgroup as one 8-lane SIMD vector and turns every storage or workgroup load into 8 scalar
// loads, so the tiled kernel (gemm.wgsl) is bound by loads, not FMAs. Here no value is loaded
// twice within a subgroup: lane l loads column k0 + l of 8 x rows and 8 weight rows' packed
// halves at k0..k0+8, then 16 subgroupBroadcasts hand every lane the x values (broadcast with
// a constant lane is a register shuffle): per 8 k a lane issues 16 loads (8 scalars of x,
// 8 vec4 of packed weights) for 512 scalar FMAs, vs 4 vec4 workgroup loads per 64 FMAs per k
// plus the staging in gemm.wgsl. No workgroup memory and no barriers (on llvmpipe a barrier
// splits the shader into coroutine phases; a K-blocked variant with one was 2x slower). The
// 64 accumulators spill on AVX2, which is what bounds this kernel at ~45% of the FMA peak. 64x64 output tile per workgroup of 64 (8 subgroups:
// subgroup s owns x rows m0 + 8s.., lane l owns weight rows n0 + 8l..), as gemm.wgsl.
// Dispatch: (ceil(rows / 64), ceil(M / 64)).
// bindings: 0 uniform P, 1 x [M, K] f32, 2 w [rows, K] f16 packed two per u32, 3 bias [N] f32
//           (BIAS), 4 y [M, N] f32
#include common

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
#if BIAS
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// acc[2r + h] += a[r] * (h == 0 ? w0 : w1): one k step of the 8x8 block (rows of a = xa, xb).
fn rank1(acc: ptr<function, array<vec4<f32>, 16>>, xa: vec4<f32>, xb: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>) {
    for (var r = 0u; r < 4u; r++) {
        (*acc)[2u * r] = fma(vec4<f32>(xa[r]), w0, (*acc)[2u * r]);
        (*acc)[2u * r + 1u] = fma(vec4<f32>(xa[r]), w1, (*acc)[2u * r + 1u]);
        (*acc)[2u * r + 8u] = fma(vec4<f32>(xb[r]), w0, (*acc)[2u * r + 8u]);
        (*acc)[2u * r + 9u] = fma(vec4<f32>(xb[r]), w1, (*acc)[2u * r + 9u]);
    }
}

// Halves 2j (.0) and 2j + 1 (.1) of four packed words, one weight row each.
fn cols(a: u32, b: u32, c: u32, d: u32) -> array<vec4<f32>, 2> {
    let ua = unpack_pair(a);
    let ub = unpack_pair(b);
    let uc = unpack_pair(c);
    let ud = unpack_pair(d);
    return array<vec4<f32>, 2>(vec4<f32>(ua.x, ub.x, uc.x, ud.x), vec4<f32>(ua.y, ub.y, uc.y, ud.y));
}

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let lane = lid % 8u;
    let m0 = wid.y * 64u + (lid / 8u) * 8u;
    let n0 = wid.x * 64u + lane * 8u;
    let kv = p.k / 8u;
    // Out-of-range rows and columns are clamped, not skipped: every lane must take part in
    // the broadcasts; their results are dropped at the store.
    var xr: array<u32, 8>;
    var wr: array<u32, 8>;
    for (var i = 0u; i < 8u; i++) {
        xr[i] = min(m0 + i, p.m - 1u) * p.k + lane;
        wr[i] = min(n0 + i, p.rows - 1u) * kv;
    }
    var acc: array<vec4<f32>, 16>; // [x row r][weight rows 4h..4h+3] at 2r + h
    for (var i = 0u; i < kv; i++) {
        let k = i * 8u;
        let xa = vec4<f32>(x[xr[0] + k], x[xr[1] + k], x[xr[2] + k], x[xr[3] + k]);
        let xb = vec4<f32>(x[xr[4] + k], x[xr[5] + k], x[xr[6] + k], x[xr[7] + k]);
        var q: array<vec4<u32>, 8>;
        for (var c = 0u; c < 8u; c++) {
            q[c] = w[wr[c] + i];
        }
        var lo = cols(q[0].x, q[1].x, q[2].x, q[3].x);
        var hi = cols(q[4].x, q[5].x, q[6].x, q[7].x);
        rank1(&acc, subgroupBroadcast(xa, 0u), subgroupBroadcast(xb, 0u), lo[0], hi[0]);
        rank1(&acc, subgroupBroadcast(xa, 1u), subgroupBroadcast(xb, 1u), lo[1], hi[1]);
        lo = cols(q[0].y, q[1].y, q[2].y, q[3].y);
        hi = cols(q[4].y, q[5].y, q[6].y, q[7].y);
        rank1(&acc, subgroupBroadcast(xa, 2u), subgroupBroadcast(xb, 2u), lo[0], hi[0]);
        rank1(&acc, subgroupBroadcast(xa, 3u), subgroupBroadcast(xb, 3u), lo[1], hi[1]);
        lo = cols(q[0].z, q[1].z, q[2].z, q[3].z);
        hi = cols(q[4].z, q[5].z, q[6].z, q[7].z);
        rank1(&acc, subgroupBroadcast(xa, 4u), subgroupBroadcast(xb, 4u), lo[0], hi[0]);
        rank1(&acc, subgroupBroadcast(xa, 5u), subgroupBroadcast(xb, 5u), lo[1], hi[1]);
        lo = cols(q[0].w, q[1].w, q[2].w, q[3].w);
        hi = cols(q[4].w, q[5].w, q[6].w, q[7].w);
        rank1(&acc, subgroupBroadcast(xa, 6u), subgroupBroadcast(xb, 6u), lo[0], hi[0]);
        rank1(&acc, subgroupBroadcast(xa, 7u), subgroupBroadcast(xb, 7u), lo[1], hi[1]);
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
