//! Cross-check of tests/fixtures/reference/<model>/pruning.json against the engine: runs the
//! CPU backend's Llama scheduler (models::llama::Llama::prefill / decode_step) with the pruner
//! built from each run's `prune` config, on the exact decoder inputs visipruner_ref.py used,
//! and compares fusion layer, K, exit layer, per-layer lengths and the 16 greedy ids.
//! Not a workspace member (its own [workspace]); a tool, not a test. Usage (repo root):
//!
//!   /tmp/venv-fix/bin/python tools/visipruner_ref.py --embeds-out /tmp/emb   # or reuse
//!   cp Cargo.lock tools/xcheck_pruning/ && cargo run --release --offline \
//!       --manifest-path tools/xcheck_pruning/Cargo.toml -- \
//!       tests/fixtures/tiny-llava-gqa /tmp/emb/emb-tiny-llava-gqa.safetensors \
//!       tests/fixtures/reference/tiny-llava-gqa/pruning.json
//!
//! Prints one MATCH/DIFF line per run; exits 1 on any DIFF.
use std::path::Path;
use std::sync::Arc;

use engine_core::weights::{open_safetensors, Weights};
use engine_core::{Backend, CpuBackend, HostData, Shape};
use models::config::LlavaConfig;
use models::llama::{ImageSpan, Llama};
use models::session::Session;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let (model_dir, embeds_file, pruning) = (&a[1], &a[2], &a[3]);
    let b: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let cfg = LlavaConfig::from_file(&Path::new(model_dir).join("config.json"))?;
    let w = Weights::new(open_safetensors(Path::new(model_dir))?, b.clone());
    let (mp, hp) = if w.contains("lm_head.weight") {
        ("model.language_model", "lm_head")
    } else {
        ("language_model.model", "language_model.lm_head")
    };
    let llama = Arc::new(Llama::load(&w.pp(mp), &w.pp(hp), &cfg.text)?);
    let bytes = std::fs::read(embeds_file)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pruning)?)?;
    let nl = cfg.text.num_hidden_layers;
    let mut diffs = 0;
    for run in p["runs"].as_array().unwrap() {
        let case = run["case"].as_str().unwrap();
        let t = st.tensor(case)?;
        let data: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (s, h) = (t.shape()[0], t.shape()[1]);
        let emb = b.upload(HostData::F32(&data), Shape::from((s, h)))?;
        let span = run["image_span"].as_array().map(|v| ImageSpan {
            start: v[0].as_u64().unwrap() as usize,
            end: v[1].as_u64().unwrap() as usize,
        });
        let pc = pruner::PruneConfig::from_json(&run["prune"].to_string())?;
        let mut pr = pruner::build(&pc, nl)?;
        let mut session = Session::new(llama.clone(), b.clone());
        let pre = session.prefill_embeds(&emb, span.as_slice(), pr.as_mut(), 16)?;
        let (mut logits, stats) = (pre.logits, pre.stats);
        let mut ids = vec![];
        let mut margins = vec![];
        for step in 0..16 {
            let l = b.to_vec_f32(&logits)?;
            let mut idx: Vec<usize> = (0..l.len()).collect();
            idx.sort_by(|&x, &y| l[y].partial_cmp(&l[x]).unwrap().then(x.cmp(&y)));
            ids.push(idx[0] as u64);
            margins.push(l[idx[0]] - l[idx[1]]);
            if step == 15 {
                break;
            }
            logits = session.step(idx[0] as u32)?;
        }
        let r = pr.report();
        let ok = r.fusion_layer.map(|x| x as u64) == run["fusion_layer"].as_u64()
            && serde_json::to_value(&r.kept_image_tokens)? == run["kept_image_tokens"]
            && serde_json::to_value(&r.text_only_from_layer)? == run["text_only_from_layer"]
            && serde_json::to_value(&stats.layer_seq_lens)? == run["layer_seq_lens"]
            && serde_json::to_value(&ids)? == run["generated_ids"];
        diffs += usize::from(!ok);
        let want: Vec<f64> = run["step_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let md = margins
            .iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0f64, f64::max);
        println!("{} {:10} {:8} fusion {:?} kept {:?} exit {:?} lens {:?} ids_match {} max_margin_diff {:.2e}",
            if ok { "MATCH" } else { "DIFF " }, case, run["name"].as_str().unwrap(), r.fusion_layer,
            r.kept_image_tokens.as_ref().map(|k| k.len()), r.text_only_from_layer, stats.layer_seq_lens,
            serde_json::to_value(&ids)? == run["generated_ids"], md);
    }
    if diffs > 0 {
        anyhow::bail!("{diffs} run(s) differ from the reference");
    }
    Ok(())
}
