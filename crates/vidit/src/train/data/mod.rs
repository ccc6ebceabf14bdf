//! Training data: (clip, caption) pairs.

pub mod folder;
pub mod shapes;

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

/// Something clips can be drawn from, with the caller's RNG (so resumed runs draw the same ones).
pub trait ClipSource {
    /// A clip `(F, 3, H, W)` in [0, 1] and its caption.
    fn sample(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<(Tensor, String)>;

    /// The (lower-cased) words of its captions: the text encoder's vocabulary.
    fn vocabulary(&self) -> Vec<String>;
}

impl ClipSource for shapes::ShapesDataset {
    fn sample(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<(Tensor, String)> {
        let (clip, combo) = shapes::ShapesDataset::sample(self, rng, device)?;
        Ok((clip, combo.caption()))
    }

    fn vocabulary(&self) -> Vec<String> {
        shapes::vocabulary()
    }
}

/// One clip drawn with a seed of its own, apart from the training stream (for sample clips).
pub fn fixed_sample(source: &dyn ClipSource, seed: u64, device: &Device) -> Result<(Tensor, String)> {
    use rand::SeedableRng;
    source.sample(&mut ChaCha8Rng::seed_from_u64(seed), device)
}

/// Draws `n` clips and stacks them as VAE input `(n, 3, F, H, W)` in [−1, 1].
pub fn batch(
    source: &dyn ClipSource,
    n: usize,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<(Tensor, Vec<String>)> {
    let mut clips = Vec::with_capacity(n);
    let mut captions = Vec::with_capacity(n);
    for _ in 0..n {
        let (clip, caption) = source.sample(rng, device)?;
        clips.push(clip.permute((1, 0, 2, 3))?.affine(2.0, -1.0)?); // (3, F, H, W)
        captions.push(caption);
    }
    Ok((Tensor::stack(&clips, 0)?, captions))
}
