//! Quantizing at load (`Weights::with_quant`): a small random Llama run with every format
//! against the same weights in f32, on the CPU backend. Reports the first-step logit error
//! and greedy agreement per format on stderr (past libtest's capture).

use std::io::Write;
use std::sync::Arc;

use engine_core::quant::QuantType;
use engine_core::weights::{MemorySource, Weights};
use engine_core::{Backend, CpuBackend};
use models::config::TextConfig;
use models::llama::Llama;
use models::session::{PromptInput, Session};
use pruner::Dense;

struct Lcg(u64);
impl Lcg {
    fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32) / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn config() -> TextConfig {
    TextConfig {
        vocab_size: 96,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling_factor: 1.0,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn source(cfg: &TextConfig) -> MemorySource {
    let mut rng = Lcg(42);
    let mut src = MemorySource::new();
    let mut put = |name: String, shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.uniform() * scale).collect();
        src.insert_f16(name, shape, &v).expect("insert");
    };
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    put(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, h],
        1.0,
    );
    put("model.norm.weight".into(), &[h], 1.0);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[h], 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0);
        let s = 1.0 / (h as f32).sqrt();
        put(format!("{p}.self_attn.q_proj.weight"), &[h, h], 3.0 * s);
        put(format!("{p}.self_attn.k_proj.weight"), &[kv, h], 3.0 * s);
        put(format!("{p}.self_attn.v_proj.weight"), &[kv, h], s);
        put(format!("{p}.self_attn.o_proj.weight"), &[h, h], s);
        put(format!("{p}.mlp.gate_proj.weight"), &[i, h], s);
        put(format!("{p}.mlp.up_proj.weight"), &[i, h], s);
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[h, i],
            1.0 / (i as f32).sqrt(),
        );
    }
    src
}

/// First-step logits and `n` greedy tokens (EOS does not stop them).
fn run(m: &Arc<Llama>, b: &Arc<dyn Backend>, ids: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let mut session = Session::new(m.clone(), b.clone());
    let pre = session
        .prefill(
            PromptInput { ids, images: &[] },
            &mut Dense,
            &models::session::PrefixKey::dense(),
            n,
        )
        .expect("prefill");
    let first = b.to_vec_f32(&pre.logits).expect("read");
    let mut toks = Vec::new();
    let mut logits = pre.logits;
    for _ in 0..n {
        let t = b
            .to_vec_u32(&b.argmax(&logits).expect("argmax"))
            .expect("read")[0];
        toks.push(t);
        logits = session.step(t).expect("decode");
    }
    (first, toks)
}

#[test]
fn quantized_at_load_tracks_f16() {
    let cfg = config();
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let w = Weights::new(Arc::new(source(&cfg)), be.clone());
    let load =
        |w: &Weights| Arc::new(Llama::load(&w.pp("model"), &w.pp("lm_head"), &cfg).expect("load"));
    let ids = [3u32, 17, 42, 5, 88, 1, 60];
    let (want, want_toks) = run(&load(&w), &be, &ids, 8);
    let std = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
    // Relative (to the logits' rms) max error allowed per format: measured 0.015 for q8_0
    // and 0.26-0.29 for the 4-bit formats on these random weights; a broken format is ~1+.
    for (qt, tol) in [
        (QuantType::Q8_0, 0.05),
        (QuantType::Q4_0, 0.5),
        (QuantType::Q4_1, 0.5),
        (QuantType::Q4K, 0.5),
    ] {
        let m = load(&w.with_quant(Some(qt)));
        let (got, toks) = run(&m, &be, &ids, 8);
        let (imax, err) = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .enumerate()
            .fold((0, 0f32), |a, (i, e)| if e > a.1 { (i, e) } else { a });
        let agree = toks
            .iter()
            .zip(&want_toks)
            .take_while(|(a, b)| a == b)
            .count();
        let _ = writeln!(
            std::io::stderr(),
            "quant_load {qt}: first-step max |logit err| {err:.4} ({:.3} of rms {std:.3}), greedy agrees on {agree}/8",
            err / std
        );
        assert!(
            err / std <= tol,
            "{qt}: logit {imax}: got {} want {} (error {:.3} of rms, allowed {tol})",
            got[imax],
            want[imax],
            err / std
        );
        if qt == QuantType::Q8_0 {
            assert_eq!(toks, want_toks, "q8_0 greedy tokens");
        }
    }
}
