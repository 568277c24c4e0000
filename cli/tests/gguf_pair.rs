//! `visi-cli run --model text.gguf --mmproj mmproj.gguf` and `visi-cli quantize`, on the
//! CPU backend: the quantize output (f16 and q8_0) against the transformers references and
//! the llama.cpp-converter-made pair (tests/fixtures/gguf/), and the error contract for
//! bad pairs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use engine_core::gguf::{GgufFile, GgufTensorOut, GgufValue};
use engine_core::weights::WeightSource;
use engine_core::{Backend, CpuBackend};
use models::llava::{GenerateOptions, Llava};
use models::prompt::Template;
use pruner::PruneConfig;
use serde_json::Value;
use visi_tests::{compare, expect_error, first_difference, fixtures, references};

fn visi(args: &[&str]) -> Result<Output> {
    visi_tests::run_visi(Path::new(env!("CARGO_BIN_EXE_visi-cli")), args)
}

fn note(s: &str) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

fn converter_pair() -> (PathBuf, PathBuf) {
    let d = fixtures().join("gguf/tiny-llava-mha");
    (
        d.join("tiny-llava-mha.f16.gguf"),
        d.join("mmproj-tiny-llava-mha.f16.gguf"),
    )
}

/// A fresh empty directory under the target dir (tests run in parallel: one per test).
fn scratch(name: &str) -> Result<PathBuf> {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf_pair-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn quantize(quant: &str, out: &Path) -> Result<(PathBuf, PathBuf)> {
    quantize_model("tiny-llava-mha", quant, out)
}

/// `visi-cli quantize` of the fixture `name`; the two paths it printed.
fn quantize_model(name: &str, quant: &str, out: &Path) -> Result<(PathBuf, PathBuf)> {
    let model = fixtures().join(name);
    let o = visi(&[
        "quantize",
        "--model",
        model.to_str().unwrap_or_default(),
        "--quant",
        quant,
        "--out",
        out.to_str().unwrap_or_default(),
    ])?;
    ensure!(
        o.status.success(),
        "quantize {quant}: exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<PathBuf> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    ensure!(lines.len() == 2, "quantize printed {lines:?}");
    ensure!(
        lines[0].file_name().and_then(|n| n.to_str()) == Some(&format!("{name}.{quant}.gguf")),
        "text file name {:?}",
        lines[0]
    );
    ensure!(
        lines[1].file_name().and_then(|n| n.to_str()) == Some(&format!("mmproj-{name}.f16.gguf")),
        "mmproj file name {:?}",
        lines[1]
    );
    Ok((lines[0].clone(), lines[1].clone()))
}

/// One reference case's run: (case, greedy tokens, first-step logits).
type CaseRun = (String, Vec<u32>, Vec<f32>);

/// Per reference case of tiny-llava-mha: (case, greedy tokens, first-step logits) of a pair.
fn run_pair(text: &Path, mmproj: &Path) -> Result<Vec<CaseRun>> {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    run_llava(Llava::load_gguf(text, mmproj, be, None, None)?)
}

/// [`run_pair`] for an already loaded model.
fn run_llava(llava: Llava) -> Result<Vec<CaseRun>> {
    let r = references()?
        .into_iter()
        .find(|r| r.name == "tiny-llava-mha")
        .context("tiny-llava-mha reference")?;
    let mut out = Vec::new();
    for c in &r.cases {
        let prompt = llava.prompt(Template::VicunaV1, &c.question, c.image.is_some())?;
        ensure!(prompt.ids == c.input_ids_expanded, "{}: prompt ids", c.name);
        let enc = match &c.image {
            None => None,
            Some(_) => {
                let (data, shape) = r.array(&c.name, "pixel_values")?;
                let (h, w) = (shape[shape.len() - 2], shape[shape.len() - 1]);
                let px = models::preprocess::PixelValues {
                    data,
                    height: h,
                    width: w,
                };
                Some(llava.encode_pixels(image::RgbImage::new(w as u32, h as u32), px)?)
            }
        };
        // The f32 KV cache: these runs check the written files against transformers'
        // 1e-3 bound (the f16 cache's own bound lives in tests/tests/reference.rs).
        let opts = GenerateOptions {
            max_new_tokens: c.generated_ids.len(),
            prune: Some(PruneConfig::Dense),
            keep_first_logits: true,
            kv_dtype: engine_core::DType::F32,
            ..Default::default()
        };
        let g = llava.generate_ids(&prompt, enc.as_slice(), &opts, &mut |_| {})?;
        out.push((c.name.clone(), g.tokens, g.first_logits.unwrap_or_default()));
    }
    Ok(out)
}

#[test]
fn quantize_f16_and_q8_0_pairs_match_the_references() -> Result<()> {
    let dir = scratch("quantize")?;
    let r = references()?
        .into_iter()
        .find(|r| r.name == "tiny-llava-mha")
        .context("reference")?;
    let (t16, m16) = quantize("f16", &dir)?;
    let f16 = run_pair(&t16, &m16)?;
    for (case, toks, logits) in &f16 {
        let c = r.cases.iter().find(|c| &c.name == case).context("case")?;
        let (want, _) = r.array(case, "logits")?;
        // Same f16 weights as the safetensors checkpoint, f32 compute: the reference
        // suite's 1e-3 bound (measured ~3e-5).
        let e = compare(
            &format!("f16 pair {case}: logits"),
            logits,
            &want,
            want.len(),
            1e-3,
        )?;
        if let Some(d) = first_difference(toks, &c.generated_ids) {
            bail!("f16 pair {case}: greedy tokens: {d}");
        }
        note(&format!(
            "quantize f16 {case}: logits max err {e:.2e}, 16 tokens match"
        ));
    }
    // Its own directory: the f16 run's mmproj is there and is never overwritten.
    let (t8, m8) = quantize("q8_0", &scratch("quantize-q8")?)?;
    let q8 = run_pair(&t8, &m8)?;
    // On the text case the same decoder matrices quantized at load from safetensors
    // (`run --quant q8_0`; it also quantizes the CLIP tower, hence text only) give the same
    // logits: the written blocks are the engine's own Q8_0 in the Q/K row order it expects.
    let at_load = run_llava(Llava::load_quantized(
        &fixtures().join("tiny-llava-mha"),
        Arc::new(CpuBackend::new()),
        None,
        Some(engine_core::QuantType::Q8_0),
    )?)?;
    for ((case, _, a), (_, _, b)) in q8.iter().zip(&at_load).filter(|(q, _)| q.0 == "text") {
        compare(
            &format!("q8_0 pair vs --quant q8_0 at load, {case}"),
            a,
            b,
            b.len(),
            1e-4,
        )?;
    }
    for ((case, toks, logits), (_, _, l16)) in q8.iter().zip(&f16) {
        let c = r.cases.iter().find(|c| &c.name == case).context("case")?;
        let err = logits
            .iter()
            .zip(l16)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let rms = (l16.iter().map(|v| v * v).sum::<f32>() / l16.len() as f32).sqrt();
        let agree = toks
            .iter()
            .zip(&c.generated_ids)
            .take_while(|(a, b)| a == b)
            .count();
        note(&format!(
            "quantize q8_0 {case}: first-step max |logit - f16 pair| {err:.4} ({:.4} of rms {rms:.2}), greedy agrees on {agree}/16",
            err / rms
        ));
        // Only the 6 ffn_down matrices (rows of 128) are whole Q8_0 blocks in this
        // hidden-48 model; the rest fall back to f16. Measured relative to the logits' rms:
        // 0.021 (square_crop) to 0.088 (text), the latter identical to quantizing at load
        // (checked above), so it is Q8_0 on these random weights, not the file. A broken
        // format or a wrong row order is ~1. Bound 0.15, and greedy must still agree with
        // transformers wherever its top-2 margin exceeds twice that error (two logits each
        // off by `err` can swap below it: with LLaVA's real vicuna_v1 sentence, issue 27, the
        // text case's step 4 is won by 0.038, which the q8_0 weights flip).
        ensure!(
            err / rms <= 0.15,
            "q8_0 {case}: first-step logit error {err} is {} of rms",
            err / rms
        );
        let clear = c
            .step_margins
            .iter()
            .position(|&m| m < 2.0 * err)
            .unwrap_or(c.generated_ids.len());
        ensure!(clear >= 1, "q8_0 {case}: no step clear of the error {err}");
        let n = clear.min(toks.len());
        if let Some(d) = first_difference(&toks[..n], &c.generated_ids[..clear]) {
            bail!("q8_0 pair {case}: greedy tokens (the first {clear}): {d}");
        }
    }
    Ok(())
}

#[test]
fn quantize_4bit_pairs_load_and_run() -> Result<()> {
    let f16 = {
        let d = scratch("q4-f16")?;
        let (t, m) = quantize("f16", &d)?;
        run_pair(&t, &m)?
    };
    for q in ["q4_0", "q4_1", "q4_k"] {
        let (t, m) = quantize(q, &scratch(&format!("q4-{q}"))?)?;
        let f = GgufFile::open(&t)?;
        let stored: Vec<String> = f.tensor_infos().map(|i| format!("{:?}", i.ty)).collect();
        let got = run_pair(&t, &m)?;
        for ((case, toks, logits), (_, ftoks, l16)) in got.iter().zip(&f16) {
            let err = logits
                .iter()
                .zip(l16)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let rms = (l16.iter().map(|v| v * v).sum::<f32>() / l16.len() as f32).sqrt();
            let agree = toks.iter().zip(ftoks).take_while(|(a, b)| a == b).count();
            note(&format!(
                "quantize {q} {case}: first-step max |logit - f16 pair| {err:.4} ({:.3} of rms), greedy agrees with f16 on {agree}/16",
                err / rms
            ));
            // Reported, not bounded: 4 bits on this random tiny model move the text case's
            // logits by ~0.9 of rms (q8_0: 0.09). Correctness is the check below.
            ensure!(err.is_finite(), "{q} {case}: non-finite logits");
        }
        // The text case equals quantizing the same matrices at load from safetensors.
        let qt = engine_core::QuantType::parse(q).context("quant type")?;
        let at_load = run_llava(Llava::load_quantized(
            &fixtures().join("tiny-llava-mha"),
            Arc::new(CpuBackend::new()),
            None,
            Some(qt),
        )?)?;
        for ((case, _, a), (_, _, b)) in got.iter().zip(&at_load).filter(|(g, _)| g.0 == "text") {
            compare(
                &format!("{q} pair vs --quant {q} at load, {case}"),
                a,
                b,
                b.len(),
                1e-4,
            )?;
        }
        let quantized = stored.iter().filter(|s| s.contains("Quant")).count();
        note(&format!(
            "quantize {q}: {quantized} of {} text tensors stored quantized",
            stored.len()
        ));
        ensure!(
            (q == "q4_k") == (quantized == 0),
            "{q}: {quantized} quantized tensors (q4_k should fall back to f16 everywhere here)"
        );
    }
    Ok(())
}

/// A llava-hf directory like tiny-llava-mha but with a 256-wide GQA decoder (2 layers,
/// 4 heads, 2 KV heads, MLP 512), seeded random f16 weights: every text matrix is whole
/// Q4_K blocks.
fn wide_model(dir: &Path) -> Result<()> {
    let src = fixtures().join("tiny-llava-mha");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
    let tc = &mut cfg["text_config"];
    tc["hidden_size"] = 256.into();
    tc["intermediate_size"] = 512.into();
    tc["num_hidden_layers"] = 2.into();
    tc["num_attention_heads"] = 4.into();
    tc["num_key_value_heads"] = 2.into();
    tc["head_dim"] = 64.into();
    let text = serde_json::to_string_pretty(&cfg)?;
    std::fs::write(dir.join("config.json"), &text)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f))?;
    }
    let lc = models::LlavaConfig::from_json_str(&text)?;
    let syn = models::synthetic::SyntheticSource::new(&lc, 11);
    let mut mem = engine_core::weights::MemorySource::new();
    for n in syn.names() {
        let v = syn.view(&n)?;
        mem.insert_bytes(n.clone(), v.dtype, v.shape, v.bytes.to_vec())?;
    }
    std::fs::write(dir.join("model.safetensors"), mem.to_safetensors_bytes())?;
    Ok(())
}

