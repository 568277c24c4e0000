//! The llama.cpp LLaVA pair made by llama.cpp's own converters from tiny-llava-mha
//! (`tools/make_gguf_pair.py`, committed under tests/fixtures/gguf/): its tokenizer
//! against the fixture's `tokenizer.json`, and the model against the transformers
//! references (`tests/fixtures/reference/tiny-llava-mha`) and our safetensors load, on the
//! CPU backend, plus one GPU (lavapipe) run of the f16 pair.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine_core::gguf::GgufFile;
use engine_core::weights::open_safetensors;
use engine_core::{Backend, CpuBackend, DType};
use models::llava::{GenerateOptions, Llava};
use models::preprocess::PixelValues;
use models::prompt::Template;
use pruner::PruneConfig;
use serde_json::Value;
use tokenizers::Tokenizer;

/// Same f16 weights on both sides and f32 compute: measured ~1e-5 against transformers;
/// the reference suite's bound for first-step logits is 1e-3.
const TOL_LOGITS: f32 = 1e-3;
/// The same with the default f16 KV cache (as in tests/tests/reference.rs).
const TOL_LOGITS_KV16: f32 = 0.05;
/// GGUF pair vs the same model loaded from safetensors by us: identical weights, identical
/// kernels, so only summation-order noise (none expected on the CPU backend).
const TOL_SAME: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn pair() -> (PathBuf, PathBuf) {
    let d = fixtures().join("gguf/tiny-llava-mha");
    (
        d.join("tiny-llava-mha.f16.gguf"),
        d.join("mmproj-tiny-llava-mha.f16.gguf"),
    )
}

/// Max abs difference; panics naming the first element over `tol`.
fn compare(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut max = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d <= tol,
            "{what}: col {i}: got {g} want {w} (|diff| {d}, tolerance {tol})"
        );
        max = max.max(d);
    }
    max
}

fn note(s: &str) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

struct Case {
    name: String,
    question: String,
    prompt: String,
    has_image: bool,
    ids: Vec<u32>,
    generated: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let path = fixtures().join("reference/tiny-llava-mha/expected.json");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read expected.json"))
            .expect("parse expected.json");
    let ids = |x: &Value| -> Vec<u32> {
        x.as_array()
            .expect("ids")
            .iter()
            .map(|i| i.as_u64().expect("id") as u32)
            .collect()
    };
    v["cases"]
        .as_object()
        .expect("cases")
        .iter()
        .map(|(name, c)| {
            let prompt = c["prompt"].as_str().expect("prompt").to_string();
            let q = prompt.split_once("USER: ").expect("vicuna").1;
            let q = q.strip_prefix("<image>\n").unwrap_or(q);
            Case {
                name: name.clone(),
                question: q.strip_suffix(" ASSISTANT:").expect("vicuna").to_string(),
                has_image: !c["image"].is_null(),
                prompt,
                ids: ids(&c["input_ids_expanded"]),
                generated: ids(&c["generated_ids"]),
            }
        })
        .collect()
}

fn array(case: &str, what: &str) -> (Vec<f32>, Vec<usize>) {
    let src = open_safetensors(&fixtures().join("reference/tiny-llava-mha/arrays.safetensors"))
        .expect("arrays");
    let v = src.view(&format!("{case}.{what}")).expect("array");
    assert_eq!(v.dtype, DType::F32);
    let data = v
        .bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (data, v.shape.to_vec())
}

/// Greedy tokens and first-step logits of one reference case (pixel values from the
/// reference arrays, so JPEG decoder differences stay out of it), default (f16) KV cache.
fn run_case(llava: &Llava, c: &Case) -> (Vec<u32>, Vec<f32>) {
    run_case_kv(llava, c, DType::F16)
}

/// [`run_case`] with a KV cache of `kv_dtype`.
fn run_case_kv(llava: &Llava, c: &Case, kv_dtype: DType) -> (Vec<u32>, Vec<f32>) {
    let prompt = llava
        .prompt(Template::VicunaV1, &c.question, c.has_image)
        .expect("prompt");
    assert_eq!(prompt.ids, c.ids, "{}: prompt ids", c.name);
    let enc = c.has_image.then(|| {
        let (data, shape) = array(&c.name, "pixel_values");
        let (h, w) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let px = PixelValues {
            data,
            height: h,
            width: w,
        };
        llava
            .encode_pixels(image::RgbImage::new(w as u32, h as u32), px)
            .expect("encode")
    });
    let opts = GenerateOptions {
        max_new_tokens: c.generated.len(),
        prune: Some(PruneConfig::Dense),
        keep_first_logits: true,
        kv_dtype,
        ..Default::default()
    };
    let g = llava
        .generate_ids(&prompt, enc.as_slice(), &opts, &mut |_| {})
        .expect("generate");
    (g.tokens, g.first_logits.expect("first logits"))
}

