#if F16
enable f16;
#endif
// flash_attn: prefill attention (FlashAttention-2 style) with online softmax over key tiles;
// the score matrix is never written. A workgroup owns BQ queries of one head and splits their
// work over its WG = BQ·TPR invocations (TPR lanes per query), so no invocation holds a
// D-length array: the Q block (f32) and each K/V tile (f16 for an f16 cache where the adapter
// has shader-f16, else f32) sit in workgroup memory; each invocation computes BQ·BK/WG scores
// of a tile, the softmax bookkeeping runs once per query (lane 0 of its TPR), and lane c of
// query r keeps NV = D/(4·TPR) vec4 columns (c, c + TPR, ...) of the output accumulator.
// The softmax normaliser runs over every visible key; masked keys (VisiPruner) get probability
// 0 after it (post-softmax zeroing without renormalisation, their P·V skipped), and
// Layer0Sink adds S_i·V[s] at the end (see mask.wgsl).
// Split-KV: with `split` > 0, workgroup z of the dispatch runs keys [z·split, (z+1)·split)
// and writes that split's running (m, l, S, o) to `state`; flash_combine.wgsl reduces the
// splits. The splits sit at fixed key positions, so one query's arithmetic does not depend
// on how many queries the call holds (batch invariance; decode runs this kernel with BQ 1).
// Keys may also be processed in several dispatches (keys kb0..kb1 each), carrying the state
// between them (first/last): llvmpipe stops any loop nest after 65535 iterations per
// invocation; the backend keeps a split under that instead, so it runs one pass.
// bindings: 0 uniform P, 1 q [Sq, H*D] f32, 2 k [L, KvH*D], 3 v [L, KvH*D] (f16 packed two per
//           u32 with KV16, else f32), 4 out [Sq, H*D] f32, 5 state [Sq, H, nsplit, D + 3] f32.
//           HEAD_DIM = D (a multiple of 4), BQ, BK, TPR (divides D/4), WG = BQ·TPR.
#include common

const D: u32 = {{HEAD_DIM}}u;
const D4: u32 = D / 4u;
const BQ: u32 = {{BQ}}u;
const BK: u32 = {{BK}}u;
const TPR: u32 = {{TPR}}u;
const WG: u32 = {{WG}}u; // BQ * TPR
const NV: u32 = D4 / TPR;

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
// Elements e..e+4 (e a multiple of 4: rows and heads start on whole words).
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

// Tiles of an f16 cache stay f16 where the adapter has shader-f16 (lossless, half the
// workgroup memory); an f32 cache keeps f32 tiles (its precision is what --kv-dtype f32 asks).
#if F16
#if KV16
alias KT = f16;
#else
alias KT = f32;
#endif
#else
alias KT = f32;
#endif

var<workgroup> qs: array<vec4<f32>, BQ * D4>;
var<workgroup> ks: array<vec4<KT>, BK * D4>;
var<workgroup> vs: array<vec4<KT>, BK * D4>;
var<workgroup> ss: array<f32, BQ * BK>; // scores, then probabilities (0 for masked keys)
var<workgroup> rm: array<f32, BQ>; // running max
var<workgroup> rl: array<f32, BQ>; // running normaliser
var<workgroup> rsi: array<f32, BQ>; // running sum Layer0Sink collects
var<workgroup> rc: array<f32, BQ>; // this tile's rescale factor

