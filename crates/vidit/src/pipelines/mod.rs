//! Pipelines compose models and a scheduler; they hold no numerics of their own.

pub mod prompt;
pub mod text_to_video;
pub mod wan;

pub use text_to_video::{TextToVideo, TextToVideoOutput};
pub use wan::WanModel;
