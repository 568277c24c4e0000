//! Autotuning: for the kernels that come in several variants, the fastest one per adapter
//! (name, driver, backend) and shape class, timed once by [`tune`] (`visi-cli tune`) and
//! cached on disk in the platform cache dir. Backends read the cache when they open; a shape
//! class without an entry runs the measured default ([`default_variant`]). A cache that
//! cannot be read or written is a note, never an error: tuning only ever changes speed.
//!
//! Shape classes and their variants (strings, so the cache file stays readable):
//! - `attn_prefill/d{D}/{f16|f32}`: `tiled:BQ,BK,TPR` (flash_attn: K/V tiles in workgroup
//!   memory, TPR lanes per query) or `keys:BQ,WG` (flash_attn_k: lanes split the keys, then
//!   the output columns; uniform Q and P reads), or `sg8` (software adapters with 8-wide
//!   subgroups, head sizes that are multiples of 64: the scores, then the probabilities and
//!   P·V, as gemm_sg8-style passes over a score buffer; no key splits).
//! - `attn_split/d{D}/{f16|f32}`: `split:CH`, the keys per split of split-KV attention (prefill
//!   and decode: the same splits, so one query's result does not depend on the call).
//!
//! No variant here changes a row's reduction order with the number of rows or queries in a
//! call: a class is an adapter and a head shape, never a batch size (batch invariance).

use std::collections::BTreeMap;

use engine_core::{AttentionMask, AttentionParams, Backend, HostData, Result, Shape};
use half::f16;
use serde_json::{json, Value};

pub use crate::variants::{cache_dir, cache_path};
use crate::variants::{prefill_class, split_class, write_cache, Prefill};
use crate::{open_gpu, GpuBackend, GpuOptions};

impl GpuBackend {
    /// The prefill variant for head size `d` (a multiple of 4): the tuned one, else the
    /// measured default. `VISI_ATTN` (`tiled:..`/`keys:..`) overrides both, for experiments.
    pub(crate) fn prefill_variant(&self, d: usize, kv16: bool) -> Prefill {
        let forced = std::env::var("VISI_ATTN")
            .ok()
            .and_then(|s| Prefill::parse(&s));
        forced
            .or_else(|| {
                self.ctx
                    .tuning
                    .get(&prefill_class(d, kv16))
                    .and_then(|s| Prefill::parse(&s))
            })
            .filter(|v| self.prefill_fits(*v, d, kv16))
            .unwrap_or_else(|| default_variant(self, d, kv16))
    }

    /// The kernel and variant attention runs for head size `d` (for reports): prefill
    /// (`sq > 1`) or decode (the same kernel with one query per workgroup).
    pub fn attention_variant(&self, d: usize, kv16: bool, prefill: bool) -> String {
        if !d.is_multiple_of(4) {
            return "attention (per query)".into();
        }
        let v = self.prefill_variant(d, kv16);
        let kernel = match v {
            Prefill::Tiled(..) => "flash_attn",
            Prefill::Keys(..) => "flash_attn_k",
            Prefill::Sg8 => {
                let rs = crate::ops::attention::sg8_queries(if prefill { 640 } else { 1 });
                return format!("attn_qk_sg8+attn_pv_sg8 sg8 RS={rs}");
            }
        };
        let split = self.kv_split(d, kv16, v);
        let bq1 = if prefill { "" } else { " BQ=1" };
        format!("{kernel} {}{bq1} split:{split}", v.name())
    }

    /// Keys per split of split-KV attention for head size `d` under `variant`: the tuned
    /// value, else 1024 on software adapters and 256 elsewhere; rounded down to whole key
    /// tiles of the variant and, on software adapters, to what one dispatch may walk.
    pub(crate) fn kv_split(&self, d: usize, kv16: bool, variant: Prefill) -> usize {
        let tile = match variant {
            Prefill::Tiled(_, bk, _) => bk,
            Prefill::Keys(_, wg) => wg,
            Prefill::Sg8 => 8,
        }
        .max(1);
        let default = if self.ctx.info.device_type == "cpu" {
            1024
        } else {
            256
        };
        let ch = self
            .ctx
            .tuning
            .get(&split_class(d, kv16))
            .and_then(|s| s.strip_prefix("split:")?.parse().ok())
            .filter(|&c: &usize| (16..=4096).contains(&c))
            .unwrap_or(default)
            .min(self.keys_per_pass(variant, d));
        (ch / tile).max(1) * tile
    }

