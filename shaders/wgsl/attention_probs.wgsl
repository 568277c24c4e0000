#if F16
enable f16;
#endif
// attention_probs: softmax probabilities of the last query row for every head, with the causal
// rule and the VisiPruner mask (zero past the visible keys). One workgroup (256) per head.
// bindings: 0 uniform P, 1 q [Sq, H*D] f32, 2 k [L, KvH*D] (f16 packed two per u32 with KV16,
//           else f32), 3 out [H, kv_len] f32
#include common
const WG: u32 = 256u;
#include reduce

struct P {
    sq: u32, kv_len: u32, q_offset: u32, causal: u32,
    mask: u32, ms: u32, me: u32, group: u32,
    qw: u32, kw: u32, scale: f32, d: u32,
    rules: array<vec4<u32>, 32>,
}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> qb: array<f32>;
#if KV16
@group(0) @binding(2) var<storage, read> kb: array<u32>;
fn k_at(e: u32) -> f32 {
    return half_at(kb[e >> 1u], (e & 1u) == 1u);
}
#else
@group(0) @binding(2) var<storage, read> kb: array<f32>;
fn k_at(e: u32) -> f32 {
    return kb[e];
}
#endif
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

#include mask

@compute @workgroup_size(256)
fn main(iv: Inv) {
    let h = iv.wid.x;
    let lid = iv.lid;
    let koff = (h / p.group) * p.d;
    let i = p.sq - 1u;
    let row = p.q_offset + i;
    var visible = p.kv_len;
    if (p.causal != 0u) {
        visible = min(row + 1u, p.kv_len);
    }
    let ob = h * p.kv_len;
    let qo = i * p.qw + h * p.d;
    var mx = -3.402823e38;
    for (var j = lid; j < visible; j += WG) {
        var s = 0.0;
        for (var d = 0u; d < p.d; d++) {
            s += qb[qo + d] * k_at(j * p.kw + koff + d);
        }
        s *= p.scale;
        out[ob + j] = s;
        mx = max(mx, s);
    }
    for (var j = visible + lid; j < p.kv_len; j += WG) {
        out[ob + j] = 0.0;
    }
    let m = wg_max(mx, lid, sg_of(iv));
    var sum = 0.0;
    for (var j = lid; j < visible; j += WG) {
        let e = exp(out[ob + j] - m);
        out[ob + j] = e;
        sum += e;
    }
    let total = wg_sum(sum, lid, sg_of(iv));
    var img = 0.0;
    for (var j = lid; j < visible; j += WG) {
        let v = out[ob + j] / total;
        let kind = mask_kind(row, j);
        if (kind == 0u) {
            out[ob + j] = v;
        } else {
            out[ob + j] = 0.0;
            if (kind == 2u) {
                img += v;
            }
        }
    }
    let s_i = wg_sum(img, lid, sg_of(iv));
    // The invocation that owns the sink key (j % WG == lid) zeroed it above; it now writes S_i there.
    let to = sink_target(row);
    if (sink_redirect(row, visible) && to % WG == lid) {
        out[ob + to] = s_i;
    }
}
