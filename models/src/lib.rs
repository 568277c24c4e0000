//! LLaVA-1.5 on the visi engine: llava-hf config, CLIP vision tower, projector, Llama
//! decoder with its pruning-aware layer scheduler, image preprocessing, prompting and
//! sampling.

#![warn(missing_docs)]

pub mod chat;
pub mod checks;
pub mod clip;
pub mod config;
pub mod gguf;
pub mod gguf_llava;
pub mod hub;
pub mod image_io;
pub mod llama;
pub mod llava;
pub mod mobilevlm;
pub mod nn;
pub mod preprocess;
pub mod preprocess_next;
pub mod preselect;
pub mod prompt;
pub mod quality;
pub mod sampling;
pub mod scheduler;
pub mod session;
pub mod synthetic;

pub use config::LlavaConfig;
pub use llama::ImageSpan;
pub use llava::{
    draw_kept_images, draw_kept_patches, EncodedImage, GenerateOptions, Generation, Llava,
    LoadProgress, Naming, Timings,
};
pub use preprocess::{decode_image, load_image, PadMode};
pub use prompt::{PromptIds, Template};
pub use sampling::SamplingParams;
pub use session::{ImageInput, PromptInput, Session};
