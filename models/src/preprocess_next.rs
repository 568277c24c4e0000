//! LLaVA-NeXT (llava-v1.6) "any resolution" preprocessing and feature layout, exactly as
//! transformers 4.46's `LlavaNextImageProcessor` and `LlavaNextForConditionalGeneration`:
//!
//! 1. pick the best resolution among `image_grid_pinpoints` (`select_best_resolution`);
//! 2. resize the image keeping its aspect ratio so it fits that resolution
//!    (`_get_patch_output_size`: the tighter side exactly, the other `ceil`ed), with PIL's
//!    resampler;
//! 3. pad with zeros (black) to the resolution, `(target - new) // 2` on *both* sides as
//!    transformers 4.46 does (an odd remainder leaves the canvas one pixel short, and the
//!    last row or column of tiles is then narrower);
//! 4. cut `image_size` tiles row-major and put the whole image resized to
//!    `image_size`×`image_size` first;
//! 5. run every tile through the CLIP pipeline (shortest-edge resize, center crop, rescale,
//!    normalise), which is a no-op resize for full tiles and squares the short ones.
//!
//! On the model side each tile's `grid × grid` features are laid out on the
//! `rows·grid × cols·grid` canvas, the padding rows or columns are cut away again
//! (`unpad_image`), an `image_newline` closes every row, and the base tile's features go
//! first. [`NextLayout`] holds that token layout so the features, the image-token count and
//! the drawing of kept tokens all come from one place.

use engine_core::{Error, Result};
use image::RgbImage;

use crate::preprocess::{resize, ImageProcessor, PadMode, PixelValues, ResizeTarget};

/// transformers' `select_best_resolution`: the pinpoint `(height, width)` that keeps the most
/// of the image's pixels after an aspect-preserving downscale, the least wasted area on ties.
pub fn select_best_resolution(
    original: (usize, usize),
    pinpoints: &[(usize, usize)],
) -> Option<(usize, usize)> {
    let (oh, ow) = original;
    let mut best = None;
    let mut max_effective = 0usize;
    let mut min_wasted = usize::MAX;
    for &(h, w) in pinpoints {
        // Python float division then int() truncation.
        let scale = (w as f64 / ow as f64).min(h as f64 / oh as f64);
        let dw = (ow as f64 * scale) as usize;
        let dh = (oh as f64 * scale) as usize;
        let effective = (dw * dh).min(ow * oh);
        let wasted = w * h - effective;
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some((h, w));
        }
    }
    best
}

/// transformers' `_get_patch_output_size`: the `(height, width)` the image is resized to
/// before padding to `target`.
pub fn patch_output_size(original: (usize, usize), target: (usize, usize)) -> (usize, usize) {
    let (oh, ow) = (original.0 as f64, original.1 as f64);
    let (th, tw) = target;
    let scale_w = tw as f64 / ow;
    let scale_h = th as f64 / oh;
    if scale_w < scale_h {
        (((oh * scale_w).ceil() as usize).min(th), tw)
    } else {
        (th, ((ow * scale_h).ceil() as usize).min(tw))
    }
}

/// Where one image's tokens come from, in the order the decoder sees them.
#[derive(Clone, Debug, PartialEq)]
pub struct NextLayout {
    /// The original image `(height, width)`.
    pub original: (usize, usize),
    /// The chosen pinpoint `(height, width)`.
    pub best: (usize, usize),
    /// Patches per tile side (`image_size / patch_size`).
    pub grid: usize,
    /// Tiles down and across (`best / image_size`).
    pub tiles: (usize, usize),
    /// Rows `[r0, r1)` of the `tiles.0·grid` feature rows kept after unpadding.
    pub rows: (usize, usize),
    /// Columns `[c0, c1)` of the `tiles.1·grid` feature columns kept after unpadding.
    pub cols: (usize, usize),
}

/// What one image token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextToken {
    /// Patch `(row, col)` of the base (whole image, squashed) tile.
    Base(usize, usize),
    /// Feature cell `(row, col)` of the tiled canvas (`tiles·grid` per side, padding included).
    Tile(usize, usize),
    /// The `image_newline` closing unpadded row `row` of the canvas.
    Newline(usize),
}

