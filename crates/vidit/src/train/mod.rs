//! Training: objectives, the optimiser and EMA, the training loop with checkpoints, and datasets.

pub mod data;
pub mod objective;
pub mod optim;
pub mod trainer;
