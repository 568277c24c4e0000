#if F16
enable f16;
#endif
// embedding: out[s, :] = table[ids[s], :] for the ids inside this table chunk's rows
// [v0, v1) (tables above the binding limit are split by rows; one dispatch per chunk).
// One invocation per output element, 2-D dispatch over ceil(S*D / 256).
// bindings: 0 uniform P, 1 ids [S] u32, 2 table chunk [v1-v0, D] (f16 packed in u32 with W16,
//           else f32), 3 out [S, D] f32
#include common

struct P { s: u32, d: u32, v0: u32, v1: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
#if W16
#if F16
@group(0) @binding(2) var<storage, read> table: array<f16>;
#else
@group(0) @binding(2) var<storage, read> table: array<u32>;
#endif
#else
@group(0) @binding(2) var<storage, read> table: array<f32>;
#endif
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(iv: Inv) {
    let t = flat_group(iv) * 256u + iv.lid;
    if (t >= p.s * p.d) {
        return;
    }
    let id = ids[t / p.d];
    if (id < p.v0 || id >= p.v1) {
        return;
    }
    let e = (id - p.v0) * p.d + t % p.d;
#if W16
#if F16
    out[t] = f32(table[e]);
#else
    out[t] = half_at(table[e >> 1u], (e & 1u) == 1u);
#endif
#else
    out[t] = table[e];
#endif
}
