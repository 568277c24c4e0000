//! Request images in `serve`: sized from their headers when the request arrives, decoded
//! only when the engine admits the request, and accounted against a memory budget.
//!
//! A decoded image costs far more than its file (a 2.8 MB PNG can decode to 537 MB), so a
//! request's images are not decoded on arrival. Each one's header gives its size; the bytes
//! its decode will hold ([`decoded_bytes`]) are summed per request and reserved from the
//! server-wide budget (`--max-image-memory`) until the engine has encoded them. A request
//! whose images alone exceed the per-request bound (`--max-request-image-memory`) is a 413;
//! one that does not fit in what the other requests leave of the budget is a 429. The
//! engine decodes one image at a time, encodes it and drops it.

use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use image::{ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use models::preprocess::{
    MAX_DECODE_BYTES, MAX_IMAGE_FILE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE,
};

/// Default of `--max-image-memory`: decoded image bytes all requests together may hold.
pub const DEFAULT_TOTAL: &str = "2GiB";
/// Default of `--max-request-image-memory`: decoded image bytes one request may hold (a
/// 76-megapixel photo; 8 images of 4096 x 4096 fit).
pub const DEFAULT_PER_REQUEST: &str = "1GiB";

/// Where an image's bytes are.
#[derive(Debug)]
pub enum Stored {
    /// A `data:` URL's bytes.
    Data(Vec<u8>),
    /// A file inside `--allow-files` (canonical path), read when decoded.
    File(PathBuf),
}

/// One image of a request: its header size, not yet decoded.
#[derive(Debug)]
pub struct PendingImage {
    /// Its bytes.
    pub stored: Stored,
    /// Width and height from the header (before any EXIF rotation).
    pub width: u32,
    pub height: u32,
    /// Bytes its decode holds at most ([`decoded_bytes`]).
    pub decoded_bytes: u64,
}

impl PendingImage {
    /// Decodes it (as `run` decodes a file or data URL: every bound applies) and checks
    /// that it is the size its header said.
    pub fn decode(&self) -> engine_core::Result<RgbImage> {
        let img = match &self.stored {
            Stored::Data(b) => models::preprocess::decode_image(b, "image data URL")?,
            Stored::File(p) => models::preprocess::load_image(p)?,
        };
        // An EXIF rotation swaps the sides (and a GIF frame may grow the canvas): the
        // decoded RGB and one copy of it must still fit in what was reserved, or the
        // file changed since its header was read.
        if img.as_raw().len() as u64 * 2 > self.decoded_bytes {
            return Err(engine_core::Error::msg(format!(
                "image decoded to {}x{} pixels, not the {}x{} its header gave when the request arrived",
                img.width(),
                img.height(),
                self.width,
                self.height
            )));
        }
        Ok(img)
    }
}

/// Bytes an image's decode holds at its peak: the decoder's buffer in the file's own pixel
/// format (at least 4 bytes a pixel: the JPEG path decodes CMYK as 4) plus the 3-byte RGB
/// copy the model takes.
pub fn decoded_bytes(width: u32, height: u32, decoder_bytes: u64) -> u64 {
    let px = width as u64 * height as u64;
    decoder_bytes
        .max(px.saturating_mul(4))
        .saturating_add(px.saturating_mul(3))
}

fn reader_limits() -> Limits {
    let mut l = Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(MAX_DECODE_BYTES);
    l
}

/// Width, height and decoder bytes from an image's header (the `image` crate reads only
/// the header here); the bounds `run` applies to the size are checked now.
fn probe<R: std::io::BufRead + std::io::Seek>(
    mut reader: ImageReader<R>,
) -> Result<(u32, u32, u64), String> {
    reader.limits(reader_limits());
    let reader = reader
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    if reader.format().is_none() {
        return Err("not an image (unrecognised format)".into());
    }
    let (w, h, total) = match reader.into_decoder() {
        Ok(d) => {
            let (w, h) = d.dimensions();
            (w, h, d.total_bytes())
        }
        Err(image::ImageError::Limits(_)) => {
            return Err(format!(
                "image too large to decode safely (limits {MAX_IMAGE_SIDE} px a side, \
                 {MAX_IMAGE_PIXELS} pixels, {MAX_DECODE_BYTES} bytes decoded)"
            ))
        }
        Err(e) => return Err(format!("cannot read the image header: {e}")),
    };
    check_size(w, h, total)?;
    Ok((w, h, total))
}

/// The size bounds `run` applies, from a header.
fn check_size(w: u32, h: u32, total: u64) -> Result<(), String> {
    let px = w as u64 * h as u64;
    if w == 0 || h == 0 {
        return Err(format!("image has no pixels ({w}x{h})"));
    }
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || px > MAX_IMAGE_PIXELS || total > MAX_DECODE_BYTES
    {
        return Err(format!(
            "image too large: {w}x{h} (limits {MAX_IMAGE_SIDE} px a side, {MAX_IMAGE_PIXELS} \
             pixels, {MAX_DECODE_BYTES} bytes decoded)"
        ));
    }
    Ok(())
}

/// A GIF's canvas as `run` decodes it: the logical screen, grown to the first frame's
/// extent when that frame is larger or offset past it (Pillow's placement). `None` when the
/// header or the blocks before the first frame are malformed.
fn gif_canvas(b: &[u8]) -> Option<(u32, u32)> {
    let u16_at = |i: usize| Some(u16::from_le_bytes([*b.get(i)?, *b.get(i + 1)?]) as u32);
    if !(b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a")) {
        return None;
    }
    let (sw, sh) = (u16_at(6)?, u16_at(8)?);
    let packed = *b.get(10)?;
    let mut i = 13;
    if packed & 0x80 != 0 {
        i += 3 << ((packed & 7) + 1);
    }
    loop {
        match *b.get(i)? {
            // An extension: its label, then sub-blocks up to an empty one.
            0x21 => {
                i += 2;
                loop {
                    let n = *b.get(i)? as usize;
                    i += 1 + n;
                    if n == 0 {
                        break;
                    }
                }
            }
            0x2C => {
                let (x, y, w, h) = (
                    u16_at(i + 1)?,
                    u16_at(i + 3)?,
                    u16_at(i + 5)?,
                    u16_at(i + 7)?,
                );
                return Some((sw.max(x + w), sh.max(y + h)));
            }
            _ => return None,
        }
    }
}

/// A GIF's size: its canvas (indices and canvas bytes are at most the 4 bytes a pixel
/// [`decoded_bytes`] counts for the decoder).
fn probe_gif(bytes: &[u8]) -> Result<(u32, u32, u64), String> {
    let (w, h) = gif_canvas(bytes).ok_or("cannot decode GIF (corrupt or truncated header)")?;
    check_size(w, h, 0)?;
    Ok((w, h, 0))
}

/// A JPEG's frame header (libjpeg decodes JPEGs here, arithmetic-coded ones included, which
/// the `image` crate's header reader refuses): width, height, components and whether it is
/// progressive. `None` when no frame header comes before the data ends.
fn jpeg_frame(b: &[u8]) -> Option<(u32, u32, u64, bool)> {
    if !b.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut i = 2;
    loop {
        // Fill bytes before a marker.
        while *b.get(i)? == 0xFF && *b.get(i + 1)? == 0xFF {
            i += 1;
        }
        if *b.get(i)? != 0xFF {
            return None;
        }
        let m = *b.get(i + 1)?;
        let len = u16::from_be_bytes([*b.get(i + 2)?, *b.get(i + 3)?]) as usize;
        match m {
            0xC0..=0xCF if !matches!(m, 0xC4 | 0xC8 | 0xCC) => {
                let h = u16::from_be_bytes([*b.get(i + 5)?, *b.get(i + 6)?]) as u32;
                let w = u16::from_be_bytes([*b.get(i + 7)?, *b.get(i + 8)?]) as u32;
                let comps = *b.get(i + 9)? as u64;
                return Some((w, h, comps, matches!(m, 0xC2 | 0xC6 | 0xCA | 0xCE)));
            }
            // Markers without a length.
            0xD0..=0xD9 | 0x01 => i += 2,
            _ => i += 2 + len,
        }
    }
}

/// A JPEG's size; the decoder's bytes are its component planes, and for a progressive file
/// also the 2-byte coefficients libjpeg keeps for every sample.
fn probe_jpeg(bytes: &[u8]) -> Result<(u32, u32, u64), String> {
    let (w, h, comps, progressive) =
        jpeg_frame(bytes).ok_or("cannot decode JPEG (no frame header: corrupt or truncated?)")?;
    let samples = (w as u64 * h as u64).saturating_mul(comps.max(1));
    let total = if progressive {
        samples.saturating_mul(3)
    } else {
        samples
    };
    check_size(w, h, 0)?;
    Ok((w, h, total))
}

/// A TIFF's first image size (IFD0's ImageWidth and ImageLength; the `image` crate's
/// reader refuses palette and CMYK files, which `run` decodes).
fn tiff_size(b: &[u8]) -> Option<(u32, u32)> {
    let le = match b.get(..4)? {
        b"II*\0" => true,
        b"MM\0*" => false,
        _ => return None,
    };
    let u16_at = |i: usize| {
        let a = [*b.get(i)?, *b.get(i + 1)?];
        Some(if le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        })
    };
    let u32_at = |i: usize| {
        let a = [*b.get(i)?, *b.get(i + 1)?, *b.get(i + 2)?, *b.get(i + 3)?];
        Some(if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        })
    };
    let ifd = u32_at(4)? as usize;
    let n = u16_at(ifd)? as usize;
    let (mut w, mut h) = (None, None);
    for k in 0..n {
        let e = ifd.checked_add(2 + 12 * k)?;
        let value = match u16_at(e + 2)? {
            3 => u16_at(e + 8)? as u32,
            4 => u32_at(e + 8)?,
            _ => continue,
        };
        match u16_at(e)? {
            256 => w = Some(value),
            257 => h = Some(value),
            _ => {}
        }
    }
    Some((w?, h?))
}

