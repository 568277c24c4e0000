//! Conversations through the one generation core (`models::session`):
//! - a 3-message conversation equals transformers (`reference/*/conversation.json`, made by
//!   tools/make_conversation_refs.py), fresh and as the follow-up turn of a session;
//! - every follow-up turn of a session equals a fresh run on the whole conversation
//!   (tokens, fusion layer, kept tokens, text-only layer, per-layer lengths) for every
//!   pruning config of the reference runs, dense included, on the CPU and the GPU backend;
//! - when a follow-up's pruning decisions differ from the previous turn's, the prefix rows
//!   are recomputed from the diverging layer and the result still equals a fresh run;
//! - conversations over two images (the second attached on turn 2), LLaVA-1.5 and
//!   LLaVA-NeXT, equal fresh runs turn by turn, multi-image shallow masks included.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use engine_core::{Backend, DType, HostData};
use models::chat::{
    load_image_url, messages_from_json, render_mistral_instruct, render_vicuna_v1, Message, Part,
    Role,
};
use models::llava::{GenerateOptions, Generation, Llava};
use models::prompt::Template;
use models::session::{ImageInput, PrefixKey, PromptInput, Session};
use models::ImageSpan;
use pruner::{
    Action, Capture, LayerView, PruneConfig, PruneError, PruneReport, Pruner, ShallowMask,
};
use serde_json::Value;
use visi_tests::{first_difference, fixtures, references};

const TOL_LOGITS: f32 = 1e-3;

fn backends(test: &str) -> Result<Vec<Arc<dyn Backend>>> {
    visi_tests::test_backends(test)
}

fn same_decisions(what: &str, got: &Generation, want: &Generation) -> Result<()> {
    if let Some(d) = first_difference(&got.tokens, &want.tokens) {
        bail!("{what}: tokens differ from a fresh run: {d}");
    }
    ensure!(
        got.prune.fusion_layer == want.prune.fusion_layer
            && got.prune.kept_image_tokens == want.prune.kept_image_tokens
            && got.prune.text_only_from_layer == want.prune.text_only_from_layer,
        "{what}: decisions differ: got fusion {:?} kept {:?} exit {:?}, fresh {:?} {:?} {:?}",
        got.prune.fusion_layer,
        got.prune.kept_image_tokens,
        got.prune.text_only_from_layer,
        want.prune.fusion_layer,
        want.prune.kept_image_tokens,
        want.prune.text_only_from_layer
    );
    ensure!(
        got.layer_seq_lens == want.layer_seq_lens && got.kv_lens == want.kv_lens,
        "{what}: schedule differs: {:?}/{:?} vs fresh {:?}/{:?}",
        got.layer_seq_lens,
        got.kv_lens,
        want.layer_seq_lens,
        want.kv_lens
    );
    Ok(())
}

/// Dense greedy options against a transformers reference of `tokens` tokens: the f32 KV
/// cache (the default f16 one moves logits by its rounding; bound and reason in
/// tests/reference.rs), first logits kept.
fn reference_opts(tokens: usize) -> GenerateOptions {
    GenerateOptions {
        template: Template::Raw,
        max_new_tokens: tokens,
        prune: Some(PruneConfig::Dense),
        keep_first_logits: true,
        kv_dtype: DType::F32,
        ..Default::default()
    }
}

/// `got` has transformers' greedy tokens and its top-5 first logits within [`TOL_LOGITS`].
fn equals_transformers(
    what: &str,
    got: &Generation,
    tokens: &[u32],
    top5: &[(u32, f32)],
) -> Result<()> {
    if let Some(d) = first_difference(&got.tokens, tokens) {
        bail!("{what}: tokens vs transformers: {d}");
    }
    let logits = got.first_logits.as_deref().context("logits")?;
    for &(id, want) in top5 {
        let g = logits[id as usize];
        ensure!(
            (g - want).abs() <= TOL_LOGITS,
            "{what}: logit {id}: got {g} want {want}"
        );
    }
    Ok(())
}