#[test]
fn llama_tokenizer_from_gguf_matches_tokenizer_json() {
    let (text, _) = pair();
    let f = GgufFile::open(&text).expect("open text gguf");
    let ours = models::gguf::tokenizer(&f).expect("tokenizer from metadata");
    let theirs =
        Tokenizer::from_file(fixtures().join("tokenizer/tokenizer.json")).expect("tokenizer.json");
    let mut strings: Vec<String> = cases().into_iter().map(|c| c.prompt).collect();
    strings.extend(
        [
            "Hello world",
            " leading space",
            "   three leading spaces and  two inside",
            "trailing space ",
            "digits 0123456789 and 3.14159, 1e-5, 2024-11-25",
            "unicode: café naïve 東京 Ελληνικά 🙂🚀 ﬁ",
            "newlines\nand\n\ntabs\there\r\n",
            "USER: <image>\nWhat is this? ASSISTANT:",
            "two <image> placeholders <image>!",
            "<s> and </s> written out, <unk>, <pad>",
            "",
            " ",
            "\u{0}\u{7f} control bytes",
            "ASSISTANT: The answer is 42.</s>",
        ]
        .map(String::from),
    );
    for s in &strings {
        let a = ours.encode(s.as_str(), true).expect("ours");
        let b = theirs.encode(s.as_str(), true).expect("theirs");
        assert_eq!(
            a.get_ids(),
            b.get_ids(),
            "ids of {s:?}: ours {:?} vs tokenizer.json {:?}",
            a.get_tokens(),
            b.get_tokens()
        );
        // Special tokens kept: the converter types `<image>` user-defined (not special), so
        // skipping specials would differ on it (transformers marks it special).
        let da = ours.decode(a.get_ids(), false).expect("decode");
        let db = theirs.decode(b.get_ids(), false).expect("decode");
        assert_eq!(da, db, "decode of {s:?}");
    }
    note(&format!(
        "gguf tokenizer: {} strings tokenize identically",
        strings.len()
    ));
}

#[test]
fn spm_merges_rebuild_the_tokenizer_json_merge_order() {
    let (text, _) = pair();
    let f = GgufFile::open(&text).expect("open");
    let md = |k: &str| f.get(k).and_then(|v| v.as_array()).expect(k).to_vec();
    let tokens: Vec<String> = md("tokenizer.ggml.tokens")
        .iter()
        .map(|v| v.as_str().expect("str").to_string())
        .collect();
    let toks: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let scores: Vec<f32> = md("tokenizer.ggml.scores")
        .iter()
        .map(|v| v.as_f64().expect("score") as f32)
        .collect();
    let types: Vec<u64> = md("tokenizer.ggml.token_type")
        .iter()
        .map(|v| v.as_u64().expect("type"))
        .collect();
    let got = models::gguf::spm_merges(&toks, &scores, &types);
    let j: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer/tokenizer.json")).expect("read"),
    )
    .expect("json");
    let want: Vec<(String, String)> = j["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| match m {
            Value::Array(p) => (
                p[0].as_str().expect("l").to_string(),
                p[1].as_str().expect("r").to_string(),
            ),
            Value::String(s) => {
                let (a, b) = s.split_once(' ').expect("pair");
                (a.to_string(), b.to_string())
            }
            _ => panic!("bad merge {m}"),
        })
        .collect();
    assert_eq!(got.len(), want.len(), "merge count");
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("merge {i}: got {:?} want {:?}", got[i], want[i]);
    }
}

