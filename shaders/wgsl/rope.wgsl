#if F16
enable f16;
#endif
// rope: HF rotate-half rotary embedding with explicit positions; one invocation per
// (row, head, i < head_dim/2), 2-D dispatch over ceil(rows * heads * half / 256).
// bindings: 0 uniform P, 1 x [rows, width] f32, 2 positions [rows] u32,
//           3 inv_freq [half] f32 (theta^(-2i/d) / scaling, computed on the host like the CPU),
//           4 out [rows, width] f32
#include common

struct P { rows: u32, width: u32, head_dim: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> pos: array<u32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// Cody-Waite reduction of `a` to [-pi, pi]: 2*pi = C1 + C2 + C3 with C1, C2 short enough that
// k*C1 and k*C2 are exact for |k| < 2^11, so angles of long contexts keep f32 accuracy.
fn reduce_angle(a: f32) -> f32 {
    let k = round(a * 0.15915493667125702);
    return ((a - k * 6.28125) - k * 0.0019350051879882812) - k * 3.019916050561733e-07;
}

// (sin a, cos a) for a in [-pi, pi] to about 1 ulp, from a quadrant and Cephes' sinf/cosf
// polynomials on [-pi/4, pi/4] (pi/2 = 1.5703125 + 4.8375129699707031e-4 + 7.5497899548918821e-8,
// the first two exact in f32 times a quadrant |j| <= 2). WGSL's sin/cos promise no accuracy
// (Vulkan allows an absolute error of 2^-11); SwiftShader's are off by ~3e-5, which moved
// rotated values by 6e-5 relative and the fixtures' logits by up to 0.02.
fn sin_cos(a: f32) -> vec2<f32> {
    let j = round(a * 0.6366197723675814);
    let r = ((a - j * 1.5703125) - j * 4.8375129699707031e-4) - j * 7.5497899548918821e-8;
    let z = r * r;
    let s = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4));
    let c = (1.0 - 0.5 * z)
        + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5));
    switch (u32(i32(j) & 3)) {
        case 0u: { return vec2<f32>(s, c); }
        case 1u: { return vec2<f32>(c, -s); }
        case 2u: { return vec2<f32>(-s, -c); }
        default: { return vec2<f32>(-c, s); }
    }
}

@compute @workgroup_size(256)
fn main(iv: Inv) {
    let half = p.head_dim / 2u;
    let heads = p.width / p.head_dim;
    let t = flat_group(iv) * 256u + iv.lid;
    if (t >= p.rows * heads * half) {
        return;
    }
    let i = t % half;
    let h = (t / half) % heads;
    let r = t / (half * heads);
    let angle = reduce_angle(f32(pos[r]) * inv_freq[i]);
    let sc = sin_cos(angle);
    let c = sc.y;
    let s = sc.x;
    let base = r * p.width + h * p.head_dim;
    let x1 = x[base + i];
    let x2 = x[base + half + i];
    out[base + i] = x1 * c + (-x2) * s;
    out[base + half + i] = x2 * c + x1 * s;
}