/// A TIFF's size; its decoder buffer counted at 8 bytes a pixel (16-bit RGBA, the most
/// the formats `run` reads hold).
fn probe_tiff(bytes: &[u8]) -> Result<(u32, u32, u64), String> {
    let (w, h) = tiff_size(bytes).ok_or("cannot decode TIFF (no image size in its first IFD)")?;
    check_size(w, h, 0)?;
    Ok((w, h, (w as u64 * h as u64).saturating_mul(8)))
}

/// Sizes in-memory image bytes by their signature.
fn probe_bytes(bytes: &[u8], format_hint: Option<ImageFormat>) -> Result<(u32, u32, u64), String> {
    if bytes.starts_with(b"GIF8") {
        probe_gif(bytes)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        probe_jpeg(bytes)
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        probe_tiff(bytes)
    } else {
        let mut reader = ImageReader::new(std::io::Cursor::new(bytes));
        // The extension names the format only when the content has no signature (TGA).
        if let Some(f) = format_hint {
            reader.set_format(f);
        }
        probe(reader)
    }
}

/// A `data:` URL's image, sized from its header.
pub fn pending_data(bytes: Vec<u8>) -> Result<PendingImage, String> {
    if bytes.len() as u64 > MAX_IMAGE_FILE_BYTES {
        return Err(format!(
            "image of {} bytes is over the {MAX_IMAGE_FILE_BYTES}-byte limit",
            bytes.len()
        ));
    }
    let (width, height, total) = probe_bytes(&bytes, None)?;
    Ok(PendingImage {
        stored: Stored::Data(bytes),
        width,
        height,
        decoded_bytes: decoded_bytes(width, height, total),
    })
}