#[test]
fn three_message_conversation_matches_transformers() -> Result<()> {
    let mut checked = 0;
    for r in references()? {
        let dir = fixtures().join("reference").join(&r.name);
        let path = dir.join("conversation.json");
        if !path.is_file() {
            continue;
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let msgs = messages_from_json(&v["messages"])?;
        let rendered = render_vicuna_v1(&msgs)?;
        ensure!(
            rendered.text == v["prompt"].as_str().unwrap_or_default(),
            "{}: rendered {:?}\nwant {:?}",
            r.name,
            rendered.text,
            v["prompt"]
        );
        let want_ids: Vec<u32> = serde_json::from_value(v["input_ids_expanded"].clone())?;
        let want_tokens: Vec<u32> = serde_json::from_value(v["generated_ids"].clone())?;
        let top5: Vec<(u32, f32)> = serde_json::from_value(v["first_logits_top5"].clone())?;
        for b in backends("three_message_conversation_matches_transformers")? {
            let dev = b.device_info().backend;
            let llava = Llava::load(&r.model_dir, b)?;
            let img = load_image_url(&rendered.images[0], Some(&dir))?;
            let prompt = llava.prompt(Template::Raw, &rendered.text, true)?;
            ensure!(
                prompt.ids == want_ids,
                "{} {dev}: prompt ids differ",
                r.name
            );
            let enc = llava.encode_image(&img, models::PadMode::Crop)?;
            let opts = reference_opts(want_tokens.len());
            // Fresh.
            let fresh =
                llava.generate_ids(&prompt, std::slice::from_ref(&enc), &opts, &mut |_| {})?;
            equals_transformers(
                &format!("{} {dev} fresh", r.name),
                &fresh,
                &want_tokens,
                &top5,
            )?;
            // As the follow-up turn of a session that answered the first question.
            let mut session = llava.session();
            let first = render_vicuna_v1(&msgs[..1])?;
            let p1 = llava.prompt(Template::Raw, &first.text, true)?;
            llava.generate_in(
                &mut session,
                &p1,
                std::slice::from_ref(&enc),
                &opts,
                &mut |_| {},
                &|| false,
            )?;
            let turn = llava.generate_in(
                &mut session,
                &prompt,
                std::slice::from_ref(&enc),
                &opts,
                &mut |_| {},
                &|| false,
            )?;
            ensure!(turn.reused_tokens > 0, "{} {dev}: nothing reused", r.name);
            if let Some(d) = first_difference(&turn.tokens, &want_tokens) {
                bail!("{} {dev}: follow-up turn vs transformers: {d}", r.name);
            }
            println!(
                "{} {dev}: 3-message conversation equals transformers; follow-up reused {} of {} tokens",
                r.name, turn.reused_tokens, turn.prompt_tokens
            );
            checked += 1;
        }
    }
    ensure!(checked > 0, "no conversation references found");
    Ok(())
}

/// Three turns in one session against fresh runs, per pruning config.
fn conversation_against_fresh(
    llava: &Llava,
    cfg: Option<PruneConfig>,
    what: &str,
) -> Result<(usize, bool)> {
    let case = "images/square.png";
    let img = models::load_image(&fixtures().join(case))?;
    let enc = llava.encode_image(&img, models::PadMode::Crop)?;
    let opts = GenerateOptions {
        template: Template::Raw,
        max_new_tokens: 6,
        prune: cfg,
        ..Default::default()
    };
    let questions = [
        "What is shown in this image?",
        "Describe the colours.",
        "Is there a circle?",
    ];
    let mut session = llava.session();
    let mut msgs: Vec<Message> = Vec::new();
    let (mut reused, mut recomputed) = (0, false);
    for (t, q) in questions.iter().enumerate() {
        let mut parts = vec![Part::Text(q.to_string())];
        if t == 0 {
            parts.insert(0, Part::Image(case.to_string()));
        }
        msgs.push(Message {
            role: Role::User,
            parts,
        });
        let r = render_vicuna_v1(&msgs)?;
        let prompt = llava.prompt(Template::Raw, &r.text, true)?;
        let got = llava.generate_in(
            &mut session,
            &prompt,
            std::slice::from_ref(&enc),
            &opts,
            &mut |_| {},
            &|| false,
        )?;
        let fresh = llava.generate_ids(&prompt, std::slice::from_ref(&enc), &opts, &mut |_| {})?;
        same_decisions(&format!("{what} turn {}", t + 1), &got, &fresh)?;
        if t > 0 {
            ensure!(
                got.reused_tokens > 0,
                "{what} turn {}: nothing reused",
                t + 1
            );
            reused += got.reused_tokens;
            recomputed |= got.recomputed_from_layer.is_some();
        }
        msgs.push(Message::text(Role::Assistant, got.text.trim()));
    }
    Ok((reused, recomputed))
}

#[test]
fn follow_up_turns_equal_fresh_runs_for_every_pruning_config() -> Result<()> {
    for b in backends("follow_up_turns_equal_fresh_runs_for_every_pruning_config")? {
        let dev = b.device_info().backend;
        for r in references()? {
            let llava = Llava::load(&r.model_dir, b.clone())?;
            let mut configs = vec![("dense".to_string(), Some(PruneConfig::Dense))];
            for run in r.prune_runs.iter().filter(|p| p.case == "square_crop") {
                let c = PruneConfig::from_value(&run.prune)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", run.name))?;
                configs.push((run.name.clone(), Some(c)));
            }
            for (name, cfg) in configs {
                let what = format!("{} {dev} {name}", r.name);
                let (reused, recomputed) = conversation_against_fresh(&llava, cfg, &what)?;
                println!("{what}: 3 turns equal fresh runs; reused {reused} tokens; recomputed after a changed decision: {recomputed}");
            }
        }
    }
    Ok(())
}

/// A system message, two user turns and an answer on the LLaVA-NeXT Mistral fixture,
/// rendered by transformers' `apply_chat_template` with llava-hf's llava-v1.6-mistral
/// template (`reference-next/tiny-next-mistral/conversation.json`, made by
/// tools/make_next_conversation_refs.py): our `mistral_instruct` rendering gives the same
/// text, and the answer equals transformers' (ids, first logits within 1e-3, greedy tokens).
#[test]
fn next_mistral_conversation_matches_transformers() -> Result<()> {
    let dir = fixtures().join("reference-next").join("tiny-next-mistral");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("conversation.json"))?)?;
    let msgs = messages_from_json(&v["messages"])?;
    let rendered = models::chat::render(Template::MistralInstruct, &msgs)?;
    let want_prompt = v["prompt"].as_str().unwrap_or_default();
    ensure!(
        rendered.text == want_prompt,
        "rendered {:?}\nwant {:?}",
        rendered.text,
        want_prompt
    );
    // One user turn renders exactly as the single-prompt template does.
    let one = render_mistral_instruct(&msgs[1..2])?;
    ensure!(
        one.text == Template::MistralInstruct.render_images("What is shown in this image?", 1)?,
        "one turn: {:?}",
        one.text
    );
    let want_ids: Vec<u32> = serde_json::from_value(v["input_ids_expanded"].clone())?;
    let want_tokens: Vec<u32> = serde_json::from_value(v["generated_ids"].clone())?;
    let top5: Vec<(u32, f32)> = serde_json::from_value(v["first_logits_top5"].clone())?;
    for b in backends("next_mistral_conversation_matches_transformers")? {
        let dev = b.device_info().backend;
        let llava = Llava::load(&fixtures().join("tiny-next-mistral"), b)?;
        let pics = rendered
            .images
            .iter()
            .map(|u| load_image_url(u, Some(&dir)))
            .collect::<Result<Vec<_>, _>>()?;
        let counts = pics
            .iter()
            .map(|p| llava.image_tokens_for(p.width(), p.height()))
            .collect::<Result<Vec<_>, _>>()?;
        let prompt = llava.prompt_images(Template::Raw, &rendered.text, &counts)?;
        ensure!(prompt.ids == want_ids, "{dev}: prompt ids differ");
        let enc = pics
            .iter()
            .map(|p| llava.encode_image(p, models::PadMode::Crop))
            .collect::<Result<Vec<_>, _>>()?;
        let opts = reference_opts(want_tokens.len());
        let got = llava.generate_ids(&prompt, &enc, &opts, &mut |_| {})?;
        equals_transformers(
            &format!("tiny-next-mistral {dev}"),
            &got,
            &want_tokens,
            &top5,
        )?;
        // As the follow-up turn of a session that answered the first question.
        let mut session = llava.session();
        let first = render_mistral_instruct(&msgs[..2])?;
        let p1 = llava.prompt_images(Template::Raw, &first.text, &counts)?;
        llava.generate_in(&mut session, &p1, &enc, &opts, &mut |_| {}, &|| false)?;
        let turn = llava.generate_in(&mut session, &prompt, &enc, &opts, &mut |_| {}, &|| false)?;
        ensure!(
            turn.reused_tokens > p1.image_spans[0].end,
            "{dev}: reused only {}",
            turn.reused_tokens
        );
        if let Some(d) = first_difference(&turn.tokens, &want_tokens) {
            bail!("tiny-next-mistral {dev}: follow-up turn vs transformers: {d}");
        }
        println!("tiny-next-mistral {dev}: the mistral_instruct conversation equals transformers");
    }
    Ok(())
}

