//! Any byte string, as a safetensors file: the reader must answer Ok or a typed error,
//! never panic, overflow or read out of bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = engine_core::weights::check_safetensors_bytes(data, std::path::Path::new("fuzz.safetensors"));
});
