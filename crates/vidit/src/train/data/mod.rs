//! Training data: (clip, caption) pairs.

pub mod shapes;
