// attn_qk_sg8: the scores pass of the subgroup-broadcast attention for software adapters
// (llvmpipe, subgroups of exactly 8): S = scale · Q·Kᵀ for one chunk of queries and heads,
// written to a score buffer, with each query's max over each 128-key block; attn_pv_sg8 turns
// the scores into probabilities and multiplies them by V. Why not a fused flash kernel there:
// llvmpipe splits every per-lane load into 8 scalar loads and a barrier into coroutine phases,
// so attention runs at the speed of its loads per FMA; as two gemm_sg8-style products (here a
// lane owns 16 keys and the query elements reach every lane by constant-lane
// subgroupBroadcast) each loaded K element feeds RS FMAs. Each score is one fma chain over the
// head in order, whatever RS is: a query's scores do not depend on how many queries the call
// holds. Body generated (shaders/src/attn_sg8.rs).
// Dispatch: (ceil(sq / RS), ceil(keys / 128), heads of the chunk); key blocks past what a
// query block sees (causal) return at once.
// bindings: 0 uniform P, 1 q [Sq, H*D] f32, 2 k [L, KvH*D] (f16 packed as vec4<u32> with
//           KV16, else vec4<f32>), 3 s [heads, sq, kpad] f32 (written as vec4s), 4 bm [heads,
//           sq, nkb] f32.
//           RS queries per subgroup, HEAD_DIM = D (a multiple of 64).

const D: u32 = {{HEAD_DIM}}u;

// sq: queries of the chunk (call queries q0..q0 + sq, at rows q_offset..); kpad: score row
// stride; nh, h0: heads of the chunk; nkb: 128-key blocks per row of bm; the mask words are
// mask.wgsl's.
struct P {
    sq: u32, kv_len: u32, q_offset: u32, causal: u32,
    mask: u32, kpad: u32, nh: u32, group: u32,
    qw: u32, kw: u32, scale: f32, q0: u32,
    h0: u32, nkb: u32, p1: u32, p2: u32,
    rules: array<vec4<u32>, 32>,
}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> q: array<f32>;
#if KV16
@group(0) @binding(2) var<storage, read> kb: array<vec4<u32>>;
#else
@group(0) @binding(2) var<storage, read> kb: array<vec4<f32>>;
#endif
@group(0) @binding(3) var<storage, read_write> s: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> bm: array<f32>;

// Keys query i of the chunk sees.
fn visible(i: u32) -> u32 {
    if (p.causal != 0u) {
        return min(p.q_offset + i + 1u, p.kv_len);
    }
    return p.kv_len;
}

#gen attn_qk_sg8:{{RS}}:{{HEAD_DIM}}