#[test]
fn quantize_q4_k_pair_of_a_256_wide_model() -> Result<()> {
    let model = scratch("wide-model")?;
    wide_model(&model)?;
    let out = scratch("wide-out")?;
    let o = visi(&[
        "quantize",
        "--model",
        model.to_str().unwrap_or_default(),
        "--quant",
        "q4_k",
        "--out",
        out.join("wide").to_str().unwrap_or_default(),
    ])?;
    ensure!(
        o.status.success(),
        "quantize: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (t, m) = (out.join("wide.q4_k.gguf"), out.join("mmproj-wide.f16.gguf"));
    let f = GgufFile::open(&t)?;
    let q4k =
        engine_core::gguf::GgufType::Known(engine_core::DType::Quant(engine_core::QuantType::Q4K));
    for i in f.tensor_infos() {
        // Every matrix is Q4_K (attn_q/attn_k included: their rows were permuted as whole
        // blocks); only the norms stay f32.
        let want_q = i.shape.len() == 2;
        ensure!((i.ty == q4k) == want_q, "{}: stored {:?}", i.name, i.ty);
    }
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let pair = Llava::load_gguf(&t, &m, be.clone(), None, None)?;
    let at_load = Llava::load_quantized(&model, be, None, Some(engine_core::QuantType::Q4K))?;
    let opts = GenerateOptions {
        max_new_tokens: 8,
        prune: Some(PruneConfig::Dense),
        keep_first_logits: true,
        ..Default::default()
    };
    let run = |l: &Llava| -> Result<(Vec<u32>, Vec<f32>)> {
        let p = l.prompt(Template::VicunaV1, "What is the capital of France?", false)?;
        let g = l.generate_ids(&p, &[], &opts, &mut |_| {})?;
        Ok((g.tokens, g.first_logits.unwrap_or_default()))
    };
    let (ta, la) = run(&pair)?;
    let (tb, lb) = run(&at_load)?;
    // Same Q4_K blocks either way (the pair's Q/K rows un-permuted at load).
    let e = compare(
        "q4_k pair vs --quant q4_k at load",
        &la,
        &lb,
        lb.len(),
        1e-4,
    )?;
    ensure!(ta == tb, "greedy tokens: pair {ta:?} vs at load {tb:?}");
    note(&format!("q4_k pair (256-wide GQA decoder): logits within {e:.1e} of quantizing at load, {} tokens match", ta.len()));
    Ok(())
}

fn md_map(f: &GgufFile) -> &std::collections::BTreeMap<String, GgufValue> {
    &f.metadata
}

fn approx_eq(a: &GgufValue, b: &GgufValue) -> bool {
    match (a, b) {
        (GgufValue::Array(x), GgufValue::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| approx_eq(a, b))
        }
        (GgufValue::String(x), GgufValue::String(y)) => x == y,
        (GgufValue::Bool(x), GgufValue::Bool(y)) => x == y,
        _ => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * x.abs().max(1.0),
            _ => a.as_u64() == b.as_u64(),
        },
    }
}

