//! Image loading and CLIP preprocessing, bit-exact with transformers' `CLIPImageProcessor`.
//!
//! The pipeline is the one transformers 4.46 runs on a PIL image: `convert("RGB")`, resize
//! of the shortest edge with Pillow's resampler (reproduced here to the bit: separable
//! two-pass convolution, horizontal then vertical, fixed-point coefficients, uint8 clipping
//! between passes), center crop (zero padding when the crop is larger), `x * rescale_factor`
//! in f64 cast to f32, then `(x - mean) / std` in f32, laid out `[3, H, W]`.
//!
//! [`PadMode::Pad`] first applies the original LLaVA-1.5 `expand2square`: the image is
//! pasted centred on a square canvas filled with `int(mean * 255)`.

use std::ops::Range;
use std::path::Path;

use engine_core::{Error, Result};
use serde_json::Value;

pub use crate::image_io::{
    decode_image, load_image, MAX_DECODE_BYTES, MAX_IMAGE_FILE_BYTES, MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
};
pub use image::RgbImage;

/// CLIP's normalisation constants (`OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD` in transformers).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// See [`CLIP_MEAN`].
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

// ---------------------------------------------------------------------------------------
// Pillow's resampler
// ---------------------------------------------------------------------------------------

/// Resampling filters with PIL's numbering (`PIL.Image.Resampling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// 1
    Lanczos,
    /// 2
    Bilinear,
    /// 3 (CLIP's)
    Bicubic,
    /// 4
    Box,
    /// 5
    Hamming,
}

impl Resample {
    /// The filter for PIL's integer code; nearest (0) is not supported.
    pub fn from_pil(code: i64) -> Option<Self> {
        Some(match code {
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => return None,
        })
    }