    /// Whether variant `v` is valid for head size `d` on this adapter (workgroup memory and
    /// size limits, lanes dividing the columns).
    fn prefill_fits(&self, v: Prefill, d: usize, kv16: bool) -> bool {
        let wgs = self.ctx.wg_storage as usize;
        match v {
            Prefill::Tiled(bq, bk, tpr) => {
                let es = if self.ctx.f16 && kv16 { 2 } else { 4 };
                let mem = bq * d * 4 + 2 * bk * d * es + bq * bk * 4 + 16 * bq;
                bq > 0
                    && bk > 0
                    && tpr > 0
                    && (d / 4).is_multiple_of(tpr)
                    && bq * tpr <= 256
                    && mem <= wgs
            }
            Prefill::Keys(bq, wg) => {
                let mem = bq * d * 4 + bq * wg * 4 + 20 * bq;
                bq > 0 && (1..=256).contains(&wg) && mem <= wgs
            }
            // Lanes own 8-column chunks of the head: D / 64 per lane.
            Prefill::Sg8 => self.ctx.sg8_cpu && d.is_multiple_of(64) && d <= 256,
        }
    }
}

/// The variant a shape class runs without a tuned entry, from measurements on lavapipe (the
/// keys-split kernel: uniform loads suit llvmpipe) and from the usual GPU design (K/V tiles in
/// workgroup memory) elsewhere.
pub(crate) fn default_variant(g: &GpuBackend, d: usize, kv16: bool) -> Prefill {
    if g.prefill_fits(Prefill::Sg8, d, kv16) {
        return Prefill::Sg8;
    }
    let keys = Prefill::Keys(16, 32);
    if g.ctx.info.device_type == "cpu" && g.prefill_fits(keys, d, kv16) {
        return keys;
    }
    let es = if g.ctx.f16 && kv16 { 2 } else { 4 };
    match crate::ops::attention::flash_tiles(d, es, g.ctx.wg_storage as usize) {
        Some((bq, bk, tpr)) => Prefill::Tiled(bq, bk, tpr),
        None => keys,
    }
}

/// Prefill candidates timed by [`tune`].
fn prefill_candidates() -> Vec<Prefill> {
    let mut v = Vec::new();
    for (bq, bk) in [(16, 32), (16, 16), (8, 32), (32, 16)] {
        for tpr in [8, 4] {
            v.push(Prefill::Tiled(bq, bk, tpr));
        }
    }
    for (bq, wg) in [(16, 32), (8, 32), (16, 64), (32, 32)] {
        v.push(Prefill::Keys(bq, wg));
    }
    v.push(Prefill::Sg8);
    v
}

