//! Training: objectives, the optimiser and EMA, the training loop with checkpoints, datasets, and
//! the VAE / DiT trainers with the recipe of the built-in model.

pub mod builtin;
pub mod data;
pub mod dit;
pub mod init;
pub mod objective;
pub mod optim;
pub mod plot;
pub mod trainer;
pub mod vae;
