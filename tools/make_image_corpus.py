#!/usr/bin/env python3
"""Regenerates tests/fixtures/images/corpus/: image files and what Pillow decodes from them.

The reference for every file is what transformers' `image_utils.load_image` gives:
`Image.open(f)`, `ImageOps.exif_transpose`, `convert("RGB")` (Pillow pinned in
tools/requirements-fixtures.txt; its JPEG decoder is libjpeg-turbo). CI never runs this; the
outputs are committed and `models/tests/image_corpus.rs` requires 0 differing values.

Needs Pillow and numpy (the fixture venv), `cjpeg` (Debian libjpeg-turbo-progs) for the
encodings Pillow cannot write (4:4:0, 4:1:1, restart intervals, arithmetic coding, RGB
without colour transform), and a C compiler with libjpeg headers (libjpeg62-turbo-dev) for
one YCCK file. Run from the repository root:

    /tmp/venv-fix/bin/python tools/make_image_corpus.py

A larger corpus for a one-off check (not committed), read by the same test:

    /tmp/venv-fix/bin/python tools/make_image_corpus.py --out /tmp/corpus-big --size 500x375
    VISI_IMAGE_CORPUS=/tmp/corpus-big cargo test --release -p models --test image_corpus

Writes (small: ~0.4 MB in all):
  corpus/<name>.<ext>          the inputs (JPEG, PNG, GIF, BMP, TIFF, WebP)
  corpus/expected/<sha>.png    Pillow's decoded RGB, as an 8-bit RGB PNG (named by its sha256)
  corpus/manifest.json         per file: width, height and sha256 of the decoded RGB bytes
"""

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "images", "corpus")


def base_image(w, h, seed=0):
    """Smooth gradients, hard coloured edges and a little texture: exercises the IDCT's
    rounding, chroma upsampling at edges and clamping at saturated colours."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 120 * np.sin(x / max(w, 1) * 5.0 + y / max(h, 1) * 1.3)
    g = 255 * (y / max(h - 1, 1))
    b = 255 * (x / max(w - 1, 1))
    a = np.stack([r, g, b], -1)
    rng = np.random.default_rng(seed)
    a += rng.normal(0, 4, a.shape)
    img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "RGB")
    if w < 8 or h < 8:
        return img
    d = ImageDraw.Draw(img)
    d.rectangle((w // 5, h // 4, w // 2, h // 2 + 2), fill=(250, 20, 30))
    d.ellipse((w // 2, h // 3, w - 3, h - 2), fill=(10, 200, 40), outline=(255, 255, 255))
    d.line((0, h - 1, w - 1, 0), fill=(0, 0, 255), width=2)
    d.rectangle((1, 1, 4, 4), fill=(255, 255, 255))
    d.rectangle((w - 6, 1, w - 2, 5), fill=(0, 0, 0))
    return img


YCCK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <jpeglib.h>
/* ycck W H QUALITY < raw CMYK (Adobe-inverted, as Pillow stores it) > file.jpg */
int main(int argc, char **argv) {
  int w = atoi(argv[1]), h = atoi(argv[2]), q = atoi(argv[3]);
  unsigned char *buf = malloc((size_t)w * h * 4);
  if (fread(buf, 1, (size_t)w * h * 4, stdin) != (size_t)w * h * 4) return 1;
  struct jpeg_compress_struct c; struct jpeg_error_mgr e;
  c.err = jpeg_std_error(&e); jpeg_create_compress(&c); jpeg_stdio_dest(&c, stdout);
  c.image_width = w; c.image_height = h; c.input_components = 4; c.in_color_space = JCS_CMYK;
  jpeg_set_defaults(&c); jpeg_set_colorspace(&c, JCS_YCCK); jpeg_set_quality(&c, q, TRUE);
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = buf + (size_t)c.next_scanline * w * 4;
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c); jpeg_destroy_compress(&c); return 0;
}
"""


def cmyk_image(img):
    """CMYK with a real black channel (Pillow's RGB->CMYK leaves K at 0): K ramps across."""
    w, h = img.size
    c, m, y = (Image.eval(ch, lambda v: 255 - v) for ch in img.split())
    k = Image.fromarray(np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1)), "L")
    return Image.merge("CMYK", (c, m, y, k))