#[test]
fn converter_pair_matches_transformers_and_safetensors_on_cpu() {
    let (text, mmproj) = pair();
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let gguf = Llava::load_gguf(&text, &mmproj, be.clone(), None, None).expect("load pair");
    let st = Llava::load(&fixtures().join("tiny-llava-mha"), be).expect("load safetensors");
    assert_eq!(gguf.config().image_tokens(), st.config().image_tokens());
    assert_eq!(gguf.config().text, {
        // The GGUF carries no pad id and reads eps through f32 like the file stores it.
        let mut t = st.config().text.clone();
        t.rms_norm_eps = gguf.config().text.rms_norm_eps;
        t
    });
    for c in cases() {
        // Against transformers with the f32 KV cache (the 1e-3 bound); the default f16 cache
        // keeps the greedy tokens (bound and reason: tests/tests/reference.rs).
        let (toks16, logits16) = run_case(&gguf, &c);
        let (toks, logits) = run_case_kv(&gguf, &c, DType::F32);
        let (want, _) = array(&c.name, "logits");
        let e16 = compare(
            &format!("{}: logits (f16 KV) vs transformers", c.name),
            &logits16,
            &want,
            TOL_LOGITS_KV16,
        );
        assert_eq!(toks16, c.generated, "{}: greedy tokens (f16 KV)", c.name);
        let e = compare(
            &format!("{}: logits vs transformers", c.name),
            &logits,
            &want,
            TOL_LOGITS,
        );
        assert_eq!(
            toks, c.generated,
            "{}: greedy tokens vs transformers",
            c.name
        );
        let (_, st_logits) = run_case_kv(&st, &c, DType::F32);
        let e2 = compare(
            &format!("{}: logits vs safetensors", c.name),
            &logits,
            &st_logits,
            TOL_SAME,
        );
        note(&format!(
            "gguf pair {}: logits max err {e:.2e} vs transformers ({e16:.2e} with the f16 KV cache), {e2:.2e} vs safetensors; 16 greedy tokens match",
            c.name
        ));
    }
}

#[test]
fn converter_pair_runs_on_gpu() {
    let be: Arc<dyn Backend> = match engine_wgpu::open(&Default::default()) {
        Ok(b) => b,
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI is set but no GPU backend: {e}"),
        Err(e) => {
            note(&format!(
                "SKIP converter_pair_runs_on_gpu: no GPU backend ({e})"
            ));
            return;
        }
    };
    let (text, mmproj) = pair();
    let llava = Llava::load_gguf(&text, &mmproj, be, None, None).expect("load pair on GPU");
    let c = cases()
        .into_iter()
        .find(|c| c.name == "square_crop")
        .expect("square_crop case");
    let (toks, logits) = run_case(&llava, &c);
    let (want, _) = array(&c.name, "logits");
    // GPU kernels may use other summation orders / f16 arithmetic (the reference suite
    // allows 2e-3 on features); logits get 2e-2 here.
    let e = compare("gpu logits vs transformers", &logits, &want, 2e-2);
    assert_eq!(toks, c.generated, "gpu greedy tokens");
    note(&format!(
        "gguf pair on GPU square_crop: logits max err {e:.2e}, tokens match"
    ));
}