    /// Half-width of the filter at scale 1 (Pillow's `support`).
    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    /// Pillow's filter functions (`Resample.c`), constants included (`0.54f`, `a = -0.5`).
    fn eval(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                return 1.0;
            }
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
        match self {
            Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Resample::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Pillow's `PRECISION_BITS`: coefficients are fixed point with 22 fractional bits.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point filter taps for a range of output pixels along one axis.
struct Coeffs {
    ksize: usize,
    /// Per output pixel: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `ksize` taps per output pixel.
    kk: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for output pixels `range` only
/// (each output pixel's taps are independent of the others, so this is exact).
fn precompute_coeffs(
    in_size: usize,
    out_size: usize,
    filter: Resample,
    range: Range<usize>,
) -> Coeffs {
    // Pillow passes the box as C floats: `(double)(in1 - in0) / outSize` with in0 = 0.
    let scale = (in_size as f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(range.len());
    let mut kk = vec![0i32; range.len() * ksize];
    let mut w = vec![0f64; ksize];
    for (i, xx) in range.enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C `(int)` casts truncate toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let xmax = xmax.clamp(0, ksize as i64) as usize;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(xmax) {
            let v = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *wx = v;
            ww += v;
        }
        let k = &mut kk[i * ksize..(i + 1) * ksize];
        for x in 0..xmax {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            k[x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin as usize, xmax));
    }
    Coeffs { ksize, bounds, kk }
}

/// Pillow's `clip8`: rounds a fixed-point sum (which started at one half) to a byte.
#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes `src` to `out_w`×`out_h` exactly like Pillow's `Image.resize` (no reducing gap).
pub fn resize(src: &RgbImage, out_w: usize, out_h: usize, filter: Resample) -> Result<RgbImage> {
    resize_window(src, out_w, out_h, filter, 0..out_w, 0..out_h)
}

/// The `cols`×`rows` window of [`resize`]'s output, computed without the rest of it (so a
/// very elongated image resized and then cropped never materialises the full resize).
pub fn resize_window(
    src: &RgbImage,
    out_w: usize,
    out_h: usize,
    filter: Resample,
    cols: Range<usize>,
    rows: Range<usize>,
) -> Result<RgbImage> {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return Err(Error::msg(format!(
            "resize: cannot resize {in_w}x{in_h} to {out_w}x{out_h}"
        )));
    }
    if cols.end > out_w || rows.end > out_h || cols.start > cols.end || rows.start > rows.end {
        return Err(Error::msg(format!(
            "resize: window {cols:?}x{rows:?} outside the {out_w}x{out_h} output"
        )));
    }
    let (win_w, win_h) = (cols.len(), rows.len());
    check_pixels(win_w, win_h)?;
    let s = src.as_raw();
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    // Pillow >= 13 (`ImagingResampleInner`): "if height is being scaled down more than twice
    // the amount the width is, run the vertical pass first". The passes round to u8 in
    // between, so the order changes pixels (a 300x560 image squashed to 336x336 differs in
    // ~2,200 values, issue 27).
    let (dh, dw) = (in_h as i64 - out_h as i64, in_w as i64 - out_w as i64);
    if dh > 0 && dh > dw * 2 {
        return resize_vertical_first(src, out_w, out_h, filter, cols, rows);
    }

    // Input rows the vertical pass reads (Pillow's ybox_first..ybox_last).
    let vert = need_v.then(|| precompute_coeffs(in_h, out_h, filter, rows.clone()));
    let (y_first, y_last) = match &vert {
        Some(c) => (
            c.bounds.iter().map(|b| b.0).min().unwrap_or(0),
            c.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0),
        ),
        None => (rows.start, rows.end),
    };

    // Horizontal pass into `tmp` [y_last - y_first, win_w, 3].
    let tmp_h = y_last - y_first;
    let mut tmp = vec![0u8; tmp_h * win_w * 3];
    if need_h {
        let c = precompute_coeffs(in_w, out_w, filter, cols.clone());
        for y in 0..tmp_h {
            let row = &s[(y + y_first) * in_w * 3..(y + y_first + 1) * in_w * 3];
            let out = &mut tmp[y * win_w * 3..(y + 1) * win_w * 3];
            for j in 0..win_w {
                let (xmin, n) = c.bounds[j];
                let k = &c.kk[j * c.ksize..j * c.ksize + n];
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    acc[0] += p[0] as i32 * kx;
                    acc[1] += p[1] as i32 * kx;
                    acc[2] += p[2] as i32 * kx;
                }
                out[j * 3] = clip8(acc[0]);
                out[j * 3 + 1] = clip8(acc[1]);
                out[j * 3 + 2] = clip8(acc[2]);
            }
        }
    } else {
        for y in 0..tmp_h {
            let from = ((y + y_first) * in_w + cols.start) * 3;
            tmp[y * win_w * 3..(y + 1) * win_w * 3].copy_from_slice(&s[from..from + win_w * 3]);
        }
    }

    // Vertical pass into the window.
    let mut out = vec![0u8; win_h * win_w * 3];
    match &vert {
        Some(c) => {
            for i in 0..win_h {
                let (ymin, n) = c.bounds[i];
                let k = &c.kk[i * c.ksize..i * c.ksize + n];
                let o = &mut out[i * win_w * 3..(i + 1) * win_w * 3];
                for (j, px) in o.chunks_exact_mut(3).enumerate() {
                    let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                    for (y, &ky) in k.iter().enumerate() {
                        let at = ((ymin - y_first + y) * win_w + j) * 3;
                        acc[0] += tmp[at] as i32 * ky;
                        acc[1] += tmp[at + 1] as i32 * ky;
                        acc[2] += tmp[at + 2] as i32 * ky;
                    }
                    px[0] = clip8(acc[0]);
                    px[1] = clip8(acc[1]);
                    px[2] = clip8(acc[2]);
                }
            }
        }
        None => out.copy_from_slice(&tmp),
    }
    RgbImage::from_raw(win_w as u32, win_h as u32, out)
        .ok_or_else(|| Error::msg("resize: internal buffer size mismatch"))
}

