//! Pipelines compose models and a scheduler; they hold no numerics of their own.

pub mod clip_image;
pub mod denoise;
pub mod extend;
pub mod prompt;
pub mod text_to_video;
pub mod video_to_video;
pub mod wan;

pub use text_to_video::{Keyframes, TextToVideo, TextToVideoOutput};
pub use video_to_video::VideoToVideo;
pub use wan::WanModel;
