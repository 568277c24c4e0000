//! Pruning before the decoder (DivPrune): choose image rows from the projected embeddings
//! and hand the decoder a shorter prompt, as the methods' reference code does (the dropped
//! rows leave the input embeddings; the kept ones are numbered on, position ids 0..S'-1).

use engine_core::{Backend, HostData, Result, Tensor};
use pruner::PruneConfig;

use crate::llama::ImageSpan;
use crate::session::ImageInput;

/// A prompt after a pre-decoder selection.
pub struct Preselection {
    /// Token ids with the dropped image rows removed.
    pub ids: Vec<u32>,
    /// The images over their shortened spans (embeddings gathered to the kept rows).
    pub images: Vec<ImageInput>,
    /// Kept offsets over all image positions of the original prompt (ascending).
    pub kept: Vec<usize>,
}

/// Runs `cfg`'s selection (DivPrune: `keep` rows per image span, see `pruner::divprune_order`)
/// over `images` of the prompt `ids`. `None` when `cfg` does not select before the decoder.
pub fn preselect(
    b: &dyn Backend,
    cfg: &PruneConfig,
    ids: &[u32],
    images: &[ImageInput],
) -> Result<Option<Preselection>> {
    let PruneConfig::DivPrune(d) = cfg else {
        return Ok(None);
    };
    let mut out_ids = Vec::with_capacity(ids.len());
    let mut out_images = Vec::with_capacity(images.len());
    let mut kept_all = Vec::new();
    let (mut cursor, mut base) = (0usize, 0usize);
    for img in images {
        let (s, e) = (img.span.start, img.span.end);
        let dims = img.embeds.dims().to_vec();
        let dim = dims.get(1).copied().unwrap_or(0);
        let rows = b.to_vec_f32(&img.embeds)?;
        let kept = pruner::divprune_select(&rows, dim, d.keep);
        out_ids.extend_from_slice(&ids[cursor..s]);
        let start = out_ids.len();
        out_ids.extend(kept.iter().map(|&k| ids[s + k]));
        let idx: Vec<u32> = kept.iter().map(|&k| k as u32).collect();
        let idx_t = b.upload(HostData::U32(&idx), idx.len().into())?;
        let embeds: Tensor = b.gather_rows(&img.embeds, &idx_t)?;
        // Equal keys must mean equal embeddings (the session's prefix reuse): the kept rows
        // are part of the content.
        let key = kept.iter().fold(img.key ^ 0x9e37_79b9_7f4a_7c15, |h, &k| {
            (h ^ k as u64).wrapping_mul(0x0100_0000_01b3)
        });
        out_images.push(ImageInput {
            span: ImageSpan {
                start,
                end: out_ids.len(),
            },
            key,
            embeds,
        });
        kept_all.extend(kept.iter().map(|&k| base + k));
        base += e - s;
        cursor = e;
    }
    out_ids.extend_from_slice(&ids[cursor..]);
    Ok(Some(Preselection {
        ids: out_ids,
        images: out_images,
        kept: kept_all,
    }))
}
