// gemm_sg8: y = x·Wᵀ (+ b) for software adapters (llvmpipe), f16 weights packed in u32,
// K % 8 == 0, subgroups of exactly 8 invocations. Why a separate kernel: llvmpipe (Mesa 22)
// runs a subgroup as one 8-lane SIMD vector and turns every storage or workgroup load into a
// loop over the 8 lanes with a branch per lane (~2-3x the cost per element of a vec4 load),
// so on that adapter a matmul is bound by how many elements it loads per FMA, not by FMAs:
// measured on 7B shapes, the loads took ~2/3 of the time of a 64-accumulator kernel and the
// same kernel without loads ran at the FMA peak. Hence:
// - no value is loaded twice within a subgroup: lane l loads column k + l of each x row and
//   8 packed halves (one vec4<u32>) of each of its weight rows per 8 k; constant-lane
//   subgroupBroadcasts (register shuffles) hand every lane the x values;
// - a big register block per lane (RS = 32 x rows × CL = 16 weight rows, 512 accumulators):
//   per 8 k a lane loads 32 x values + 16 vec4 for 4096 FMAs. The accumulators spill, but
//   each takes its 8 FMAs of a k step in one chain (one spill load + store per 8 FMAs);
//   16×8 blocks reach ~85% of this speed, the old 8×8 one ~55%;
// - no workgroup memory and no barriers (on llvmpipe a barrier splits the shader into
//   coroutine phases; a K-blocked variant with one was 2x slower).
// The body is generated (`#gen gemm_sg8_main`, shaders/src/unrolled.rs): llvmpipe neither
// unrolls nor promotes loops this big. Workgroup: 2 subgroups stacked along M, so a workgroup
// computes a 64 (x rows) × 128 (weight rows) tile (shaders::GEMM_SG8_TILE).
// Dispatch: (ceil(M / 64), ceil(rows / 128)): M tiles along x, so consecutive workgroups (run
// side by side on the llvmpipe threads) share their weight tile in cache.
// bindings: 0 uniform P, 1 x [M, K] f32, 2 w [rows, K] f16 packed two per u32, 3 bias [N] f32
//           (BIAS), 4 y [M, N] f32

struct P { m: u32, k: u32, rows: u32, n: u32, n_off: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
#if BIAS
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

#gen gemm_sg8_main
