//! The uniform (`@binding(0) var<uniform> p: P`) of every kernel, as one `#[repr(C)]` Pod
//! struct each, with the WGSL struct's member names. [`Ctx::dispatch`](crate::ctx::Ctx)
//! takes one of these, never loose words; [`KERNEL_UNIFORMS`] says which struct each kernel
//! reads, and the test at the bottom reflects every kernel variant's `struct P` with naga and
//! checks its size and every member's name, offset, size and scalar type against the Rust
//! struct, so neither side can drift.

use bytemuck::{Pod, Zeroable};
use engine_core::{AttentionParams, MaskAction};

/// One member of a uniform struct, as the layout test compares it.
#[cfg_attr(not(test), allow(dead_code))] // read by the layout test only
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
    /// f32 (true) or u32 (false) scalars.
    pub float: bool,
}

/// A kernel uniform: plain bytes with a known layout.
pub(crate) trait Uniform: Pod {
    /// The members in declaration order.
    #[cfg_attr(not(test), allow(dead_code))] // read by the layout test only
    const FIELDS: &'static [Field];
}

/// Whether a member type holds f32 scalars.
#[cfg_attr(not(test), allow(dead_code))] // read by the layout test only
pub(crate) trait Scalars {
    const FLOAT: bool;
}
impl Scalars for u32 {
    const FLOAT: bool = false;
}
impl Scalars for f32 {
    const FLOAT: bool = true;
}
impl<T: Scalars, const N: usize> Scalars for [T; N] {
    const FLOAT: bool = T::FLOAT;
}

macro_rules! uniform {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Pod, Zeroable)]
        pub(crate) struct $name {
            $($(#[$fm])* pub $f: $t),*
        }
        impl Uniform for $name {
            const FIELDS: &'static [Field] = &[$(Field {
                name: stringify!($f),
                offset: std::mem::offset_of!($name, $f),
                size: std::mem::size_of::<$t>(),
                float: <$t as Scalars>::FLOAT,
            }),*];
        }
    };
}

/// The most mask rules a uniform carries (engine_core::MAX_MASK_RULES), two vec4 each.
pub(crate) const RULE_WORDS: usize = 2 * engine_core::MAX_MASK_RULES;

