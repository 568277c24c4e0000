// embedding_q: out[s, :] = table[ids[s], :] from a block-quantized table (see quant.wgsl) for
// the ids inside this table chunk's rows [v0, v1) (one dispatch per chunk). One invocation per
// 32-weight sub-block of an output row, so each block is decoded once.
// Dispatch: ceil(S * D / 32 / 256) workgroups (flattened 2-D). Requires D % 32 == 0.
// bindings: 0 uniform P, 1 ids [S] u32, 2 table chunk raw blocks as u32 words, 3 out [S, D] f32
#include common

struct P { s: u32, k: u32, v0: u32, v1: u32 } // k: the row width D
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

#include quant

@compute @workgroup_size(256)
fn main(iv: Inv) {
    let t = flat_group(iv) * 256u + iv.lid;
    let nsub = p.k / 32u;
    if (t >= p.s * nsub) {
        return;
    }
    let s = t / nsub;
    let j = t % nsub;
    let id = ids[s];
    if (id < p.v0 || id >= p.v1) {
        return;
    }
    let rb = (id - p.v0) * (p.k / QBS) * QBB;
    let dm = sub_head(rb, j);
    for (var u = 0u; u < 8u; u++) {
        out[s * (p.k / 4u) + j * 8u + u] = dm.x * sub_q4(rb, j, u) + vec4<f32>(dm.y);
    }
}
