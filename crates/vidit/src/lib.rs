//! vidit: video generation with latent diffusion transformers.
//!
//! The data path, one module per stage:
//! - [`model_folder`]: the diffusers folder layout (`model_index.json`, `transformer/`, `vae/`, …) and its weights;
//! - [`models`]: the networks (Wan transformer, Wan VAE, UMT5 text encoder), built from their `config.json`;
//! - [`schedulers`]: the samplers (`set_timesteps`, `step`);
//! - [`pipelines`]: compose the above into text-to-video;
//! - [`io`]: media and tensor files, written atomically;
//! - [`kernels`]: fused CPU kernels (attention, norms, GELU, RoPE) with their backward passes.

pub mod error;
pub mod io;
pub mod kernels;
pub mod model_folder;
pub mod models;
pub mod noise;
pub mod pipelines;
pub mod schedulers;
pub mod train;

pub use error::InputError;
