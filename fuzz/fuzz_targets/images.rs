//! Any bytes as an image file (`--image` or a data URL): JPEG through libjpeg-turbo, the other
//! formats through the image crate, EXIF/XMP orientation, palette TIFF and GIF canvases.
//! Ok or a typed error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = models::preprocess::decode_image(data, "fuzz");
});
