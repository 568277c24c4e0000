//! Image decoding against Pillow: every file of `tests/fixtures/images/corpus` (JPEG over
//! quality, 4:4:4/4:2:2/4:2:0/4:4:0/4:1:1, progressive, restart intervals, arithmetic coding,
//! grey, CMYK, YCCK, EXIF orientations 1-8; PNG, GIF, BMP, TIFF and WebP variants) must
//! decode to exactly the RGB bytes `tools/make_image_corpus.py` recorded from Pillow
//! (`Image.open`, `ImageOps.exif_transpose`, `convert("RGB")`, as transformers'
//! `load_image`): 0 differing values. And the limits: truncated files, decompression bombs
//! and special files are refused with a clear error before any pixel is allocated.

use std::path::{Path, PathBuf};

use models::preprocess::{decode_image, load_image};

fn committed_corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images/corpus")
}

/// `VISI_IMAGE_CORPUS` points the corpus test at another folder the generator wrote (a
/// larger one: `tools/make_image_corpus.py --out DIR --size 500x375`).
fn corpus() -> PathBuf {
    std::env::var_os("VISI_IMAGE_CORPUS").map_or_else(committed_corpus, PathBuf::from)
}

fn manifest_at(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("corpus manifest");
    serde_json::from_str(&text).expect("manifest is JSON")
}

#[test]
fn corpus_decodes_exactly_as_pillow() {
    let m = manifest_at(&corpus());
    let files = m["files"].as_object().expect("files");
    if corpus() == committed_corpus() {
        assert!(files.len() >= 80, "the corpus has {} files", files.len());
    }
    let (mut values, mut differing, mut failed) = (0usize, 0usize, Vec::new());
    for (name, f) in files {
        let want = image::open(corpus().join(f["expected"].as_str().expect("expected")))
            .expect("reference PNG")
            .to_rgb8();
        let (w, h) = (f["width"].as_u64().unwrap(), f["height"].as_u64().unwrap());
        assert_eq!(
            (want.width() as u64, want.height() as u64),
            (w, h),
            "{name}: reference size"
        );
        values += want.as_raw().len();
        match load_image(&corpus().join(name)) {
            Err(e) => {
                println!("{name}: ERROR {e}");
                failed.push(name.clone());
                differing += want.as_raw().len();
            }
            Ok(got) if got.dimensions() != want.dimensions() => {
                println!(
                    "{name}: size {:?}, Pillow {:?}",
                    got.dimensions(),
                    want.dimensions()
                );
                failed.push(name.clone());
                differing += want.as_raw().len();
            }
            Ok(got) => {
                let diff: Vec<i32> = got
                    .as_raw()
                    .iter()
                    .zip(want.as_raw())
                    .map(|(&a, &b)| a as i32 - b as i32)
                    .filter(|&d| d != 0)
                    .collect();
                let max = diff.iter().map(|d| d.abs()).max().unwrap_or(0);
                println!(
                    "{name}: {w}x{h}, {} differing values (max {max})",
                    diff.len()
                );
                if !diff.is_empty() {
                    failed.push(name.clone());
                    differing += diff.len();
                }
            }
        }
    }
    println!(
        "{} files, {values} values, {differing} differing (Pillow {}, libjpeg-turbo {})",
        files.len(),
        m["pillow"],
        m["libjpeg_turbo"]
    );
    assert!(failed.is_empty(), "{differing} values differ in {failed:?}");
}

#[test]
fn in_memory_decode_equals_file_decode() {
    for name in [
        "exif_orientation_6.jpg",
        "cjpeg_progressive_restart.jpg",
        "png_palette_trns.png",
    ] {
        let path = committed_corpus().join(name);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            decode_image(&bytes, "data URL").unwrap(),
            load_image(&path).unwrap(),
            "{name}"
        );
    }
}

