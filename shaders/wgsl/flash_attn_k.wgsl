#if F16
enable f16;
#endif
// flash_attn_k: the attention of flash_attn.wgsl (same uniform, bindings, masks, split-KV
// and multi-pass state) with the work split the other way: invocation t of the WG owns key t0 + t
// of each key tile while the scores are computed (BQ partial sums, one per query of the
// block) and vec4 columns t, t + WG, ... of the output while P·V accumulates (BQ·NC vec4
// accumulators), so the Q block and the probabilities are read at addresses that are uniform
// over the workgroup and only K and V rows differ per invocation. K and V are read from the
// cache directly: every row is read once per workgroup, no tile is staged. This is the variant
// for software adapters (llvmpipe splits a divergent workgroup-memory load into scalar loads
// but loads a uniform one once); flash_attn is the GPU one. Autotuning picks between them.
// bindings: 0 uniform P, 1 q [Sq, H*D] f32, 2 k, 3 v [L, KvH*D] (f16 packed two per u32 with
//           KV16, else f32), 4 out [Sq, H*D] f32, 5 state [Sq, H, nsplit, D + 3] f32.
//           HEAD_DIM = D (a multiple of 4), BQ queries, WG keys per tile, NC = ceil(D/4 / WG).
#include common

const D: u32 = {{HEAD_DIM}}u;
const D4: u32 = D / 4u;
const BQ: u32 = {{BQ}}u;
const WG: u32 = {{WG}}u;
const NC: u32 = {{NC}}u;

