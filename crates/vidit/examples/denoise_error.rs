//! How well a shapes model denoises: noisy latents of rendered squares at several noise levels σ,
//! and how far the DiT's clean-latent prediction x̂0 (x_t − σ·v for a velocity model) lands from the square's latents,
//! from the latents of a circle with the same motion, and (for scale) how far the unscaled noisy
//! input x_t / (1 − σ) is. Where the prediction is barely nearer the square than the noisy input,
//! the last sampling steps cannot sharpen a square's corners.
//!
//!     cargo run --release -p vidit --example denoise_error -- [MODEL_DIR]

mod shapes_probe;

use anyhow::Result;
use shapes_probe::{distance, open_model, x0_predictor};
use vidit::noise::randn;
use vidit::pipelines::denoise::encode_frames;
use vidit::train::data::shapes::{render, Combination, Motion, COLORS, DIRECTIONS};

/// Squares (with their circles) per noise level.
const CLIPS: u64 = 16;

fn main() -> Result<()> {
    let model = open_model()?;
    let predict_x0 = x0_predictor(&model)?;
    let device = model.device.clone();
    let g = &model.generation;
    let (w, h, f) = (g.width, g.height, g.num_frames);
    // Each square clip, the circle clip of the same motion, and the square's text context.
    let mut clips = Vec::new();
    for seed in 0..CLIPS {
        let square = Combination {
            color: seed as usize % COLORS.len(),
            shape: 1,
            direction: seed as usize % DIRECTIONS.len(),
        };
        let circle = Combination { shape: 0, ..square };
        let motion = Motion::from_seed(seed, square, w, h, f);
        let latents = |c| encode_frames(&model, &render(c, &motion, w, h, f, &device)?); // (1, C, T, h, w)
        let text = model.text.encode(&[square.caption()], g.max_sequence_length, &device)?;
        clips.push((latents(square)?, latents(circle)?, model.transformer.text_context(&text)?));
    }
    println!("σ      input error   x̂0 to square   x̂0 to circle   square-circle gap   closer to the square");
    for sigma in [0.05f64, 0.1, 0.2, 0.3, 0.45, 0.6] {
        let (mut input, mut to_square, mut to_circle, mut gap, mut closer) = (0f32, 0f32, 0f32, 0f32, 0);
        for (seed, (square, circle, context)) in clips.iter().enumerate() {
            let noise = randn(seed as u64 + 100, square.dims(), &device)?;
            let x = ((&noise * sigma)? + (square * (1.0 - sigma))?)?;
            let x0 = predict_x0(&x, sigma, context)?;
            input += distance(&(&x / (1.0 - sigma))?, square)?;
            let (a, b) = (distance(&x0, square)?, distance(&x0, circle)?);
            to_square += a;
            to_circle += b;
            gap += distance(square, circle)?;
            closer += usize::from(a < b);
        }
        let n = CLIPS as f32;
        println!(
            "{sigma:<6.2} {:>11.2} {:>14.2} {:>14.2} {:>19.2}   {closer}/{CLIPS}",
            input / n,
            to_square / n,
            to_circle / n,
            gap / n
        );
    }
    println!("(mean L2 distances over the whole latent tensor, in the model's normalised units)");
    Ok(())
}
