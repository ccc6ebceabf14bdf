//! Training: datasets, the optimiser and EMA; objectives and the trainer build on them.

pub mod data;
pub mod optim;
