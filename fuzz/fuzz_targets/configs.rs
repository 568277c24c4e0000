//! Any text, as each JSON configuration the engine reads from a user: llava-hf config.json,
//! preprocessor_config.json and a pruning config. Ok or a typed error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = models::config::LlavaConfig::from_json_str(text) {
        let _ = cfg.image_tokens();
        let _ = cfg.vision_layers_to_run();
    }
    let _ = models::preprocess::ImageProcessor::from_json_str(text, std::path::Path::new("fuzz.json"));
    if let Ok(p) = pruner::PruneConfig::from_json(text) {
        for layers in [1, 7, 32] {
            let _ = pruner::build(&p, layers);
        }
    }
});
