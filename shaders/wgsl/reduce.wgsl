// reduce: workgroup-wide sum and max over WG invocations (WG: a power of two <= 256, declared
// by the includer). Every invocation gets the result. Call from uniform control flow only.
// With SUBGROUPS: subgroupAdd/Max, then one partial per subgroup through workgroup memory
// (subgroups of a 1-D workgroup are runs of consecutive invocations on the drivers we target).

var<workgroup> red: array<f32, WG>;

fn wg_sum(v: f32, lid: u32, sg: u32) -> f32 {
    workgroupBarrier(); // `red` may still be read by the previous reduction
#if SUBGROUPS
    let s = subgroupAdd(v);
    if (lid % sg == 0u) {
        red[lid / sg] = s;
    }
    workgroupBarrier();
    var t = 0.0;
    let parts = (WG + sg - 1u) / sg;
    for (var i = 0u; i < parts; i++) {
        t += red[i];
    }
    return t;
#else
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    return red[0];
#endif
}

fn wg_max(v: f32, lid: u32, sg: u32) -> f32 {
    workgroupBarrier();
#if SUBGROUPS
    let s = subgroupMax(v);
    if (lid % sg == 0u) {
        red[lid / sg] = s;
    }
    workgroupBarrier();
    var t = red[0];
    let parts = (WG + sg - 1u) / sg;
    for (var i = 1u; i < parts; i++) {
        t = max(t, red[i]);
    }
    return t;
#else
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    return red[0];
#endif
}