/// Three turns in one session, a second image attached on turn 2, against fresh runs.
fn two_image_conversation_against_fresh(
    llava: &Llava,
    cfg: Option<PruneConfig>,
    what: &str,
    files: [&str; 2],
) -> Result<usize> {
    let pics = files
        .iter()
        .map(|f| models::load_image(&fixtures().join(f)))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = GenerateOptions {
        template: Template::Raw,
        max_new_tokens: 6,
        prune: cfg,
        ..Default::default()
    };
    let turns = [
        (Some(0), "What is shown in this image?"),
        (Some(1), "What differs between these images?"),
        (None, "Is there a circle?"),
    ];
    let mut session = llava.session();
    let mut msgs: Vec<Message> = Vec::new();
    let mut reused = 0;
    for (t, (image, q)) in turns.iter().enumerate() {
        let mut parts = vec![Part::Text(q.to_string())];
        if let Some(i) = image {
            parts.insert(0, Part::Image(files[*i].to_string()));
        }
        msgs.push(Message {
            role: Role::User,
            parts,
        });
        let r = render_vicuna_v1(&msgs)?;
        let n = r.images.len();
        let counts = pics[..n]
            .iter()
            .map(|p| llava.image_tokens_for(p.width(), p.height()))
            .collect::<Result<Vec<_>, _>>()?;
        let prompt = llava.prompt_images(Template::Raw, &r.text, &counts)?;
        let enc = pics[..n]
            .iter()
            .map(|p| llava.encode_image(p, models::PadMode::Crop))
            .collect::<Result<Vec<_>, _>>()?;
        let got = llava.generate_in(&mut session, &prompt, &enc, &opts, &mut |_| {}, &|| false)?;
        let fresh = llava.generate_ids(&prompt, &enc, &opts, &mut |_| {})?;
        same_decisions(&format!("{what} turn {}", t + 1), &got, &fresh)?;
        if t > 0 {
            // Turn 2 shares the first image's span and everything before it.
            ensure!(
                got.reused_tokens > prompt.image_spans[0].end,
                "{what} turn {}: reused only {}",
                t + 1,
                got.reused_tokens
            );
            reused += got.reused_tokens;
        }
        msgs.push(Message::text(Role::Assistant, got.text.trim()));
    }
    Ok(reused)
}

