#if F16
enable f16;
#endif
// bench: the adapter's peaks. fma: 8 independent vec4 FMA chains per invocation for `iters`
// steps (64 FLOP per step; `iters` % 4 == 0), result written so nothing is dead code. The
// loop body holds 4 steps: on llvmpipe a dynamic loop's mask bookkeeping costs as much as
// ~16 FMAs per iteration, so a body of one step measured ~30% under what a matmul's inner
// loop reaches (unrolled 4x it is the highest of the variants tried: 2-16 chains, scalar or
// vec4, unrolled 1-32x). copy: dst = src, one vec4
// per invocation, 2-D dispatch over ceil(len4 / 256).
// bindings: 0 uniform P (u0 iters or len4), 1 out (fma) vec4 f32, 2 src vec4, 3 dst vec4 (rw)
#include common

struct P { u0: u32, u1: u32, u2: u32, u3: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> sink: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn peak_fma(iv: Inv) {
    let t = flat_group(iv) * 256u + iv.lid;
    let s = f32(t) * 1e-9;
    var a0 = vec4<f32>(s, s + 1.0, s + 2.0, s + 3.0);
    var a1 = a0 + 0.1;
    var a2 = a0 + 0.2;
    var a3 = a0 + 0.3;
    var a4 = a0 + 0.4;
    var a5 = a0 + 0.5;
    var a6 = a0 + 0.6;
    var a7 = a0 + 0.7;
    let m = vec4<f32>(0.9999);
    let c = vec4<f32>(1e-4);
    for (var i = 0u; i < p.u0; i += 4u) {
        for (var u = 0u; u < 4u; u++) {
            a0 = fma(a0, m, c);
            a1 = fma(a1, m, c);
            a2 = fma(a2, m, c);
            a3 = fma(a3, m, c);
            a4 = fma(a4, m, c);
            a5 = fma(a5, m, c);
            a6 = fma(a6, m, c);
            a7 = fma(a7, m, c);
        }
    }
    sink[t] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

@compute @workgroup_size(256)
fn peak_copy(iv: Inv) {
    let t = flat_group(iv) * 256u + iv.lid;
    if (t >= p.u0) {
        return;
    }
    dst[t] = src[t];
}
