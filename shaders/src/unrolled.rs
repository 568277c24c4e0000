//! Generated kernel text for `#gen NAME` lines: kernels whose bodies are too regular and too
//! long to write out by hand (fully unrolled register blocks), but must be straight-line WGSL
//! because the compilers that run them (llvmpipe) do not unroll or promote big loops.

use std::fmt::Write;

/// The generated text for `#gen name`, or None for an unknown name.
pub(crate) fn generate(name: &str) -> Option<String> {
    match name {
        "gemm_sg8_main" => Some(gemm_sg8_main(GEMM_SG8_RS, GEMM_SG8_CL, GEMM_SG8_SG)),
        _ => {
            // `gemm_sg8_main:RS:CL:SG`: the same body with another register block (gemv_sg8's
            // tile variant for a few x rows).
            let mut it = name.split(':');
            if it.next()? != "gemm_sg8_main" {
                return None;
            }
            let mut arg = || it.next()?.parse::<u32>().ok();
            let (rs, cl, sg) = (arg()?, arg()?, arg()?);
            if it.next().is_some()
                || !(1..=64).contains(&rs)
                || !(1..=32).contains(&cl)
                || !(1..=8).contains(&sg)
            {
                return None;
            }
            Some(gemm_sg8_main(rs, cl, sg))
        }
    }
}

/// x rows per subgroup in `gemm_sg8` (each lane keeps RS × CL accumulators).
pub const GEMM_SG8_RS: u32 = 32;
/// Weight rows per lane in `gemm_sg8` (a subgroup covers 8 × CL weight rows).
pub const GEMM_SG8_CL: u32 = 16;
/// Subgroups per `gemm_sg8` workgroup (stacked along M).
pub const GEMM_SG8_SG: u32 = 2;
/// Output tile of one `gemm_sg8` workgroup: (x rows, weight rows). Dispatch
/// (ceil(M / tile.0), ceil(rows / tile.1)).
pub const GEMM_SG8_TILE: (u32, u32) = (GEMM_SG8_RS * GEMM_SG8_SG, 8 * GEMM_SG8_CL);

/// `main` of gemm_sg8 (see gemm_sg8.wgsl for the bindings and why): subgroup s of the
/// workgroup owns x rows m0 = wid.x·RS·SG + s·RS .. + RS, lane l owns weight rows
/// n0 = wid.y·8·CL + l·CL .. + CL; per 8 k, every lane loads one x value per row (column
/// k + l) and one vec4<u32> (8 packed halves) per weight row, and the x values reach all
/// lanes by constant-lane subgroupBroadcast. Each accumulator takes its 8 FMAs of a k step
/// in one chain, so spilled accumulators (RS × CL of them) cost one load and one store per
/// 8 FMAs.
fn gemm_sg8_main(rs: u32, cl: u32, sg: u32) -> String {
    let mut o = String::with_capacity(64 * 1024);
    let w = &mut o;
    // Writing to a String cannot fail.
    let _ = writeln!(w, "@compute @workgroup_size({})", 8 * sg);
    let _ = writeln!(
        w,
        "fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {{"
    );
    let _ = writeln!(w, "    let lane = lid % 8u;");
    let _ = writeln!(w, "    let m0 = wid.x * {}u + (lid / 8u) * {rs}u;", rs * sg);
    // Whole subgroups past M have nothing to do (no barriers, so they may leave).
    let _ = writeln!(w, "    if (m0 >= p.m) {{\n        return;\n    }}");
    let _ = writeln!(w, "    let n0 = wid.y * {}u + lane * {cl}u;", 8 * cl);
    let _ = writeln!(w, "    let kv = p.k / 8u;");
    // Rows past the end are clamped, not skipped: every lane must take part in the
    // broadcasts; the store drops their results.
    for r in 0..rs {
        let _ = writeln!(w, "    let xr{r} = min(m0 + {r}u, p.m - 1u) * p.k + lane;");
    }
    for c in 0..cl {
        let _ = writeln!(w, "    let wr{c} = min(n0 + {c}u, p.rows - 1u) * kv;");
    }
    for r in 0..rs {
        for c in 0..cl {
            let _ = writeln!(w, "    var a{r}_{c} = 0.0;");
        }
    }
    let _ = writeln!(w, "    for (var i = 0u; i < kv; i++) {{");
    let _ = writeln!(w, "        let k = i * 8u;");
    for r in 0..rs {
        let _ = writeln!(w, "        let x{r} = x[xr{r} + k];");
    }
    for c in 0..cl {
        let _ = writeln!(w, "        let q{c} = w[wr{c} + i];");
    }
    for c in 0..cl {
        for (j, comp) in ["x", "y", "z", "w"].iter().enumerate() {
            let _ = writeln!(w, "        let u{c}_{j} = unpack2x16float(q{c}.{comp});");
        }
    }
    for r in 0..rs {
        let _ = writeln!(w, "        {{");
        for kk in 0..8 {
            let _ = writeln!(w, "        let b{kk} = subgroupBroadcast(x{r}, {kk}u);");
        }
        for c in 0..cl {
            let mut e = format!("a{r}_{c}");
            for kk in 0..8 {
                let h = if kk % 2 == 0 { "x" } else { "y" };
                e = format!("fma(b{kk}, u{c}_{}.{h}, {e})", kk / 2);
            }
            let _ = writeln!(w, "        a{r}_{c} = {e};");
        }
        let _ = writeln!(w, "        }}");
    }
    let _ = writeln!(w, "    }}");
    for r in 0..rs {
        let _ = writeln!(w, "    if (m0 + {r}u < p.m) {{");
        let _ = writeln!(w, "        let yr = (m0 + {r}u) * p.n + p.n_off + n0;");
        for c in 0..cl {
            let _ = writeln!(w, "        if (n0 + {c}u < p.rows) {{");
            let _ = writeln!(w, "#if BIAS");
            let _ = writeln!(
                w,
                "            y[yr + {c}u] = a{r}_{c} + bias[p.n_off + n0 + {c}u];"
            );
            let _ = writeln!(w, "#else");
            let _ = writeln!(w, "            y[yr + {c}u] = a{r}_{c};");
            let _ = writeln!(w, "#endif");
            let _ = writeln!(w, "        }}");
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    o
}
