// quant: decoding of GGUF block-quantized weights stored as raw bytes in `w: array<u32>`
// (the includer declares `w`). Blocks keep GGUF's exact layout (engine-core quant.rs); rows
// follow each other with no padding, so Q8_0 (34 B) and Q4_0 (18 B) blocks start on 2-byte,
// not 4-byte, boundaries: their fields are read with two-word funnel shifts. Q4_1 (20 B) and
// Q4_K (144 B) blocks are word-aligned. Substitutions: QT (0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q4_K),
// QBS weights per block, QBB bytes per block. Every format is decoded in 32-weight sub-blocks
// (a whole block, or one of Q4_K's eight): weight i = d * q_i + m.

const QT: u32 = {{QT}}u;
const QBS: u32 = {{QBS}}u;
const QBB: u32 = {{QBB}}u;

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

// One 32-weight sub-block: scale, offset and the raw quants (Q8_0: 32 bytes; Q4_0/Q4_1: 16
// bytes in q[0..4], weight i < 16 the low nibble of byte i, i >= 16 the high nibble of byte
// i - 16; Q4_K: 32 bytes in q, nibble `shift` of byte i).
struct Sub {
    d: f32,
    m: f32,
    shift: u32,
    q: array<u32, 8>,
}

// Byte `i` (0..12) of the Q4_K scales at word `sw`.
fn k4_byte(sw: u32, i: u32) -> u32 {
    return (w[sw + i / 4u] >> (8u * (i % 4u))) & 0xFFu;
}

// Sub-block `s` (weights 32s..32s+32) of the quantized row starting at byte `rb`.
fn sub_block(rb: u32, s: u32) -> Sub {
    var o: Sub;
    if (QT == 3u) {
        // Q4_K: d, dmin (f16), 12 bytes of six-bit scales/mins, 128 bytes of nibbles.
        let bw = (rb + (s / 8u) * 144u) / 4u;
        let j = s % 8u;
        let dm = unpack2x16float(w[bw]);
        let sw = bw + 1u;
        var sc: u32;
        var mn: u32;
        if (j < 4u) {
            sc = k4_byte(sw, j) & 63u;
            mn = k4_byte(sw, j + 4u) & 63u;
        } else {
            sc = (k4_byte(sw, j + 4u) & 0xFu) | ((k4_byte(sw, j - 4u) >> 6u) << 4u);
            mn = (k4_byte(sw, j + 4u) >> 4u) | ((k4_byte(sw, j) >> 6u) << 4u);
        }
        o.d = dm.x * f32(sc);
        o.m = -dm.y * f32(mn);
        o.shift = (j % 2u) * 4u;
        let qw = bw + 4u + 8u * (j / 2u);
        for (var t = 0u; t < 8u; t++) {
            o.q[t] = w[qw + t];
        }
    } else if (QT == 2u) {
        // Q4_1: d, m (f16), 16 bytes of nibbles; word-aligned.
        let bw = (rb + s * 20u) / 4u;
        let dm = unpack2x16float(w[bw]);
        o.d = dm.x;
        o.m = dm.y;
        for (var t = 0u; t < 4u; t++) {
            o.q[t] = w[bw + 1u + t];
        }
    } else if (QT == 1u) {
        // Q4_0: d (f16), 16 bytes of nibbles; x = d * (q - 8).
        let b = rb + s * 18u;
        o.d = qhalf(b);
        o.m = -8.0 * o.d;
        for (var t = 0u; t < 4u; t++) {
            o.q[t] = qword(b + 2u + 4u * t);
        }
    } else {
        // Q8_0: d (f16), 32 signed bytes.
        let b = rb + s * 34u;
        o.d = qhalf(b);
        o.m = 0.0;
        for (var t = 0u; t < 8u; t++) {
            o.q[t] = qword(b + 2u + 4u * t);
        }
    }
    return o;
}

// The raw quants q of weights 4t..4t+4 of sub-block `sb` (t < 8), as floats.
fn sub_q4(sb: Sub, t: u32) -> vec4<f32> {
    if (QT == 0u) {
        let v = bitcast<vec4<i32>>(vec4<u32>(sb.q[t]) << vec4<u32>(24u, 16u, 8u, 0u));
        return vec4<f32>(v >> vec4<u32>(24u));
    }
    if (QT == 3u) {
        return vec4<f32>((vec4<u32>(sb.q[t]) >> (vec4<u32>(0u, 8u, 16u, 24u) + sb.shift)) & vec4<u32>(15u));
    }
    // Q4_0 / Q4_1: words 0..4 hold weights 0..16 (low nibbles) and 16..32 (high nibbles).
    let sh = vec4<u32>(0u, 8u, 16u, 24u) + 4u * (t / 4u);
    return vec4<f32>((vec4<u32>(sb.q[t % 4u]) >> sh) & vec4<u32>(15u));
}