def ppm_bytes(img):
    w, h = img.size
    if img.mode == "L":
        return b"P5 %d %d 255\n" % (w, h) + img.tobytes()
    return b"P6 %d %d 255\n" % (w, h) + img.convert("RGB").tobytes()


def cjpeg(img, args):
    return subprocess.run(["cjpeg", *args], input=ppm_bytes(img), capture_output=True, check=True).stdout


def pil_save(img, fmt, **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(arr, color_type):
    """A 16-bit PNG written by hand (Pillow writes 16-bit only for grey)."""
    h, w = arr.shape[:2]
    rows = arr.reshape(h, -1).astype(">u2").tobytes()
    stride = len(rows) // h
    raw = b"".join(b"\x00" + rows[i * stride:(i + 1) * stride] for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b"")


def gif_offset_frame(img, screen, offset, **kw):
    """A one-frame GIF whose frame sits at `offset` on a logical screen of size `screen`
    (Pillow writes frame == screen; the header and image descriptor are patched)."""
    d = bytearray(pil_save(img, "GIF", **kw))
    d[6:10] = struct.pack("<HH", *screen)
    d[11] = 2  # background colour index: Pillow does not use it for the first frame
    i = 13 + (3 << ((d[10] & 7) + 1) if d[10] & 0x80 else 0)
    while d[i] != 0x2C:  # skip extension blocks up to the image descriptor
        assert d[i] == 0x21
        i += 2
        while d[i]:
            i += d[i] + 1
        i += 1
    d[i + 1:i + 5] = struct.pack("<HH", *offset)
    return bytes(d)


def exif_with_orientation(o):
    ex = Image.Exif()
    ex[0x0112] = o
    return ex.tobytes()


def make_corpus(ycck_tool, tmp, w, h):
    base = base_image(w, h)
    big = base_image(2 * w + 7, 2 * h - 1, seed=1)
    grey = base.convert("L")
    files = {}

    # --- JPEG through Pillow: quality x subsampling (4:4:4, 4:2:2, 4:2:0)
    for q in (30, 75, 95, 100):
        for sub, tag in ((0, "444"), (1, "422"), (2, "420")):
            files[f"jpeg_q{q}_{tag}.jpg"] = pil_save(base, "JPEG", quality=q, subsampling=sub)
    files["jpeg_big_420.jpg"] = pil_save(big, "JPEG", quality=85, subsampling=2)
    files["jpeg_progressive_420.jpg"] = pil_save(base, "JPEG", quality=85, subsampling=2, progressive=True)
    files["jpeg_progressive_444.jpg"] = pil_save(big, "JPEG", quality=90, subsampling=0, progressive=True)
    files["jpeg_optimized_422.jpg"] = pil_save(base, "JPEG", quality=80, subsampling=1, optimize=True)
    files["jpeg_grey_pil.jpg"] = pil_save(grey, "JPEG", quality=90)
    files["jpeg_cmyk.jpg"] = pil_save(cmyk_image(base), "JPEG", quality=90)
    # --- JPEG through cjpeg: what Pillow cannot write
    for sample, tag in (("1x2", "440"), ("4x1", "411"), ("2x2", "420"), ("2x1", "422"), ("1x1", "444")):
        files[f"cjpeg_{tag}.jpg"] = cjpeg(big, ["-quality", "88", "-sample", sample])
    files["cjpeg_440_odd.jpg"] = cjpeg(base_image(33, 19, seed=2), ["-quality", "70", "-sample", "1x2"])
    files["cjpeg_progressive_440.jpg"] = cjpeg(base, ["-quality", "80", "-sample", "1x2", "-progressive"])
    files["cjpeg_restart_rows.jpg"] = cjpeg(big, ["-quality", "85", "-restart", "1"])
    files["cjpeg_restart_blocks.jpg"] = cjpeg(big, ["-quality", "85", "-restart", "5B"])
    files["cjpeg_progressive_restart.jpg"] = cjpeg(big, ["-quality", "85", "-progressive", "-restart", "2B"])
    # A progressive file whose scans never send the last bit: libjpeg's block smoothing runs.
    scans = os.path.join(tmp, "scans.txt")
    with open(scans, "w") as f:
        f.write("0,1,2: 0-0, 0, 1;\n0: 1-5, 0, 2;\n1: 1-63, 0, 1;\n2: 1-63, 0, 1;\n0: 6-63, 0, 2;\n")
    files["cjpeg_progressive_incomplete.jpg"] = cjpeg(big, ["-quality", "85", "-scans", scans])
    files["cjpeg_arithmetic.jpg"] = cjpeg(base, ["-quality", "85", "-arithmetic"])
    files["cjpeg_grey.jpg"] = cjpeg(grey, ["-quality", "75", "-grayscale"])
    files["cjpeg_grey_progressive.jpg"] = cjpeg(big.convert("L"), ["-quality", "75", "-progressive"])
    files["cjpeg_rgb.jpg"] = cjpeg(base, ["-quality", "90", "-rgb"])
    files["cjpeg_float_dct.jpg"] = cjpeg(base, ["-quality", "90", "-dct", "float"])
    files["cjpeg_1x1.jpg"] = cjpeg(base_image(1, 1, seed=3), ["-quality", "90"])
    files["cjpeg_17x9.jpg"] = cjpeg(base_image(17, 9, seed=4), ["-quality", "90"])
    files["cjpeg_9x17_440.jpg"] = cjpeg(base_image(9, 17, seed=5), ["-quality", "90", "-sample", "1x2"])
    if ycck_tool:
        raw = cmyk_image(base).tobytes()
        # Pillow stores CMYK inverted (Adobe convention); write it the same way.
        raw = bytes(255 - v for v in raw)
        files["jpeg_ycck.jpg"] = subprocess.run(
            [ycck_tool, str(w), str(h), "90"], input=raw, capture_output=True, check=True).stdout
    # --- EXIF orientation 1..8 (non-square, so every transpose shows)
    for o in range(1, 9):
        files[f"exif_orientation_{o}.jpg"] = pil_save(base, "JPEG", quality=90, exif=exif_with_orientation(o))
    files["exif_orientation_6.png"] = pil_save(base, "PNG", exif=exif_with_orientation(6))
    files["exif_orientation_3.webp"] = pil_save(base, "WEBP", lossless=True, exif=exif_with_orientation(3))
    files["tiff_orientation_8.tiff"] = pil_save(base, "TIFF", tiffinfo={0x0112: 8})

    # --- PNG
    rgba = base.copy()
    rgba.putalpha(Image.fromarray((np.arange(w * h) % 256).reshape(h, w).astype(np.uint8)))
    files["png_rgb.png"] = pil_save(base, "PNG")
    files["png_rgba.png"] = pil_save(rgba, "PNG")
    files["png_l.png"] = pil_save(grey, "PNG")
    files["png_la.png"] = pil_save(rgba.convert("LA"), "PNG")
    pal = base.quantize(colors=64, dither=Image.Dither.NONE)
    files["png_palette.png"] = pil_save(pal, "PNG")
    files["png_palette_trns.png"] = pil_save(pal, "PNG", transparency=3)
    pal16 = base.quantize(colors=16)
    files["png_palette_4bit.png"] = pil_save(pal16, "PNG", bits=4)
    files["png_1bit.png"] = pil_save(grey.convert("1"), "PNG")
    files["png_rgb_trns.png"] = pil_save(base, "PNG", transparency=(250, 20, 30))
    files["png_l_trns.png"] = pil_save(grey, "PNG", transparency=0)
    arr16 = (np.asarray(base).astype(np.uint32) * 257 + np.arange(w)[None, :, None] * 3) % 65536
    alpha16 = (np.arange(w * h).reshape(h, w) * 47) % 65536
    files["png_rgb16.png"] = png16(arr16, 2)
    files["png_rgba16.png"] = png16(np.concatenate([arr16, alpha16[..., None]], -1), 6)
    files["png_la16.png"] = png16(np.stack([arr16[..., 0], alpha16], -1), 4)
    # Grey 16-bit with small values (Pillow's "I;16"; convert("RGB") clips at 255).
    files["png_l16.png"] = png16((np.asarray(grey).astype(np.uint32) * 2) % 65536, 0)
    files["png_l16_full.png"] = png16(arr16[..., 1], 0)

    # --- GIF (first frame of an animation; transparency; grey palette)
    frames = [pal.convert("RGB"), base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base.rotate(180)]
    files["gif_animated.gif"] = pil_save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    files["gif_transparent.gif"] = pil_save(pal, "GIF", transparency=5)
    files["gif_grey.gif"] = pil_save(grey, "GIF")
    small = base.resize((17, 11)).quantize(colors=32)
    files["gif_offset_frame.gif"] = gif_offset_frame(small, (30, 20), (5, 4))
    files["gif_offset_frame_transparent.gif"] = gif_offset_frame(small, (30, 20), (5, 4), transparency=7)
    files["gif_frame_past_screen.gif"] = gif_offset_frame(small, (12, 8), (3, 2))

    # --- BMP
    files["bmp_rgb.bmp"] = pil_save(base, "BMP")
    files["bmp_palette.bmp"] = pil_save(pal, "BMP")
    files["bmp_l.bmp"] = pil_save(grey, "BMP")
    files["bmp_1bit.bmp"] = pil_save(grey.convert("1"), "BMP")
    files["bmp_rgba.bmp"] = pil_save(rgba, "BMP")

    # --- TIFF
    files["tiff_rgb.tiff"] = pil_save(base, "TIFF")
    files["tiff_lzw.tiff"] = pil_save(base, "TIFF", compression="tiff_lzw")
    files["tiff_deflate.tiff"] = pil_save(base, "TIFF", compression="tiff_adobe_deflate")
    files["tiff_packbits.tiff"] = pil_save(base, "TIFF", compression="packbits")
    files["tiff_rgba.tiff"] = pil_save(rgba, "TIFF", compression="tiff_lzw")
    files["tiff_l.tiff"] = pil_save(grey, "TIFF")
    files["tiff_palette.tiff"] = pil_save(pal, "TIFF")
    files["tiff_cmyk.tiff"] = pil_save(cmyk_image(base), "TIFF", compression="tiff_lzw")
    files["tiff_l16.tiff"] = pil_save(Image.fromarray(arr16[..., 1].astype(np.uint16)), "TIFF")

    # --- WebP
    files["webp_lossy.webp"] = pil_save(base, "WEBP", quality=80)
    files["webp_lossy_big.webp"] = pil_save(big, "WEBP", quality=60)
    files["webp_lossless.webp"] = pil_save(base, "WEBP", lossless=True)
    files["webp_lossy_alpha.webp"] = pil_save(rgba, "WEBP", quality=80)
    files["webp_lossless_alpha.webp"] = pil_save(rgba, "WEBP", lossless=True)
    return files


def pil_decode(path):
    """transformers 4.46 image_utils.load_image on a local path."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT, help="output folder (default: the committed corpus)")
    ap.add_argument("--size", default="45x31", help="base picture WxH (the committed corpus: 45x31)")
    args = ap.parse_args()
    out = args.out
    w, h = (int(v) for v in args.size.split("x"))
    tmp = tempfile.mkdtemp()
    ycck_tool = None
    try:
        src = os.path.join(tmp, "ycck.c")
        with open(src, "w") as f:
            f.write(YCCK_C)
        exe = os.path.join(tmp, "ycck")
        subprocess.run(["cc", "-O1", "-o", exe, src, "-ljpeg"], check=True)
        ycck_tool = exe
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"WARNING: no YCCK file (cannot build the helper: {e})", file=sys.stderr)
    files = make_corpus(ycck_tool, tmp, w, h)
    shutil.rmtree(tmp)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "expected"))
    manifest = {}
    for name in sorted(files):
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(files[name])
        rgb = pil_decode(path)
        sha = hashlib.sha256(rgb.tobytes()).hexdigest()
        # Named by content: lossless files of one picture share one reference.
        rel = f"expected/{sha[:16]}.png"
        if not os.path.exists(os.path.join(out, rel)):
            rgb.save(os.path.join(out, rel), optimize=True)
        manifest[name] = {"width": rgb.width, "height": rgb.height, "rgb_sha256": sha, "expected": rel}
    import PIL
    from PIL import features
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({
            "generator": "tools/make_image_corpus.py",
            "pillow": PIL.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo"),
            "libwebp": features.version("webp"),
            "reference": "Image.open -> ImageOps.exif_transpose -> convert('RGB')",
            "files": manifest,
        }, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(r, x)) for r, _, fs in os.walk(out) for x in fs)
    print(f"{len(manifest)} files, {total} bytes in {out}")


if __name__ == "__main__":
    main()
