// common: helpers shared by the kernels (included after `enable` directives).
// - unpack_pair/half_at: f16 weights are stored packed two per u32 (element 2i in the low half),
//   so every adapter can read them. Kernels built with F16 (shader-f16) instead bind the same
//   bytes as array<f16> / array<vec4<f16>> and load halves natively; unpack2x16float stays the
//   portable path (naga 30 mistranslates bitcast between u32 and vec2<f16>, so no bitcasts).
// - Inv: the invocation builtins every kernel takes; 2-D dispatches flatten (wid, nwg).

fn unpack_pair(word: u32) -> vec2<f32> {
    return unpack2x16float(word);
}

fn half_at(word: u32, hi: bool) -> f32 {
    let v = unpack_pair(word);
    return select(v.x, v.y, hi);
}

struct Inv {
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
#if SUBGROUPS
    @builtin(subgroup_size) sg: u32,
#endif
}

// Index of this workgroup in a 2-D dispatch (x fastest).
fn flat_group(iv: Inv) -> u32 {
    return iv.wid.y * iv.nwg.x + iv.wid.x;
}

// Subgroup size, or 0 without subgroups (unused then).
fn sg_of(iv: Inv) -> u32 {
#if SUBGROUPS
    return iv.sg;
#else
    return 0u;
#endif
}