/// llama.cpp pairs converted from the original LLaVA checkpoints have no `<image>` token
/// (32000 tokens). The same text file with the two added tokens dropped from its vocabulary
/// metadata still answers the image prompt identically: the span's id is never embedded.
#[test]
fn pair_without_an_image_token_still_matches() {
    use engine_core::gguf::{to_gguf_bytes, GgufTensorOut, GgufValue};
    use engine_core::weights::WeightSource;
    let (text, mmproj) = pair();
    let f = GgufFile::open(&text).expect("open");
    let md: Vec<(String, GgufValue)> = f
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("GGUF."))
        .map(|(k, v)| {
            let v = match (k.as_str(), v) {
                (
                    "tokenizer.ggml.tokens" | "tokenizer.ggml.scores" | "tokenizer.ggml.token_type",
                    GgufValue::Array(a),
                ) => GgufValue::Array(a[..32000].to_vec()),
                _ => v.clone(),
            };
            (k.clone(), v)
        })
        .filter(|(k, _)| k != "tokenizer.ggml.padding_token_id")
        .collect();
    let ts: Vec<GgufTensorOut> = f
        .tensor_infos()
        .map(|i| {
            let v = f.view(&i.name).expect("view");
            GgufTensorOut {
                name: i.name.clone(),
                dtype: v.dtype,
                shape: v.shape.to_vec(),
                bytes: v.bytes.to_vec(),
            }
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("visi-gguf-noimage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("no-image-token.gguf");
    std::fs::write(&path, to_gguf_bytes(&md, &ts).expect("write")).expect("write");
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let llava = Llava::load_gguf(&path, &mmproj, be, None, None).expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(llava.config().image_token_index, 32000, "placeholder id");
    let c = cases()
        .into_iter()
        .find(|c| c.name == "square_crop")
        .expect("case");
    let (toks, _) = run_case(&llava, &c);
    assert_eq!(toks, c.generated, "greedy tokens without an <image> token");
}

/// The LLaVA-1.6 pair llama.cpp's converters make from tiny-next-mistral
/// (`tools/make_gguf_pair.py --next`): an mmproj with `clip.vision.image_grid_pinpoints` and
/// `model.image_newline`, a Mistral decoder as `llama`.
fn next_pair() -> (PathBuf, PathBuf) {
    let d = fixtures().join("gguf/tiny-next-mistral");
    (
        d.join("tiny-next-mistral.f16.gguf"),
        d.join("mmproj-tiny-next-mistral.f16.gguf"),
    )
}

/// One NeXT reference case through `llava`: prompt ids, packed image features, greedy
/// tokens, first-step logits, and the pruning decisions under `prune`.
fn run_next_case(
    llava: &Llava,
    c: &Value,
    prune: Option<PruneConfig>,
) -> (Vec<u32>, Vec<f32>, Vec<f32>, Option<Vec<usize>>) {
    let images: Vec<image::RgbImage> = c["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|p| models::load_image(&fixtures().join(p.as_str().expect("path"))).expect("image"))
        .collect();
    let q = if images.len() == 2 {
        "What differs between these images?"
    } else {
        "What is shown in this image?"
    };
    let counts: Vec<usize> = images
        .iter()
        .map(|i| {
            llava
                .image_tokens_for(i.width(), i.height())
                .expect("count")
        })
        .collect();
    let prompt = llava
        .prompt_images(Template::MistralInstruct, q, &counts)
        .expect("prompt");
    let want_ids: Vec<u32> = serde_json::from_value(c["input_ids_expanded"].clone()).expect("ids");
    assert_eq!(prompt.ids, want_ids, "prompt ids");
    let enc: Vec<_> = images
        .iter()
        .map(|i| {
            llava
                .encode_image(i, models::PadMode::Crop)
                .expect("encode")
        })
        .collect();
    let mut features = Vec::new();
    for e in &enc {
        features.extend(llava.backend().to_vec_f32(&e.embeds).expect("features"));
    }
    // The f32 KV cache: these logits are held to transformers' within 1e-3, which the
    // f16 default moves past (4.4e-3 on the landscape case), as in `run_case`'s callers.
    let opts = GenerateOptions {
        max_new_tokens: c["generated_ids"].as_array().expect("ids").len(),
        prune,
        keep_first_logits: true,
        kv_dtype: DType::F32,
        ..Default::default()
    };
    let g = llava
        .generate_ids(&prompt, &enc, &opts, &mut |_| {})
        .expect("generate");
    (
        g.tokens,
        g.first_logits.expect("logits"),
        features,
        g.prune.kept_image_tokens,
    )
}

#[test]
fn next_converter_pair_equals_the_safetensors_load_and_transformers() {
    let (text, mmproj) = next_pair();
    let cpu = || -> Arc<dyn Backend> { Arc::new(CpuBackend::new()) };
    let pair = Llava::load_gguf(&text, &mmproj, cpu(), None, None).expect("load 1.6 pair");
    let st = Llava::load(&fixtures().join("tiny-next-mistral"), cpu()).expect("load safetensors");
    let (pc, sc) = (pair.config(), st.config());
    assert_eq!(pc.arch, sc.arch, "architecture");
    assert_eq!(
        pc.image_grid_pinpoints, sc.image_grid_pinpoints,
        "pinpoints"
    );
    assert_eq!(pc.vision.image_size, sc.vision.image_size);
    let dir = fixtures().join("reference-next/tiny-next-mistral");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).expect("read"))
            .expect("parse");
    let arrays = open_safetensors(&dir.join("arrays.safetensors")).expect("arrays");
    let runs: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("pruning.json")).expect("read pruning.json"),
    )
    .expect("parse pruning.json");
    for (name, c) in v["cases"].as_object().expect("cases") {
        let (tp, lp, fp, _) = run_next_case(&pair, c, Some(PruneConfig::Dense));
        let (ts, ls, fs, _) = run_next_case(&st, c, Some(PruneConfig::Dense));
        let ef = compare(
            &format!("{name}: packed features, pair vs safetensors"),
            &fp,
            &fs,
            TOL_SAME,
        );
        let el = compare(
            &format!("{name}: logits, pair vs safetensors"),
            &lp,
            &ls,
            TOL_SAME,
        );
        assert_eq!(tp, ts, "{name}: tokens, pair vs safetensors");
        let want: Vec<u32> = serde_json::from_value(c["generated_ids"].clone()).expect("ids");
        assert_eq!(tp, want, "{name}: tokens vs transformers");
        let w = arrays.view(&format!("{name}.logits")).expect("logits");
        let w: Vec<f32> = w
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let et = compare(
            &format!("{name}: logits vs transformers"),
            &lp,
            &w,
            TOL_LOGITS,
        );
        note(&format!(
            "1.6 pair {name}: features {ef:.1e}, logits {el:.1e} from the safetensors load, {et:.1e} from transformers; tokens match"
        ));
    }
    // Pruning decides the same on both loads (every reference run of the two-image case).
    for run in runs["runs"].as_array().expect("runs") {
        if run["case"] != "two" {
            continue;
        }
        let cfg = PruneConfig::from_value(&run["prune"]).expect("prune config");
        let c = &v["cases"]["two"];
        let (tp, _, _, kp) = run_next_case(&pair, c, Some(cfg.clone()));
        let (ts, _, _, ks) = run_next_case(&st, c, Some(cfg));
        assert_eq!(
            (tp, kp),
            (ts, ks),
            "two {}: pair vs safetensors",
            run["name"]
        );
    }
}