/// [`resize_window`] with Pillow's vertical pass first (the height shrinks, so `out_h <
/// in_h`): the vertical pass over the input columns the horizontal pass reads, rounded to
/// u8, then the horizontal pass.
fn resize_vertical_first(
    src: &RgbImage,
    out_w: usize,
    out_h: usize,
    filter: Resample,
    cols: Range<usize>,
    rows: Range<usize>,
) -> Result<RgbImage> {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (win_w, win_h) = (cols.len(), rows.len());
    let s = src.as_raw();
    let horiz = (out_w != in_w).then(|| precompute_coeffs(in_w, out_w, filter, cols.clone()));
    // Input columns the horizontal pass reads.
    let (x_first, x_last) = match &horiz {
        Some(c) => (
            c.bounds.iter().map(|b| b.0).min().unwrap_or(0),
            c.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0),
        ),
        None => (cols.start, cols.end),
    };
    let tmp_w = x_last - x_first;
    check_pixels(tmp_w, win_h)?;
    // Vertical pass into `tmp` [win_h, tmp_w, 3].
    let v = precompute_coeffs(in_h, out_h, filter, rows);
    let mut tmp = vec![0u8; win_h * tmp_w * 3];
    for i in 0..win_h {
        let (ymin, n) = v.bounds[i];
        let k = &v.kk[i * v.ksize..i * v.ksize + n];
        let o = &mut tmp[i * tmp_w * 3..(i + 1) * tmp_w * 3];
        for (j, px) in o.chunks_exact_mut(3).enumerate() {
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (y, &ky) in k.iter().enumerate() {
                let at = ((ymin + y) * in_w + x_first + j) * 3;
                acc[0] += s[at] as i32 * ky;
                acc[1] += s[at + 1] as i32 * ky;
                acc[2] += s[at + 2] as i32 * ky;
            }
            px[0] = clip8(acc[0]);
            px[1] = clip8(acc[1]);
            px[2] = clip8(acc[2]);
        }
    }
    let out = match &horiz {
        None => tmp,
        Some(c) => {
            let mut out = vec![0u8; win_h * win_w * 3];
            for y in 0..win_h {
                let row = &tmp[y * tmp_w * 3..(y + 1) * tmp_w * 3];
                let o = &mut out[y * win_w * 3..(y + 1) * win_w * 3];
                for j in 0..win_w {
                    let (xmin, n) = c.bounds[j];
                    let k = &c.kk[j * c.ksize..j * c.ksize + n];
                    let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                    for (x, &kx) in k.iter().enumerate() {
                        let p = &row[(xmin - x_first + x) * 3..(xmin - x_first + x) * 3 + 3];
                        acc[0] += p[0] as i32 * kx;
                        acc[1] += p[1] as i32 * kx;
                        acc[2] += p[2] as i32 * kx;
                    }
                    o[j * 3] = clip8(acc[0]);
                    o[j * 3 + 1] = clip8(acc[1]);
                    o[j * 3 + 2] = clip8(acc[2]);
                }
            }
            out
        }
    };
    RgbImage::from_raw(win_w as u32, win_h as u32, out)
        .ok_or_else(|| Error::msg("resize: internal buffer size mismatch"))
}