@compute @workgroup_size({{WG}})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.y;
    let koff = (h / p.group) * D;
    // Split-KV: workgroup z takes keys [z·split, (z+1)·split) of kb0..kb1 (split 0: all).
    let kb0 = p.kb0 + wid.z * p.split;
    let kb1 = select(p.kb1, min(kb0 + p.split, p.kb1), p.split != 0u);
    let r = lid / TPR;
    let c = lid % TPR;
    let q0 = wid.x * BQ;
    let i = q0 + r;
    let live = i < p.sq;
    let row = p.q_offset + i;
    var visible = 0u;
    if (live) {
        visible = p.kv_len;
        if (p.causal != 0u) {
            visible = min(row + 1u, p.kv_len);
        }
    }
    // Keys the workgroup needs: up to what its last query sees (uniform over the workgroup).
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
    var acc: array<vec4<f32>, NV>;
    let sb = ((i * (p.qw / D) + h) * p.nsplit + wid.z) * (D + 3u);
    for (var n = 0u; n < NV; n++) {
        acc[n] = vec4<f32>(0.0);
        if (live && p.first == 0u) {
            let s = sb + 3u + (c + n * TPR) * 4u;
            acc[n] = vec4<f32>(state[s], state[s + 1u], state[s + 2u], state[s + 3u]);
        }
    }
    if (c == 0u) {
        var m = -3.402823e38;
        var l = 0.0;
        var si = 0.0;
        if (live && p.first == 0u) {
            m = state[sb];
            l = state[sb + 1u];
            si = state[sb + 2u];
        }
        rm[r] = m;
        rl[r] = l;
        rsi[r] = si;
    }
    let t_end = min(kv_end, kb1);
    for (var t0 = kb0; t0 < t_end; t0 += BK) {
        workgroupBarrier();
        for (var e = lid; e < BK * D4; e += WG) {
            let j = t0 + e / D4;
            var kx = vec4<f32>(0.0);
            var vx = vec4<f32>(0.0);
            if (j < t_end) {
                let g = j * p.kw + koff + (e % D4) * 4u;
                kx = k4(g);
                vx = v4(g);
            }
            ks[e] = vec4<KT>(kx);
            vs[e] = vec4<KT>(vx);
        }
        workgroupBarrier();
        for (var e = lid; e < BQ * BK; e += WG) {
            let qo = (e / BK) * D4;
            let ko = (e % BK) * D4;
            var s = 0.0;
            for (var d = 0u; d < D4; d++) {
                s += dot(qs[qo + d], vec4<f32>(ks[ko + d]));
            }
            ss[e] = s * p.scale;
        }
        workgroupBarrier();
        if (c == 0u) {
            var tend = 0u;
            if (visible > t0) {
                tend = min(min(BK, visible - t0), t_end - t0);
            }
            let m = rm[r];
            let l = rl[r];
            var mx = m;
            for (var jj = 0u; jj < tend; jj++) {
                mx = max(mx, ss[r * BK + jj]);
            }
            // Before the first key (l == 0) there is nothing to rescale; this also keeps exp
            // away from the sentinel's huge negative difference.
            let corr = select(exp(m - mx), 0.0, l == 0.0);
            var nl = l * corr;
            var si = rsi[r] * corr;
            for (var jj = 0u; jj < BK; jj++) {
                var pr = 0.0;
                if (jj < tend) {
                    let e = exp(ss[r * BK + jj] - mx);
                    nl += e;
                    let kind = mask_kind(row, t0 + jj);
                    if (kind == 0u) {
                        pr = e;
                    } else if (kind == 2u) {
                        si += e;
                    }
                }
                ss[r * BK + jj] = pr;
            }
            rm[r] = mx;
            rl[r] = nl;
            rsi[r] = si;
            rc[r] = corr;
        }
        workgroupBarrier();
        let corr = rc[r];
        for (var n = 0u; n < NV; n++) {
            acc[n] *= corr;
        }
        let tcount = min(BK, t_end - t0);
        for (var jj = 0u; jj < tcount; jj++) {
            let pr = ss[r * BK + jj];
            // Masked and invisible keys are exact zeros: their value rows are not read.
            if (pr != 0.0) {
                for (var n = 0u; n < NV; n++) {
                    acc[n] += pr * vec4<f32>(vs[jj * D4 + c + n * TPR]);
                }
            }
        }
    }
    workgroupBarrier();
    if (!live) {
        return;
    }
    if (p.last == 0u) {
        if (c == 0u) {
            state[sb] = rm[r];
            state[sb + 1u] = rl[r];
            state[sb + 2u] = rsi[r];
        }
        for (var n = 0u; n < NV; n++) {
            let s = sb + 3u + (c + n * TPR) * 4u;
            state[s] = acc[n].x;
            state[s + 1u] = acc[n].y;
            state[s + 2u] = acc[n].z;
            state[s + 3u] = acc[n].w;
        }
        return;
    }
    let l = rl[r];
    let redirect = sink_redirect(row, visible);
    let sink = select(0u, sink_target(row), redirect);
    let sf = rsi[r] / l;
    for (var n = 0u; n < NV; n++) {
        let d = (c + n * TPR) * 4u;
        var o = acc[n] / l;
        if (redirect) {
            o += sf * v4(sink * p.kw + koff + d);
        }
        let g = i * p.qw + h * D + d;
        out[g] = o.x;
        out[g + 1u] = o.y;
        out[g + 2u] = o.z;
        out[g + 3u] = o.w;
    }
}
