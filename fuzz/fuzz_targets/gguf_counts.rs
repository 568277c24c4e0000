//! GGUF headers whose counts come from the fuzzer: a tensor count, a metadata count and
//! an array (type and count, possibly nested) in front of arbitrary bytes. Random bytes
//! almost never reach a lying count past the magic and version; here every input does.
//! The reader must answer Ok or a typed error, never panic, and never allocate by a count
//! the remaining bytes cannot hold (run with `-malloc_limit_mb`, see fuzz/README.md).
#![no_main]
use engine_core::weights::WeightSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 30 {
        return;
    }
    let (head, rest) = data.split_at(30);
    let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or([0; 8]));
    let n_tensors = u64_at(0);
    let n_kv = u64_at(8);
    let count = u64_at(16);
    // 0..=13: every value type and one unknown.
    let ety = u32::from(head[24] % 14);
    let version = 2 + u32::from(head[25] & 1);
    let shape = head[26] % 4;
    let inner = u64::from(u16::from_le_bytes([head[27], head[28]]));
    let ity = u32::from(head[29] % 14);

    let mut f = b"GGUF".to_vec();
    f.extend_from_slice(&version.to_le_bytes());
    match shape {
        // The header's own counts, then whatever follows.
        0 => {
            f.extend_from_slice(&n_tensors.to_le_bytes());
            f.extend_from_slice(&n_kv.to_le_bytes());
        }
        // One metadata pair: an array of `count` elements of type `ety`.
        1 | 2 => {
            f.extend_from_slice(&(n_tensors % 4).to_le_bytes());
            f.extend_from_slice(&1u64.to_le_bytes());
            f.extend_from_slice(&1u64.to_le_bytes());
            f.push(b'k');
            f.extend_from_slice(&9u32.to_le_bytes());
            if shape == 1 {
                f.extend_from_slice(&ety.to_le_bytes());
                f.extend_from_slice(&count.to_le_bytes());
            } else {
                // Nested: `count` arrays, the first of `inner` elements of type `ity`.
                f.extend_from_slice(&9u32.to_le_bytes());
                f.extend_from_slice(&count.to_le_bytes());
                f.extend_from_slice(&ity.to_le_bytes());
                f.extend_from_slice(&inner.to_le_bytes());
            }
        }
        // No metadata; tensor infos follow with the fuzzer's tensor count.
        _ => {
            f.extend_from_slice(&n_tensors.to_le_bytes());
            f.extend_from_slice(&0u64.to_le_bytes());
        }
    }
    f.extend_from_slice(rest);
    if let Ok(g) = engine_core::gguf::GgufFile::from_bytes(f, std::path::Path::new("fuzz.gguf")) {
        for name in g.names() {
            let _ = g.view(&name);
        }
    }
});
