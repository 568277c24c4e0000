//! The sweep's PNG: accuracy against mean time to first token and against mean prefill
//! FLOPs (fraction of dense), one coloured point per pruning config, drawn with the `image`
//! crate and `font8x8`'s public-domain 8x8 glyphs for the labels.

use font8x8::{UnicodeFonts, BASIC_FONTS};
use image::{Rgb, RgbImage};

/// One config's point.
#[derive(Clone, Debug)]
pub struct Point {
    /// Config name (legend).
    pub name: String,
    /// The score (y).
    pub accuracy: f64,
    /// Mean TTFT in ms (x of the left panel).
    pub ttft_ms: f64,
    /// Mean prefill FLOPs / dense (x of the right panel).
    pub flops: f64,
}

const PANEL_W: u32 = 520;
const PANEL_H: u32 = 380;
const MARGIN_L: u32 = 72;
const MARGIN_R: u32 = 24;
const MARGIN_T: u32 = 36;
const MARGIN_B: u32 = 48;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GREY: Rgb<u8> = Rgb([225, 225, 225]);
const COLOURS: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

/// Draws both panels and the legend; `metric` labels the y axes.
pub fn sweep_plot(points: &[Point], metric: &str) -> RgbImage {
    let legend_h = 14 * points.len() as u32 + 16;
    let mut img = RgbImage::from_pixel(2 * PANEL_W, PANEL_H + legend_h, WHITE);
    let ys: Vec<f64> = points.iter().map(|p| p.accuracy).collect();
    let yr = range(&ys);
    let panels: [(&str, Vec<f64>); 2] = [
        (
            "time to first token (ms)",
            points.iter().map(|p| p.ttft_ms).collect(),
        ),
        (
            "prefill FLOPs / dense",
            points.iter().map(|p| p.flops).collect(),
        ),
    ];
    for (k, (xlabel, xs)) in panels.iter().enumerate() {
        let ox = k as u32 * PANEL_W;
        let xr = range(xs);
        let (x0, x1) = (ox + MARGIN_L, ox + PANEL_W - MARGIN_R);
        let (y0, y1) = (MARGIN_T, PANEL_H - MARGIN_B);
        // Grid and ticks: 5 intervals per axis.
        for i in 0..=5 {
            let t = i as f64 / 5.0;
            let gx = x0 + ((x1 - x0) as f64 * t) as u32;
            let gy = y1 - ((y1 - y0) as f64 * t) as u32;
            line(&mut img, gx, y0, gx, y1, GREY);
            line(&mut img, x0, gy, x1, gy, GREY);
            let xv = xr.0 + (xr.1 - xr.0) * t;
            let yv = yr.0 + (yr.1 - yr.0) * t;
            let xs = tick(xv);
            text(
                &mut img,
                gx.saturating_sub(4 * xs.len() as u32),
                y1 + 6,
                &xs,
                BLACK,
            );
            let ys = tick(yv);
            text(
                &mut img,
                x0.saturating_sub(8 * ys.len() as u32 + 6),
                gy.saturating_sub(4),
                &ys,
                BLACK,
            );
        }
        line(&mut img, x0, y1, x1, y1, BLACK);
        line(&mut img, x0, y0, x0, y1, BLACK);
        let title = format!("{metric} vs {xlabel}");
        text(&mut img, ox + MARGIN_L, 12, &title, BLACK);
        text(
            &mut img,
            ox + (PANEL_W - 8 * xlabel.len() as u32) / 2 + MARGIN_L / 2,
            y1 + 24,
            xlabel,
            BLACK,
        );
        for (i, p) in points.iter().enumerate() {
            let px = x0 as f64 + (x1 - x0) as f64 * (xs[i] - xr.0) / (xr.1 - xr.0);
            let py = y1 as f64 - (y1 - y0) as f64 * (p.accuracy - yr.0) / (yr.1 - yr.0);
            disc(&mut img, px, py, 5.0, Rgb(COLOURS[i % COLOURS.len()]));
        }
    }
    for (i, p) in points.iter().enumerate() {
        let y = PANEL_H + 8 + 14 * i as u32;
        let c = Rgb(COLOURS[i % COLOURS.len()]);
        disc(&mut img, (MARGIN_L + 4) as f64, (y + 4) as f64, 5.0, c);
        let label = format!(
            "{}: {metric} {}, ttft {:.1} ms, flops {:.3}",
            p.name,
            tick(p.accuracy),
            p.ttft_ms,
            p.flops
        );
        text(&mut img, MARGIN_L + 16, y, &label, BLACK);
    }
    img
}

/// A padded axis range that never collapses to a point.
fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * 0.1
    } else {
        lo.abs().max(1.0) * 0.1
    };
    (lo - pad, hi + pad)
}

/// A tick label with about three significant digits.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, c: Rgb<u8>) {
    // Axis-parallel lines only.
    for x in x0.min(x1)..=x0.max(x1) {
        for y in y0.min(y1)..=y0.max(y1) {
            put(img, x as i64, y as i64, c);
        }
    }
}

fn disc(img: &mut RgbImage, cx: f64, cy: f64, r: f64, c: Rgb<u8>) {
    let ri = r.ceil() as i64;
    for dy in -ri..=ri {
        for dx in -ri..=ri {
            if ((dx * dx + dy * dy) as f64) <= r * r {
                put(img, cx.round() as i64 + dx, cy.round() as i64 + dy, c);
            }
        }
    }
}

fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let Some(g) = BASIC_FONTS.get(ch).or_else(|| BASIC_FONTS.get('?')) else {
            continue;
        };
        for (row, bits) in g.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    put(
                        img,
                        (x + 8 * i as u32 + col) as i64,
                        (y + row as u32) as i64,
                        c,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_land_in_their_panels() {
        let pts = vec![
            Point {
                name: "dense".into(),
                accuracy: 60.0,
                ttft_ms: 100.0,
                flops: 1.0,
            },
            Point {
                name: "fastv".into(),
                accuracy: 50.0,
                ttft_ms: 50.0,
                flops: 0.5,
            },
        ];
        let img = sweep_plot(&pts, "accuracy");
        // Ranges padded by 10% of their span: ttft 45..105, accuracy 49..61, flops
        // 0.45..1.05, so the dense point sits at 55/60 of both axes in both panels.
        let (x0, x1, y0, y1) = (
            MARGIN_L as f64,
            (PANEL_W - MARGIN_R) as f64,
            MARGIN_T as f64,
            (PANEL_H - MARGIN_B) as f64,
        );
        let px = (x0 + (x1 - x0) * (100.0 - 45.0) / (105.0 - 45.0)).round() as u32;
        let py = (y1 - (y1 - y0) * (60.0 - 49.0) / (61.0 - 49.0)).round() as u32;
        assert_eq!(img.get_pixel(px, py), &Rgb(COLOURS[0]));
        assert_eq!(img.get_pixel(px + PANEL_W, py), &Rgb(COLOURS[0]));
    }
}