/// Times every candidate variant of each shape class on the adapter `opts` selects (the
/// LLaVA-7B text head shape with an f16 cache, prefill of 640 queries and decode over 640
/// keys; the CLIP head shape, f32 and non-causal) and caches the winners. `quick` uses fewer
/// queries (for tests). Returns the report: per class, each candidate's time and the winner;
/// the cache path, or a note when it could not be written.
pub fn tune(opts: &GpuOptions, quick: bool) -> Result<Value> {
    let gpu = open_gpu(opts)?;
    let sq = if quick { 64 } else { 640 };
    let mut classes = Vec::new();
    let mut winners = BTreeMap::new();
    // (head_dim, heads, kv f16, causal): Vicuna-7B text layers, CLIP-L/336 vision layers.
    for (d, h, kv16, causal) in [(128usize, 32usize, true, true), (64, 16, false, false)] {
        let w = h * d;
        let kvv = values(sq * w);
        let (k, v) = if kv16 {
            let hh: Vec<f16> = kvv.iter().map(|&x| f16::from_f32(x)).collect();
            (
                gpu.upload(HostData::F16(&hh), Shape::from([sq, w]))?,
                gpu.upload(HostData::F16(&hh), Shape::from([sq, w]))?,
            )
        } else {
            (
                gpu.upload(HostData::F32(&kvv), Shape::from([sq, w]))?,
                gpu.upload(HostData::F32(&kvv), Shape::from([sq, w]))?,
            )
        };
        let q = gpu.upload(HostData::F32(&values(sq * w)), Shape::from([sq, w]))?;
        let p = AttentionParams {
            num_heads: h,
            num_kv_heads: h,
            head_dim: d,
            scale: (d as f32).powf(-0.5),
            causal,
            q_offset: 0,
            kv_len: sq,
            mask: AttentionMask::None,
        };
        let class = prefill_class(d, kv16);
        let mut rows = Vec::new();
        let mut best: Option<(f64, String)> = None;
        for cand in prefill_candidates() {
            if !gpu.prefill_fits(cand, d, kv16) {
                continue;
            }
            gpu.ctx.tuning.set(&class, cand.name());
            let t = time_min(&gpu, &|| gpu.attention(&q, &k, &v, &p).map(drop))?;
            rows.push(json!({ "variant": cand.name(), "seconds": t }));
            if best.as_ref().is_none_or(|(b, _)| t < *b) {
                best = Some((t, cand.name()));
            }
        }
        let mut split_kv = true;
        if let Some((t, name)) = best {
            gpu.ctx.tuning.set(&class, name.clone());
            // The sg8 passes walk every key of a query block in one subgroup: no key splits.
            split_kv = name != Prefill::Sg8.name();
            winners.insert(class.clone(), name.clone());
            classes
                .push(json!({ "class": class, "winner": name, "seconds": t, "candidates": rows }));
        }
        if causal && split_kv {
            // Keys per split: prefill of `sq` queries plus decode of the last query over the
            // whole cache (both run the same splits).
            let q1 = gpu.upload(HostData::F32(&values(w)), Shape::from([1, w]))?;
            let p1 = AttentionParams {
                q_offset: sq - 1,
                ..p
            };
            let class = split_class(d, kv16);
            let mut rows = Vec::new();
            let mut best: Option<(f64, String)> = None;
            for ch in [128usize, 256, 512, 1024] {
                let name = format!("split:{ch}");
                gpu.ctx.tuning.set(&class, name.clone());
                let t = time_min(&gpu, &|| {
                    gpu.attention(&q, &k, &v, &p)?;
                    gpu.attention(&q1, &k, &v, &p1).map(drop)
                })?;
                rows.push(json!({ "variant": name, "seconds": t }));
                if best.as_ref().is_none_or(|(b, _)| t < *b) {
                    best = Some((t, name));
                }
            }
            if let Some((t, name)) = best {
                gpu.ctx.tuning.set(&class, name.clone());
                winners.insert(class.clone(), name.clone());
                classes.push(
                    json!({ "class": class, "winner": name, "seconds": t, "candidates": rows }),
                );
            }
        }
    }
    let (cache, note) = match write_cache(&gpu.ctx.tuning.key, &winners) {
        Ok(p) => (Some(p.display().to_string()), None),
        Err(e) => (
            None,
            Some(format!(
                "the tuning cache was not written ({e}); runs use the measured defaults"
            )),
        ),
    };
    Ok(json!({
        "adapter": gpu.ctx.tuning.key,
        "queries": sq,
        "classes": classes,
        "cache": cache,
        "note": note,
    }))
}

/// Deterministic values in [-0.5, 0.5).
fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i.wrapping_mul(7919) % 1000) as f32) / 1000.0 - 0.5)
        .collect()
}

/// Best of three synchronised runs after one untimed run (pipeline compilation).
fn time_min(g: &GpuBackend, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    f()?;
    g.sync()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        f()?;
        g.sync()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}
