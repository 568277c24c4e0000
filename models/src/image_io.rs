//! Image files decoded to exactly the RGB bytes transformers' `image_utils.load_image` gives:
//! `PIL.Image.open`, `ImageOps.exif_transpose`, `convert("RGB")`.
//!
//! - JPEG goes through libjpeg-turbo's own decoder (vendored C, see `csrc/jpeg_shim.c`),
//!   the library Pillow links: islow IDCT, fancy upsampling, block smoothing and libjpeg's
//!   YCbCr→RGB are Pillow's to the bit. CMYK/YCCK files are read as Pillow reads them
//!   (Adobe-inverted CMYK) and converted with Pillow's `cmyk2rgb`.
//! - Other formats go through the `image` crate, then Pillow's `convert("RGB")` rules: alpha
//!   is dropped (not composited), grey is replicated, 16-bit RGB(A)/LA keep the high byte and
//!   16-bit grey (Pillow's `I;16`) clips at 255.
//! - The EXIF orientation (JPEG APP1, PNG `eXIf`, WebP `EXIF`, TIFF's own IFD0; the XMP
//!   `tiff:Orientation` when EXIF has none) is applied as `exif_transpose` applies it.
//!
//! `tests/fixtures/images/corpus` (made by `tools/make_image_corpus.py` with Pillow) is the
//! reference; `models/tests/image_corpus.rs` requires 0 differing values on it.

use std::io::{ErrorKind, Read};
use std::path::Path;

use engine_core::{Error, Result};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

// Linked for its symbols: the C shim calls libjpeg directly.
use mozjpeg_sys as _;

/// Largest width or height accepted.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Most pixels accepted: Pillow's `DecompressionBombError` threshold
/// (`2 * Image.MAX_IMAGE_PIXELS`), checked from the header before any pixel is allocated.
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;
/// Largest decoder allocation allowed (decompression-bomb guard).
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// Largest image file (or in-memory image) read; a 16k×16k PNG compresses far below this.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;
/// libjpeg's working memory bound (a progressive file's coefficients: 2 bytes per sample).
const MAX_JPEG_WORK_BYTES: u64 = 2 << 30;