#[test]
fn quantize_f16_writes_what_the_llama_cpp_converters_write() -> Result<()> {
    let dir = scratch("compare")?;
    let (ours_t, ours_m) = quantize("f16", &dir)?;
    let (conv_t, conv_m) = converter_pair();
    same_as_converter([(&ours_t, &conv_t), (&ours_m, &conv_m)])
}

/// LLaVA-1.6: `quantize` of tiny-next-mistral writes the pair llama.cpp's converters write
/// (`tools/make_gguf_pair.py --next`: grid pinpoints, anyres/spatial_unpad, the newline
/// tensor), and it loads as the checkpoint does.
#[test]
fn quantize_f16_writes_a_llava_16_pair_as_the_converters_do() -> Result<()> {
    let dir = scratch("compare-next")?;
    let (ours_t, ours_m) = quantize_model("tiny-next-mistral", "f16", &dir)?;
    let conv = fixtures().join("gguf/tiny-next-mistral");
    let (conv_t, conv_m) = (
        conv.join("tiny-next-mistral.f16.gguf"),
        conv.join("mmproj-tiny-next-mistral.f16.gguf"),
    );
    same_as_converter([(&ours_t, &conv_t), (&ours_m, &conv_m)])?;
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let pair = Llava::load_gguf(&ours_t, &ours_m, be.clone(), None, None)?;
    let st = Llava::load(&fixtures().join("tiny-next-mistral"), be)?;
    ensure!(
        pair.config().image_grid_pinpoints == st.config().image_grid_pinpoints,
        "pinpoints"
    );
    let img = models::load_image(&fixtures().join("images/landscape.png"))?;
    let opts = GenerateOptions {
        max_new_tokens: 8,
        prune: Some(PruneConfig::Dense),
        keep_first_logits: true,
        ..Default::default()
    };
    let mut runs = Vec::new();
    for m in [&pair, &st] {
        let n = m.image_tokens_for(img.width(), img.height())?;
        let prompt = m.prompt_images(Template::MistralInstruct, "What is shown?", &[n])?;
        let enc = m.encode_image(&img, models::PadMode::Crop)?;
        runs.push(m.generate_ids(&prompt, &[enc], &opts, &mut |_| {})?);
    }
    ensure!(runs[0].tokens == runs[1].tokens, "tokens differ");
    let (a, b) = (
        runs[0].first_logits.as_deref().unwrap_or_default(),
        runs[1].first_logits.as_deref().unwrap_or_default(),
    );
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    ensure!(!a.is_empty() && max <= 1e-5, "logits differ by {max}");
    Ok(())
}

