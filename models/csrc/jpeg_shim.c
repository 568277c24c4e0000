/*
 * The JPEG decoder's C side: libjpeg-turbo's decoder (vendored and built by mozjpeg-sys with
 * cc, no SIMD) driven exactly as Pillow drives it, so the output equals Pillow's to the bit:
 * islow IDCT, fancy upsampling and block smoothing (libjpeg's defaults, which Pillow keeps),
 * libjpeg's own YCbCr->RGB (Pillow asks for JCS_RGB) and YCCK->CMYK.
 *
 * libjpeg reports fatal errors through error_exit, which must not return: it longjmps back
 * here, so no error ever unwinds through Rust frames. Only C frames lie between setjmp and
 * longjmp. Warnings are ignored, as Pillow ignores them, except "premature end of data",
 * which Pillow reports as a truncated file.
 */
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct visi_err {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int truncated;
};

static void visi_error_exit(j_common_ptr c) {
  struct visi_err *e = (struct visi_err *)c->err;
  longjmp(e->jump, 1);
}

static void visi_emit_message(j_common_ptr c, int level) {
  struct visi_err *e = (struct visi_err *)c->err;
  if (level < 0 && c->err->msg_code == JWRN_JPEG_EOF) e->truncated = 1;
}

/*
 * Decodes `data`. With out == NULL only the header is read: width, height and the number of
 * components are stored and 0 is returned. Otherwise the image is decoded into `out` (rows of
 * width * components bytes: grey, RGB, or CMYK as stored) and the number of output
 * components is returned. A negative return is an error described in `msg`: -1 invalid or
 * unsupported data, -2 truncated data, -3 `out` too small, -4 dimensions over libjpeg's
 * 65500-pixel limit.
 * `max_memory` bounds libjpeg's working memory (coefficient buffers of progressive files).
 */
int visi_jpeg_decode(const uint8_t *data, size_t len, uint32_t *width, uint32_t *height,
                     int *components, uint8_t *out, size_t out_len, long max_memory,
                     char *msg, size_t msg_len) {
  struct jpeg_decompress_struct c;
  struct visi_err e;
  memset(&c, 0, sizeof c);
  memset(&e, 0, sizeof e);
  c.err = jpeg_std_error(&e.pub);
  e.pub.error_exit = visi_error_exit;
  e.pub.emit_message = visi_emit_message;
  if (setjmp(e.jump)) {
    char text[JMSG_LENGTH_MAX];
    e.pub.format_message((j_common_ptr)&c, text);
    snprintf(msg, msg_len, "%s", text);
    int too_big = e.pub.msg_code == JERR_IMAGE_TOO_BIG;
    jpeg_destroy_decompress(&c);
    return too_big ? -4 : -1;
  }
  jpeg_create_decompress(&c);
  c.mem->max_memory_to_use = max_memory;
  jpeg_mem_src(&c, data, (unsigned long)len);
  jpeg_read_header(&c, TRUE);
  *width = c.image_width;
  *height = c.image_height;
  *components = c.num_components;
  if (out == NULL) {
    jpeg_destroy_decompress(&c);
    return 0;
  }
  /* Pillow's modes: 1 layer "L", 3 "RGB" (libjpeg converts YCbCr), 4 "CMYK" (libjpeg
     converts YCCK). Others Pillow refuses. */
  switch (c.num_components) {
    case 1: c.out_color_space = JCS_GRAYSCALE; break;
    case 3: c.out_color_space = JCS_RGB; break;
    case 4: c.out_color_space = JCS_CMYK; break;
    default:
      snprintf(msg, msg_len, "%d-component JPEG is not supported", c.num_components);
      jpeg_destroy_decompress(&c);
      return -1;
  }
  jpeg_start_decompress(&c);
  size_t stride = (size_t)c.output_width * (size_t)c.output_components;
  if (c.output_width != *width || c.output_height != *height ||
      stride * c.output_height > out_len) {
    snprintf(msg, msg_len, "output buffer too small");
    jpeg_destroy_decompress(&c);
    return -3;
  }
  while (c.output_scanline < c.output_height) {
    JSAMPROW row = out + stride * c.output_scanline;
    jpeg_read_scanlines(&c, &row, 1);
  }
  int comps = c.output_components;
  jpeg_finish_decompress(&c);
  jpeg_destroy_decompress(&c);
  if (e.truncated) {
    snprintf(msg, msg_len, "premature end of JPEG data");
    return -2;
  }
  return comps;
}
