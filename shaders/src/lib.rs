//! WGSL compute kernels of visi and their tiny preprocessor.
//!
//! Every kernel lives in its own file under `shaders/wgsl/` (one op family per file). The
//! preprocessor understands, line by line:
//! - `#if NAME` / `#else` / `#endif` (nestable): keep lines when flag `NAME` is set;
//! - `#include NAME`: paste the snippet `NAME` (see [`snippet`]), preprocessed with the same flags;
//! - `#gen NAME`: paste generated text (see `unrolled.rs` and `attn_sg8.rs`: unrolled kernel
//!   bodies), preprocessed alike; `{{..}}` in NAME is substituted first
//!   (`#gen attn_qk_sg8:{{RS}}:{{HEAD_DIM}}`);
//! - `{{NAME}}` anywhere in a line: replaced by the substitution's value.
//!
//! Flags used by the kernels: `F16` (the adapter has `shader-f16`; emits `enable f16;`),
//! `SUBGROUPS` (subgroup reductions), `W16` (weights are f16 packed two per u32), `VEC`
//! (vectorised weight loads), `BIAS`, `KV16` (attention K/V are an f16 cache), `MASK`
//! (`attn_pv_sg8`: apply mask rules).

use std::fmt;

mod attn_sg8;
mod unrolled;
pub use attn_sg8::ATTN_QK_KEYS;
pub use unrolled::GEMM_SG8_TILE;

/// One kernel source: its name, WGSL text, the flags it reacts to, and the substitutions it needs
/// (with a default value used when validating every variant).
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// Kernel family name (also the file stem).
    pub name: &'static str,
    /// Raw WGSL with preprocessor directives.
    pub source: &'static str,
    /// Flags the source tests with `#if`.
    pub flags: &'static [&'static str],
    /// `{{NAME}}` substitutions with a representative default.
    pub subs: &'static [(&'static str, &'static str)],
}

macro_rules! kernel {
    ($name:literal, $flags:expr, $subs:expr) => {
        Kernel {
            name: $name,
            source: include_str!(concat!("../wgsl/", $name, ".wgsl")),
            flags: $flags,
            subs: $subs,
        }
    };
}

/// Kernels that need an experimental wgpu feature (`gemm_coop`: cooperative matrices). The
/// backend builds them only where the adapter has the feature; naga validates them in tests
/// with that capability. Not in [`KERNELS`]: the translation tests cover the portable kernels.
pub const EXPERIMENTAL_KERNELS: &[Kernel] = &[kernel!("gemm_coop", &["W16", "BIAS"], &[])];

/// Every kernel family.
pub const KERNELS: &[Kernel] = &[
    kernel!("elementwise", &["F16"], &[]),
    kernel!("norm", &["F16", "SUBGROUPS"], &[]),
    kernel!("rope", &["F16"], &[]),
    kernel!("gemm", &["F16", "W16", "VEC", "BIAS"], &[]),
    kernel!("gemv", &["F16", "W16", "VEC", "BIAS"], &[("M", "16")]),
    kernel!("gemm_sg8", &["BIAS"], &[]),
    kernel!("gemv_sg8", &["BIAS", "TILE"], &[("M", "16"), ("CL", "16")]),
    kernel!("attention", &["F16"], &[("HEAD_DIM", "128"), ("TK", "16")]),
    kernel!(
        "flash_attn",
        &["F16", "KV16"],
        &[
            ("HEAD_DIM", "128"),
            ("BQ", "16"),
            ("BK", "32"),
            ("TPR", "8"),
            ("WG", "128")
        ]
    ),
    kernel!(
        "flash_attn_k",
        &["F16", "KV16"],
        &[("HEAD_DIM", "128"), ("BQ", "16"), ("WG", "32"), ("NC", "1")]
    ),
    kernel!("flash_combine", &["F16", "KV16"], &[("HEAD_DIM", "128")]),
    kernel!(
        "attn_qk_sg8",
        &["KV16"],
        &[("RS", "32"), ("HEAD_DIM", "128")]
    ),
    kernel!(
        "attn_pv_sg8",
        &["KV16", "MASK"],
        &[("RS", "32"), ("HEAD_DIM", "128")]
    ),
    kernel!("attention_probs", &["F16", "SUBGROUPS", "KV16"], &[]),
    kernel!("contrib", &["F16", "SUBGROUPS", "KV16"], &[]),
    kernel!("embedding", &["F16", "W16"], &[]),
    kernel!("copy", &["F16"], &[]),
    kernel!("argmax", &["F16"], &[]),
    kernel!("bench", &["F16"], &[]),
    kernel!(
        "gemv_q",
        &["BIAS"],
        &[
            ("M", "16"),
            ("QT", "0"),
            ("QBS", "32"),
            ("QBB", "34"),
            ("QPK", "0")
        ]
    ),
    kernel!(
        "gemm_q",
        &["BIAS"],
        &[("QT", "0"), ("QBS", "32"), ("QBB", "34"), ("QPK", "0")]
    ),
    kernel!(
        "embedding_q",
        &[],
        &[("QT", "0"), ("QBS", "32"), ("QBB", "34"), ("QPK", "0")]
    ),
    kernel!(
        "gemv_q_sg8",
        &["BIAS"],
        &[
            ("M", "16"),
            ("QT", "0"),
            ("QBS", "32"),
            ("QBB", "34"),
            ("QPK", "0")
        ]
    ),
    kernel!(
        "gemm_q_sg8",
        &["BIAS"],
        &[("QT", "0"), ("QBS", "32"), ("QBB", "34"), ("QPK", "0")]
    ),
];

