#if F16
enable f16;
#endif
// copy: data movement and conversions, one invocation per output word/element, 2-D dispatch
// over ceil(count / 256).
// gather32:   dst[r*n + c] = src[idx[r]*n + c] (32-bit words; f32, u32, f16 pairs).
//             P: u0 count (words), u1 n (words per row).
// copy16:     f16 element copy at any (odd) offsets, bit-exact: dst elements
//             [dst_off, dst_off+len) = src elements [src_off, ..); the other half of a shared
//             word keeps its bits. P: u0 dst_off, u1 src_off, u2 len, u3 first dst word, u4 words.
// cast_to_f16: dst word t = pack(srcf[2t], srcf[2t+1]). P: u0 n (elements).
// cast_to_f32: dstf[t] = f16 element t of src. P: u0 n.
// im2col:     dstf [P, C*p*p] from pixels srcf [C, H, W] (patch = stride, no padding).
//             P: u0 count, u1 C, u2 H, u3 W, u4 patch, u5 grid width, u6 C*patch*patch.
// bindings: 0 uniform P, 1 src u32, 2 idx u32, 3 dst u32 (rw), 4 srcf f32, 5 dstf f32 (rw)
#include common

struct P { u0: u32, u1: u32, u2: u32, u3: u32, u4: u32, u5: u32, u6: u32, u7: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;
@group(0) @binding(4) var<storage, read> srcf: array<f32>;
@group(0) @binding(5) var<storage, read_write> dstf: array<f32>;

@compute @workgroup_size(256)
fn gather32(iv: Inv) {
    let t = flat_group(iv) * 256u + iv.lid;
    if (t >= p.u0) {
        return;
    }
    let r = t / p.u1;
    dst[t] = src[idx[r] * p.u1 + t % p.u1];
}

fn half_bits(e: u32) -> u32 {
    return (src[e >> 1u] >> ((e & 1u) * 16u)) & 0xffffu;
}

@compute @workgroup_size(256)
fn copy16(iv: Inv) {
    let t = flat_group(iv) * 256u + iv.lid;
    if (t >= p.u4) {
        return;
    }
    let w = p.u3 + t;
    var word = dst[w];
    for (var h = 0u; h < 2u; h++) {
        let e = 2u * w + h;
        if (e >= p.u0 && e < p.u0 + p.u2) {
            let bits = half_bits(e - p.u0 + p.u1);
            let sh = h * 16u;
            word = (word & ~(0xffffu << sh)) | (bits << sh);
        }
    }
    dst[w] = word;
}

@compute @workgroup_size(256)
fn cast_to_f16(iv: Inv) {
    let t = flat_group(iv) * 256u + iv.lid;
    let e = 2u * t;
    if (e >= p.u0) {
        return;
    }
    var b = 0.0;
    if (e + 1u < p.u0) {
        b = srcf[e + 1u];
    }
    // pack2x16float in every variant: naga 30 mistypes bitcast<u32>(vec2<f16>).
    dst[t] = pack2x16float(vec2<f32>(srcf[e], b));
}

@compute @workgroup_size(256)
fn cast_to_f32(iv: Inv) {
    let t = flat_group(iv) * 256u + iv.lid;
    if (t >= p.u0) {
        return;
    }
    dstf[t] = half_at(src[t >> 1u], (t & 1u) == 1u);
}

@compute @workgroup_size(256)
fn im2col(iv: Inv) {
    let t = flat_group(iv) * 256u + iv.lid;
    if (t >= p.u0) {
        return;
    }
    let pp = p.u4 * p.u4;
    let pi = t / p.u6;
    let rem = t % p.u6;
    let ch = rem / pp;
    let ky = (rem / p.u4) % p.u4;
    let kx = rem % p.u4;
    let py = pi / p.u5;
    let px = pi % p.u5;
    dstf[t] = srcf[ch * p.u2 * p.u3 + (py * p.u4 + ky) * p.u3 + px * p.u4 + kx];
}
