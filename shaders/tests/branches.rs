//! The attention-mask functions stay light on branches (issue 25).
//!
//! SwiftShader's shader compiler takes time and memory exponential in the conditional branches
//! of a function: `mask_kind` and `sink_target` written as 16 `if (rule) { return ...; }`
//! tests made every attention kernel grow past 24 GB there (8 such rules: std::bad_alloc past
//! 3 GB; 6: 15 s; 4: 0.9 s). They run inside the key loops of every attention kernel, so this
//! bounds their branches in naga's IR (what every backend translates), with no driver needed.

use naga::{Block, Statement};

/// Conditional statements (`if`, `switch`) in `block`, nested ones included, and whether a
/// `return` sits inside one (an early return).
fn branches(block: &Block) -> (usize, bool) {
    let mut n = 0;
    let mut early = false;
    for s in block.iter() {
        match s {
            Statement::If { accept, reject, .. } => {
                n += 1;
                for b in [accept, reject] {
                    let (m, e) = branches(b);
                    n += m;
                    early |= e || contains_return(b);
                }
            }
            Statement::Switch { cases, .. } => {
                n += 1;
                for c in cases {
                    let (m, e) = branches(&c.body);
                    n += m;
                    early |= e || contains_return(&c.body);
                }
            }
            Statement::Block(b) => {
                let (m, e) = branches(b);
                n += m;
                early |= e;
            }
            Statement::Loop {
                body, continuing, ..
            } => {
                for b in [body, continuing] {
                    let (m, e) = branches(b);
                    n += m;
                    early |= e;
                }
            }
            _ => {}
        }
    }
    (n, early)
}

fn contains_return(block: &Block) -> bool {
    block.iter().any(|s| match s {
        Statement::Return { .. } => true,
        Statement::Block(b) => contains_return(b),
        Statement::If { accept, reject, .. } => contains_return(accept) || contains_return(reject),
        _ => false,
    })
}

#[test]
fn mask_functions_have_few_branches_and_no_early_returns() {
    // Every kernel that includes the mask snippet, at its representative substitutions.
    let mut checked = 0;
    for k in shaders::KERNELS {
        if !k.source.contains("#include mask") {
            continue;
        }
        let subs: Vec<(&str, String)> = k.subs.iter().map(|(n, v)| (*n, v.to_string())).collect();
        // attn_pv_sg8 includes the snippet under MASK; the others ignore the flag.
        let src = shaders::build(k.name, &["MASK"], &subs).expect("preprocess");
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{}: {}", k.name, e.emit_to_string(&src)));
        for (_, f) in module.functions.iter() {
            let name = f.name.as_deref().unwrap_or("");
            if ![
                "rule_hit",
                "kind_step",
                "mask_kind",
                "sink_rule",
                "sink_step",
                "sink_target",
                "sink_redirect",
            ]
            .contains(&name)
            {
                continue;
            }
            let (n, early) = branches(&f.body);
            // Four uniform groups of four rules each; a rule test itself has no branch.
            assert!(
                n <= 4,
                "{}: {name} has {n} conditional statements (at most 4: SwiftShader's \
                 compile time grows exponentially with them)",
                k.name
            );
            assert!(!early, "{}: {name} returns early from a branch", k.name);
            checked += 1;
        }
    }
    // flash_attn, flash_attn_k, flash_combine, attention, attention_probs, attn_pv_sg8 MASK.
    assert!(checked >= 6 * 3, "checked only {checked} mask functions");
}
