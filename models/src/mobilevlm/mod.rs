//! MobileVLM V2 (Meituan-AutoML/MobileVLM, `MobileLlamaForCausalLM` with
//! `mm_projector_type: ldpnetv2`): a CLIP tower read from the checkpoint or from
//! `mm_vision_tower`, the LDPv2 projector (MLP, 12×12 adaptive average pool, depthwise
//! 3×3 positional conv with a residual), LLaVA's `conv_vicuna_v1` prompt tokenised the way
//! the authors' `tokenizer_image_token` does (chunks split at `<image>`).
//!
//! The decoder, session, pruner and sampler are LLaVA's: [`crate::Llava`] loads a MobileVLM
//! directory too (the family is read from `config.json`).

pub mod config;
pub mod projector;

pub use config::{read_config, MobileVlmSetup, TowerSource};
pub use projector::{adaptive_avg_pool_2d, LdpV2Projector};

/// `TokenDownLayer((12, 12))`: image tokens per image after the LDPv2 projector.
pub const POOL_GRID: usize = 12;

/// Image tokens per image in the prompt ([`POOL_GRID`]²).
pub const IMAGE_TOKENS: usize = POOL_GRID * POOL_GRID;
