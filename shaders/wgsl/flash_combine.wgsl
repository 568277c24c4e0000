#if F16
enable f16;
#endif
// flash_combine: the reduction pass of split-KV attention (flash-decoding, for prefill and
// decode alike). flash_attn / flash_attn_k ran each (query, head) over its keys in fixed
// splits of `split` keys (absolute key positions, so a query's splits do not depend on how
// many queries the call holds) and wrote each split's running state (m_c, l_c, S_c, o_c) to
// `part`; a workgroup per (query, head) rescales the splits to their common max, in split
// order, and writes o / l (+ S/l · V[t] where a sink rule redirects to key t), as the CPU
// reference computes it. An empty split (l_c = 0) weighs exactly 0.
// bindings: 0 uniform P, 3 v [L, KvH*D] (f16 packed two per u32 with KV16, else f32),
//           4 out [Sq, H*D] f32, 5 part [Sq, H, nsplit, D + 3] f32.
//           HEAD_DIM = D (a multiple of 4). Dispatch: (query, head) flattened over x, y.
#include common

const D: u32 = {{HEAD_DIM}}u;
const D4: u32 = D / 4u;
const WG: u32 = 64u;

struct P {
    sq: u32, kv_len: u32, q_offset: u32, causal: u32,
    mask: u32, split: u32, nsplit: u32, group: u32,
    qw: u32, kw: u32, scale: f32, pad: u32,
    kb0: u32, kb1: u32, first: u32, last: u32,
    rules: array<vec4<u32>, 32>,
}
@group(0) @binding(0) var<uniform> p: P;
#if KV16
@group(0) @binding(3) var<storage, read> vb: array<u32>;
fn v4(e: u32) -> vec4<f32> {
    let w = e >> 1u;
    return vec4<f32>(unpack_pair(vb[w]), unpack_pair(vb[w + 1u]));
}
#else
@group(0) @binding(3) var<storage, read> vb: array<f32>;
fn v4(e: u32) -> vec4<f32> {
    return vec4<f32>(vb[e], vb[e + 1u], vb[e + 2u], vb[e + 3u]);
}
#endif
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> part: array<f32>;

#include mask

// Start of split `c` of (query i, head h) in `part`.
fn split_base(i: u32, h: u32, c: u32) -> u32 {
    return ((i * (p.qw / D) + h) * p.nsplit + c) * (D + 3u);
}

// Weight of a split relative to the common max `mx` (0 for an empty split).
fn split_weight(pb: u32, mx: f32) -> f32 {
    return select(exp(part[pb] - mx), 0.0, part[pb + 1u] == 0.0);
}

@compute @workgroup_size(64)
fn main(iv: Inv) {
    let g = flat_group(iv);
    let nh = p.qw / D;
    let i = g / nh;
    let h = g % nh;
    if (i >= p.sq) {
        return;
    }
    let lid = iv.lid;
    let koff = (h / p.group) * D;
    let row = p.q_offset + i;
    var visible = p.kv_len;
    if (p.causal != 0u) {
        visible = min(row + 1u, p.kv_len);
    }
    var mx = -3.402823e38;
    for (var c = 0u; c < p.nsplit; c++) {
        let pb = split_base(i, h, c);
        if (part[pb + 1u] != 0.0) {
            mx = max(mx, part[pb]);
        }
    }
    var l = 0.0;
    var si = 0.0;
    for (var c = 0u; c < p.nsplit; c++) {
        let pb = split_base(i, h, c);
        let w = split_weight(pb, mx);
        l += part[pb + 1u] * w;
        si += part[pb + 2u] * w;
    }
    let redirect = sink_redirect(row, visible);
    let sink = select(0u, sink_target(row), redirect);
    let sf = si / l;
    for (var d = lid; d < D4; d += WG) {
        var o = vec4<f32>(0.0);
        for (var c = 0u; c < p.nsplit; c++) {
            let pb = split_base(i, h, c);
            let s = pb + 3u + d * 4u;
            o += vec4<f32>(part[s], part[s + 1u], part[s + 2u], part[s + 3u])
                * split_weight(pb, mx);
        }
        o /= l;
        if (redirect) {
            o += sf * v4(sink * p.kw + koff + d * 4u);
        }
        let go = i * p.qw + h * D + d * 4u;
        out[go] = o.x;
        out[go + 1u] = o.y;
        out[go + 2u] = o.z;
        out[go + 3u] = o.w;
    }
}