/// Intermediate images are bounded like decoded ones.
fn check_pixels(w: usize, h: usize) -> Result<()> {
    let bytes = (w as u64).saturating_mul(h as u64).saturating_mul(3);
    if w > u32::MAX as usize || h > u32::MAX as usize || bytes > MAX_DECODE_BYTES {
        return Err(Error::msg(format!(
            "image of {w}x{h} pixels is too large to process (limit {MAX_DECODE_BYTES} bytes)"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// geometry helpers
// ---------------------------------------------------------------------------------------

/// LLaVA's `expand2square`: a square canvas of `background`, the image pasted at
/// `(0, (w - h) / 2)` when wide or `((h - w) / 2, 0)` when tall.
pub fn expand_to_square(img: &RgbImage, background: [u8; 3]) -> Result<RgbImage> {
    let (w, h) = (img.width(), img.height());
    if w == h {
        return Ok(img.clone());
    }
    let side = w.max(h);
    check_pixels(side as usize, side as usize)?;
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(background));
    let (dx, dy) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    for y in 0..h {
        for x in 0..w {
            out.put_pixel(x + dx, y + dy, *img.get_pixel(x, y));
        }
    }
    Ok(out)
}

/// Output size of transformers' `get_resize_output_image_size(default_to_square=False)`:
/// the short side becomes `short`, the long side `int(short * long / short_in)`.
/// Returns `(height, width)`.
pub fn shortest_edge_size(height: usize, width: usize, short: usize) -> (usize, usize) {
    let (s, l) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python's int * int / int is a correctly rounded float division, as f64 `/` is.
    let new_long = ((short as f64 * l as f64) / s as f64) as usize;
    if width <= height {
        (new_long, short)
    } else {
        (short, new_long)
    }
}

/// Top-left corner of transformers' `center_crop` in the source (may be negative when the
/// crop is larger and the image gets zero padding): `floor((in - crop) / 2)`.
fn crop_origin(in_size: usize, crop: usize) -> i64 {
    (in_size as i64 - crop as i64).div_euclid(2)
}

// ---------------------------------------------------------------------------------------
// the processor
// ---------------------------------------------------------------------------------------

/// How the resize target is given in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTarget {
    /// `size: {"shortest_edge": n}` or `size: n`: keep the aspect ratio.
    ShortestEdge(usize),
    /// `size: {"height": h, "width": w}`: exact size.
    Exact {
        /// Output rows.
        height: usize,
        /// Output columns.
        width: usize,
    },
}

/// Whether to square the image before the CLIP pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PadMode {
    /// transformers' pipeline as is: resize the shortest edge, center crop (llava-hf).
    #[default]
    Crop,
    /// Original LLaVA-1.5 (`image_aspect_ratio: pad`): `expand2square` with the mean colour first.
    Pad,
}

impl PadMode {
    /// `"crop"` or `"pad"`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "crop" => Ok(PadMode::Crop),
            "pad" => Ok(PadMode::Pad),
            other => Err(Error::msg(format!(
                "unknown image mode `{other}` (expected `crop` or `pad`)"
            ))),
        }
    }
}

/// Preprocessed pixels: `[3, height, width]` f32, channel-major.
#[derive(Clone, Debug, PartialEq)]
pub struct PixelValues {
    /// Channel-major values `[3, height, width]`.
    pub data: Vec<f32>,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// The settings of a `preprocessor_config.json` (`CLIPImageProcessor`), with its defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    /// Whether to resize.
    pub do_resize: bool,
    /// Resize target.
    pub size: ResizeTarget,
    /// Resampling filter.
    pub resample: Resample,
    /// Whether to center-crop to `crop_size`.
    pub do_center_crop: bool,
    /// `(height, width)`.
    pub crop_size: (usize, usize),
    /// Whether to multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Pixel scale (1/255).
    pub rescale_factor: f64,
    /// Whether to normalise with mean/std.
    pub do_normalize: bool,
    /// Per-channel mean.
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation.
    pub image_std: [f64; 3],
    /// Images are always converted to RGB when loaded; kept for completeness.
    pub do_convert_rgb: bool,
}

impl Default for ImageProcessor {
    /// transformers' `CLIPImageProcessor()` defaults (224 px).
    fn default() -> Self {
        ImageProcessor {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(224),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            do_convert_rgb: true,
        }
    }
}