/// A LLaVA-1.6 mmproj with half of what makes it one (the grid without the newline vector,
/// the newline without the grid) or another packing is refused, never read as LLaVA-1.5.
#[test]
fn incomplete_or_other_llava_16_mmprojs_are_refused() {
    use engine_core::gguf::{to_gguf_bytes, GgufTensorOut, GgufValue};
    use engine_core::weights::WeightSource;
    let (text, mmproj) = next_pair();
    let f = GgufFile::open(&mmproj).expect("open");
    let dir = std::env::temp_dir().join(format!("visi-gguf-next-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    // (tag, metadata key or tensor to drop, metadata to set, what the error names)
    type Variant<'a> = (&'a str, &'a str, Option<(&'a str, GgufValue)>, &'a str);
    let variants: [Variant; 3] = [
        (
            "no-newline",
            "model.image_newline",
            None,
            "model.image_newline",
        ),
        (
            "no-grid",
            "clip.vision.image_grid_pinpoints",
            None,
            "image_grid_pinpoints",
        ),
        (
            "flat",
            "",
            Some((
                "clip.vision.mm_patch_merge_type",
                GgufValue::String("flat".into()),
            )),
            "spatial_unpad",
        ),
    ];
    for (tag, drop, set, needle) in variants {
        let md: Vec<(String, GgufValue)> = f
            .metadata
            .iter()
            .filter(|(k, _)| !k.starts_with("GGUF.") && k.as_str() != drop)
            .map(|(k, v)| match &set {
                Some((sk, sv)) if k == sk => (k.clone(), sv.clone()),
                _ => (k.clone(), v.clone()),
            })
            .collect();
        let ts: Vec<GgufTensorOut> = f
            .tensor_infos()
            .filter(|i| i.name != drop)
            .map(|i| {
                let v = f.view(&i.name).expect("view");
                GgufTensorOut {
                    name: i.name.clone(),
                    dtype: v.dtype,
                    shape: v.shape.to_vec(),
                    bytes: v.bytes.to_vec(),
                }
            })
            .collect();
        let path = dir.join(format!("mmproj-{tag}.gguf"));
        std::fs::write(&path, to_gguf_bytes(&md, &ts).expect("write")).expect("write");
        let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
        let err = Llava::load_gguf(&text, &path, be, None, None)
            .err()
            .unwrap_or_else(|| panic!("{tag}: loaded"))
            .to_string();
        assert!(err.contains(needle), "{tag}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