impl NextLayout {
    /// The layout transformers' model produces for an image of `original` `(height, width)`.
    /// Errors when the processor's integer formula for the token count disagrees with the
    /// model's rounding (transformers then fails with "Image features and image tokens do
    /// not match"); visi refuses such an image the same way rather than guess.
    pub fn new(
        original: (usize, usize),
        pinpoints: &[(usize, usize)],
        image_size: usize,
        patch_size: usize,
    ) -> Result<Self> {
        let (oh, ow) = original;
        if oh == 0 || ow == 0 || image_size == 0 || patch_size == 0 {
            return Err(Error::msg(
                "an image of zero pixels has no LLaVA-NeXT layout",
            ));
        }
        let best = select_best_resolution(original, pinpoints)
            .ok_or_else(|| Error::msg("image_grid_pinpoints is empty"))?;
        let grid = image_size / patch_size;
        let tiles = (best.0 / image_size, best.1 / image_size);
        let (ch, cw) = (tiles.0 * grid, tiles.1 * grid);
        // unpad_image (the model, transformers 4.46: `int(original * scale)`).
        let (rows, cols) = if ow as f64 / oh as f64 > cw as f64 / ch as f64 {
            let scale = cw as f64 / ow as f64;
            let nh = (oh as f64 * scale) as usize;
            let pad = (ch.saturating_sub(nh)) / 2;
            ((pad, ch - pad), (0, cw))
        } else {
            let scale = ch as f64 / oh as f64;
            let nw = (ow as f64 * scale) as usize;
            let pad = (cw.saturating_sub(nw)) / 2;
            ((0, ch), (pad, cw - pad))
        };
        let layout = NextLayout {
            original,
            best,
            grid,
            tiles,
            rows,
            cols,
        };
        // _get_unpadded_features (the processor), with integer arithmetic.
        let (mut ph, mut pw) = (ch, cw);
        if ow as f64 / oh as f64 > cw as f64 / ch as f64 {
            let nh = oh * cw / ow;
            ph -= (ch - nh) / 2 * 2;
        } else {
            let nw = ow * ch / oh;
            pw -= (cw - nw) / 2 * 2;
        }
        let processor = ph * pw + ph + grid * grid;
        if processor != layout.num_tokens() {
            return Err(Error::msg(format!(
                "a {ow}x{oh} image gives {} image features but the processor counts {processor} tokens (transformers fails on this size too)",
                layout.num_tokens()
            )));
        }
        Ok(layout)
    }

    /// Image tokens: the base tile, then every unpadded row with its newline.
    pub fn num_tokens(&self) -> usize {
        let (r, c) = (self.rows.1 - self.rows.0, self.cols.1 - self.cols.0);
        self.grid * self.grid + r * (c + 1)
    }

    /// Every token in decoder order.
    pub fn tokens(&self) -> Vec<NextToken> {
        let g = self.grid;
        let mut out = Vec::with_capacity(self.num_tokens());
        out.extend((0..g * g).map(|i| NextToken::Base(i / g, i % g)));
        for y in self.rows.0..self.rows.1 {
            out.extend((self.cols.0..self.cols.1).map(|x| NextToken::Tile(y, x)));
            out.push(NextToken::Newline(y));
        }
        out
    }

    /// Rows of the stacked per-tile features `[(1 + tiles) · grid², D]` (base tile first)
    /// each token takes; `newline` is the row index given to newline tokens.
    pub fn feature_rows(&self, newline: u32) -> Vec<u32> {
        let g = self.grid;
        self.tokens()
            .into_iter()
            .map(|t| match t {
                NextToken::Base(y, x) => (y * g + x) as u32,
                NextToken::Tile(y, x) => {
                    let tile = (y / g) * self.tiles.1 + x / g;
                    ((1 + tile) * g * g + (y % g) * g + x % g) as u32
                }
                NextToken::Newline(_) => newline,
            })
            .collect()
    }

    /// The rectangle `(x0, y0, x1, y1)` of the original image a canvas cell covers (clipped;
    /// empty for padding), for drawing kept tokens.
    pub fn cell_on_original(&self, row: usize, col: usize) -> (f64, f64, f64, f64) {
        let (rh, rw) = patch_output_size(self.original, self.best);
        let (py, px) = ((self.best.0 - rh) / 2, (self.best.1 - rw) / 2);
        let cell = (self.best.0 / (self.tiles.0 * self.grid)) as f64;
        let (sy, sx) = (
            self.original.0 as f64 / rh as f64,
            self.original.1 as f64 / rw as f64,
        );
        let clip = |v: f64, hi: usize| v.clamp(0.0, hi as f64);
        let y0 = clip((row as f64 * cell - py as f64) * sy, self.original.0);
        let y1 = clip(((row + 1) as f64 * cell - py as f64) * sy, self.original.0);
        let x0 = clip((col as f64 * cell - px as f64) * sx, self.original.1);
        let x1 = clip(((col + 1) as f64 * cell - px as f64) * sx, self.original.1);
        (x0, y0, x1, y1)
    }
}

