#if F16
enable f16;
#endif
// attention: flash-style multi-head attention with online softmax over key tiles (prefill and
// chunks; one-query decode runs attention_probs + contrib_o instead); the score
// matrix is never written. Workgroup = 64 queries of one head (dispatch (ceil(Sq/64), H));
// each tile of TK keys and values (of the head's kv head, GQA) is staged in workgroup memory.
// The softmax normaliser runs over every visible key; masked keys (VisiPruner) only skip their
// P·V product (post-softmax zeroing without renormalisation), and Layer0Sink adds S_i·V[s].
// Keys may be processed in several dispatches (keys kb0..kb1 each), carrying the running
// (m, l, S, o) of every (query, head) in `state`: llvmpipe stops any loop nest after 65535
// iterations per invocation, so on software adapters long contexts take several passes.
// bindings: 0 uniform P, 1 q [Sq, H*D] f32, 2 k [L, KvH*D] f32, 3 v [L, KvH*D] f32,
//           4 out [Sq, H*D] f32, 5 state [Sq, H, D + 3] f32 (multi-pass only).
//           HEAD_DIM = D, TK = keys per tile (substituted).
#include common

const D: u32 = {{HEAD_DIM}}u;
const TK: u32 = {{TK}}u;
const WG: u32 = 64u;

struct P {
    sq: u32, kv_len: u32, q_offset: u32, causal: u32,
    mask: u32, ms: u32, me: u32, group: u32,
    qw: u32, kw: u32, scale: f32, pad: u32,
    kb0: u32, kb1: u32, first: u32, last: u32,
    rules: array<vec4<u32>, 32>,
}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> qb: array<f32>;
@group(0) @binding(2) var<storage, read> kb: array<f32>;
@group(0) @binding(3) var<storage, read> vb: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> state: array<f32>;

#include mask

var<workgroup> kt: array<f32, TK * D>;
var<workgroup> vt: array<f32, TK * D>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.y;
    let koff = (h / p.group) * D;
    let i = wid.x * WG + lid;
    let live = i < p.sq;
    let row = p.q_offset + i;
    var visible = p.kv_len;
    if (p.causal != 0u) {
        visible = min(row + 1u, p.kv_len);
    }
    // Keys the workgroup needs: up to what its last query sees (uniform over the workgroup).
    let last = min(wid.x * WG + WG - 1u, p.sq - 1u);
    var kv_end = p.kv_len;
    if (p.causal != 0u) {
        kv_end = min(p.q_offset + last + 1u, p.kv_len);
    }
    var q: array<f32, D>;
    var o: array<f32, D>;
    if (live) {
        for (var d = 0u; d < D; d++) {
            q[d] = qb[i * p.qw + h * D + d];
        }
    }
    var m = -3.402823e38;
    var l = 0.0;
    var simg = 0.0; // unnormalised sum of the probabilities Layer0Sink collects
    let sb = (i * (p.qw / D) + h) * (D + 3u);
    if (live && p.first == 0u) {
        m = state[sb];
        l = state[sb + 1u];
        simg = state[sb + 2u];
        for (var d = 0u; d < D; d++) {
            o[d] = state[sb + 3u + d];
        }
    }
    let t_end = min(kv_end, p.kb1);
    for (var t0 = p.kb0; t0 < t_end; t0 += TK) {
        workgroupBarrier();
        for (var idx = lid; idx < TK * D; idx += WG) {
            let j = t0 + idx / D;
            if (j < t_end) {
                let g = j * p.kw + koff + idx % D;
                kt[idx] = kb[g];
                vt[idx] = vb[g];
            }
        }
        workgroupBarrier();
        if (live && t0 < visible) {
            let tend = min(TK, visible - t0);
            for (var jj = 0u; jj < tend; jj++) {
                let j = t0 + jj;
                var s = 0.0;
                for (var d = 0u; d < D; d++) {
                    s += q[d] * kt[jj * D + d];
                }
                s *= p.scale;
                let mn = max(m, s);
                // Before the first key (l == 0) there is nothing to rescale; this also keeps
                // exp away from the sentinel's huge negative difference.
                let corr = select(exp(m - mn), 0.0, l == 0.0);
                let e = exp(s - mn);
                l = l * corr + e;
                simg *= corr;
                // Rescaling fused into the P·V loop; masked keys only rescale (their V row is
                // never read).
                let kind = mask_kind(row, j);
                if (kind == 0u) {
                    for (var d = 0u; d < D; d++) {
                        o[d] = o[d] * corr + e * vt[jj * D + d];
                    }
                } else {
                    for (var d = 0u; d < D; d++) {
                        o[d] *= corr;
                    }
                    if (kind == 2u) {
                        simg += e;
                    }
                }
                m = mn;
            }
        }
    }
    if (live && p.last == 0u) {
        state[sb] = m;
        state[sb + 1u] = l;
        state[sb + 2u] = simg;
        for (var d = 0u; d < D; d++) {
            state[sb + 3u + d] = o[d];
        }
    }
    if (live && p.last != 0u) {
        let redirect = sink_redirect(row, visible);
        let sv = select(0u, sink_target(row), redirect) * p.kw + koff;
        for (var d = 0u; d < D; d++) {
            var r = o[d] / l;
            if (redirect) {
                r += (simg / l) * vb[sv + d];
            }
            out[i * p.qw + h * D + d] = r;
        }
    }
}
