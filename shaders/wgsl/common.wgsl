// common: helpers shared by the kernels (included after `enable` directives).
// - unpack_pair/half_at: f16 weights are stored packed two per u32 (element 2i in the low half),
//   so every adapter can read them; with shader-f16 the unpack is a bitcast.
// - Inv: the invocation builtins every kernel takes; 2-D dispatches flatten (wid, nwg).

fn unpack_pair(word: u32) -> vec2<f32> {
#if F16
    return vec2<f32>(bitcast<vec2<f16>>(word));
#else
    return unpack2x16float(word);
#endif
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
