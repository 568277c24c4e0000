//! Any byte string, as a GGUF file: the reader must answer Ok or a typed error, never
//! panic, overflow, allocate by a lying count or read out of bounds; every tensor it
//! accepts must be viewable (or refused by type).
#![no_main]
use engine_core::weights::WeightSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = engine_core::gguf::GgufFile::from_bytes(data.to_vec(), std::path::Path::new("fuzz.gguf")) {
        for name in f.names() {
            let _ = f.view(&name);
        }
    }
});