/// Every metadata key and tensor the converter wrote is in ours, equal (tensors byte for byte).
fn same_as_converter(pairs: [(&PathBuf, &PathBuf); 2]) -> Result<()> {
    // Keys whose values legitimately differ: names/descriptions, our merge-rank scores
    // (the converter writes -1000 placeholders), token types of added tokens (`<image>` is
    // special in tokenizer.json; the converter types it user-defined), and the converter's
    // general.size_label. Everything else the converter writes must be there and equal.
    let skip = [
        "general.name",
        "general.size_label",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.padding_token_id",
    ];
    for (ours, conv) in pairs {
        let a = GgufFile::open(ours)?;
        let b = GgufFile::open(conv)?;
        for (k, v) in md_map(&b) {
            if skip.contains(&k.as_str()) || k.starts_with("GGUF.") {
                continue;
            }
            let Some(mine) = md_map(&a).get(k) else {
                bail!("{}: key {k} missing (converter has it)", ours.display());
            };
            ensure!(
                approx_eq(mine, v),
                "{}: key {k}: ours {mine:?} vs converter {v:?}",
                ours.display()
            );
        }
        let names_a: Vec<String> = a.tensor_infos().map(|t| t.name.clone()).collect();
        let mut names_b: Vec<String> = b.tensor_infos().map(|t| t.name.clone()).collect();
        let mut sorted_a = names_a.clone();
        sorted_a.sort();
        names_b.sort();
        ensure!(
            sorted_a == names_b,
            "{}: tensor names differ: ours {sorted_a:?} converter {names_b:?}",
            ours.display()
        );
        for n in &names_b {
            let (ta, tb) = (
                a.tensor_info(n).context("a")?,
                b.tensor_info(n).context("b")?,
            );
            ensure!(
                ta.shape == tb.shape,
                "{n}: shape ours {:?} converter {:?}",
                ta.shape,
                tb.shape
            );
            ensure!(
                ta.ty == tb.ty,
                "{n}: type ours {:?} converter {:?}",
                ta.ty,
                tb.ty
            );
            // Same f16 source values, same Q/K permutation: identical bytes.
            let (va, vb) = (a.view(n)?, b.view(n)?);
            if let Some(i) = va.bytes.iter().zip(vb.bytes).position(|(x, y)| x != y) {
                bail!("{n}: byte {i} differs from the converter's");
            }
        }
        // Types agree on every non-added token.
        if let (Some(GgufValue::Array(x)), Some(GgufValue::Array(y))) = (
            md_map(&a).get("tokenizer.ggml.token_type"),
            md_map(&b).get("tokenizer.ggml.token_type"),
        ) {
            ensure!(x.len() == y.len(), "token_type lengths");
            for (i, (p, q)) in x.iter().zip(y).enumerate().take(32000) {
                ensure!(
                    p.as_u64() == q.as_u64(),
                    "token_type[{i}]: ours {p:?} converter {q:?}"
                );
            }
        }
        note(&format!(
            "{}: {} tensors and the converter's metadata match",
            ours.display(),
            names_b.len()
        ));
    }
    Ok(())
}