#[test]
fn two_image_conversations_equal_fresh_runs() -> Result<()> {
    // LLaVA-1.5 and LLaVA-NeXT, with the two-image reference runs' pruning configs (the
    // multi-image shallow masks among them) and dense.
    let plan = [
        ("tiny-llava-mha", "tiny-llava-mha-two-images"),
        ("tiny-next-llama", "tiny-next-llama"),
    ];
    for b in backends("two_image_conversations_equal_fresh_runs")? {
        let dev = b.device_info().backend;
        for (model, refname) in plan {
            let llava = Llava::load(&fixtures().join(model), b.clone())?;
            let runs = visi_tests::load_prune_runs(
                &fixtures()
                    .join("reference-next")
                    .join(refname)
                    .join("pruning.json"),
            )?;
            let mut configs = vec![("dense".to_string(), Some(PruneConfig::Dense))];
            for run in runs.iter().filter(|p| p.case == "two") {
                let c = PruneConfig::from_value(&run.prune)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", run.name))?;
                configs.push((run.name.clone(), Some(c)));
            }
            ensure!(configs.len() > 3, "{refname}: too few two-image runs");
            for (name, cfg) in configs {
                let what = format!("{model} {dev} {name}");
                let reused = two_image_conversation_against_fresh(
                    &llava,
                    cfg,
                    &what,
                    ["images/landscape.png", "images/portrait.png"],
                )?;
                println!("{what}: 3 turns over 2 images equal fresh runs; reused {reused} tokens");
            }
        }
    }
    Ok(())
}

/// A pruner whose decisions are scripted per prefill: keep `keeps[i]` after layer
/// `layers[i]` on the i-th prompt, so a follow-up can decide differently from its turn 1.
struct Scripted {
    plan: Vec<(usize, Vec<usize>)>,
    call: usize,
    fired: Option<usize>,
}

impl Pruner for Scripted {
    fn mask(&self, layer: usize) -> ShallowMask {
        if layer == 0 {
            ShallowMask::Layer0Sink
        } else {
            ShallowMask::None
        }
    }
    fn capture(&self, _layer: usize) -> Capture {
        Capture::Nothing
    }
    fn after_layer(&mut self, view: &LayerView) -> Result<Action, PruneError> {
        let (at, keep) = &self.plan[(self.call - 1) % self.plan.len()];
        if view.layer == *at && self.fired.is_none() {
            self.fired = Some(*at);
            return Ok(Action::Keep(keep.clone()));
        }
        Ok(Action::Continue)
    }
    fn report(&self) -> PruneReport {
        PruneReport {
            method: "scripted".into(),
            config: Value::Null,
            fusion_layer: self.fired,
            kept_image_tokens: None,
            text_only_from_layer: None,
        }
    }
    fn reset(&mut self) {
        self.call += 1;
        self.fired = None;
    }
}

