//! Translates every variant of every kernel with naga to what each wgpu backend compiles:
//! MSL (Metal), HLSL shader model 6.x (DX12; 6.2 with 16-bit types for the f16 variants),
//! GLSL ES 3.1 (GL) and SPIR-V (Vulkan). No GPU is needed: these are the translations
//! wgpu would make on a Mac, on Windows, on GL and on Vulkan, so a kernel that only one
//! backend's translator rejects fails here, on any machine. SPIR-V output is also checked
//! with `spirv-val` (Khronos' validator, Debian's spirv-tools) where it is installed.

use std::path::PathBuf;
use std::process::Command;

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{
    Capabilities, ModuleInfo, ShaderStages, SubgroupOperationSet, ValidationFlags, Validator,
};
use naga::{Module, ShaderStage};

/// One preprocessed kernel variant.
struct Variant {
    label: String,
    flags: Vec<&'static str>,
    /// The kernel always uses subgroup operations (the `*_sg8` family), flag or not.
    needs_subgroups: bool,
    src: String,
}

/// Every flag combination of every kernel with its default substitutions, plus every
/// GGUF format of the quantized kernels (their defaults are Q8_0 only).
fn variants() -> Vec<Variant> {
    let mut out = Vec::new();
    for k in shaders::KERNELS {
        let quant = k.subs.iter().any(|(n, _)| *n == "QT");
        let formats: Vec<Vec<(&str, String)>> = if quant {
            shaders::QUANT_SUBS
                .iter()
                .flat_map(|[qt, bs, bb]| {
                    (0..2).map(move |pk| {
                        vec![
                            ("M", "8".to_string()),
                            ("QT", qt.to_string()),
                            ("QBS", bs.to_string()),
                            ("QBB", bb.to_string()),
                            ("QPK", pk.to_string()),
                        ]
                    })
                })
                .collect()
        } else {
            vec![k.subs.iter().map(|(n, v)| (*n, v.to_string())).collect()]
        };
        for subs in &formats {
            for flags in shaders::all_variants(k) {
                let src = shaders::preprocess(k.source, &flags, subs)
                    .unwrap_or_else(|e| panic!("{} {flags:?}: preprocess: {e}", k.name));
                let tag: Vec<String> = subs
                    .iter()
                    .filter(|(n, _)| quant && *n != "M")
                    .map(|(n, v)| format!("{n}={v}"))
                    .collect();
                out.push(Variant {
                    label: format!("{} {flags:?} {}", k.name, tag.join(",")),
                    flags: flags.clone(),
                    needs_subgroups: k.name.ends_with("_sg8"),
                    src,
                });
            }
        }
    }
    out
}

fn parse_and_validate(v: &Variant, caps: Capabilities) -> Result<(Module, ModuleInfo), String> {
    let module = naga::front::wgsl::parse_str(&v.src).map_err(|e| e.emit_to_string(&v.src))?;
    let mut val = Validator::new(ValidationFlags::all(), caps);
    val.subgroup_stages(ShaderStages::COMPUTE);
    val.subgroup_operations(SubgroupOperationSet::all());
    let info = val
        .validate(&module)
        .map_err(|e| e.emit_to_string(&v.src))?;
    Ok((module, info))
}

/// The module as wgpu hands it to a backend for entry point `ep`: `override` constants
/// resolved (here to their defaults; the translators refuse unresolved ones).
fn specialise(
    module: &Module,
    info: &ModuleInfo,
    ep: &str,
) -> Result<(Module, ModuleInfo), String> {
    let (m, i) = naga::back::pipeline_constants::process_overrides(
        module,
        info,
        Some((ShaderStage::Compute, ep)),
        &Default::default(),
    )
    .map_err(|e| format!("{ep}: overrides: {e}"))?;
    Ok((m.into_owned(), i.into_owned()))
}

fn entry_points(m: &Module) -> Vec<String> {
    m.entry_points
        .iter()
        .filter(|e| e.stage == ShaderStage::Compute)
        .map(|e| e.name.clone())
        .collect()
}

fn uses_f16(v: &Variant) -> bool {
    v.flags.contains(&"F16")
}

fn uses_subgroups(v: &Variant) -> bool {
    v.needs_subgroups || v.flags.contains(&"SUBGROUPS")
}

/// Runs `f` on every variant and fails listing every variant it fails on.
fn for_each(
    what: &str,
    skip: impl Fn(&Variant) -> bool,
    f: impl Fn(&Variant) -> Result<(), String>,
) -> usize {
    let mut done = 0;
    let mut failures = Vec::new();
    for v in variants() {
        if skip(&v) {
            continue;
        }
        if let Err(e) = f(&v) {
            failures.push(format!("{}: {e}", v.label));
        }
        done += 1;
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {done} variants fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        done >= shaders::KERNELS.len(),
        "{what}: only {done} variants"
    );
    println!("{what}: translated {done} variants");
    done
}