struct P {
    sq: u32, kv_len: u32, q_offset: u32, causal: u32,
    mask: u32, split: u32, nsplit: u32, group: u32,
    qw: u32, kw: u32, scale: f32, pad: u32,
    kb0: u32, kb1: u32, first: u32, last: u32,
    rules: array<vec4<u32>, 32>,
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
@group(0) @binding(5) var<storage, read_write> state: array<f32>;

#include mask

var<workgroup> qs: array<vec4<f32>, BQ * D4>;
var<workgroup> ss: array<f32, BQ * WG>; // scores, then probabilities (0 for masked keys)
var<workgroup> rm: array<f32, BQ>;
var<workgroup> rl: array<f32, BQ>;
var<workgroup> rsi: array<f32, BQ>;
var<workgroup> rc: array<f32, BQ>;
var<workgroup> rvis: array<u32, BQ>; // keys each query sees

@compute @workgroup_size({{WG}})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.y;
    let koff = (h / p.group) * D;
    // Split-KV: workgroup z takes keys [z·split, (z+1)·split) of kb0..kb1 (split 0: all).
    let kb0 = p.kb0 + wid.z * p.split;
    let kb1 = select(p.kb1, min(kb0 + p.split, p.kb1), p.split != 0u);
    let q0 = wid.x * BQ;
    let nh = p.qw / D;
    let last = min(q0 + BQ - 1u, p.sq - 1u);
    var kv_end = p.kv_len;
    if (p.causal != 0u) {
        kv_end = min(p.q_offset + last + 1u, p.kv_len);
    }
    for (var e = lid; e < BQ * D4; e += WG) {
        let qi = q0 + e / D4;
        var x = vec4<f32>(0.0);
        if (qi < p.sq) {
            let g = qi * p.qw + h * D + (e % D4) * 4u;
            x = vec4<f32>(qb[g], qb[g + 1u], qb[g + 2u], qb[g + 3u]);
        }
        qs[e] = x;
    }
    for (var r = lid; r < BQ; r += WG) {
        let i = q0 + r;
        var m = -3.402823e38;
        var l = 0.0;
        var si = 0.0;
        var vis = 0u;
        if (i < p.sq) {
            vis = p.kv_len;
            if (p.causal != 0u) {
                vis = min(p.q_offset + i + 1u, p.kv_len);
            }
            if (p.first == 0u) {
                let sb = ((i * nh + h) * p.nsplit + wid.z) * (D + 3u);
                m = state[sb];
                l = state[sb + 1u];
                si = state[sb + 2u];
            }
        }
        rm[r] = m;
        rl[r] = l;
        rsi[r] = si;
        rvis[r] = vis;
    }
    var acc: array<vec4<f32>, BQ * NC>;
    for (var r = 0u; r < BQ; r++) {
        let i = q0 + r;
        for (var n = 0u; n < NC; n++) {
            let c = lid + n * WG;
            var a = vec4<f32>(0.0);
            if (p.first == 0u && i < p.sq && c < D4) {
                let s = ((i * nh + h) * p.nsplit + wid.z) * (D + 3u) + 3u + c * 4u;
                a = vec4<f32>(state[s], state[s + 1u], state[s + 2u], state[s + 3u]);
            }
            acc[r * NC + n] = a;
        }
    }
    let t_end = min(kv_end, kb1);
    for (var t0 = kb0; t0 < t_end; t0 += WG) {
        workgroupBarrier();
        let j = t0 + lid;
        var sc: array<f32, BQ>;
        for (var r = 0u; r < BQ; r++) {
            sc[r] = 0.0;
        }
        if (j < t_end) {
            let kbase = j * p.kw + koff;
            for (var d = 0u; d < D4; d++) {
                let kv = k4(kbase + d * 4u);
                for (var r = 0u; r < BQ; r++) {
                    sc[r] += dot(qs[r * D4 + d], kv);
                }
            }
        }
        for (var r = 0u; r < BQ; r++) {
            ss[r * WG + lid] = sc[r] * p.scale;
        }
        workgroupBarrier();
        for (var r = lid; r < BQ; r += WG) {
            let vis = rvis[r];
            var tend = 0u;
            if (vis > t0) {
                tend = min(min(WG, vis - t0), t_end - t0);
            }
            let m = rm[r];
            let l = rl[r];
            var mx = m;
            for (var jj = 0u; jj < tend; jj++) {
                mx = max(mx, ss[r * WG + jj]);
            }
            // Before the first key (l == 0) there is nothing to rescale; this also keeps exp
            // away from the sentinel's huge negative difference.
            let corr = select(exp(m - mx), 0.0, l == 0.0);
            var nl = l * corr;
            var si = rsi[r] * corr;
            let row = p.q_offset + q0 + r;
            for (var jj = 0u; jj < WG; jj++) {
                var pr = 0.0;
                if (jj < tend) {
                    let e = exp(ss[r * WG + jj] - mx);
                    nl += e;
                    let kind = mask_kind(row, t0 + jj);
                    if (kind == 0u) {
                        pr = e;
                    } else if (kind == 2u) {
                        si += e;
                    }
                }
                ss[r * WG + jj] = pr;
            }
            rm[r] = mx;
            rl[r] = nl;
            rsi[r] = si;
            rc[r] = corr;
        }
        workgroupBarrier();
        for (var r = 0u; r < BQ; r++) {
            let corr = rc[r];
            for (var n = 0u; n < NC; n++) {
                acc[r * NC + n] *= corr;
            }
        }
        let tcount = min(WG, t_end - t0);
        for (var jj = 0u; jj < tcount; jj++) {
            let vbase = (t0 + jj) * p.kw + koff;
            for (var n = 0u; n < NC; n++) {
                let c = lid + n * WG;
                if (c < D4) {
                    let vv = v4(vbase + c * 4u);
                    for (var r = 0u; r < BQ; r++) {
                        // Masked and invisible keys are exact zeros.
                        let pr = ss[r * WG + jj];
                        if (pr != 0.0) {
                            acc[r * NC + n] += pr * vv;
                        }
                    }
                }
            }
        }
    }
    workgroupBarrier();
    for (var r = 0u; r < BQ; r++) {
        let i = q0 + r;
        if (i >= p.sq) {
            break;
        }
        let sb = ((i * nh + h) * p.nsplit + wid.z) * (D + 3u);
        let row = p.q_offset + i;
        if (p.last == 0u) {
            if (lid == 0u) {
                state[sb] = rm[r];
                state[sb + 1u] = rl[r];
                state[sb + 2u] = rsi[r];
            }
            for (var n = 0u; n < NC; n++) {
                let c = lid + n * WG;
                if (c < D4) {
                    let a = acc[r * NC + n];
                    let s = sb + 3u + c * 4u;
                    state[s] = a.x;
                    state[s + 1u] = a.y;
                    state[s + 2u] = a.z;
                    state[s + 3u] = a.w;
                }
            }
        } else {
            let l = rl[r];
            let redirect = sink_redirect(row, rvis[r]);
            let sink = select(0u, sink_target(row), redirect);
            let sf = rsi[r] / l;
            for (var n = 0u; n < NC; n++) {
                let c = lid + n * WG;
                if (c < D4) {
                    var o = acc[r * NC + n] / l;
                    if (redirect) {
                        o += sf * v4(sink * p.kw + koff + c * 4u);
                    }
                    let g = i * p.qw + h * D + c * 4u;
                    out[g] = o.x;
                    out[g + 1u] = o.y;
                    out[g + 2u] = o.z;
                    out[g + 3u] = o.w;
                }
            }
        }
    }
}
