#if F16
enable f16;
#endif
// flash_decode: one query (decode) split over the KV length (flash-decoding), then a small
// reduction pass. One query per head leaves too little work for a workgroup per head on long
// caches, so the keys are cut into splits of CH:
// partial: workgroup (split c, head h) computes the scores of its keys (one invocation per key,
//          q in workgroup memory), their max m_c and normaliser l_c over the visible keys, the
//          sum S_c of the probabilities Layer0Sink collects, and the unnormalised P·V o_c (vec4
//          column per invocation, masked keys skipped); writes (m_c, l_c, S_c, o_c) to `part`.
// combine: workgroup per head rescales the splits to their common max and writes
//          o / l (+ S/l · V[s] where Layer0Sink redirects), as the CPU reference computes it.
// bindings: 0 uniform P, 1 q [1, H*D] f32, 2 k [L, KvH*D], 3 v [L, KvH*D] (f16 packed two per
//           u32 with KV16, else f32), 4 out [1, H*D] f32, 5 part [H, nsplit, D + 3] f32.
//           HEAD_DIM = D (a multiple of 4), CH = keys per split.
#include common

const D: u32 = {{HEAD_DIM}}u;
const D4: u32 = D / 4u;
const CH: u32 = {{CH}}u;
const WG: u32 = 64u;
#include reduce

struct P {
    sq: u32, kv_len: u32, q_offset: u32, causal: u32,
    mask: u32, ms: u32, me: u32, group: u32,
    qw: u32, kw: u32, scale: f32, pad: u32,
    nsplit: u32, pad1: u32, pad2: u32, pad3: u32,
    rules: array<vec4<u32>, 16>,
}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> qb: array<f32>;
#if KV16
@group(0) @binding(2) var<storage, read> kb: array<u32>;
@group(0) @binding(3) var<storage, read> vb: array<u32>;
fn k4(e: u32) -> vec4<f32> {
    let w = e >> 1u;
    return vec4<f32>(unpack_pair(kb[w]), unpack_pair(kb[w + 1u]));
}
fn v4(e: u32) -> vec4<f32> {
    let w = e >> 1u;
    return vec4<f32>(unpack_pair(vb[w]), unpack_pair(vb[w + 1u]));
}
#else
@group(0) @binding(2) var<storage, read> kb: array<f32>;
@group(0) @binding(3) var<storage, read> vb: array<f32>;
fn k4(e: u32) -> vec4<f32> {
    return vec4<f32>(kb[e], kb[e + 1u], kb[e + 2u], kb[e + 3u]);
}
fn v4(e: u32) -> vec4<f32> {
    return vec4<f32>(vb[e], vb[e + 1u], vb[e + 2u], vb[e + 3u]);
}
#endif
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> part: array<f32>;

#include mask

var<workgroup> qsh: array<vec4<f32>, D4>;
var<workgroup> ps: array<f32, CH>;

fn visible_keys() -> u32 {
    if (p.causal != 0u) {
        return min(p.q_offset + 1u, p.kv_len);
    }
    return p.kv_len;
}

@compute @workgroup_size(64)
fn partial(iv: Inv) {
    let c = iv.wid.x;
    let h = iv.wid.y;
    let lid = iv.lid;
    let koff = (h / p.group) * D;
    let row = p.q_offset;
    let visible = visible_keys();
    let j0 = c * CH;
    let j1 = min(j0 + CH, visible);
    for (var d = lid; d < D4; d += WG) {
        let g = h * D + d * 4u;
        qsh[d] = vec4<f32>(qb[g], qb[g + 1u], qb[g + 2u], qb[g + 3u]);
    }
    workgroupBarrier();
    var mx = -3.402823e38;
    for (var jj = lid; jj < CH; jj += WG) {
        let j = j0 + jj;
        var s = -3.402823e38;
        if (j < j1) {
            let g = j * p.kw + koff;
            var a = 0.0;
            for (var d = 0u; d < D4; d++) {
                a += dot(qsh[d], k4(g + d * 4u));
            }
            s = a * p.scale;
            mx = max(mx, s);
        }
        ps[jj] = s;
    }
    let m = wg_max(mx, lid, sg_of(iv));
    var l = 0.0;
    var si = 0.0;
    for (var jj = lid; jj < CH; jj += WG) {
        let j = j0 + jj;
        var pr = 0.0;
        if (j < j1) {
            let e = exp(ps[jj] - m);
            l += e;
            let kind = mask_kind(row, j);
            if (kind == 0u) {
                pr = e;
            } else if (kind == 2u) {
                si += e;
            }
        }
        ps[jj] = pr;
    }
    // The reductions start with a barrier: every probability is in `ps` after them.
    let lt = wg_sum(l, lid, sg_of(iv));
    let st = wg_sum(si, lid, sg_of(iv));
    let pb = (h * p.nsplit + c) * (D + 3u);
    if (lid == 0u) {
        part[pb] = m;
        part[pb + 1u] = lt;
        part[pb + 2u] = st;
    }
    var n = 0u;
    if (j1 > j0) {
        n = j1 - j0;
    }
    for (var d = lid; d < D4; d += WG) {
        var o = vec4<f32>(0.0);
        for (var jj = 0u; jj < n; jj++) {
            let pr = ps[jj];
            if (pr != 0.0) {
                o += pr * v4((j0 + jj) * p.kw + koff + d * 4u);
            }
        }
        let s = pb + 3u + d * 4u;
        part[s] = o.x;
        part[s + 1u] = o.y;
        part[s + 2u] = o.z;
        part[s + 3u] = o.w;
    }
}

// Weight of split `c` of head `h` relative to the common max `mx` (0 for an empty split).
fn split_weight(h: u32, c: u32, mx: f32) -> f32 {
    let pb = (h * p.nsplit + c) * (D + 3u);
    return select(exp(part[pb] - mx), 0.0, part[pb + 1u] == 0.0);
}

@compute @workgroup_size(64)
fn combine(iv: Inv) {
    let h = flat_group(iv);
    let lid = iv.lid;
    let koff = (h / p.group) * D;
    var mx = -3.402823e38;
    for (var c = 0u; c < p.nsplit; c++) {
        let pb = (h * p.nsplit + c) * (D + 3u);
        if (part[pb + 1u] != 0.0) {
            mx = max(mx, part[pb]);
        }
    }
    var l = 0.0;
    var si = 0.0;
    for (var c = 0u; c < p.nsplit; c++) {
        let pb = (h * p.nsplit + c) * (D + 3u);
        let w = split_weight(h, c, mx);
        l += part[pb + 1u] * w;
        si += part[pb + 2u] * w;
    }
    let redirect = sink_redirect(p.q_offset, visible_keys());
    let sink = select(0u, sink_target(p.q_offset), redirect);
    for (var d = lid; d < D4; d += WG) {
        var o = vec4<f32>(0.0);
        for (var c = 0u; c < p.nsplit; c++) {
            let s = (h * p.nsplit + c) * (D + 3u) + 3u + d * 4u;
            o += vec4<f32>(part[s], part[s + 1u], part[s + 2u], part[s + 3u])
                * split_weight(h, c, mx);
        }
        o /= l;
        if (redirect) {
            o += (si / l) * v4(sink * p.kw + koff + d * 4u);
        }
        let g = h * D + d * 4u;
        out[g] = o.x;
        out[g + 1u] = o.y;
        out[g + 2u] = o.z;
        out[g + 3u] = o.w;
    }
}