#[test]
fn every_variant_translates_to_msl() {
    for_each(
        "MSL 2.4",
        |_| false,
        |v| {
            let (module, info) = parse_and_validate(v, Capabilities::all())?;
            // Metal 2.4 (macOS 12): f16 is native, simdgroup functions are there from 2.0.
            let opts = msl::Options {
                lang_version: (2, 4),
                ..Default::default()
            };
            for ep in entry_points(&module) {
                let (module, info) = specialise(&module, &info, &ep)?;
                let pipe = msl::PipelineOptions {
                    entry_point: Some((ShaderStage::Compute, ep.clone())),
                    ..Default::default()
                };
                msl::write_string(&module, &info, &opts, &pipe)
                    .map_err(|e| format!("{ep}: {e}"))?;
            }
            Ok(())
        },
    );
}

#[test]
fn every_variant_translates_to_hlsl() {
    let half_variants = std::cell::Cell::new(0usize);
    for_each(
        "HLSL SM 6.x",
        |_| false,
        |v| {
            let (module, info) = parse_and_validate(v, Capabilities::all())?;
            // Wave intrinsics need SM 6.0; 16-bit types (f16) need SM 6.2 and DXC's
            // -enable-16bit-types, which wgpu's DX12 backend passes.
            let shader_model = if uses_f16(v) {
                hlsl::ShaderModel::V6_2
            } else {
                hlsl::ShaderModel::V6_0
            };
            let opts = hlsl::Options {
                shader_model,
                ..Default::default()
            };
            let mut any_half = false;
            for ep in entry_points(&module) {
                let (module, info) = specialise(&module, &info, &ep)?;
                let pipe = hlsl::PipelineOptions {
                    entry_point: Some((ShaderStage::Compute, ep.clone())),
                };
                let mut out = String::new();
                hlsl::Writer::new(&mut out, &opts, &pipe)
                    .write(&module, &info, None)
                    .map_err(|e| format!("{ep}: {e}"))?;
                any_half |= out.contains("half");
            }
            if uses_f16(v) && any_half {
                half_variants.set(half_variants.get() + 1);
            }
            Ok(())
        },
    );
    // Some F16 variants only `enable f16` (norm); those with f16 arithmetic must come out
    // as HLSL `half` (16-bit types), not be widened.
    assert!(
        half_variants.get() >= 10,
        "only {} f16 variants use half in HLSL",
        half_variants.get()
    );
}

#[test]
fn every_variant_gl_runs_translates_to_glsl_es_310() {
    // GL has neither shader-f16 nor subgroups in wgpu: the engine runs the fallback
    // variants there, and those are what must translate.
    let mut caps = Capabilities::all();
    caps.remove(Capabilities::SHADER_FLOAT16 | Capabilities::SUBGROUP);
    for_each(
        "GLSL ES 3.10",
        |v| uses_f16(v) || uses_subgroups(v),
        |v| {
            let (module, info) = parse_and_validate(v, caps)?;
            let opts = glsl::Options {
                version: glsl::Version::new_gles(310),
                writer_flags: glsl::WriterFlags::empty(),
                ..Default::default()
            };
            for ep in entry_points(&module) {
                let (module, info) = specialise(&module, &info, &ep)?;
                let pipe = glsl::PipelineOptions {
                    shader_stage: ShaderStage::Compute,
                    entry_point: ep.clone(),
                    multiview: None,
                };
                let mut out = String::new();
                glsl::Writer::new(
                    &mut out,
                    &module,
                    &info,
                    &opts,
                    &pipe,
                    naga::proc::BoundsCheckPolicies::default(),
                )
                .and_then(|mut w| w.write())
                .map_err(|e| format!("{ep}: {e}"))?;
            }
            Ok(())
        },
    );
}

/// `spirv-val` if it runs here.
fn spirv_val() -> Option<PathBuf> {
    let ok = Command::new("spirv-val")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then(|| PathBuf::from("spirv-val"))
}

#[test]
fn every_variant_translates_to_valid_spirv() {
    let val = spirv_val();
    if val.is_none() {
        // CI installs spirv-tools (.ci/run); elsewhere the translation alone is checked.
        println!("spirv-val not found: SPIR-V is translated but not validated");
    }
    let dir = std::env::temp_dir().join(format!("visi-spv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let counter = std::sync::atomic::AtomicUsize::new(0);
    for_each(
        "SPIR-V 1.3",
        |_| false,
        |v| {
            let (module, info) = parse_and_validate(v, Capabilities::all())?;
            // SPIR-V 1.3 (Vulkan 1.1) is the first with subgroup operations.
            let opts = spv::Options {
                lang_version: (1, 3),
                flags: spv::WriterFlags::empty(),
                ..Default::default()
            };
            for ep in entry_points(&module) {
                let (module, info) = specialise(&module, &info, &ep)?;
                let pipe = spv::PipelineOptions {
                    shader_stage: ShaderStage::Compute,
                    entry_point: ep.clone(),
                };
                let words = spv::write_vec(&module, &info, &opts, Some(&pipe))
                    .map_err(|e| format!("{ep}: {e}"))?;
                if let Some(val) = &val {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let path = dir.join(format!("{n}.spv"));
                    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
                    let out = Command::new(val)
                        .args(["--target-env", "vulkan1.1"])
                        .arg(&path)
                        .output()
                        .map_err(|e| format!("spirv-val: {e}"))?;
                    let _ = std::fs::remove_file(&path);
                    if !out.status.success() {
                        return Err(format!(
                            "{ep}: spirv-val: {}{}",
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                }
            }
            Ok(())
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
}
