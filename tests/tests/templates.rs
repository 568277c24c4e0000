//! Prompt templates against LLaVA's own `llava/conversation.py` (vendored unedited as
//! `tools/upstream/llava_conversation.py`): `tools/render_upstream_prompts.py` renders each
//! case through upstream's `conv_templates[mode].get_prompt()` into
//! `fixtures/templates/upstream_prompts.json`, and visi must render the same string, as a
//! single prompt (`Template::render_images`) and as a conversation (`chat::render`).

use anyhow::{ensure, Context, Result};
use models::chat::{messages_from_json, render};
use models::prompt::{Template, VICUNA_SYSTEM};
use serde_json::Value;
use visi_tests::fixtures;

fn upstream() -> Result<Value> {
    let path = fixtures().join("templates/upstream_prompts.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

#[test]
fn vicuna_system_sentence_is_upstreams() -> Result<()> {
    let u = upstream()?;
    let want = u["vicuna_v1_system"].as_str().context("vicuna_v1_system")?;
    assert_eq!(
        VICUNA_SYSTEM, want,
        "VICUNA_SYSTEM differs from LLaVA's conv_vicuna_v1.system"
    );
    Ok(())
}

#[test]
fn renders_as_llava_conversation_py() -> Result<()> {
    let u = upstream()?;
    let cases = u["cases"].as_array().context("cases")?;
    ensure!(cases.len() >= 8, "too few cases: {}", cases.len());
    let mut compared = 0;
    for c in cases {
        let name = c["name"].as_str().context("name")?;
        let want = c["upstream"].as_str().context("upstream")?;
        let images = c["images"].as_u64().context("images")? as usize;
        let template = Template::from_name(c["mode"].as_str().context("mode")?)?;
        // `--template raw` passes upstream's text through untouched.
        assert_eq!(
            Template::Raw.render_images(want, images)?,
            want,
            "{name}: raw"
        );
        if !c["visi_follows_upstream"]
            .as_bool()
            .context("visi_follows_upstream")?
        {
            continue;
        }
        if let Some(q) = c["question"].as_str() {
            assert_eq!(
                template.render_images(q, images)?,
                want,
                "{name}: Template::{template:?}.render_images"
            );
        }
        let messages = messages_from_json(&c["messages"])?;
        let r = render(template, &messages)?;
        assert_eq!(r.text, want, "{name}: chat::render");
        assert_eq!(r.images.len(), images, "{name}: images");
        compared += 1;
    }
    ensure!(compared >= 7, "only {compared} cases compared");
    Ok(())
}
