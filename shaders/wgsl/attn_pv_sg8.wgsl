// attn_pv_sg8: the output pass of the subgroup-broadcast attention (see attn_qk_sg8.wgsl):
// per query, m = the max of attn_qk_sg8's block maxes over the keys it sees, then for every
// key p = exp(s - m), l += p (masked keys too), S += p for keys a sink rule covers, and the
// probability kept for P·V is p (0 for zeroed and sunk keys, as mask.wgsl and the flash
// kernels apply the rules); O = Σ p·V / l (+ S/l · V[sink] where a sink rule redirects). A
// lane owns D/8 output columns (8-column chunks lane, lane + 8, ..); per 8 keys it makes one
// probability per query (shared by constant-lane subgroupBroadcast) and loads its chunks of
// the 8 V rows, so each loaded V element feeds RS FMAs. Each output is one fma chain over the
// keys in order and l, S sums in a fixed order (lane k: keys k, k + 8, ..; then lane order),
// whatever RS is, and keys a query does not see weigh an exact 0, so a query's output does not
// depend on how many queries the call holds. Body generated (shaders/src/attn_sg8.rs).
// Dispatch: (ceil(sq / RS), heads of the chunk).
// bindings: 0 uniform P (attn_qk_sg8's), 1 s [heads, sq, kpad] f32 scores, 2 v [L, KvH*D]
//           (f16 packed as vec4<u32> with KV16, else vec4<f32>), 3 out [Sq, H*D] f32,
//           4 bm [heads, sq, nkb] f32 block maxes.

const D: u32 = {{HEAD_DIM}}u;

struct P {
    sq: u32, kv_len: u32, q_offset: u32, causal: u32,
    mask: u32, kpad: u32, nh: u32, group: u32,
    qw: u32, kw: u32, scale: f32, q0: u32,
    h0: u32, nkb: u32, p1: u32, p2: u32,
    rules: array<vec4<u32>, 32>,
}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> s: array<f32>;
#if KV16
@group(0) @binding(2) var<storage, read> vb: array<vec4<u32>>;
#else
@group(0) @binding(2) var<storage, read> vb: array<vec4<f32>>;
#endif
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> bm: array<f32>;

#include mask

fn visible(i: u32) -> u32 {
    if (p.causal != 0u) {
        return min(p.q_offset + i + 1u, p.kv_len);
    }
    return p.kv_len;
}

#gen attn_pv_sg8:{{RS}}:{{HEAD_DIM}}
