//! Generated bodies of the subgroup-broadcast attention passes (`attn_qk_sg8`, `attn_pv_sg8`):
//! gemm_sg8's register-blocked design (see gemm_sg8.wgsl for why it suits llvmpipe) applied to
//! the two products of attention, one head at a time. Named `#gen attn_qk_sg8:RS:D` and
//! `#gen attn_pv_sg8:RS:D` (RS queries per subgroup, head size D): the kernel files pass
//! `{{RS}}` and `{{HEAD_DIM}}` through the `#gen` line.
//!
//! Batch invariance: every score is one fma chain over the head dimension in order, and every
//! output one fma chain over the keys in order, whatever RS is (RS only says how many queries
//! share the loaded K and V values), so a query gets the same bits in a call of 1 query
//! (RS = 1) as in a prefill (RS = 32).

use std::fmt::Write;

/// Keys per lane in `attn_qk_sg8` (a subgroup covers 8 × QK_CL keys).
pub const QK_CL: u32 = 16;
/// Keys per `attn_qk_sg8` workgroup (one subgroup). Dispatch (ceil(Sq / RS), ceil(keys /
/// ATTN_QK_KEYS), heads).
pub const ATTN_QK_KEYS: u32 = 8 * QK_CL;

/// Parses `NAME:RS:D` for the attention generators.
pub(crate) fn generate(name: &str) -> Option<String> {
    let mut it = name.split(':');
    let kind = it.next()?;
    let rs: u32 = it.next()?.parse().ok()?;
    let d: u32 = it.next()?.parse().ok()?;
    if it.next().is_some() || !(1..=64).contains(&rs) || d == 0 || !d.is_multiple_of(64) || d > 256
    {
        return None;
    }
    match kind {
        "attn_qk_sg8" => Some(qk_main(rs, d)),
        "attn_pv_sg8" => Some(pv_main(rs, d)),
        _ => None,
    }
}

const COMP: [&str; 4] = ["x", "y", "z", "w"];