#[test]
fn changed_decisions_recompute_from_the_diverging_layer() -> Result<()> {
    let r = references()?.into_iter().next().context("no fixture")?;
    for b in backends("changed_decisions_recompute_from_the_diverging_layer")? {
        let dev = b.device_info().backend;
        let llava = Llava::load(&r.model_dir, b.clone())?;
        let n_img = llava.config().image_tokens();
        let h = llava.config().text.hidden_size;
        // Deterministic "image embeddings" and a prompt: 5 text, the image, 7 text.
        let emb: Vec<f32> = (0..n_img * h)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 80.0)
            .collect();
        let embeds = b.upload(HostData::F32(&emb), (n_img, h).into())?;
        let span = ImageSpan {
            start: 5,
            end: 5 + n_img,
        };
        let img = ImageInput {
            span,
            key: 7,
            embeds,
        };
        let mut ids: Vec<u32> = (0..5).map(|i| 100 + i).collect();
        ids.extend(std::iter::repeat_n(32000, n_img));
        ids.extend((0..7).map(|i| 200 + i));
        let mut ids2 = ids.clone();
        ids2.extend((0..9).map(|i| 300 + i));
        let plans = [
            // Same decision on both turns: every layer reused.
            (vec![(2, vec![1, 3, 4])], vec![(2, vec![1, 3, 4])], None),
            // Another kept set at the same layer: recomputed from layer 3.
            (vec![(2, vec![1, 3, 4])], vec![(2, vec![0, 2])], Some(3)),
            // Another fusion layer: recomputed from the earlier of the two plus one.
            (vec![(3, vec![5])], vec![(1, vec![2, 5, 6])], Some(2)),
        ];
        // The scripted pruner has no config: every prefill here runs it under one key.
        let scripted_key = PrefixKey::dense();
        for (i, (p1, p2, want_from)) in plans.into_iter().enumerate() {
            let mut s = Session::new(llava.llama_arc().clone(), b.clone());
            let mut pr = Scripted {
                plan: vec![p1.clone(), p2.clone()].into_iter().flatten().collect(),
                call: 0,
                fired: None,
            };
            s.prefill(
                PromptInput {
                    ids: &ids,
                    images: std::slice::from_ref(&img),
                },
                &mut pr,
                &scripted_key,
                4,
            )?;
            let got = s.prefill(
                PromptInput {
                    ids: &ids2,
                    images: std::slice::from_ref(&img),
                },
                &mut pr,
                &scripted_key,
                4,
            )?;
            let mut fresh = Session::new(llava.llama_arc().clone(), b.clone());
            let mut pr2 = Scripted {
                plan: p2,
                call: 0,
                fired: None,
            };
            let want = fresh.prefill(
                PromptInput {
                    ids: &ids2,
                    images: std::slice::from_ref(&img),
                },
                &mut pr2,
                &scripted_key,
                4,
            )?;
            ensure!(
                got.reused_tokens == ids.len(),
                "plan {i} {dev}: reused {}",
                got.reused_tokens
            );
            ensure!(
                got.recomputed_from_layer == want_from,
                "plan {i} {dev}: recomputed from {:?}, want {:?}",
                got.recomputed_from_layer,
                want_from
            );
            ensure!(
                got.stats.layer_seq_lens == want.stats.layer_seq_lens,
                "plan {i} {dev}: schedule"
            );
            let (g, w) = (b.to_vec_f32(&got.logits)?, b.to_vec_f32(&want.logits)?);
            let max = g
                .iter()
                .zip(&w)
                .map(|(a, c)| (a - c).abs())
                .fold(0f32, f32::max);
            ensure!(
                max <= 1e-4,
                "plan {i} {dev}: logits differ from a fresh run by {max}"
            );
            // Decoding continues from the reused cache exactly as from the fresh one.
            let (a, c) = (s.step(11)?, fresh.step(11)?);
            let (a, c) = (b.to_vec_f32(&a)?, b.to_vec_f32(&c)?);
            let max = a
                .iter()
                .zip(&c)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            ensure!(max <= 1e-4, "plan {i} {dev}: decode step differs by {max}");
            ensure!(s.kv_lens() == fresh.kv_lens(), "plan {i} {dev}: kv lens");
            println!("plan {i} {dev}: reuse equals fresh (max logit diff {max:.2e}), recomputed from {:?}", got.recomputed_from_layer);
        }
    }
    Ok(())
}
