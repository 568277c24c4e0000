#if F16
enable f16;
#endif
// elementwise: unary (gelu, quick_gelu) and binary (add, mul, silu_mul) maps, 256 per workgroup,
// 2-D dispatch over ceil(len / 256) workgroups. OP (override) picks the function.
// bindings (unary):  0 uniform P, 1 x [len] f32, 3 out [len] f32
// bindings (binary): 0 uniform P, 1 a [len] f32, 2 b [len] or row [n] f32, 3 out [len] f32
#include common

// 0 gelu, 1 quick_gelu (unary); 0 add, 1 mul, 2 silu_mul (binary).
override OP: u32 = 0u;

struct P { len: u32, n: u32, b_len: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// erf by Abramowitz-Stegun 7.1.26 (max abs error 1.5e-7); WGSL has no erf.
fn erf_as(x: f32) -> f32 {
    let ax = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * ax);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let y = 1.0 - poly * exp(-ax * ax);
    return select(y, -y, x < 0.0);
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

@compute @workgroup_size(256)
fn unary(iv: Inv) {
    let i = flat_group(iv) * 256u + iv.lid;
    if (i >= p.len) {
        return;
    }
    let x = a[i];
    var y: f32;
    if (OP == 0u) {
        y = 0.5 * x * (1.0 + erf_as(x * 0.70710678118654752));
    } else {
        y = x * sigmoid(1.702 * x);
    }
    out[i] = y;
}

@compute @workgroup_size(256)
fn binary(iv: Inv) {
    let i = flat_group(iv) * 256u + iv.lid;
    if (i >= p.len) {
        return;
    }
    let x = a[i];
    // b is either the full tensor or one row broadcast over a's rows.
    let y = b[select(i % p.n, i, p.b_len == p.len)];
    var r: f32;
    if (OP == 0u) {
        r = x + y;
    } else if (OP == 1u) {
        r = x * y;
    } else {
        r = x * sigmoid(x) * y;
    }
    out[i] = r;
}