/// `main` of attn_qk_sg8: S[i, j] = scale · q_i·k_j for the RS queries m0.. of workgroup x and
/// the keys j0 = wid.y · 128 + lane · 16 .. + 16 of each lane, head p.h0 + wid.z. Per 8 head
/// elements a lane loads one q value per query (element d + lane, shared by constant-lane
/// broadcasts) and 8 elements of each of its 16 key rows.
fn qk_main(rs: u32, d: u32) -> String {
    let cl = QK_CL;
    let mut o = String::with_capacity(64 * 1024);
    let w = &mut o;
    // Writing to a String cannot fail.
    let _ = writeln!(w, "@compute @workgroup_size(8)");
    let _ = writeln!(
        w,
        "fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wid: vec3<u32>) {{"
    );
    let _ = writeln!(w, "    let m0 = wid.x * {rs}u;");
    let _ = writeln!(w, "    let vl = visible(min(m0 + {rs}u, p.sq) - 1u);");
    let _ = writeln!(w, "    let j0 = wid.y * {}u;", 8 * cl);
    // Key blocks no query of the block sees (causal) are skipped whole (no barriers).
    let _ = writeln!(w, "    if (j0 >= vl) {{\n        return;\n    }}");
    let _ = writeln!(w, "    let h = p.h0 + wid.z;");
    let _ = writeln!(w, "    let n0 = j0 + lane * {cl}u;");
    let _ = writeln!(w, "    let qb = p.q0 * p.qw + h * {d}u + lane;");
    // Rows past the end are clamped, not skipped: every lane takes part in the broadcasts.
    for r in 0..rs {
        let _ = writeln!(w, "    let xr{r} = qb + min(m0 + {r}u, p.sq - 1u) * p.qw;");
    }
    let _ = writeln!(w, "#if KV16");
    let _ = writeln!(w, "    let kr = p.kw / 8u;");
    let _ = writeln!(w, "    let ko = (h / p.group) * {}u;", d / 8);
    let _ = writeln!(w, "#else");
    let _ = writeln!(w, "    let kr = p.kw / 4u;");
    let _ = writeln!(w, "    let ko = (h / p.group) * {}u;", d / 4);
    let _ = writeln!(w, "#endif");
    for c in 0..cl {
        let _ = writeln!(
            w,
            "    let wr{c} = min(n0 + {c}u, p.kv_len - 1u) * kr + ko;"
        );
    }
    for r in 0..rs {
        for c in 0..cl {
            let _ = writeln!(w, "    var a{r}_{c} = 0.0;");
        }
    }
    let _ = writeln!(w, "    for (var i = 0u; i < {}u; i++) {{", d / 8);
    let _ = writeln!(w, "        let k = i * 8u;");
    for r in 0..rs {
        let _ = writeln!(w, "        let x{r} = q[xr{r} + k];");
    }
    let _ = writeln!(w, "#if KV16");
    for c in 0..cl {
        let _ = writeln!(w, "        let kq{c} = kb[wr{c} + i];");
        for (j, comp) in COMP.iter().enumerate() {
            let _ = writeln!(w, "        let u{c}_{j} = unpack2x16float(kq{c}.{comp});");
        }
        for kk in 0..8 {
            let h = if kk % 2 == 0 { "x" } else { "y" };
            let _ = writeln!(w, "        let w{c}_{kk} = u{c}_{}.{h};", kk / 2);
        }
    }
    let _ = writeln!(w, "#else");
    for c in 0..cl {
        let _ = writeln!(w, "        let kq{c}_0 = kb[wr{c} + 2u * i];");
        let _ = writeln!(w, "        let kq{c}_1 = kb[wr{c} + 2u * i + 1u];");
        for kk in 0..8 {
            let _ = writeln!(
                w,
                "        let w{c}_{kk} = kq{c}_{}.{};",
                kk / 4,
                COMP[kk % 4]
            );
        }
    }
    let _ = writeln!(w, "#endif");
    for r in 0..rs {
        let _ = writeln!(w, "        {{");
        for kk in 0..8 {
            let _ = writeln!(w, "        let b{kk} = subgroupBroadcast(x{r}, {kk}u);");
        }
        for c in 0..cl {
            let mut e = format!("a{r}_{c}");
            for kk in 0..8 {
                e = format!("fma(b{kk}, w{c}_{kk}, {e})");
            }
            let _ = writeln!(w, "        a{r}_{c} = {e};");
        }
        let _ = writeln!(w, "        }}");
    }
    let _ = writeln!(w, "    }}");
    // Scores of keys the block's last query sees (the others are never read), and each
    // query's max over the keys of this block it sees (exact in any order).
    for r in 0..rs {
        let _ = writeln!(w, "    if (m0 + {r}u < p.sq) {{");
        let _ = writeln!(w, "        let i = m0 + {r}u;");
        let _ = writeln!(w, "        let vr = visible(i);");
        let _ = writeln!(
            w,
            "        let sr = ((wid.z * p.sq + i) * p.kpad + n0) / 4u;"
        );
        let _ = writeln!(w, "        var mx = -3.402823e38;");
        for c in 0..cl {
            let _ = writeln!(w, "        let s{c} = a{r}_{c} * p.scale;");
            let _ = writeln!(
                w,
                "        mx = max(mx, select(-3.402823e38, s{c}, n0 + {c}u < vr));"
            );
        }
        // Whole vec4s (a quarter of the per-lane stores) up to the row's end: scores past
        // what the block sees are never read.
        for t in 0..cl / 4 {
            let _ = writeln!(
                w,
                "        if (n0 + {}u < p.kpad) {{ s[sr + {t}u] = vec4<f32>(s{}, s{}, s{}, s{}); }}",
                4 * t,
                4 * t,
                4 * t + 1,
                4 * t + 2,
                4 * t + 3
            );
        }
        let _ = writeln!(w, "        mx = subgroupMax(mx);");
        let _ = writeln!(
            w,
            "        if (lane == 0u) {{ bm[(wid.z * p.sq + i) * p.nkb + wid.y] = mx; }}"
        );
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    o
}

/// `main` of attn_pv_sg8: O[i] = (Σ_j P[i, j] V[j]) / l_i (+ S_i / l_i · V[sink]) for the RS
/// queries m0.. of workgroup x, head p.h0 + wid.y; lane l owns the 8-column chunks l, l + 8,
/// .. of the head (D / 8 columns). Per 8 keys a lane loads one score per query (key j0 +
/// lane), makes it a probability (exp(s - m), the mask; 0 past what the query sees), adds it
/// to its partial sums of l and S and shares it by broadcasts, and loads its chunks of the 8 V
/// rows. Lane k sums keys k, k + 8, .. in order, and the lanes' sums are added in lane order.
fn pv_main(rs: u32, d: u32) -> String {
    let nt = d / 64; // chunks per lane
    let cpl = 8 * nt; // columns per lane
    let mut o = String::with_capacity(64 * 1024);
    let w = &mut o;
    let _ = writeln!(w, "@compute @workgroup_size(8)");
    let _ = writeln!(
        w,
        "fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wid: vec3<u32>) {{"
    );
    let _ = writeln!(w, "    let m0 = wid.x * {rs}u;");
    let _ = writeln!(w, "    let h = p.h0 + wid.y;");
    let _ = writeln!(w, "    let vl = visible(min(m0 + {rs}u, p.sq) - 1u);");
    let _ = writeln!(w, "    let sb = wid.y * p.sq * p.kpad + lane;");
    for r in 0..rs {
        let _ = writeln!(w, "    let ri{r} = min(m0 + {r}u, p.sq - 1u);");
        let _ = writeln!(w, "    let sr{r} = sb + ri{r} * p.kpad;");
        let _ = writeln!(w, "    let vr{r} = visible(ri{r});");
        let _ = writeln!(w, "    let row{r} = p.q_offset + ri{r};");
        // The row max from attn_qk_sg8's per-block maxes (uniform loads).
        let _ = writeln!(w, "    let bb{r} = (wid.y * p.sq + ri{r}) * p.nkb;");
        let _ = writeln!(w, "    var mx{r} = -3.402823e38;");
        let _ = writeln!(
            w,
            "    for (var b = 0u; b * {ATTN_QK_KEYS}u < vr{r}; b++) {{ mx{r} = max(mx{r}, bm[bb{r} + b]); }}"
        );
        let _ = writeln!(w, "    var l{r} = 0.0;");
        let _ = writeln!(w, "    var z{r} = 0.0;");
    }
    let _ = writeln!(w, "#if KV16");
    let _ = writeln!(w, "    let kr = p.kw / 8u;");
    let _ = writeln!(w, "    let ko = (h / p.group) * {}u + lane;", d / 8);
    let _ = writeln!(w, "#else");
    let _ = writeln!(w, "    let kr = p.kw / 4u;");
    let _ = writeln!(w, "    let ko = (h / p.group) * {}u + 2u * lane;", d / 4);
    let _ = writeln!(w, "#endif");
    for r in 0..rs {
        for c in 0..cpl {
            let _ = writeln!(w, "    var a{r}_{c} = 0.0;");
        }
    }
    let _ = writeln!(w, "    for (var j0 = 0u; j0 < vl; j0 += 8u) {{");
    let _ = writeln!(w, "        let jl = j0 + lane;");
    for r in 0..rs {
        let _ = writeln!(
            w,
            "        let e{r} = select(0.0, exp(s[sr{r} + j0] - mx{r}), jl < vr{r});"
        );
        let _ = writeln!(w, "        l{r} += e{r};");
        // Without mask rules the kept probability is e (what the rules give where none
        // covers a key): the MASK variant only costs time where a layer has rules.
        let _ = writeln!(w, "#if MASK");
        let _ = writeln!(w, "        let kd{r} = mask_kind(row{r}, jl);");
        let _ = writeln!(w, "        z{r} += select(0.0, e{r}, kd{r} == 2u);");
        let _ = writeln!(w, "        let x{r} = select(0.0, e{r}, kd{r} == 0u);");
        let _ = writeln!(w, "#else");
        let _ = writeln!(w, "        let x{r} = e{r};");
        let _ = writeln!(w, "#endif");
    }
    for kk in 0..8 {
        let _ = writeln!(
            w,
            "        let vrow{kk} = min(j0 + {kk}u, p.kv_len - 1u) * kr + ko;"
        );
    }
    // w{kk}_{c}: column c of the lane (chunk c / 8, element c % 8) of key j0 + kk.
    let _ = writeln!(w, "#if KV16");
    for kk in 0..8 {
        for t in 0..nt {
            let _ = writeln!(w, "        let vq{kk}_{t} = vb[vrow{kk} + {}u];", 8 * t);
            for (j, comp) in COMP.iter().enumerate() {
                let _ = writeln!(
                    w,
                    "        let vu{kk}_{t}_{j} = unpack2x16float(vq{kk}_{t}.{comp});"
                );
            }
            for e in 0..8 {
                let h = if e % 2 == 0 { "x" } else { "y" };
                let _ = writeln!(
                    w,
                    "        let w{kk}_{} = vu{kk}_{t}_{}.{h};",
                    8 * t + e,
                    e / 2
                );
            }
        }
    }
    let _ = writeln!(w, "#else");
    for kk in 0..8 {
        for t in 0..nt {
            let _ = writeln!(w, "        let vq{kk}_{t}_0 = vb[vrow{kk} + {}u];", 16 * t);
            let _ = writeln!(
                w,
                "        let vq{kk}_{t}_1 = vb[vrow{kk} + {}u];",
                16 * t + 1
            );
            for e in 0..8 {
                let _ = writeln!(
                    w,
                    "        let w{kk}_{} = vq{kk}_{t}_{}.{};",
                    8 * t + e,
                    e / 4,
                    COMP[(e % 4) as usize]
                );
            }
        }
    }
    let _ = writeln!(w, "#endif");
    for r in 0..rs {
        let _ = writeln!(w, "        {{");
        for kk in 0..8 {
            let _ = writeln!(w, "        let b{kk} = subgroupBroadcast(x{r}, {kk}u);");
        }
        for c in 0..cpl {
            let mut e = format!("a{r}_{c}");
            for kk in 0..8 {
                e = format!("fma(b{kk}, w{kk}_{c}, {e})");
            }
            let _ = writeln!(w, "        a{r}_{c} = {e};");
        }
        let _ = writeln!(w, "        }}");
    }
    let _ = writeln!(w, "    }}");
    // o = acc / l, plus S / l times the sink's V row where a sink rule redirects.
    for r in 0..rs {
        let _ = writeln!(w, "    if (m0 + {r}u < p.sq) {{");
        let _ = writeln!(w, "        let i = m0 + {r}u;");
        let _ = writeln!(
            w,
            "        let ob = (p.q0 + i) * p.qw + h * {d}u + 8u * lane;"
        );
        let mut e = format!("subgroupBroadcast(l{r}, 0u)");
        for k in 1..8 {
            e = format!("{e} + subgroupBroadcast(l{r}, {k}u)");
        }
        let _ = writeln!(w, "        let l = {e};");
        let _ = writeln!(w, "#if MASK");
        let mut e = format!("subgroupBroadcast(z{r}, 0u)");
        for k in 1..8 {
            e = format!("{e} + subgroupBroadcast(z{r}, {k}u)");
        }
        let _ = writeln!(w, "        let si = {e};");
        let _ = writeln!(w, "        let sf = si / l;");
        let _ = writeln!(w, "        let row = p.q_offset + i;");
        let _ = writeln!(w, "        let rd = sink_redirect(row, vr{r});");
        let _ = writeln!(
            w,
            "        let tr = min(select(0u, sink_target(row), rd), p.kv_len - 1u) * kr + ko;"
        );
        for t in 0..nt {
            let _ = writeln!(w, "#if KV16");
            let _ = writeln!(w, "        let tq{t} = vb[tr + {}u];", 8 * t);
            for (j, comp) in COMP.iter().enumerate() {
                let _ = writeln!(w, "        let tu{t}_{j} = unpack2x16float(tq{t}.{comp});");
            }
            for e in 0..8 {
                let h = if e % 2 == 0 { "x" } else { "y" };
                let _ = writeln!(w, "        let t{} = tu{t}_{}.{h};", 8 * t + e, e / 2);
            }
            let _ = writeln!(w, "#else");
            let _ = writeln!(w, "        let tq{t}_0 = vb[tr + {}u];", 16 * t);
            let _ = writeln!(w, "        let tq{t}_1 = vb[tr + {}u];", 16 * t + 1);
            for e in 0..8 {
                let _ = writeln!(
                    w,
                    "        let t{} = tq{t}_{}.{};",
                    8 * t + e,
                    e / 4,
                    COMP[(e % 4) as usize]
                );
            }
            let _ = writeln!(w, "#endif");
            for e in 0..8 {
                let c = 8 * t + e;
                let _ = writeln!(w, "        let o{c} = a{r}_{c} / l;");
                let _ = writeln!(
                    w,
                    "        out[ob + {}u] = select(o{c}, fma(sf, t{c}, o{c}), rd);",
                    64 * t + e
                );
            }
        }
        let _ = writeln!(w, "#else");
        for t in 0..nt {
            for e in 0..8 {
                let _ = writeln!(
                    w,
                    "        out[ob + {}u] = a{r}_{} / l;",
                    64 * t + e,
                    8 * t + e
                );
            }
        }
        let _ = writeln!(w, "#endif");
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    o
}