/// A file the request names, confined to `dir` (canonical), sized from its header. Every
/// path that is not a file inside `dir` gets the same answer, whether it exists outside
/// or not at all, so requests cannot probe the server's filesystem.
pub fn pending_file(dir: &Path, p: &Path) -> Result<PendingImage, String> {
    let not_inside =
        || "no such image file inside the server's --allow-files directory".to_string();
    let p = if p.is_relative() {
        dir.join(p)
    } else {
        p.to_path_buf()
    };
    let canon = std::fs::canonicalize(&p).map_err(|_| not_inside())?;
    if !canon.starts_with(dir) {
        return Err(not_inside());
    }
    let meta = std::fs::metadata(&canon).map_err(|_| not_inside())?;
    if meta.is_dir() {
        return Err("the image path is a directory, not an image".into());
    }
    if !meta.is_file() {
        return Err("the image path is not a regular file".into());
    }
    if meta.len() > MAX_IMAGE_FILE_BYTES {
        return Err(format!(
            "image of {} bytes is over the {MAX_IMAGE_FILE_BYTES}-byte limit",
            meta.len()
        ));
    }
    let mut file =
        std::fs::File::open(&canon).map_err(|e| format!("cannot read the image: {e}"))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).unwrap_or(0);
    file.rewind()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    let whole = n == 4
        && (magic.starts_with(b"GIF")
            || magic.starts_with(&[0xFF, 0xD8, 0xFF])
            || &magic == b"II*\0"
            || &magic == b"MM\0*");
    let (width, height, total) = if whole {
        // The frame header may come after metadata blocks: read the file (bounded above;
        // the engine reads it again when it decodes).
        let mut bytes = Vec::new();
        file.take(MAX_IMAGE_FILE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read the image: {e}"))?;
        probe_bytes(&bytes, None)?
    } else {
        let mut reader = ImageReader::new(BufReader::new(file));
        if let Ok(f) = ImageFormat::from_path(&canon) {
            reader.set_format(f);
        }
        probe(reader)?
    };
    Ok(PendingImage {
        stored: Stored::File(canon),
        width,
        height,
        decoded_bytes: decoded_bytes(width, height, total),
    })
}