uniform!(
    /// elementwise.wgsl: element count, row width (broadcast), the second operand's length.
    ElementwiseP { len: u32, n: u32, b_len: u32, pad: u32 }
);
uniform!(
    /// norm.wgsl: rows × n, epsilon.
    NormP { rows: u32, n: u32, eps: f32, pad: u32 }
);
uniform!(
    /// rope.wgsl: rows × width, head size.
    RopeP { rows: u32, width: u32, head_dim: u32, pad: u32 }
);
uniform!(
    /// argmax.wgsl: rows × n.
    ArgmaxP { rows: u32, n: u32, p0: u32, p1: u32 }
);
uniform!(
    /// embedding.wgsl: ids, row width, the table chunk's rows v0..v1.
    EmbeddingP { s: u32, d: u32, v0: u32, v1: u32 }
);
uniform!(
    /// embedding_q.wgsl: ids, row width, the table chunk's rows v0..v1.
    EmbeddingQP { s: u32, k: u32, v0: u32, v1: u32 }
);
uniform!(
    /// bench.wgsl: `u0` iterations (peak_fma) or vec4 count (peak_copy).
    BenchP { u0: u32, u1: u32, u2: u32, u3: u32 }
);
uniform!(
    /// The matmul kernels (gemm, gemv and their sg8/q/coop variants): x `[m, k]`, a weight
    /// chunk of `rows` rows that are output columns `n_off..` of `n`.
    MatmulP { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
);
uniform!(
    /// copy.wgsl: one struct, read per entry point (copy16: dst_off, src_off, count, w0,
    /// words; gather32: count, words; im2col: count, c, h, w, patch, gw, kdim; casts: count).
    CopyP { u0: u32, u1: u32, u2: u32, u3: u32, u4: u32, u5: u32, u6: u32, u7: u32 }
);
uniform!(
    /// contrib.wgsl: heads, head size, keys, GQA group, K/V row width, the key range.
    ContribP { h: u32, d: u32, n: u32, group: u32, kw: u32, start: u32, count: u32, pad: u32 }
);
uniform!(
    /// attention.wgsl (per-query kernel): the shared attention words, the pass's keys
    /// kb0..kb1 (first/last pass flags), the mask rules.
    AttentionP {
        sq: u32, kv_len: u32, q_offset: u32, causal: u32,
        mask: u32, ms: u32, me: u32, group: u32,
        qw: u32, kw: u32, scale: f32, pad: u32,
        kb0: u32, kb1: u32, first: u32, last: u32,
        rules: [[u32; 4]; RULE_WORDS],
    }
);
uniform!(
    /// flash_attn.wgsl, flash_attn_k.wgsl, flash_combine.wgsl: keys per split and splits.
    FlashP {
        sq: u32, kv_len: u32, q_offset: u32, causal: u32,
        mask: u32, split: u32, nsplit: u32, group: u32,
        qw: u32, kw: u32, scale: f32, pad: u32,
        kb0: u32, kb1: u32, first: u32, last: u32,
        rules: [[u32; 4]; RULE_WORDS],
    }
);
uniform!(
    /// attn_qk_sg8.wgsl and attn_pv_sg8.wgsl: score rows of `kpad` keys, the chunk's `nh`
    /// heads from `h0` and queries from `q0`, `nkb` key blocks.
    Sg8P {
        sq: u32, kv_len: u32, q_offset: u32, causal: u32,
        mask: u32, kpad: u32, nh: u32, group: u32,
        qw: u32, kw: u32, scale: f32, q0: u32,
        h0: u32, nkb: u32, p1: u32, p2: u32,
        rules: [[u32; 4]; RULE_WORDS],
    }
);
uniform!(
    /// attention_probs.wgsl: the last query's probabilities; `d` the head size.
    ProbsP {
        sq: u32, kv_len: u32, q_offset: u32, causal: u32,
        mask: u32, ms: u32, me: u32, group: u32,
        qw: u32, kw: u32, scale: f32, d: u32,
        rules: [[u32; 4]; RULE_WORDS],
    }
);

/// The struct each kernel reads (every kernel of `shaders::KERNELS` and
/// `shaders::EXPERIMENTAL_KERNELS`), for the layout test.
#[cfg(test)]
pub(crate) const KERNEL_UNIFORMS: &[(&str, &[Field], usize)] = &[
    (
        "elementwise",
        ElementwiseP::FIELDS,
        size_of::<ElementwiseP>(),
    ),
    ("norm", NormP::FIELDS, size_of::<NormP>()),
    ("rope", RopeP::FIELDS, size_of::<RopeP>()),
    ("gemm", MatmulP::FIELDS, size_of::<MatmulP>()),
    ("gemv", MatmulP::FIELDS, size_of::<MatmulP>()),
    ("gemm_sg8", MatmulP::FIELDS, size_of::<MatmulP>()),
    ("gemv_sg8", MatmulP::FIELDS, size_of::<MatmulP>()),
    ("gemm_q", MatmulP::FIELDS, size_of::<MatmulP>()),
    ("gemv_q", MatmulP::FIELDS, size_of::<MatmulP>()),
    ("gemm_q_sg8", MatmulP::FIELDS, size_of::<MatmulP>()),
    ("gemv_q_sg8", MatmulP::FIELDS, size_of::<MatmulP>()),
    ("gemm_coop", MatmulP::FIELDS, size_of::<MatmulP>()),
    ("attention", AttentionP::FIELDS, size_of::<AttentionP>()),
    ("flash_attn", FlashP::FIELDS, size_of::<FlashP>()),
    ("flash_attn_k", FlashP::FIELDS, size_of::<FlashP>()),
    ("flash_combine", FlashP::FIELDS, size_of::<FlashP>()),
    ("attn_qk_sg8", Sg8P::FIELDS, size_of::<Sg8P>()),
    ("attn_pv_sg8", Sg8P::FIELDS, size_of::<Sg8P>()),
    ("attention_probs", ProbsP::FIELDS, size_of::<ProbsP>()),
    ("contrib", ContribP::FIELDS, size_of::<ContribP>()),
    ("embedding", EmbeddingP::FIELDS, size_of::<EmbeddingP>()),
    ("embedding_q", EmbeddingQP::FIELDS, size_of::<EmbeddingQP>()),
    ("copy", CopyP::FIELDS, size_of::<CopyP>()),
    ("argmax", ArgmaxP::FIELDS, size_of::<ArgmaxP>()),
    ("bench", BenchP::FIELDS, size_of::<BenchP>()),
];

/// A size as a u32 uniform member, saturated (the kernels compare against it).
fn sat(v: usize) -> u32 {
    v.min(u32::MAX as usize) as u32
}

/// The mask rules as mask.wgsl reads them: (query range, key range), (kind, target) per rule,
/// kind 0 keep, 1 zero, 2 sink; and their count.
pub(crate) fn mask_rules(p: &AttentionParams) -> (u32, [[u32; 4]; RULE_WORDS]) {
    let mut w = [[0u32; 4]; RULE_WORDS];
    let rules = p.mask.rules();
    for (r, rule) in rules.as_slice().iter().enumerate() {
        let (kind, to) = match rule.action {
            MaskAction::Keep => (0, 0),
            MaskAction::Zero => (1, 0),
            MaskAction::Sink { to } => (2, sat(to)),
        };
        w[2 * r] = [
            sat(rule.queries.0),
            sat(rule.queries.1),
            sat(rule.keys.0),
            sat(rule.keys.1),
        ];
        w[2 * r + 1] = [kind, to, 0, 0];
    }
    (rules.as_slice().len() as u32, w)
}

impl FlashP {
    /// The attention words of `p` for `sq` queries, its mask rules, the rest zero.
    pub fn new(sq: usize, p: &AttentionParams) -> Self {
        let (mask, rules) = mask_rules(p);
        FlashP {
            sq: sat(sq),
            kv_len: sat(p.kv_len),
            q_offset: sat(p.q_offset),
            causal: u32::from(p.causal),
            mask,
            split: 0,
            nsplit: 0,
            group: sat(p.num_heads / p.num_kv_heads),
            qw: sat(p.num_heads * p.head_dim),
            kw: sat(p.num_kv_heads * p.head_dim),
            scale: p.scale,
            pad: 0,
            kb0: 0,
            kb1: 0,
            first: 0,
            last: 0,
            rules,
        }
    }
}

impl AttentionP {
    /// The attention words of `p` for `sq` queries, its mask rules, the rest zero.
    pub fn new(sq: usize, p: &AttentionParams) -> Self {
        let f = FlashP::new(sq, p);
        AttentionP {
            sq: f.sq,
            kv_len: f.kv_len,
            q_offset: f.q_offset,
            causal: f.causal,
            mask: f.mask,
            ms: 0,
            me: 0,
            group: f.group,
            qw: f.qw,
            kw: f.kw,
            scale: f.scale,
            pad: 0,
            kb0: 0,
            kb1: 0,
            first: 0,
            last: 0,
            rules: f.rules,
        }
    }
}

impl Sg8P {
    /// The attention words of `p` for `sq` queries, its mask rules, the rest zero.
    pub fn new(sq: usize, p: &AttentionParams) -> Self {
        let f = FlashP::new(sq, p);
        Sg8P {
            sq: f.sq,
            kv_len: f.kv_len,
            q_offset: f.q_offset,
            causal: f.causal,
            mask: f.mask,
            kpad: 0,
            nh: 0,
            group: f.group,
            qw: f.qw,
            kw: f.kw,
            scale: f.scale,
            q0: 0,
            h0: 0,
            nkb: 0,
            p1: 0,
            p2: 0,
            rules: f.rules,
        }
    }
}

impl ProbsP {
    /// The attention words of `p` for `sq` queries, head size `d`, its mask rules.
    pub fn new(sq: usize, p: &AttentionParams, d: u32) -> Self {
        let f = FlashP::new(sq, p);
        ProbsP {
            sq: f.sq,
            kv_len: f.kv_len,
            q_offset: f.q_offset,
            causal: f.causal,
            mask: f.mask,
            ms: 0,
            me: 0,
            group: f.group,
            qw: f.qw,
            kw: f.kw,
            scale: f.scale,
            d,
            rules: f.rules,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use naga::{ScalarKind, TypeInner};

    /// (name, offset, size, float) of each member of `struct P` in `module`, and its size.
    fn reflect(module: &naga::Module) -> Option<(Vec<Field>, usize)> {
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("P"))?;
        let TypeInner::Struct { members, span } = &ty.inner else {
            return None;
        };
        let fields = members
            .iter()
            .map(|m| {
                let inner = &module.types[m.ty].inner;
                let size = inner.size(module.to_ctx()) as usize;
                let scalar = match inner {
                    TypeInner::Scalar(s) => Some(*s),
                    TypeInner::Vector { scalar, .. } => Some(*scalar),
                    TypeInner::Array { base, .. } => match &module.types[*base].inner {
                        TypeInner::Scalar(s) => Some(*s),
                        TypeInner::Vector { scalar, .. } => Some(*scalar),
                        _ => None,
                    },
                    _ => None,
                };
                Field {
                    name: Box::leak(m.name.clone().unwrap_or_default().into_boxed_str()),
                    offset: m.offset as usize,
                    size,
                    float: scalar.is_some_and(|s| s.kind == ScalarKind::Float),
                }
            })
            .collect();
        Some((fields, *span as usize))
    }

    /// Every kernel, every flag combination, the generated sg8 attention at each query block
    /// size: its `struct P` equals the Rust uniform member for member.
    #[test]
    fn every_kernel_uniform_matches_its_rust_struct() {
        let mut checked = 0;
        let mut failures = Vec::new();
        for k in shaders::KERNELS.iter().chain(shaders::EXPERIMENTAL_KERNELS) {
            let Some((_, fields, size)) = KERNEL_UNIFORMS.iter().find(|(n, ..)| *n == k.name)
            else {
                failures.push(format!("{}: no Rust uniform in KERNEL_UNIFORMS", k.name));
                continue;
            };
            let base: Vec<(&str, String)> =
                k.subs.iter().map(|(n, v)| (*n, v.to_string())).collect();
            let mut subs_sets = vec![base.clone()];
            if k.name.starts_with("attn_") && k.name.ends_with("_sg8") {
                for rs in ["1", "4", "8"] {
                    let mut s = base.clone();
                    s.iter_mut()
                        .filter(|(n, _)| *n == "RS")
                        .for_each(|x| x.1 = rs.into());
                    subs_sets.push(s);
                }
            }
            for subs in &subs_sets {
                for flags in shaders::all_variants(k) {
                    let src = shaders::preprocess(k.source, &flags, subs).expect("preprocess");
                    let module = match naga::front::wgsl::parse_str(&src) {
                        Ok(m) => m,
                        Err(e) => {
                            failures.push(format!("{} {flags:?}: {e}", k.name));
                            continue;
                        }
                    };
                    let Some((got, span)) = reflect(&module) else {
                        failures.push(format!("{} {flags:?}: no struct P", k.name));
                        continue;
                    };
                    if got != *fields || span != *size {
                        failures.push(format!(
                            "{} {flags:?}: WGSL P ({span} bytes) {got:?}\n  Rust ({size} bytes) {fields:?}",
                            k.name
                        ));
                    }
                    checked += 1;
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert!(checked > 100, "checked only {checked} variants");
    }

    /// The layout test itself catches a drift: a struct with one member moved fails.
    #[test]
    fn a_moved_member_is_caught() {
        let src = "struct P { rows: u32, eps: f32, n: u32, pad: u32 }\n\
                   @group(0) @binding(0) var<uniform> p: P;\n\
                   @compute @workgroup_size(1) fn main() { _ = p.rows; }";
        let module = naga::front::wgsl::parse_str(src).unwrap();
        let (got, _) = reflect(&module).unwrap();
        assert_ne!(got.as_slice(), NormP::FIELDS);
    }
}
