//! `Llava::load` bounds what it reads from a checkpoint directory before parsing it, for
//! library users as for the CLI: a `tokenizer.json` far larger than the vocabulary needs is
//! refused from its size alone (a sparse file: nothing is read).

use std::path::PathBuf;
use std::sync::Arc;

use engine_core::CpuBackend;
use models::llava::Llava;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llava-mha")
}

#[test]
fn oversized_tokenizer_is_refused_before_parsing() {
    let dir = std::env::temp_dir().join(format!("visi-load-bounds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    // 200 MB of zeros, sparse: over the bound for the fixture's vocabulary (16 MiB floor),
    // under the absolute file limit, so only the vocabulary bound can refuse it.
    let tok = std::fs::File::create(dir.join("tokenizer.json")).unwrap();
    tok.set_len(200 << 20).unwrap();
    drop(tok);
    let err = Llava::load(&dir, Arc::new(CpuBackend::new()))
        .err()
        .expect("a 200 MB tokenizer.json must be refused")
        .to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains("tokenizer.json") && err.contains("vocabulary"),
        "unexpected error: {err}"
    );
}
