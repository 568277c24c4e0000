//! LLaVA-1.5 on the visi engine: llava-hf config, CLIP vision tower, projector, Llama
//! decoder with its pruning-aware layer scheduler, image preprocessing, prompting and
//! sampling.

pub mod clip;
pub mod config;
pub mod hub;
pub mod llama;
pub mod nn;
pub mod preprocess;
pub mod prompt;
pub mod sampling;
