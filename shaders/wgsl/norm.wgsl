#if F16
enable f16;
#endif
// norm: rms_norm, layer_norm and softmax over the last dim; one workgroup (256) per row,
// 2-D dispatch over the rows.
// bindings: 0 uniform P, 1 x [rows, n] f32, 2 w [n] f32, 3 b [n] f32, 4 out [rows, n] f32
// (softmax uses 1 and 4 only, rms_norm 1, 2 and 4).
#include common
const WG: u32 = 256u;
#include reduce

struct P { rows: u32, n: u32, eps: f32, pad: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn rms_norm(iv: Inv) {
    let row = flat_group(iv);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var s = 0.0;
    for (var j = iv.lid; j < p.n; j += WG) {
        let v = x[base + j];
        s += v * v;
    }
    let ms = wg_sum(s, iv.lid, sg_of(iv)) / f32(p.n);
    let inv = 1.0 / sqrt(ms + p.eps);
    for (var j = iv.lid; j < p.n; j += WG) {
        out[base + j] = w[j] * (x[base + j] * inv);
    }
}

@compute @workgroup_size(256)
fn layer_norm(iv: Inv) {
    let row = flat_group(iv);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var s = 0.0;
    for (var j = iv.lid; j < p.n; j += WG) {
        s += x[base + j];
    }
    let mean = wg_sum(s, iv.lid, sg_of(iv)) / f32(p.n);
    // Two passes (mean, then squared deviations): no cancellation on rows with a large mean.
    var q = 0.0;
    for (var j = iv.lid; j < p.n; j += WG) {
        let d = x[base + j] - mean;
        q += d * d;
    }
    let var_ = wg_sum(q, iv.lid, sg_of(iv)) / f32(p.n);
    let inv = 1.0 / sqrt(var_ + p.eps);
    for (var j = iv.lid; j < p.n; j += WG) {
        out[base + j] = ((x[base + j] - mean) * inv) * w[j] + b[j];
    }
}

@compute @workgroup_size(256)
fn softmax(iv: Inv) {
    let row = flat_group(iv);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var m = -3.402823e38;
    for (var j = iv.lid; j < p.n; j += WG) {
        m = max(m, x[base + j]);
    }
    let mx = wg_max(m, iv.lid, sg_of(iv));
    var s = 0.0;
    for (var j = iv.lid; j < p.n; j += WG) {
        let e = exp(x[base + j] - mx);
        out[base + j] = e;
        s += e;
    }
    let total = wg_sum(s, iv.lid, sg_of(iv));
    // Each invocation rescales the entries it wrote itself.
    for (var j = iv.lid; j < p.n; j += WG) {
        out[base + j] = out[base + j] / total;
    }
}
