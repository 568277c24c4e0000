// mask: VisiPruner's post-softmax masks, per (query cache row, key), exactly as the CPU
// reference applies them (engine-core/src/cpu/attention.rs, apply_mask). The includer declares
// the uniform `p` with fields mask (0 none, 1 Layer0Sink, 2 Layer0Split, 3 TextToImage),
// ms, me (image span [s, e) in cache rows).
// Returns 0: keep; 1: zero the probability (skip its P·V); 2: zero it and add it to the sum
// S_i that Layer0Sink puts back on key s.
fn mask_kind(row: u32, j: u32) -> u32 {
    let s = p.ms;
    let e = p.me;
    if (p.mask == 1u) {
        if (s < e && row >= s && j >= s && j < e) {
            return select(1u, 2u, row >= e);
        }
    } else if (p.mask == 2u) {
        if (row >= s && row < e) {
            if (j >= s && j < e) {
                return 1u;
            }
        } else if (row >= e) {
            if (j >= s && j < s + (e - s) / 2u) {
                return 1u;
            }
        }
    } else if (p.mask == 3u) {
        if (row >= e && j >= s && j < e) {
            return 1u;
        }
    }
    return 0u;
}

// Whether Layer0Sink puts S_i back on key s for the query at `row` seeing `visible` keys.
fn sink_redirect(row: u32, visible: u32) -> bool {
    return p.mask == 1u && p.ms < p.me && row >= p.me && p.ms < visible;
}