impl ImageProcessor {
    /// Reads a `preprocessor_config.json`; errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            engine_core::files::read_text_limited(path, engine_core::files::MAX_CONFIG_BYTES)?;
        Self::from_json_str(&text, path)
    }

    /// Parses config JSON; `origin` names the file in errors.
    // Keys are read one by one in the file's order so each error names its own key.
    /// Parses `preprocessor_config.json` text; errors name `origin` and the key.
    #[allow(clippy::field_reassign_with_default)]
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::file(origin, format!("invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::file(origin, "expected a JSON object"))?;
        let err = |key: &str, msg: &str| Error::file(origin, format!("`{key}`: {msg}"));
        // A missing key or `null` means the default, as in transformers.
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let boolean = |key: &str, default: bool| -> Result<bool> {
            match get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| err(key, "must be true or false")),
            }
        };
        let positive = |key: &str, v: &Value| -> Result<usize> {
            v.as_u64()
                .filter(|&n| n > 0 && n <= MAX_IMAGE_SIDE as u64)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    err(
                        key,
                        &format!("must be an integer in 1..={MAX_IMAGE_SIDE}, got {v}"),
                    )
                })
        };
        let triple = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match get(key) {
                None => Ok(default),
                Some(Value::Number(n)) => {
                    let x = n.as_f64().ok_or_else(|| err(key, "not a number"))?;
                    Ok([x; 3])
                }
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0.0; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x.as_f64().ok_or_else(|| err(key, "must hold numbers"))?;
                    }
                    Ok(out)
                }
                Some(_) => Err(err(key, "must be a number or a list of 3 numbers")),
            }
        };

        let mut p = ImageProcessor::default();
        p.do_resize = boolean("do_resize", true)?;
        if let Some(size) = get("size") {
            p.size = match size {
                Value::Number(_) => ResizeTarget::ShortestEdge(positive("size", size)?),
                Value::Object(m) => {
                    if let Some(s) = m.get("shortest_edge") {
                        ResizeTarget::ShortestEdge(positive("size.shortest_edge", s)?)
                    } else if let (Some(h), Some(w)) = (m.get("height"), m.get("width")) {
                        ResizeTarget::Exact {
                            height: positive("size.height", h)?,
                            width: positive("size.width", w)?,
                        }
                    } else {
                        return Err(err("size", "needs `shortest_edge` or `height` and `width`"));
                    }
                }
                _ => return Err(err("size", "must be an integer or an object")),
            };
        }
        if let Some(r) = get("resample") {
            let code = r
                .as_i64()
                .ok_or_else(|| err("resample", "must be an integer"))?;
            p.resample = Resample::from_pil(code).ok_or_else(|| {
                err("resample", &format!("PIL filter {code} is not supported (1..=5: lanczos, bilinear, bicubic, box, hamming)"))
            })?;
        }
        p.do_center_crop = boolean("do_center_crop", true)?;
        if let Some(c) = get("crop_size") {
            p.crop_size = match c {
                Value::Number(_) => {
                    let n = positive("crop_size", c)?;
                    (n, n)
                }
                Value::Object(m) => match (m.get("height"), m.get("width")) {
                    (Some(h), Some(w)) => (
                        positive("crop_size.height", h)?,
                        positive("crop_size.width", w)?,
                    ),
                    _ => return Err(err("crop_size", "needs `height` and `width`")),
                },
                _ => return Err(err("crop_size", "must be an integer or an object")),
            };
        }
        p.do_rescale = boolean("do_rescale", true)?;
        if let Some(f) = get("rescale_factor") {
            p.rescale_factor = f
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| err("rescale_factor", "must be a finite number"))?;
        }
        p.do_normalize = boolean("do_normalize", true)?;
        p.image_mean = triple("image_mean", CLIP_MEAN)?;
        p.image_std = triple("image_std", CLIP_STD)?;
        if p.image_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(err("image_std", "must be finite and non-zero"));
        }
        if p.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(err("image_mean", "must be finite"));
        }
        p.do_convert_rgb = boolean("do_convert_rgb", true)?;
        Ok(p)
    }

    /// The canvas colour of [`PadMode::Pad`]: LLaVA's `tuple(int(x * 255) for x in image_mean)`.
    pub fn pad_background(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }

    /// Size `(height, width)` of the pixel values for an input of `height`×`width`.
    pub fn output_size(&self, height: usize, width: usize, mode: PadMode) -> (usize, usize) {
        let (h, w) = match mode {
            PadMode::Pad => (height.max(width), height.max(width)),
            PadMode::Crop => (height, width),
        };
        let (h, w) = self.resized_size(h, w);
        if self.do_center_crop {
            self.crop_size
        } else {
            (h, w)
        }
    }

    fn resized_size(&self, h: usize, w: usize) -> (usize, usize) {
        if !self.do_resize {
            return (h, w);
        }
        match self.size {
            ResizeTarget::ShortestEdge(s) => shortest_edge_size(h, w, s),
            ResizeTarget::Exact { height, width } => (height, width),
        }
    }

    /// The uint8 stage: (pad to square), resize, center crop. This is the picture the vision
    /// tower sees, pixel for pixel (for drawing kept or pruned patches on).
    pub fn prepare(&self, img: &RgbImage, mode: PadMode) -> Result<RgbImage> {
        let squared;
        let img = match mode {
            PadMode::Pad => {
                squared = expand_to_square(img, self.pad_background())?;
                &squared
            }
            PadMode::Crop => img,
        };
        let (in_h, in_w) = (img.height() as usize, img.width() as usize);
        let (rh, rw) = self.resized_size(in_h, in_w);
        if rh == 0 || rw == 0 {
            return Err(Error::msg(format!(
                "resize of a {in_w}x{in_h} image gives an empty image"
            )));
        }
        if !self.do_center_crop {
            check_pixels(rw, rh)?;
            return resize(img, rw, rh, self.resample);
        }
        let (ch, cw) = self.crop_size;
        check_pixels(cw, ch)?;
        let (top, left) = (crop_origin(rh, ch), crop_origin(rw, cw));
        // The part of the resized image the crop keeps, in resized coordinates.
        let rows = top.max(0) as usize..((top + ch as i64).min(rh as i64)) as usize;
        let cols = left.max(0) as usize..((left + cw as i64).min(rw as i64)) as usize;
        let window = resize_window(img, rw, rh, self.resample, cols.clone(), rows.clone())?;
        if window.dimensions() == (cw as u32, ch as u32) {
            return Ok(window);
        }
        // Crop larger than the image: transformers pads with zeros.
        let mut out = RgbImage::new(cw as u32, ch as u32);
        let (dy, dx) = (
            (rows.start as i64 - top) as u32,
            (cols.start as i64 - left) as u32,
        );
        image::imageops::replace(&mut out, &window, dx as i64, dy as i64);
        Ok(out)
    }

    /// Rescale and normalise the uint8 stage into `[3, H, W]` f32, with transformers'
    /// arithmetic: `f32(f64(x) * rescale_factor)`, then `(x - f32(mean)) / f32(std)` in f32.
    pub fn normalize(&self, img: &RgbImage) -> PixelValues {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let mut data = vec![0f32; 3 * h * w];
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut x = if self.do_rescale {
                    (px[c] as f64 * self.rescale_factor) as f32
                } else {
                    px[c] as f32
                };
                if self.do_normalize {
                    x = (x - mean[c]) / std[c];
                }
                data[c * h * w + i] = x;
            }
        }
        PixelValues {
            data,
            height: h,
            width: w,
        }
    }

    /// The whole pipeline: [`ImageProcessor::prepare`] then [`ImageProcessor::normalize`].
    pub fn preprocess(&self, img: &RgbImage, mode: PadMode) -> Result<PixelValues> {
        Ok(self.normalize(&self.prepare(img, mode)?))
    }
}