/// `{{QT}}`, `{{QBS}}`, `{{QBB}}` of the quantized kernels (`*_q`, snippet `quant`) for each
/// GGUF format: format code, weights per block, bytes per block (Q8_0, Q4_0, Q4_1, Q4_K).
/// `{{QPK}}` is 1 where the backend re-packed Q8_0/Q4_0 rows (see quant.wgsl).
pub const QUANT_SUBS: [[u32; 3]; 4] = [[0, 32, 34], [1, 32, 18], [2, 32, 20], [3, 256, 144]];

/// Shared snippets for `#include`.
const SNIPPETS: &[(&str, &str)] = &[
    ("common", include_str!("../wgsl/common.wgsl")),
    ("reduce", include_str!("../wgsl/reduce.wgsl")),
    ("mask", include_str!("../wgsl/mask.wgsl")),
    ("quant", include_str!("../wgsl/quant.wgsl")),
];

/// The kernel family `name`, if it exists.
pub fn kernel(name: &str) -> Option<&'static Kernel> {
    KERNELS
        .iter()
        .chain(EXPERIMENTAL_KERNELS)
        .find(|k| k.name == name)
}

/// The snippet `name` (for `#include`), if it exists.
pub fn snippet(name: &str) -> Option<&'static str> {
    SNIPPETS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// A preprocessing failure, with the line it happened on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreprocessError {
    /// 1-based line number in the file being processed.
    pub line: usize,
    /// What went wrong.
    pub msg: String,
}

impl fmt::Display for PreprocessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.msg)
    }
}

impl std::error::Error for PreprocessError {}

/// Preprocesses `src` with the set `flags` and `{{NAME}}` substitutions `subs`.
pub fn preprocess(
    src: &str,
    flags: &[&str],
    subs: &[(&str, String)],
) -> Result<String, PreprocessError> {
    let mut out = String::with_capacity(src.len() + 256);
    expand(src, flags, subs, &mut out, 0)?;
    Ok(out)
}

fn expand(
    src: &str,
    flags: &[&str],
    subs: &[(&str, String)],
    out: &mut String,
    depth: usize,
) -> Result<(), PreprocessError> {
    if depth > 8 {
        return Err(PreprocessError {
            line: 0,
            msg: "#include nests too deep".into(),
        });
    }
    // Stack of (this branch is taken, some enclosing branch is dropped).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &[(bool, bool)]| stack.iter().all(|(on, _)| *on);
    for (i, line) in src.lines().enumerate() {
        let err = |msg: String| PreprocessError { line: i + 1, msg };
        let t = line.trim();
        if let Some(name) = t.strip_prefix("#if ") {
            stack.push((flags.contains(&name.trim()), false));
        } else if t == "#else" {
            let top = stack
                .last_mut()
                .ok_or_else(|| err("#else without #if".into()))?;
            if top.1 {
                return Err(err("second #else".into()));
            }
            *top = (!top.0, true);
        } else if t == "#endif" {
            stack
                .pop()
                .ok_or_else(|| err("#endif without #if".into()))?;
        } else if let Some(name) = t.strip_prefix("#include ") {
            if active(&stack) {
                let s = snippet(name.trim())
                    .ok_or_else(|| err(format!("unknown snippet `{}`", name.trim())))?;
                expand(s, flags, subs, out, depth + 1)?;
            }
        } else if let Some(name) = t.strip_prefix("#gen ") {
            if active(&stack) {
                let name = substitute(name.trim(), subs).map_err(err)?;
                let s = unrolled::generate(&name)
                    .or_else(|| attn_sg8::generate(&name))
                    .ok_or_else(|| err(format!("unknown generator `{name}`")))?;
                expand(&s, flags, subs, out, depth + 1)?;
            }
        } else if t.starts_with('#') {
            return Err(err(format!("unknown directive `{t}`")));
        } else if active(&stack) {
            out.push_str(&substitute(line, subs).map_err(err)?);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(PreprocessError {
            line: src.lines().count(),
            msg: "missing #endif".into(),
        });
    }
    Ok(())
}

/// `line` with every `{{NAME}}` replaced by its value in `subs`.
fn substitute(line: &str, subs: &[(&str, String)]) -> Result<String, String> {
    let mut l = line.to_string();
    while let Some(a) = l.find("{{") {
        let b = l[a..].find("}}").ok_or("unclosed {{")? + a;
        let name = &l[a + 2..b];
        let v = subs
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| format!("no value for {{{{{name}}}}}"))?;
        l.replace_range(a..b + 2, &v.1);
    }
    Ok(l)
}

