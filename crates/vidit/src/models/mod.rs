//! The networks, each built from its `config.json` and loaded by the checkpoint's key names.
//! They know nothing about sampling.

pub mod clip_vision;
pub mod layers;
pub mod umt5;
pub mod wan_transformer;
pub mod wan_vae;