fn err(r: engine_core::Result<image::RgbImage>) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_and_corrupt_jpeg_are_refused() {
    let bytes = std::fs::read(committed_corpus().join("jpeg_q75_420.jpg")).unwrap();
    let e = err(decode_image(&bytes[..bytes.len() / 2], "half.jpg"));
    assert!(e.contains("truncated"), "{e}");
    let e = err(decode_image(&bytes[..40], "head.jpg"));
    assert!(e.contains("head.jpg"), "{e}");
    let mut garbage = bytes[..3].to_vec();
    garbage.extend(std::iter::repeat_n(0x55, 200));
    let e = err(decode_image(&garbage, "garbage.jpg"));
    assert!(e.contains("JPEG"), "{e}");
}

/// Rewrites a JPEG's frame header (SOFn) dimensions.
fn with_size(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut b = jpeg.to_vec();
    let mut i = 2;
    while i + 9 < b.len() {
        let m = b[i + 1];
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        if (0xC0..=0xCF).contains(&m) && m != 0xC4 && m != 0xC8 && m != 0xCC {
            b[i + 5..i + 7].copy_from_slice(&h.to_be_bytes());
            b[i + 7..i + 9].copy_from_slice(&w.to_be_bytes());
            return b;
        }
        i += 2 + len;
    }
    panic!("no SOF");
}

#[test]
fn decompression_bombs_are_refused_before_decoding() {
    let bytes = std::fs::read(committed_corpus().join("jpeg_q75_420.jpg")).unwrap();
    // Over the side limit, then within it but over Pillow's pixel limit.
    for (w, h) in [(20000, 10), (16000, 16000)] {
        let e = err(decode_image(&with_size(&bytes, w, h), "bomb.jpg"));
        assert!(e.contains("too large"), "{w}x{h}: {e}");
    }
    // A GIF whose logical screen claims 65535x65535 (the canvas Pillow would allocate).
    let mut gif = std::fs::read(committed_corpus().join("gif_grey.gif")).unwrap();
    gif[6..10].copy_from_slice(&[0xFF; 4]);
    let e = err(decode_image(&gif, "bomb.gif"));
    assert!(e.contains("too large"), "{e}");
    let png = std::fs::read(committed_corpus().join("png_rgb.png")).unwrap();
    let mut bomb = png.clone();
    // IHDR width/height at bytes 16..24 (the CRC is then wrong; the size check comes first).
    bomb[16..20].copy_from_slice(&30000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&30000u32.to_be_bytes());
    let e = err(decode_image(&bomb, "bomb.png"));
    assert!(e.contains("too large") || e.contains("decode"), "{e}");
}

#[cfg(unix)]
#[test]
fn special_files_are_refused() {
    let e = err(load_image(Path::new("/dev/zero")));
    assert!(e.contains("not a regular file"), "{e}");
    let dir = std::env::temp_dir().join(format!("visi-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("image.jpg");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        let e = err(load_image(&fifo));
        assert!(e.contains("not a regular file"), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Damaged files (bytes overwritten, cut short) decode or fail with an error: never a panic,
/// an abort or a hang. A fixed pseudo-random sequence, so a failure reproduces.
#[test]
fn damaged_files_never_panic() {
    let m = manifest_at(&committed_corpus());
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let (mut ok, mut refused) = (0, 0);
    for name in m["files"].as_object().unwrap().keys() {
        let clean = std::fs::read(committed_corpus().join(name)).unwrap();
        for round in 0..40 {
            let mut b = clean.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % b.len() as u64) as usize;
                b[at] = next() as u8;
            }
            if round % 4 == 3 {
                b.truncate((next() % b.len() as u64) as usize);
            }
            match decode_image(&b, name) {
                Ok(img) => {
                    assert!(img.width() > 0 && img.height() > 0);
                    ok += 1;
                }
                Err(e) => {
                    assert!(
                        !e.to_string().contains('\n'),
                        "{name}: multi-line error {e}"
                    );
                    refused += 1;
                }
            }
        }
    }
    println!("damaged files: {ok} decoded, {refused} refused");
}
