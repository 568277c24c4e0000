//! Reading weights: memory-mapped safetensors (single file or sharded) and an in-memory
//! source for tests, behind a VarBuilder-style [`Weights`] that checks names and shapes.
//! (Filled in by the weight-reader work.)
