// quant: decoding of GGUF block-quantized weights stored as raw bytes in `w: array<u32>`
// (the includer declares `w` and a uniform `p` with the row length `p.k`). Blocks keep GGUF's
// exact layout (engine-core quant.rs) and rows follow each other with no padding, with one
// exception (QPK = 1): Q8_0 (34 B) and Q4_0 (18 B) blocks would start on 2-byte boundaries,
// so when a row has an even number of blocks the backend re-packs each row at upload as
// [the nb f16 scales][the nb runs of quants] (same bytes, same row size, every quant word
// aligned). With QPK = 0 (odd nb) their fields are read with two-word funnel shifts. Q4_1
// (20 B) and Q4_K (144 B) blocks are word-aligned as stored. Substitutions: QT (0 Q8_0, 1
// Q4_0, 2 Q4_1, 3 Q4_K), QBS weights per block, QBB bytes per block, QPK. Every format is
// decoded in 32-weight sub-blocks (a whole block, or one of Q4_K's eight): weight i = d*q_i + m.

const QT: u32 = {{QT}}u;
const QBS: u32 = {{QBS}}u;
const QBB: u32 = {{QBB}}u;
const QPK: u32 = {{QPK}}u;

// The 32-bit little-endian word at even byte offset `b`.
fn qword(b: u32) -> u32 {
    let i = b >> 2u;
    if ((b & 2u) == 0u) {
        return w[i];
    }
    return (w[i] >> 16u) | (w[i + 1u] << 16u);
}

// The f16 at even byte offset `b`.
fn qhalf(b: u32) -> f32 {
    return unpack2x16float(w[b >> 2u] >> ((b & 2u) * 8u)).x;
}

// Byte `i` (0..12) of the Q4_K scales at word `sw`.
fn k4_byte(sw: u32, i: u32) -> u32 {
    return (w[sw + i / 4u] >> (8u * (i % 4u))) & 0xFFu;
}

// Byte offset of the block holding sub-block `s` (weights 32s..32s+32) of the row at byte `rb`.
fn sub_base(rb: u32, s: u32) -> u32 {
    if (QT == 3u) {
        return rb + (s / 8u) * QBB;
    }
    return rb + s * QBB;
}

// Scale d and offset m of sub-block `s` of the row at byte `rb`: weight i = d * q_i + m.
fn sub_head(rb: u32, s: u32) -> vec2<f32> {
    let b = sub_base(rb, s);
    if (QT == 3u) {
        // Q4_K: d, dmin (f16), 12 bytes of six-bit scales/mins, 128 bytes of nibbles.
        let j = s % 8u;
        let dm = unpack2x16float(w[b / 4u]);
        let sw = b / 4u + 1u;
        var sc: u32;
        var mn: u32;
        if (j < 4u) {
            sc = k4_byte(sw, j) & 63u;
            mn = k4_byte(sw, j + 4u) & 63u;
        } else {
            sc = (k4_byte(sw, j + 4u) & 0xFu) | ((k4_byte(sw, j - 4u) >> 6u) << 4u);
            mn = (k4_byte(sw, j + 4u) >> 4u) | ((k4_byte(sw, j) >> 6u) << 4u);
        }
        return vec2<f32>(dm.x * f32(sc), -dm.y * f32(mn));
    }
    if (QT == 2u) {
        // Q4_1: d, m (f16); word-aligned.
        return unpack2x16float(w[b / 4u]);
    }
    var d: f32;
    if (QPK == 1u) {
        // Re-packed Q8_0/Q4_0: scale s is the s-th f16 of the row.
        d = qhalf(rb + 2u * s);
    } else {
        d = qhalf(b);
    }
    if (QT == 1u) {
        // Q4_0: x = d * (q - 8).
        return vec2<f32>(d, -8.0 * d);
    }
    return vec2<f32>(d, 0.0);
}

// The raw quants q of weights 4t..4t+4 (t < 8) of sub-block `s` of the row at byte `rb`, as
// floats. Q8_0: signed bytes after the f16 scale. Q4_0/Q4_1: 16 bytes after the header,
// weight i < 16 the low nibble of byte i, i >= 16 the high nibble of byte i - 16. Q4_K: the
// 32 bytes of the sub-block's pair, low nibbles for even sub-blocks, high for odd.
fn sub_q4(rb: u32, s: u32, t: u32) -> vec4<f32> {
    let b = sub_base(rb, s);
    // Re-packed Q8_0/Q4_0: the quants of block s start at word (rb + 2 nb) / 4 + s * (QBB - 2) / 4.
    let pw = (rb + 2u * (p.k / QBS)) / 4u + s * ((QBB - 2u) / 4u);
    if (QT == 0u) {
        var word: u32;
        if (QPK == 1u) {
            word = w[pw + t];
        } else {
            word = qword(b + 2u + 4u * t);
        }
        let v = bitcast<vec4<i32>>(vec4<u32>(word) << vec4<u32>(24u, 16u, 8u, 0u));
        return vec4<f32>(v >> vec4<u32>(24u));
    }
    var word: u32;
    var sh: u32;
    if (QT == 3u) {
        let j = s % 8u;
        word = w[b / 4u + 4u + 8u * (j / 2u) + t];
        sh = (j % 2u) * 4u;
    } else if (QT == 2u) {
        word = w[b / 4u + 1u + t % 4u];
        sh = 4u * (t / 4u);
    } else if (QPK == 1u) {
        word = w[pw + t % 4u];
        sh = 4u * (t / 4u);
    } else {
        word = qword(b + 2u + 4u * (t % 4u));
        sh = 4u * (t / 4u);
    }
    return vec4<f32>((vec4<u32>(word) >> (vec4<u32>(0u, 8u, 16u, 24u) + sh)) & vec4<u32>(15u));
}
