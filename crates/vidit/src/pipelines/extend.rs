//! Video extension and frame interpolation for frame-conditioned models (vidit's own), built on
//! text-to-video with keyframes: a clip is continued window by window from its last frames, and
//! new frames between two frames are taken from a clip generated between them.

use super::text_to_video::{Keyframes, TextToVideo};
use super::wan::WanModel;
use crate::schedulers::Scheduler;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Continues `video` `(F, 3, H, W)` by `new_frames`, each window conditioned on the clip's last
/// `context` frames (1 + 4k); `request` gives the prompt, size, window length and seed (window i
/// uses seed + i). Returns the whole clip, the given frames first.
pub fn extend(
    model: &WanModel,
    scheduler: &mut dyn Scheduler,
    request: &TextToVideo,
    video: &Tensor,
    new_frames: usize,
    context: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let temporal = model.vae.config.temporal_factor();
    if context % temporal != 1 || context >= request.num_frames {
        bail!("context of {context} frames must be of the form {temporal}k+1 and shorter than the window");
    }
    if video.dim(0)? < context {
        bail!("the clip has {} frames; extension conditions on its last {context}", video.dim(0)?);
    }
    let per_window = request.num_frames - context;
    let windows = new_frames.div_ceil(per_window);
    let mut clip = video.clone();
    for i in 0..windows {
        let n = clip.dim(0)?;
        let window = TextToVideo {
            keyframes: Keyframes::Prefix(clip.narrow(0, n - context, context)?),
            seed: request.seed.wrapping_add(i as u64),
            ..request.clone()
        };
        let frames = window.run(model, scheduler, |_, _| {})?.frames; // (window, 3, H, W)
        let take = per_window.min(new_frames - i * per_window);
        clip = Tensor::cat(&[&clip, &frames.narrow(0, context, take)?], 0)?;
        on_window(i + 1, windows);
    }
    Ok(clip)
}

/// Puts `factor − 1` new frames between each pair of neighbours in `video` `(F, 3, H, W)`: for
/// each pair a clip is generated from the first to the second, and its frames at the fractions
/// m / factor of the way are kept.
pub fn interpolate(
    model: &WanModel,
    scheduler: &mut dyn Scheduler,
    request: &TextToVideo,
    video: &Tensor,
    factor: usize,
    mut on_pair: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let n = video.dim(0)?;
    if factor < 2 || n < 2 {
        bail!("interpolation needs a factor of at least 2 and at least 2 frames");
    }
    let last = request.num_frames - 1;
    let mut out = vec![video.narrow(0, 0, 1)?];
    for i in 0..n - 1 {
        let (a, b) = (video.get(i)?, video.get(i + 1)?);
        let pair = TextToVideo {
            keyframes: Keyframes::FirstLast(a, b.clone()),
            seed: request.seed.wrapping_add(i as u64),
            ..request.clone()
        };
        let frames = pair.run(model, scheduler, |_, _| {})?.frames;
        for m in 1..factor {
            let at = (m * last + factor / 2) / factor; // nearest frame to m/factor of the way
            out.push(frames.narrow(0, at, 1)?);
        }
        out.push(b.unsqueeze(0)?);
        on_pair(i + 1, n - 1);
    }
    Ok(Tensor::cat(&out, 0)?)
}
