#if F16
enable f16;
#endif
// argmax: index of the largest value of each row, first index on ties; a NaN wins over every
// number and the first NaN over later ones (as the CPU reference). One workgroup (256) per row,
// 2-D dispatch over the rows.
// bindings: 0 uniform P, 1 x [rows, n] f32, 2 out [rows] u32
#include common

struct P { rows: u32, n: u32, p0: u32, p1: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

const NONE: u32 = 0xffffffffu;
var<workgroup> vals: array<f32, 256>;
var<workgroup> idxs: array<u32, 256>;

// Bit test: `v != v` may be folded away by fast-math compilers.
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// Whether candidate (bv, bi) beats (av, ai).
fn beats(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    if (bi == NONE) {
        return false;
    }
    if (ai == NONE) {
        return true;
    }
    let an = is_nan(av);
    let bn = is_nan(bv);
    if (an && bn) {
        return bi < ai;
    }
    if (an) {
        return false;
    }
    if (bn) {
        return true;
    }
    if (bv != av) {
        return bv > av;
    }
    return bi < ai;
}

@compute @workgroup_size(256)
fn main(iv: Inv) {
    let row = flat_group(iv);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var bv = 0.0;
    var bi = NONE;
    for (var j = iv.lid; j < p.n; j += 256u) {
        let v = x[base + j];
        if (beats(bv, bi, v, j)) {
            bv = v;
            bi = j;
        }
    }
    vals[iv.lid] = bv;
    idxs[iv.lid] = bi;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (iv.lid < s && beats(vals[iv.lid], idxs[iv.lid], vals[iv.lid + s], idxs[iv.lid + s])) {
            vals[iv.lid] = vals[iv.lid + s];
            idxs[iv.lid] = idxs[iv.lid + s];
        }
        workgroupBarrier();
    }
    if (iv.lid == 0u) {
        out[row] = idxs[0];
    }
}
