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
    let c = cos(angle);
    let s = sin(angle);
    let base = r * p.width + h * p.head_dim;
    let x1 = x[base + i];
    let x2 = x[base + half + i];
    out[base + i] = x1 * c + (-x2) * s;
    out[base + half + i] = x2 * c + x1 * s;
}
