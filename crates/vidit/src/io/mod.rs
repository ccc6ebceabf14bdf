//! Reading and writing media and tensor files, with no system libraries. Every writer goes through
//! [`atomic`], so a crash never leaves a half-written file under the final name.

pub mod atomic;
pub mod frames;
pub mod media;
pub mod tensors;
pub mod video;
