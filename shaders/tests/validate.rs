//! Preprocesses every variant of every kernel and validates it with naga (no GPU needed).

use naga::valid::{Capabilities, ShaderStages, SubgroupOperationSet, ValidationFlags, Validator};

#[test]
fn every_variant_validates() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for k in shaders::KERNELS {
        let subs: Vec<(&str, String)> = k.subs.iter().map(|(n, v)| (*n, v.to_string())).collect();
        for flags in shaders::all_variants(k) {
            let src = match shaders::preprocess(k.source, &flags, &subs) {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("{} {flags:?}: preprocess: {e}", k.name));
                    continue;
                }
            };
            let module = match naga::front::wgsl::parse_str(&src) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!(
                        "{} {flags:?}: parse: {}",
                        k.name,
                        e.emit_to_string(&src)
                    ));
                    continue;
                }
            };
            let mut v = Validator::new(ValidationFlags::all(), Capabilities::all());
            v.subgroup_stages(ShaderStages::COMPUTE);
            v.subgroup_operations(SubgroupOperationSet::all());
            if let Err(e) = v.validate(&module) {
                failures.push(format!(
                    "{} {flags:?}: validate: {}",
                    k.name,
                    e.emit_to_string(&src)
                ));
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the variants fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= shaders::KERNELS.len());
    println!("validated {checked} variants");
}

#[test]
fn attention_head_dims_validate() {
    // The head sizes the models use, with the tile size the backend picks for a 16 KiB limit.
    for (d, tk) in [(64, 16), (80, 12), (128, 8), (256, 4)] {
        let subs = [("HEAD_DIM", d.to_string()), ("TK", tk.to_string())];
        let src = shaders::build("attention", &[], &subs).expect("preprocess");
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("head_dim {d}: {}", e.emit_to_string(&src)));
        Validator::new(ValidationFlags::all(), Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("head_dim {d}: {}", e.emit_to_string(&src)));
    }
}

#[test]
fn flash_attention_shapes_validate() {
    // Head sizes of the models and fixtures with the tiles the backend picks (16 and 32 KiB
    // of workgroup memory, f16 and f32 tiles), f16 and f32 caches, with and without f16.
    for (d, bq, bk, tpr) in [
        (8usize, 16usize, 32usize, 2usize),
        (16, 16, 32, 4),
        (64, 16, 32, 8),
        (80, 16, 32, 4),
        (128, 16, 32, 8),
        (128, 8, 8, 8),
        (128, 1, 32, 8),
        (256, 4, 4, 8),
    ] {
        let subs = [
            ("HEAD_DIM", d.to_string()),
            ("BQ", bq.to_string()),
            ("BK", bk.to_string()),
            ("TPR", tpr.to_string()),
            ("WG", (bq * tpr).to_string()),
            ("NC", (d / 4).div_ceil(32).to_string()),
        ];
        for flags in [&[][..], &["KV16"], &["F16"], &["F16", "KV16"]] {
            for name in ["flash_attn", "flash_attn_k", "flash_combine"] {
                let src = shaders::build(name, flags, &subs).expect("preprocess");
                let what = format!("{name} head_dim {d} {flags:?}");
                let module = naga::front::wgsl::parse_str(&src)
                    .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
                let mut v = Validator::new(ValidationFlags::all(), Capabilities::all());
                v.validate(&module)
                    .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
            }
        }
    }
}

#[test]
fn attn_sg8_variants_validate() {
    // The subgroup-broadcast attention passes at every queries-per-subgroup count the backend
    // picks (engine-wgpu's sg8_queries: 1, 4, 8, 32) and the head sizes they take (multiples
    // of 64), with and without an f16 cache and mask rules; the generator refuses others.
    for rs in [1, 4, 8, 32] {
        for d in [64, 128, 256] {
            let subs = [("RS", rs.to_string()), ("HEAD_DIM", d.to_string())];
            for flags in [&[][..], &["KV16"], &["MASK"], &["KV16", "MASK"]] {
                for name in ["attn_qk_sg8", "attn_pv_sg8"] {
                    let src = shaders::build(name, flags, &subs).expect("preprocess");
                    let what = format!("{name} RS {rs} head_dim {d} {flags:?}");
                    let module = naga::front::wgsl::parse_str(&src)
                        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
                    let mut v = Validator::new(ValidationFlags::all(), Capabilities::all());
                    v.subgroup_stages(ShaderStages::COMPUTE);
                    v.subgroup_operations(SubgroupOperationSet::all());
                    v.validate(&module)
                        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
                }
            }
        }
    }
    let subs = [("RS", "32".to_string()), ("HEAD_DIM", "80".to_string())];
    assert!(shaders::build("attn_pv_sg8", &[], &subs).is_err());
}

#[test]
fn quant_formats_validate() {
    // Every quantized kernel for every format (the defaults above only cover Q8_0).
    for name in [
        "gemv_q",
        "gemm_q",
        "embedding_q",
        "gemv_q_sg8",
        "gemm_q_sg8",
    ] {
        for [qt, bs, bb] in shaders::QUANT_SUBS {
            for (bias, pk) in [(false, 0), (true, 0), (false, 1), (true, 1)] {
                let flags: &[&str] = if bias { &["BIAS"] } else { &[] };
                let subs = [
                    ("M", "3".to_string()),
                    ("QT", qt.to_string()),
                    ("QBS", bs.to_string()),
                    ("QBB", bb.to_string()),
                    ("QPK", pk.to_string()),
                ];
                let src = shaders::build(name, flags, &subs).expect("preprocess");
                let module = naga::front::wgsl::parse_str(&src)
                    .unwrap_or_else(|e| panic!("{name} qt {qt}: {}", e.emit_to_string(&src)));
                let mut v = Validator::new(ValidationFlags::all(), Capabilities::all());
                v.subgroup_stages(ShaderStages::COMPUTE);
                v.subgroup_operations(SubgroupOperationSet::all());
                v.validate(&module)
                    .unwrap_or_else(|e| panic!("{name} qt {qt}: {}", e.emit_to_string(&src)));
            }
        }
    }
}

#[test]
fn cooperative_matrix_kernels_validate() {
    // gemm_coop needs `enable wgpu_cooperative_matrix` (naga's COOPERATIVE_MATRIX capability);
    // no adapter here has the feature, so validation is what checks it before a GPU runs it.
    let mut checked = 0;
    for k in shaders::EXPERIMENTAL_KERNELS {
        for flags in shaders::all_variants(k) {
            let src = shaders::build(k.name, &flags, &[]).expect("preprocess");
            let what = format!("{} {flags:?}", k.name);
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
            let mut v = Validator::new(ValidationFlags::all(), Capabilities::all());
            let info = v
                .validate(&module)
                .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
            // Without the capability it must be refused (the gate is real).
            let caps = Capabilities::all() - Capabilities::COOPERATIVE_MATRIX;
            assert!(
                Validator::new(ValidationFlags::all(), caps)
                    .validate(&module)
                    .is_err(),
                "{what}: validates without the cooperative-matrix capability"
            );
            // And it translates to SPIR-V (the Vulkan path of VK_KHR_cooperative_matrix).
            naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None)
                .unwrap_or_else(|e| panic!("{what}: SPIR-V: {e}"));
            checked += 1;
        }
    }
    assert!(checked >= 4, "{checked} variants");
}
