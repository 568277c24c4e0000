//! Builds the C side of the JPEG decoder (`csrc/jpeg_shim.c`) against the libjpeg-turbo
//! headers that mozjpeg-sys vendors (it exports their directories as `DEP_JPEG_INCLUDE`).

fn main() {
    let include = std::env::var_os("DEP_JPEG_INCLUDE")
        .expect("mozjpeg-sys exports DEP_JPEG_INCLUDE (links = \"jpeg\")");
    let mut build = cc::Build::new();
    for dir in std::env::split_paths(&include) {
        build.include(dir);
    }
    build.file("csrc/jpeg_shim.c").compile("visi_jpeg_shim");
    println!("cargo:rerun-if-changed=csrc/jpeg_shim.c");
}
