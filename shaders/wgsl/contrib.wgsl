#if F16
enable f16;
#endif
// contrib: per-token contributions to one query's attention output (VisiPruner middle/deep).
// contrib_o: o[h*D + d] = Σ_j probs[h, j] · v[j, kvh*D + d], one invocation per (h, d)
//            (also the P·V half of decode attention, after attention_probs)
//            (2-D dispatch over ceil(H*D / 256)).
// contrib_main: one workgroup (256) per key j in start..start+count: with c = probs[h,j]·v_h[j]
//            and r = o − c, out[t] = [‖c‖, Σ r·o / (‖r‖‖o‖)] (1 when ‖r‖ or ‖o‖ is 0).
// bindings: 0 uniform P, 1 probs [H, n] f32, 2 v [L, KvH*D] (f16 packed two per u32 with KV16,
//           else f32), 3 o (rw, contrib_o) [H*D],
//           4 o (read, contrib_main) [H*D], 5 out [count, 2] f32
#include common
const WG: u32 = 256u;
#include reduce

struct P { h: u32, d: u32, n: u32, group: u32, kw: u32, start: u32, count: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> probs: array<f32>;
#if KV16
@group(0) @binding(2) var<storage, read> v: array<u32>;
fn v_at(e: u32) -> f32 {
    return half_at(v[e >> 1u], (e & 1u) == 1u);
}
#else
@group(0) @binding(2) var<storage, read> v: array<f32>;
fn v_at(e: u32) -> f32 {
    return v[e];
}
#endif
@group(0) @binding(3) var<storage, read_write> o_out: array<f32>;
@group(0) @binding(4) var<storage, read> o_in: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn contrib_o(iv: Inv) {
    let t = flat_group(iv) * 256u + iv.lid;
    if (t >= p.h * p.d) {
        return;
    }
    let h = t / p.d;
    let off = (h / p.group) * p.d + t % p.d;
    var acc = 0.0;
    for (var j = 0u; j < p.n; j++) {
        let pj = probs[h * p.n + j];
        // Zero probabilities (masked keys) contribute nothing; their values are not read.
        if (pj != 0.0) {
            acc += pj * v_at(j * p.kw + off);
        }
    }
    o_out[t] = acc;
}

@compute @workgroup_size(256)
fn contrib_main(iv: Inv) {
    let t = flat_group(iv);
    if (t >= p.count) {
        return;
    }
    let j = p.start + t;
    var c2 = 0.0;
    var rc2 = 0.0;
    var rco = 0.0;
    var o2 = 0.0;
    for (var idx = iv.lid; idx < p.h * p.d; idx += WG) {
        let h = idx / p.d;
        let c = probs[h * p.n + j] * v_at(j * p.kw + (h / p.group) * p.d + idx % p.d);
        let oi = o_in[idx];
        let r = oi - c;
        c2 += c * c;
        rc2 += r * r;
        rco += r * oi;
        o2 += oi * oi;
    }
    let sg = sg_of(iv);
    let tc2 = wg_sum(c2, iv.lid, sg);
    let trc2 = wg_sum(rc2, iv.lid, sg);
    let trco = wg_sum(rco, iv.lid, sg);
    let to2 = wg_sum(o2, iv.lid, sg);
    if (iv.lid == 0u) {
        out[2u * t] = sqrt(tc2);
        if (trc2 == 0.0 || to2 == 0.0) {
            out[2u * t + 1u] = 1.0;
        } else {
            out[2u * t + 1u] = trco / (sqrt(trc2) * sqrt(to2));
        }
    }
}