/// Loads an image file as transformers' `load_image` does (`Image.open`,
/// `ImageOps.exif_transpose`, `convert("RGB")`), bit-exact with Pillow. Only regular files
/// up to [`MAX_IMAGE_FILE_BYTES`] are read; images over [`MAX_IMAGE_SIDE`] or
/// [`MAX_IMAGE_PIXELS`] are refused before decoding.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::file(path, "image not found"),
        _ => Error::file(path, format!("cannot read image: {e}")),
    })?;
    if meta.is_dir() {
        return Err(Error::file(path, "is a directory, not an image"));
    }
    if !meta.is_file() {
        return Err(Error::file(path, "not a regular file"));
    }
    if meta.len() > MAX_IMAGE_FILE_BYTES {
        return Err(too_big_file(path, meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // `take` bounds the read even if the file grows after the check.
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_IMAGE_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
    if bytes.len() as u64 > MAX_IMAGE_FILE_BYTES {
        return Err(too_big_file(path, bytes.len() as u64));
    }
    // The extension picks the format only when the content has no recognisable signature (TGA).
    decode(&bytes, path, ImageFormat::from_path(path).ok())
}

/// Decodes an in-memory image (a `data:` URL's bytes) like [`load_image`]; `origin` names
/// it in errors.
pub fn decode_image(bytes: &[u8], origin: &str) -> Result<RgbImage> {
    let origin = Path::new(origin);
    if bytes.len() as u64 > MAX_IMAGE_FILE_BYTES {
        return Err(too_big_file(origin, bytes.len() as u64));
    }
    decode(bytes, origin, None)
}

fn too_big_file(path: &Path, len: u64) -> Error {
    Error::file(
        path,
        format!("image of {len} bytes is over the {MAX_IMAGE_FILE_BYTES}-byte limit"),
    )
}

fn decode(bytes: &[u8], path: &Path, by_name: Option<ImageFormat>) -> Result<RgbImage> {
    let format = match image::guess_format(bytes) {
        Ok(f) => f,
        Err(_) => match by_name {
            // TGA alone has no signature.
            Some(ImageFormat::Tga) => ImageFormat::Tga,
            // A known extension on content without that format's signature (a text file
            // named .png) would otherwise read as a truncated image.
            Some(f) => {
                return Err(Error::file(
                    path,
                    format!(
                        "not an image (the name says {}, the content has no image signature)",
                        f.extensions_str().first().unwrap_or(&"?")
                    ),
                ))
            }
            None => return Err(Error::file(path, "not an image (unrecognised format)")),
        },
    };
    let (img, orientation) = if format == ImageFormat::Jpeg {
        let img = jpeg::decode(bytes, path)?;
        (img, jpeg_orientation(bytes))
    } else if format == ImageFormat::Gif {
        // GIFs carry no EXIF in Pillow.
        (gif_first_frame(bytes, path)?, None)
    } else if let Some(decoded) = palette_tiff(bytes, path)? {
        decoded
    } else if let Some(decoded) = cmyk_tiff(bytes, path)? {
        decoded
    } else {
        decode_with_image_crate(bytes, path, format)?
    };
    Ok(exif_transpose(img, orientation))
}

/// Refuses sizes over the limits (called with header dimensions, before decoding).
fn check_dimensions(path: &Path, w: u32, h: u32) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(Error::file(path, format!("image has no pixels ({w}x{h})")));
    }
    let pixels = w as u64 * h as u64;
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || pixels > MAX_IMAGE_PIXELS {
        return Err(Error::file(
            path,
            format!(
                "image too large: {w}x{h} (limits {MAX_IMAGE_SIDE} px a side, \
                 {MAX_IMAGE_PIXELS} pixels)"
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// JPEG (libjpeg-turbo through csrc/jpeg_shim.c)
// ---------------------------------------------------------------------------------------

mod jpeg {
    use super::*;
    use std::ffi::{c_char, c_int, c_long};

    extern "C" {
        fn visi_jpeg_decode(
            data: *const u8,
            len: usize,
            width: *mut u32,
            height: *mut u32,
            components: *mut c_int,
            out: *mut u8,
            out_len: usize,
            max_memory: c_long,
            msg: *mut c_char,
            msg_len: usize,
        ) -> c_int;
    }

    struct Call {
        width: u32,
        height: u32,
        components: c_int,
        ret: c_int,
        msg: String,
    }

    /// One call of the shim; `out` empty reads the header only.
    fn call(bytes: &[u8], out: &mut [u8]) -> Call {
        let mut c = Call {
            width: 0,
            height: 0,
            components: 0,
            ret: 0,
            msg: String::new(),
        };
        let mut msg = [0 as c_char; 256];
        let out_ptr = if out.is_empty() {
            std::ptr::null_mut()
        } else {
            out.as_mut_ptr()
        };
        // c_long is 32-bit on Windows: the bound saturates there (2 GiB - 1).
        let max_memory = c_long::try_from(MAX_JPEG_WORK_BYTES).unwrap_or(c_long::MAX);
        // SAFETY: every pointer is valid for the length passed with it; the shim writes at
        // most `out.len()` bytes to `out` and at most `msg.len()` (NUL included) to `msg`,
        // and never unwinds (libjpeg's errors longjmp within C frames).
        c.ret = unsafe {
            visi_jpeg_decode(
                bytes.as_ptr(),
                bytes.len(),
                &mut c.width,
                &mut c.height,
                &mut c.components,
                out_ptr,
                out.len(),
                max_memory,
                msg.as_mut_ptr(),
                msg.len(),
            )
        };
        let end = msg.iter().position(|&b| b == 0).unwrap_or(msg.len());
        c.msg = String::from_utf8_lossy(&msg[..end].iter().map(|&b| b as u8).collect::<Vec<_>>())
            .into_owned();
        c
    }

    fn failed(path: &Path, c: &Call) -> Error {
        let msg = match c.ret {
            -2 => format!("image is truncated ({})", c.msg),
            -4 => format!("image too large: {}", c.msg),
            _ => format!("cannot decode JPEG (corrupt or unsupported?): {}", c.msg),
        };
        Error::file(path, msg)
    }

    /// Decodes a JPEG as Pillow does, converted to RGB as `convert("RGB")` converts
    /// Pillow's mode for it (L, RGB, or CMYK).
    pub(super) fn decode(bytes: &[u8], path: &Path) -> Result<RgbImage> {
        let head = call(bytes, &mut []);
        if head.ret < 0 {
            return Err(failed(path, &head));
        }
        check_dimensions(path, head.width, head.height)?;
        let comps = match head.components {
            1 | 3 | 4 => head.components as usize,
            n => {
                // Pillow refuses these too ("cannot handle N-layer images").
                return Err(Error::file(
                    path,
                    format!("unsupported JPEG: {n} components"),
                ));
            }
        };
        let (w, h) = (head.width as usize, head.height as usize);
        if (w * h * comps.max(3)) as u64 > MAX_DECODE_BYTES {
            return Err(Error::file(
                path,
                format!("image too large: {w}x{h} needs over {MAX_DECODE_BYTES} bytes decoded"),
            ));
        }
        let mut px = vec![0u8; w * h * comps];
        let c = call(bytes, &mut px);
        if c.ret < 0 {
            return Err(failed(path, &c));
        }
        if c.ret as usize != comps || c.width != head.width || c.height != head.height {
            return Err(Error::file(path, "JPEG header changed between reads"));
        }
        let rgb = match comps {
            1 => px.iter().flat_map(|&v| [v, v, v]).collect(),
            3 => px,
            _ => px
                .chunks_exact(4)
                .flat_map(|p| {
                    // Pillow reads 4-layer JPEGs as "CMYK;I" (Adobe's inverted polarity).
                    cmyk_to_rgb([255 - p[0], 255 - p[1], 255 - p[2], 255 - p[3]])
                })
                .collect(),
        };
        RgbImage::from_raw(head.width, head.height, rgb)
            .ok_or_else(|| Error::file(path, "JPEG decoder returned a short buffer"))
    }
}

/// Pillow's `cmyk2rgb` (Convert.c): per channel `nk - nk * c / 255` with `nk = 255 - k`,
/// rounded as its `MULDIV255`, clipped.
fn cmyk_to_rgb(p: [u8; 4]) -> [u8; 3] {
    let nk = 255 - p[3] as i32;
    let ch = |c: u8| {
        let t = c as i32 * nk + 128;
        (nk - (((t >> 8) + t) >> 8)).clamp(0, 255) as u8
    };
    [ch(p[0]), ch(p[1]), ch(p[2])]
}

// ---------------------------------------------------------------------------------------
// other formats (the image crate)
// ---------------------------------------------------------------------------------------

fn decode_with_image_crate(
    bytes: &[u8],
    path: &Path,
    format: ImageFormat,
) -> Result<(RgbImage, Option<u32>)> {
    let mut reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| image_error(path, e))?;
    let (w, h) = decoder.dimensions();
    check_dimensions(path, w, h)?;
    // Checked before decoding so a bomb never allocates its buffer.
    if decoder.total_bytes() > MAX_DECODE_BYTES {
        return Err(Error::file(
            path,
            format!(
                "image too large: {w}x{h} needs {} bytes decoded (limit {MAX_DECODE_BYTES})",
                decoder.total_bytes()
            ),
        ));
    }
    // Pillow reads a TIFF's orientation from the file's own first IFD.
    let exif = if format == ImageFormat::Tiff {
        Some(bytes.to_vec())
    } else {
        decoder.exif_metadata().ok().flatten()
    };
    let xmp = decoder.xmp_metadata().ok().flatten();
    let orientation = exif
        .as_deref()
        .and_then(exif_orientation)
        .or_else(|| xmp.as_deref().and_then(xmp_orientation));
    let img = DynamicImage::from_decoder(decoder).map_err(|e| image_error(path, e))?;
    Ok((to_rgb8_like_pil(img), orientation))
}

/// A GIF's first frame as Pillow gives it: a canvas the size of the logical screen (grown to
/// the frame's extent if that is larger) filled with the frame's transparent index, or 0,
/// the frame's indices pasted at its offset, then mapped through the frame's palette (local,
/// else global). Indices past the palette map to black, except that a palette which is the
/// grey ramp (Pillow's mode `L`) maps every index `i` to grey `i`. (The `image` crate fills
/// the canvas with transparent black instead.)
fn gif_first_frame(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let bad = |e: gif::DecodingError| {
        let msg = match &e {
            gif::DecodingError::Io(io) if io.kind() == ErrorKind::UnexpectedEof => {
                format!("image is truncated: {e}")
            }
            _ => format!("cannot decode GIF (corrupt or truncated?): {e}"),
        };
        Error::file(path, msg.replace('\n', " "))
    };
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::Indexed);
    // Frames larger than or offset past the screen are placed as Pillow places them.
    opts.check_frame_consistency(false);
    if let Some(limit) = std::num::NonZeroU64::new(MAX_DECODE_BYTES) {
        opts.set_memory_limit(gif::MemoryLimit::Bytes(limit));
    }
    let mut d = opts.read_info(std::io::Cursor::new(bytes)).map_err(bad)?;
    let (sw, sh) = (d.width() as usize, d.height() as usize);
    let global = d.global_palette().map(<[u8]>::to_vec);
    // The frame's header first: the canvas is checked against the limits before any
    // pixel is decoded.
    let frame = d
        .next_frame_info()
        .map_err(bad)?
        .ok_or_else(|| Error::file(path, "GIF has no image"))?;
    let (fx, fy) = (frame.left as usize, frame.top as usize);
    let (fw, fh) = (frame.width as usize, frame.height as usize);
    let fill = frame.transparent.unwrap_or(0);
    let palette = frame.palette.clone().or(global);
    let (w, h) = (sw.max(fx + fw), sh.max(fy + fh));
    check_dimensions(path, w as u32, h as u32)?;
    let mut indices = vec![0u8; fw * fh];
    d.read_into_buffer(&mut indices).map_err(bad)?;
    let mut canvas = vec![fill; w * h];
    if fw > 0 {
        for (row, src) in indices.chunks_exact(fw).enumerate() {
            let at = (fy + row) * w + fx;
            canvas[at..at + fw].copy_from_slice(src);
        }
    }
    let grey_ramp = palette.as_deref().is_none_or(|p| {
        p.chunks(3)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&v| v as usize == i))
    });
    let rgb = canvas
        .iter()
        .flat_map(|&i| {
            let i = i as usize;
            match palette.as_deref() {
                _ if grey_ramp => [i as u8; 3],
                Some(p) if 3 * i + 2 < p.len() => [p[3 * i], p[3 * i + 1], p[3 * i + 2]],
                _ => [0; 3],
            }
        })
        .collect();
    RgbImage::from_raw(w as u32, h as u32, rgb)
        .ok_or_else(|| Error::file(path, "GIF canvas size mismatch"))
}

/// An 8-bit CMYK TIFF (photometric 5), converted with Pillow's `cmyk2rgb` (the `image`
/// crate rounds its own way). `None` for other files.
fn cmyk_tiff(bytes: &[u8], path: &Path) -> Result<Option<(RgbImage, Option<u32>)>> {
    let Some(ifd) = Ifd0::parse(bytes) else {
        return Ok(None);
    };
    if ifd.entry(262).and_then(|e| ifd.single(e)) != Some(5) {
        return Ok(None);
    }
    let bad = |e: tiff::TiffError| {
        Error::file(
            path,
            format!("cannot decode TIFF (corrupt or unsupported?): {e}").replace('\n', " "),
        )
    };
    let mut d = tiff::decoder::Decoder::new(std::io::Cursor::new(bytes)).map_err(bad)?;
    if d.colortype().map_err(bad)? != tiff::ColorType::CMYK(8) {
        // 16-bit CMYK and the rest: the image crate's conversion.
        return Ok(None);
    }
    let (w, h) = d.dimensions().map_err(bad)?;
    check_dimensions(path, w, h)?;
    let tiff::decoder::DecodingResult::U8(px) = d.read_image().map_err(bad)? else {
        return Err(Error::file(
            path,
            "CMYK TIFF did not decode to 8-bit samples",
        ));
    };
    let rgb: Vec<u8> = px
        .chunks_exact(4)
        .flat_map(|p| cmyk_to_rgb([p[0], p[1], p[2], p[3]]))
        .collect();
    let img = RgbImage::from_raw(w, h, rgb)
        .ok_or_else(|| Error::file(path, "CMYK TIFF decoded to a short buffer"))?;
    Ok(Some((img, exif_orientation(bytes))))
}

/// A palette TIFF (photometric 3), which the `tiff` crate does not decode: its indices are
/// decoded as 8-bit grey (the photometric entry patched to 1 in a copy), then mapped through
/// the colour map as Pillow maps it (each 16-bit entry `// 256`). `None` for other files.
fn palette_tiff(bytes: &[u8], path: &Path) -> Result<Option<(RgbImage, Option<u32>)>> {
    let Some(ifd) = Ifd0::parse(bytes) else {
        return Ok(None);
    };
    let Some(photometric) = ifd.entry(262) else {
        return Ok(None);
    };
    // Written in place below, so only the usual one-SHORT form is taken.
    if ifd.kind(photometric) != Some((3, 1)) || ifd.single(photometric) != Some(3) {
        return Ok(None);
    }
    let unsupported =
        |what: &str| Error::file(path, format!("unsupported image: palette TIFF {what}"));
    let bits = ifd.entry(258).and_then(|e| ifd.single(e)).unwrap_or(1);
    let samples = ifd.entry(277).and_then(|e| ifd.single(e)).unwrap_or(1);
    if bits != 8 || samples != 1 {
        return Err(unsupported(&format!(
            "with {samples} sample(s) of {bits} bits (only 8-bit indices)"
        )));
    }
    let map_entry = ifd
        .entry(320)
        .ok_or_else(|| unsupported("without a colour map"))?;
    let map_at = match ifd.kind(map_entry) {
        Some((3, 768)) => ifd.u32_at(map_entry + 8).map(|o| o as usize),
        _ => None,
    };
    let map: Vec<u8> = map_at
        .and_then(|at| {
            (0..768)
                .map(|i| ifd.u16_at(at + 2 * i).map(|v| (v >> 8) as u8))
                .collect()
        })
        .ok_or_else(|| unsupported("with a malformed colour map"))?;
    let mut grey = bytes.to_vec();
    let value = photometric + 8;
    let one = if ifd.le {
        1u16.to_le_bytes()
    } else {
        1u16.to_be_bytes()
    };
    grey[value..value + 2].copy_from_slice(&one);
    let (mut img, orientation) = decode_with_image_crate(&grey, path, ImageFormat::Tiff)?;
    for p in img.pixels_mut() {
        let i = p.0[0] as usize;
        p.0 = [map[i], map[256 + i], map[512 + i]];
    }
    Ok(Some((img, orientation)))
}

fn image_error(path: &Path, e: ImageError) -> Error {
    let msg = match &e {
        ImageError::Limits(_) => format!(
            "image too large (limits {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} px, {MAX_DECODE_BYTES} bytes): {e}"
        ),
        ImageError::Unsupported(_) => format!("unsupported image: {e}"),
        ImageError::IoError(io) if io.kind() == ErrorKind::UnexpectedEof => {
            format!("image is truncated: {e}")
        }
        _ => format!("cannot decode image (corrupt or truncated?): {e}"),
    };
    Error::file(path, msg.replace('\n', " "))
}

/// RGB8 with Pillow's `convert("RGB")` semantics for the modes Pillow opens.
///
/// 16-bit RGB(A) and grey+alpha PNGs: Pillow keeps the high byte. 16-bit grey opens as
/// `I;16`, which `convert("RGB")` clips at 255 (so most of a real 16-bit photo turns white,
/// as it does in transformers).
fn to_rgb8_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let hi = |v: u16| (v >> 8) as u8;
    let clip = |v: u16| v.min(255) as u8;
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageRgba8(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([p[0], p[1], p[2]])
        }),
        DynamicImage::ImageLuma8(i) => RgbImage::from_fn(w, h, |x, y| {
            let v = i.get_pixel(x, y).0[0];
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA8(i) => RgbImage::from_fn(w, h, |x, y| {
            let v = i.get_pixel(x, y).0[0];
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageRgb16(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([hi(p[0]), hi(p[1]), hi(p[2])])
        }),
        DynamicImage::ImageRgba16(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([hi(p[0]), hi(p[1]), hi(p[2])])
        }),
        DynamicImage::ImageLuma16(i) => RgbImage::from_fn(w, h, |x, y| {
            let v = clip(i.get_pixel(x, y).0[0]);
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA16(i) => RgbImage::from_fn(w, h, |x, y| {
            let v = hi(i.get_pixel(x, y).0[0]);
            image::Rgb([v, v, v])
        }),
        // Float images (HDR, EXR): clamped to [0, 1] and rounded.
        other => other.to_rgb8(),
    }
}

// ---------------------------------------------------------------------------------------
// orientation (ImageOps.exif_transpose)
// ---------------------------------------------------------------------------------------

/// A JPEG's orientation as Pillow finds it: the `Exif` APP1 segments (concatenated, as
/// Pillow concatenates them), else the XMP APP1 segment's `tiff:Orientation`.
fn jpeg_orientation(bytes: &[u8]) -> Option<u32> {
    let mut exif: Option<Vec<u8>> = None;
    let mut xmp: Option<&[u8]> = None;
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            break;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        // Standalone markers have no length; SOS/EOI end the headers.
        if marker == 0x01 || (0xD0..=0xD7).contains(&marker) {
            i += 2;
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            break;
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        if len < 2 || i + 2 + len > bytes.len() {
            break;
        }
        let seg = &bytes[i + 4..i + 2 + len];
        if marker == 0xE1 {
            if let Some(rest) = seg.strip_prefix(b"Exif\0\0") {
                match &mut exif {
                    Some(e) => e.extend_from_slice(rest),
                    None => exif = Some(rest.to_vec()),
                }
            } else if let Some(rest) = seg.strip_prefix(b"http://ns.adobe.com/xap/1.0/\0") {
                xmp = Some(rest);
            }
        }
        i += 2 + len;
    }
    match exif.as_deref().and_then(exif_orientation) {
        Some(o) => Some(o),
        None => xmp.and_then(xmp_orientation),
    }
}

/// The first IFD of a TIFF structure (a TIFF file, or an EXIF block after `Exif\0\0`).
struct Ifd0<'a> {
    t: &'a [u8],
    le: bool,
    at: usize,
}

impl<'a> Ifd0<'a> {
    fn parse(t: &'a [u8]) -> Option<Self> {
        let le = match t.get(..4)? {
            b"II*\0" => true,
            b"MM\0*" => false,
            _ => return None,
        };
        let mut ifd = Ifd0 { t, le, at: 0 };
        ifd.at = ifd.u32_at(4)? as usize;
        Some(ifd)
    }

    fn u16_at(&self, o: usize) -> Option<u16> {
        let b: [u8; 2] = self.t.get(o..o.checked_add(2)?)?.try_into().ok()?;
        Some(if self.le {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    }

    fn u32_at(&self, o: usize) -> Option<u32> {
        let b: [u8; 4] = self.t.get(o..o.checked_add(4)?)?.try_into().ok()?;
        Some(if self.le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }

    /// Offset of the 12-byte entry for `tag`.
    fn entry(&self, tag: u16) -> Option<usize> {
        let count = self.u16_at(self.at)? as usize;
        (0..count)
            .map(|k| self.at + 2 + 12 * k)
            .find(|&e| self.u16_at(e) == Some(tag))
    }

    /// (type, count) of an entry.
    fn kind(&self, e: usize) -> Option<(u16, u32)> {
        Some((self.u16_at(e + 2)?, self.u32_at(e + 4)?))
    }

    /// An entry's value when it is one BYTE, SHORT or LONG (stored inline, left-justified);
    /// `Some(0)` for any other shape (Pillow then holds a tuple or another type, which
    /// matches no orientation).
    fn single(&self, e: usize) -> Option<u32> {
        match self.kind(e)? {
            (1, 1) => self.t.get(e + 8).map(|&v| v as u32),
            (3, 1) => self.u16_at(e + 8).map(u32::from),
            (4, 1) => self.u32_at(e + 8),
            _ => Some(0),
        }
    }
}

/// The Orientation tag (0x0112) of an EXIF block's IFD0 (optionally after `Exif\0\0`), if
/// present, as Pillow reads it.
fn exif_orientation(exif: &[u8]) -> Option<u32> {
    let ifd = Ifd0::parse(exif.strip_prefix(b"Exif\0\0").unwrap_or(exif))?;
    ifd.single(ifd.entry(0x0112)?)
}

/// Pillow's XMP fallback: the first `tiff:Orientation="N"` or `tiff:Orientation>N`.
fn xmp_orientation(xmp: &[u8]) -> Option<u32> {
    const KEY: &[u8] = b"tiff:Orientation";
    let mut from = 0;
    while let Some(p) = xmp[from..].windows(KEY.len()).position(|w| w == KEY) {
        let at = from + p + KEY.len();
        let rest = &xmp[at..];
        let digit = match rest {
            [b'=', b'"', d, ..] | [b'>', d, ..] if d.is_ascii_digit() => Some(*d),
            _ => None,
        };
        if let Some(d) = digit {
            return Some((d - b'0') as u32);
        }
        from = at;
    }
    None
}

/// `ImageOps.exif_transpose`: orientations 2..=8 transpose, anything else leaves the image.
fn exif_transpose(img: RgbImage, orientation: Option<u32>) -> RgbImage {
    let Some(o) = orientation
        .and_then(|o| u8::try_from(o).ok())
        .and_then(Orientation::from_exif)
    else {
        return img;
    };
    let mut d = DynamicImage::ImageRgb8(img);
    d.apply_orientation(o);
    match d {
        DynamicImage::ImageRgb8(i) => i,
        other => other.to_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exif_orientation_both_byte_orders() {
        // II, IFD at 8, one entry: 0x0112 SHORT count 1 value 6.
        let le = [
            b'I', b'I', 42, 0, 8, 0, 0, 0, 1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0,
        ];
        assert_eq!(exif_orientation(&le), Some(6));
        let be = [
            b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 3, 0, 0, 0, 0,
        ];
        assert_eq!(exif_orientation(&be), Some(3));
        assert_eq!(exif_orientation(b"Exif\0\0II*\0"), None);
    }

    #[test]
    fn xmp_orientation_both_forms() {
        assert_eq!(xmp_orientation(br#"<x tiff:Orientation="8"/>"#), Some(8));
        assert_eq!(
            xmp_orientation(b"<tiff:Orientation>5</tiff:Orientation>"),
            Some(5)
        );
        assert_eq!(
            xmp_orientation(b"tiff:Orientation=x tiff:Orientation>2"),
            Some(2)
        );
        assert_eq!(xmp_orientation(b"nothing"), None);
    }
}