/// The server-wide budget of decoded image bytes.
#[derive(Debug)]
pub struct ImageBudget {
    /// All requests together (`--max-image-memory`).
    pub total: u64,
    /// One request (`--max-request-image-memory`).
    pub per_request: u64,
    used: AtomicU64,
}

impl ImageBudget {
    /// An empty budget.
    pub fn new(total: u64, per_request: u64) -> Self {
        ImageBudget {
            total,
            per_request,
            used: AtomicU64::new(0),
        }
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Reserves `bytes`, or `None` when the other requests leave too little.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.total)
            })
            .ok()?;
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }
}

/// Decoded image bytes held for one request; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ImageBudget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_reserves_and_gives_back() {
        let b = Arc::new(ImageBudget::new(100, 60));
        let r1 = b.reserve(60).expect("fits");
        assert!(b.reserve(41).is_none());
        let r2 = b.reserve(40).expect("fits");
        assert_eq!(b.used(), 100);
        drop(r1);
        assert_eq!(b.used(), 40);
        assert!(b.reserve(u64::MAX).is_none());
        drop(r2);
        assert_eq!(b.used(), 0);
    }

    /// Every image of the decoding corpus: the header gives the decoded size (sides
    /// swapped by an EXIF rotation at most), and the estimate covers the decoded RGB.
    #[test]
    fn headers_give_the_decoded_size() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images/corpus");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus") {
            let p = e.expect("entry").path();
            if p.is_dir() || p.extension().is_some_and(|x| x == "json") {
                continue;
            }
            let Ok(img) = models::preprocess::load_image(&p) else {
                continue;
            };
            let pending = pending_file(&dir.canonicalize().unwrap(), &p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let (w, h) = (pending.width, pending.height);
            assert!(
                (w, h) == img.dimensions() || (h, w) == img.dimensions(),
                "{}: header {w}x{h}, decoded {:?}",
                p.display(),
                img.dimensions()
            );
            assert!(pending.decoded_bytes >= img.as_raw().len() as u64 * 2);
            let again = pending.decode().expect("decodes");
            assert_eq!(again.as_raw(), img.as_raw(), "{}", p.display());
            n += 1;
        }
        assert!(n >= 50, "only {n} corpus images");
    }

    /// The hand-read headers (GIF, JPEG, TIFF) on every truncation and a flipped byte of
    /// every corpus file of those formats: an answer or an error, never a panic.
    #[test]
    fn damaged_headers_never_panic() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images/corpus");
        for e in std::fs::read_dir(&dir).expect("corpus") {
            let p = e.expect("entry").path();
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
            if !matches!(ext, "gif" | "jpg" | "tiff") {
                continue;
            }
            let b = std::fs::read(&p).expect("read");
            for n in 0..b.len().min(4096) {
                let _ = probe_bytes(&b[..n], None);
                let mut f = b.clone();
                f[n] ^= 0xFF;
                let _ = probe_bytes(&f, None);
            }
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(pending_data(b"hello, world".to_vec()).is_err());
        assert!(pending_data(Vec::new()).is_err());
    }
}
