//! GGUF counts never drive an allocation past what the file could hold: headers whose
//! tensor, metadata and array counts lie (up to 1e9 and u64::MAX) are refused with an error
//! naming the count, and the largest single allocation the parse asks for stays within a
//! small multiple of the file's size (measured by a counting global allocator), where the
//! old reader asked for `count * size_of::<element>()` up front (32 GB for 1e9 elements).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use engine_core::gguf::{GgufFile, MAX_METADATA_VALUES, MAX_TENSORS};

/// The system allocator, recording the largest request of the measuring thread since the
/// last reset (other tests' threads build their buffers meanwhile).
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
}

fn note(size: usize) {
    if MEASURING.with(Cell::get) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

/// One test at a time measures (the counter is process-wide).
static SERIAL: Mutex<()> = Mutex::new(());

/// Parses `bytes` (moved in, so the buffer is not counted) and returns the error and the
/// largest allocation the parse asked for.
fn parse_err(bytes: Vec<u8>) -> (String, usize) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    LARGEST.store(0, Ordering::Relaxed);
    MEASURING.with(|m| m.set(true));
    let r = GgufFile::from_bytes(bytes, Path::new("lying.gguf"));
    MEASURING.with(|m| m.set(false));
    let largest = LARGEST.load(Ordering::Relaxed);
    match r {
        Ok(f) => panic!("a lying header parsed: {f:?}"),
        Err(e) => (e.to_string(), largest),
    }
}

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b
}

/// A header with one metadata pair `k`: an array of `n` elements of type `ety`.
fn array_header(ety: u32, n: u64) -> Vec<u8> {
    let mut b = header(0, 1);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&ety.to_le_bytes());
    b.extend_from_slice(&n.to_le_bytes());
    b
}

/// Zero bytes up to `len`.
fn padded(mut b: Vec<u8>, len: usize) -> Vec<u8> {
    b.resize(len, 0);
    b
}

/// The allocations of a refused parse: the error message and a little bookkeeping, never
/// anything sized by the count (the buffer itself was allocated before the reset).
const SMALL: usize = 1 << 16;

#[test]
fn tensor_count_is_bounded_by_the_bytes_left() {
    // 8 MiB of zeros: 8 Mi tensors would each need 32 bytes of it (the old check only
    // asked for one byte each, then reserved 8 Mi tensor infos, ~600 MB).
    let len = 8 << 20;
    let (e, big) = parse_err(padded(header(len as u64 - 24, 0), len));
    assert!(e.contains("tensors") && e.contains("at least"), "{e}");
    assert!(big < SMALL, "largest allocation {big} bytes for: {e}");
    for n in [1_000_000_000u64, u64::MAX, u64::MAX / 32 + 1] {
        let (e, big) = parse_err(padded(header(n, 0), 4096));
        assert!(e.contains(&n.to_string()) && e.contains("tensors"), "{e}");
        assert!(big < SMALL, "{n} tensors: largest allocation {big} bytes");
    }
}

#[test]
fn tensor_count_over_the_limit_is_refused() {
    let len = (MAX_TENSORS as usize + 1) * 32 + 24;
    let (e, big) = parse_err(padded(header(MAX_TENSORS + 1, 0), len));
    assert!(e.contains("limit"), "{e}");
    assert!(big < SMALL, "largest allocation {big} bytes");
}

#[test]
fn metadata_count_is_bounded_by_the_bytes_left() {
    for n in [1_000_000_000u64, u64::MAX, 1 << 40] {
        let (e, big) = parse_err(padded(header(0, n), 4096));
        assert!(e.contains("metadata"), "{e}");
        assert!(big < SMALL, "{n} pairs: largest allocation {big} bytes");
    }
    // Counts that overflow together.
    let (e, _) = parse_err(padded(header(u64::MAX / 64, u64::MAX / 26), 4096));
    assert!(e.contains("tensors"), "{e}");
}

#[test]
fn array_counts_are_bounded_by_element_size() {
    // u32 elements take 4 bytes: 1 Mi of them do not fit in 2 MiB (the old check let any
    // count up to the bytes left through and reserved 32 bytes per element).
    let len = 2 << 20;
    for (ety, each) in [(4u32, 4u64), (10, 8), (8, 8), (9, 12), (2, 2)] {
        let n = len as u64 / each + 1;
        let (e, big) = parse_err(padded(array_header(ety, n), len));
        assert!(e.contains("array") && e.contains(&n.to_string()), "{e}");
        assert!(
            big < SMALL,
            "type {ety}: largest allocation {big} bytes for: {e}"
        );
    }
    for n in [1_000_000_000u64, u64::MAX, u64::MAX / 2 + 1] {
        let (e, big) = parse_err(padded(array_header(4, n), 4096));
        assert!(e.contains("array"), "{e}");
        assert!(big < SMALL, "{n}: largest allocation {big} bytes");
    }
    let (e, _) = parse_err(padded(array_header(13, 4), 4096));
    assert!(e.contains("element type 13"), "{e}");
}

#[test]
fn a_huge_byte_array_is_refused_before_it_is_built() {
    // 80 MB of u8 elements (each one byte, so the bytes left hold them): the value budget
    // refuses them up front instead of building 80 M values (2.5 GiB, seconds).
    let len = 80_000_000usize;
    // Exactly the bytes left after the header, one per element.
    let n = (len - array_header(0, 0).len()) as u64;
    let (e, big) = parse_err(padded(array_header(0, n), len));
    assert!(e.contains("metadata values"), "{e}");
    assert!(big < SMALL, "largest allocation {big} bytes");
    // Nested arrays share the budget: 3 arrays of 2 Mi bytes each.
    let m = 2u64 << 20;
    let mut b = array_header(9, 3);
    for _ in 0..3 {
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&m.to_le_bytes());
        b.resize(b.len() + m as usize, 0);
    }
    let (e, big) = parse_err(b);
    assert!(e.contains("metadata values"), "{e}");
    assert!(
        big <= (MAX_METADATA_VALUES as usize) * 32,
        "largest allocation {big} bytes"
    );
}

#[test]
fn arrays_within_the_limits_still_parse() {
    // 1 Mi u8 elements and 100k strings: real tokenizers are this size.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = header(0, 2);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'a');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 20).to_le_bytes());
    b.resize(b.len() + (1 << 20), 7);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'b');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&100_000u64.to_le_bytes());
    for i in 0..100_000u32 {
        let s = format!("tok{i}");
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    let f = GgufFile::from_bytes(b, Path::new("ok.gguf")).expect("parses");
    assert_eq!(
        f.get("a").and_then(|v| v.as_array()).map(|a| a.len()),
        Some(1 << 20)
    );
    assert_eq!(
        f.get("b").and_then(|v| v.as_array()).map(|a| a.len()),
        Some(100_000)
    );
}