/// Preprocessed source of kernel `name` with `flags` and `subs`.
pub fn build(
    name: &str,
    flags: &[&str],
    subs: &[(&str, String)],
) -> Result<String, PreprocessError> {
    let k = kernel(name).ok_or_else(|| PreprocessError {
        line: 0,
        msg: format!("unknown kernel `{name}`"),
    })?;
    preprocess(k.source, flags, subs)
}

/// Every flag combination of `k` (the power set of its flags), for validation.
pub fn all_variants(k: &Kernel) -> Vec<Vec<&'static str>> {
    (0u32..1 << k.flags.len())
        .map(|mask| {
            k.flags
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, f)| *f)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives() {
        let src = "a\n#if X\nb\n#if Y\nc\n#else\nd\n#endif\n#else\ne\n#endif\nf {{N}}\n";
        let subs = [("N", "7".to_string())];
        assert_eq!(preprocess(src, &["X"], &subs).unwrap(), "a\nb\nd\nf 7\n");
        assert_eq!(
            preprocess(src, &["X", "Y"], &subs).unwrap(),
            "a\nb\nc\nf 7\n"
        );
        assert_eq!(preprocess(src, &[], &subs).unwrap(), "a\ne\nf 7\n");
        assert!(preprocess("#if X\n", &[], &[]).is_err());
        assert!(preprocess("#endif\n", &[], &[]).is_err());
        assert!(preprocess("{{M}}\n", &[], &[]).is_err());
    }

    #[test]
    fn generated_bodies() {
        assert!(preprocess("#gen nothing\n", &[], &[]).is_err());
        // The generated gemm_sg8 body takes the BIAS flag through its own #if lines.
        let with = preprocess("#gen gemm_sg8_main\n", &["BIAS"], &[]).unwrap();
        let without = preprocess("#gen gemm_sg8_main\n", &[], &[]).unwrap();
        assert!(with.contains("bias[") && !without.contains("bias["));
        let (tm, tn) = GEMM_SG8_TILE;
        assert!(
            with.contains(&format!("wid.x * {tm}u")),
            "M tile {tm} not in the body"
        );
        assert!(
            with.contains(&format!("wid.y * {tn}u")),
            "N tile {tn} not in the body"
        );
        // gemv_sg8's TILE variant: the same body with its own block (RS:CL:SG), out-of-range
        // blocks refused.
        let t = preprocess("#gen gemm_sg8_main:8:16:1\n", &[], &[]).unwrap();
        assert!(t.contains("@workgroup_size(8)") && t.contains("wid.y * 128u"));
        assert!(t.contains("var a7_15 ") && !t.contains("var a8_0 ") && !t.contains("var a0_16 "));
        for bad in [
            "0:16:1", "8:0:1", "8:16:0", "65:16:1", "8:16", "8:16:1:1", "x:16:1",
        ] {
            let src = format!("#gen gemm_sg8_main:{bad}\n");
            assert!(preprocess(&src, &[], &[]).is_err(), "{bad} accepted");
        }
        let gemv = |flags: &[&str]| {
            build("gemv_sg8", flags, &[("M", "8".into()), ("CL", "16".into())]).unwrap()
        };
        assert!(gemv(&["TILE"]).contains("var a7_15 ") && !gemv(&[]).contains("var a7_15 "));
    }
}