#[test]
fn run_with_mmproj_matches_the_reference_and_samples() -> Result<()> {
    let (t, m) = converter_pair();
    let r = references()?
        .into_iter()
        .find(|r| r.name == "tiny-llava-mha")
        .context("reference")?;
    let c = r
        .cases
        .iter()
        .find(|c| c.name == "square_crop")
        .context("case")?;
    let image = c.image.clone().context("image")?;
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "run",
            "--model",
            t.to_str().unwrap_or_default(),
            "--mmproj",
            m.to_str().unwrap_or_default(),
            "--image",
            image.to_str().unwrap_or_default(),
            "--prompt",
            &c.question,
            "--max-new-tokens",
            "16",
            "--device",
            "cpu",
            "--json",
        ]
        .map(String::from)
        .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let go = |a: Vec<String>| -> Result<Value> {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = visi(&refs)?;
        ensure!(
            o.status.success(),
            "{a:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(serde_json::from_slice(&o.stdout)?)
    };
    let j = go(args(&["--no-prune"]))?;
    let toks: Vec<u32> = j["tokens"]
        .as_array()
        .context("tokens")?
        .iter()
        .filter_map(|v| v.as_u64().map(|x| x as u32))
        .collect();
    if let Some(d) = first_difference(&toks, &c.generated_ids) {
        bail!("run --mmproj greedy tokens: {d}");
    }
    ensure!(
        j["image_tokens"] == 576,
        "image_tokens {}",
        j["image_tokens"]
    );
    // Pruning runs on the pair as on safetensors (6 layers: the paper default falls back
    // to dense with a note, an explicit FastV config runs).
    let j = go(args(&[
        "--prune",
        r#"{"method":"fastv","k":2,"ratio":0.5}"#,
    ]))?;
    ensure!(
        j["pruning"]["method"] == "fastv",
        "pruning {}",
        j["pruning"]
    );
    // Sampling: seeded runs repeat, and differ from greedy somewhere.
    let s = |seed: &str| {
        go(args(&[
            "--no-prune",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ]))
    };
    let (a, b) = (s("7")?, s("7")?);
    ensure!(a["tokens"] == b["tokens"], "same seed, different tokens");
    ensure!(
        a["tokens"] != Value::from(c.generated_ids.clone()),
        "sampling at T=1.5 reproduced greedy"
    );
    // The text file alone is the text-only GGUF path (no --mmproj): same greedy tokens.
    let o = visi(&[
        "run",
        "--model",
        t.to_str().unwrap_or_default(),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "16",
        "--json",
    ])?;
    ensure!(
        o.status.success(),
        "text-only gguf: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j: Value = serde_json::from_slice(&o.stdout)?;
    let want = &r
        .cases
        .iter()
        .find(|c| c.name == "text")
        .context("text case")?
        .generated_ids;
    ensure!(
        j["tokens"] == Value::from(want.clone()),
        "text-only gguf tokens {}",
        j["tokens"]
    );
    // Text-only through the pair (no --image) works too.
    let o = visi(&[
        "run",
        "--model",
        t.to_str().unwrap_or_default(),
        "--mmproj",
        m.to_str().unwrap_or_default(),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "16",
        "--device",
        "cpu",
        "--json",
        "--no-prune",
    ])?;
    ensure!(
        o.status.success(),
        "text-only pair: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j: Value = serde_json::from_slice(&o.stdout)?;
    ensure!(
        j["tokens"] == Value::from(want.clone()),
        "text-only pair tokens {}",
        j["tokens"]
    );
    Ok(())
}

/// The converter's mmproj with the projector narrowed to `width` outputs.
fn narrowed_mmproj(dst: &Path, width: usize) -> Result<()> {
    let (_, m) = converter_pair();
    let f = GgufFile::open(&m)?;
    let md: Vec<(String, GgufValue)> = f
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("GGUF."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut ts = Vec::new();
    for info in f.tensor_infos() {
        let v = f.view(&info.name)?;
        let mut shape = v.shape.to_vec();
        let mut bytes = v.bytes.to_vec();
        if info.name.starts_with("mm.") {
            let el = v.dtype.bytes_for(1).context("element size")?;
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            let new_cols = if info.name == "mm.2.weight" {
                width
            } else {
                cols
            };
            let mut out = Vec::new();
            for r in 0..width {
                out.extend_from_slice(&bytes[r * cols * el..(r * cols + new_cols) * el]);
            }
            bytes = out;
            shape[0] = width;
            if shape.len() == 2 {
                shape[1] = new_cols;
            }
        }
        ts.push(GgufTensorOut {
            name: info.name.clone(),
            dtype: v.dtype,
            shape,
            bytes,
        });
    }
    std::fs::write(dst, engine_core::gguf::to_gguf_bytes(&md, &ts)?)?;
    Ok(())
}

#[test]
fn bad_pairs_and_quantize_inputs_exit_2_with_one_line() -> Result<()> {
    let dir = scratch("bad")?;
    let (t, m) = converter_pair();
    let (t, m) = (
        t.to_str().unwrap_or_default().to_string(),
        m.to_str().unwrap_or_default().to_string(),
    );
    let img = fixtures().join("images/square.png");
    let img = img.to_str().unwrap_or_default();
    let narrow = dir.join("mmproj-narrow.gguf");
    narrowed_mmproj(&narrow, 40)?;
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &std::fs::read(&m)?[..200])?;
    let (narrow, truncated) = (
        narrow.to_str().unwrap_or_default(),
        truncated.to_str().unwrap_or_default(),
    );
    let run = |mm: &str| -> Vec<String> {
        [
            "run", "--model", &t, "--mmproj", mm, "--image", img, "--prompt", "hi", "--device",
            "cpu",
        ]
        .map(String::from)
        .to_vec()
    };
    let model = fixtures().join("tiny-llava-mha");
    let model = model.to_str().unwrap_or_default();
    let existing = dir.join("tiny-llava-mha.f16.gguf");
    std::fs::write(&existing, b"keep me")?;
    let out = dir.to_str().unwrap_or_default();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            ["run", "--model", &t, "--image", img, "--prompt", "hi"]
                .map(String::from)
                .to_vec(),
            vec!["--mmproj"],
        ),
        (run(narrow), vec!["mm.0.weight", "does not belong"]),
        (run(truncated), vec!["truncated.gguf"]),
        (run(&t), vec!["not an mmproj"]),
        (
            [
                "run", "--model", &m, "--mmproj", &m, "--prompt", "hi", "--device", "cpu",
            ]
            .map(String::from)
            .to_vec(),
            vec!["general.architecture"],
        ),
        (
            [
                "quantize", "--model", model, "--quant", "q5_k", "--out", out,
            ]
            .map(String::from)
            .to_vec(),
            vec!["--quant q5_k"],
        ),
        (
            ["quantize", "--model", model, "--quant", "f16", "--out", out]
                .map(String::from)
                .to_vec(),
            vec!["already exists", "--force"],
        ),
        (
            [
                "quantize",
                "--model",
                "/nonexistent",
                "--quant",
                "f16",
                "--out",
                out,
            ]
            .map(String::from)
            .to_vec(),
            vec!["not a directory"],
        ),
        (
            [
                "quantize",
                "--model",
                &fixtures().join("tiny-llava-gqa").to_string_lossy(),
                "--quant",
                "f16",
                "--out",
                out,
            ]
            .map(String::from)
            .to_vec(),
            vec!["full"],
        ),
    ];
    for (args, needles) in &cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = visi(&refs)?;
        expect_error(&o, 2, needles).with_context(|| format!("{args:?}"))?;
    }
    ensure!(
        std::fs::read(&existing)? == b"keep me",
        "quantize replaced a file without --force"
    );
    // With --force it is replaced, and no temp file is left behind.
    let o = visi(&[
        "quantize", "--model", model, "--quant", "f16", "--out", out, "--force",
    ])?;
    ensure!(
        o.status.success(),
        "--force: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(
        std::fs::read(&existing)?.starts_with(b"GGUF"),
        "--force did not write the pair"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    ensure!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    Ok(())
}