/// One image preprocessed for LLaVA-NeXT.
#[derive(Clone, Debug)]
pub struct NextPixels {
    /// Token layout of this image.
    pub layout: NextLayout,
    /// Normalised tiles `[3, S, S]`, base image first, then the grid row-major.
    pub tiles: Vec<PixelValues>,
}

/// `LlavaNextImageProcessor.preprocess` for one image: see the module docs.
pub fn preprocess_next(
    processor: &ImageProcessor,
    img: &RgbImage,
    pinpoints: &[(usize, usize)],
    image_size: usize,
    patch_size: usize,
) -> Result<NextPixels> {
    let original = (img.height() as usize, img.width() as usize);
    let layout = NextLayout::new(original, pinpoints, image_size, patch_size)?;
    let best = layout.best;
    let (nh, nw) = patch_output_size(original, best);
    let resized = resize(img, nw, nh, processor.resample)?;
    let (py, px) = ((best.0 - nh) / 2, (best.1 - nw) / 2);
    // Symmetric padding as transformers 4.46 pads: the canvas may be a pixel short.
    let (canvas_h, canvas_w) = (nh + 2 * py, nw + 2 * px);
    let mut canvas = RgbImage::new(canvas_w as u32, canvas_h as u32);
    image::imageops::replace(&mut canvas, &resized, px as i64, py as i64);
    let mut tiles = Vec::with_capacity(1 + layout.tiles.0 * layout.tiles.1);
    // get_image_patches: the base side is size's shortest edge (or the smaller of height
    // and width), the tile side crop_size's height.
    let base_side = match processor.size {
        ResizeTarget::ShortestEdge(s) => s,
        ResizeTarget::Exact { height, width } => height.min(width),
    };
    let tile = processor.crop_size.0;
    let base = resize(img, base_side, base_side, processor.resample)?;
    tiles.push(checked(
        processor.preprocess(&base, PadMode::Crop)?,
        image_size,
    )?);
    for y in (0..canvas_h).step_by(tile) {
        for x in (0..canvas_w).step_by(tile) {
            let h = tile.min(canvas_h - y);
            let w = tile.min(canvas_w - x);
            let cut = image::imageops::crop_imm(&canvas, x as u32, y as u32, w as u32, h as u32)
                .to_image();
            tiles.push(checked(
                processor.preprocess(&cut, PadMode::Crop)?,
                image_size,
            )?);
        }
    }
    if tiles.len() != 1 + layout.tiles.0 * layout.tiles.1 {
        return Err(Error::msg(format!(
            "LLaVA-NeXT tiling cut {} tiles for a {}x{} grid",
            tiles.len() - 1,
            layout.tiles.1,
            layout.tiles.0
        )));
    }
    Ok(NextPixels { layout, tiles })
}

/// A tile must come out at the vision tower's input size.
fn checked(pv: PixelValues, side: usize) -> Result<PixelValues> {
    if (pv.height, pv.width) != (side, side) {
        return Err(Error::msg(format!(
            "preprocessor_config.json gives {}x{} tiles but the vision tower takes {side}x{side}",
            pv.width, pv.height
        )));
    }
    Ok(pv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_PINPOINTS;

    #[test]
    fn best_resolution_matches_transformers_examples() {
        // Values from transformers' select_best_resolution on llava-v1.6's pinpoints.
        let p = &DEFAULT_PINPOINTS;
        assert_eq!(select_best_resolution((480, 640), p), Some((672, 672)));
        assert_eq!(select_best_resolution((300, 1000), p), Some((336, 1008)));
        assert_eq!(select_best_resolution((1000, 300), p), Some((1008, 336)));
        assert_eq!(select_best_resolution((200, 400), p), Some((336, 672)));
    }

    #[test]
    fn llava_v16_token_count_for_a_vga_image() {
        // 640x480 on llava-v1.6: the 672x672 pinpoint, a 48x48 feature canvas; the
        // processor's formula by hand: new_height = 480*48//640 = 36, padding
        // (48-36)//2 = 6, so 36 rows of 48 cells plus a newline each, after 576 base tokens.
        let l = NextLayout::new((480, 640), &DEFAULT_PINPOINTS, 336, 14).unwrap();
        assert_eq!(l.tiles, (2, 2));
        assert_eq!(l.rows, (6, 42));
        assert_eq!(l.num_tokens(), 576 + 36 * 49);
        assert_eq!(l.tokens().len(), l.num_tokens());
    }
}
