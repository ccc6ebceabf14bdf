//! How much each word of the shapes grammar steers a model: swapping one word of a reference
//! prompt ("a red circle moving right"), how far the text encoder's output moves, and how far the
//! DiT's clean-latent prediction x̂0 (x_t − σ·v for a velocity model) moves on the same noisy latents of a rendered
//! red circle moving right, at several noise levels, beside the true gap between the two clips'
//! latents. A word the model ignores moves little against its true gap.
//!
//!     cargo run --release -p vidit --example word_influence -- [MODEL_DIR]

mod shapes_probe;

use anyhow::Result;
use candle_core::Tensor;
use shapes_probe::{distance, open_model, x0_predictor};
use vidit::pipelines::denoise::encode_frames;
use vidit::train::data::shapes::{render, Combination, Motion};

fn main() -> Result<()> {
    let model = open_model()?;
    let predict_x0 = x0_predictor(&model)?;
    let device = model.device.clone();
    let (width, height, frames) =
        (model.generation.width, model.generation.height, model.generation.num_frames);
    // The reference (red circle right) and one word swapped: (name, caption, combination).
    let reference = Combination { color: 0, shape: 0, direction: 1 };
    let swaps = [
        ("square", Combination { shape: 1, ..reference }),
        ("triangle", Combination { shape: 2, ..reference }),
        ("blue", Combination { color: 2, ..reference }),
        ("left", Combination { direction: 0, ..reference }),
    ];
    let combos: Vec<Combination> = std::iter::once(reference).chain(swaps.iter().map(|s| s.1)).collect();
    let captions: Vec<String> = combos.iter().map(Combination::caption).collect();
    let text = model.text.encode(&captions, model.generation.max_sequence_length, &device)?; // (P, S, D)

    // The same motion for every clip: the latents differ by the swapped attribute alone.
    let motion = Motion::from_seed(7, reference, width, height, frames);
    let latents: Vec<Tensor> = combos
        .iter()
        .map(|&c| encode_frames(&model, &render(c, &motion, width, height, frames, &device)?))
        .collect::<Result<_>>()?; // each (1, C, T, h, w)
    let contexts: Vec<_> = (0..combos.len())
        .map(|i| model.transformer.text_context(&text.narrow(0, i, 1)?))
        .collect::<Result<_>>()?;
    println!(
        "{:<9} {:>10} {:>10}   x̂0 move at σ = 0.95 / 0.8 / 0.6 / 0.4 / 0.2",
        "swap", "text move", "true gap"
    );
    let text_norm = text.get(0)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    for (i, (name, _)) in swaps.iter().enumerate() {
        let mut moves = Vec::new();
        for sigma in [0.95f64, 0.8, 0.6, 0.4, 0.2] {
            let mut total = 0f32;
            for seed in 0..8u64 {
                let noise = vidit::noise::randn(seed, latents[0].dims(), &device)?;
                let x = ((&noise * sigma)? + (&latents[0] * (1.0 - sigma))?)?;
                total += distance(
                    &predict_x0(&x, sigma, &contexts[0])?,
                    &predict_x0(&x, sigma, &contexts[i + 1])?,
                )?;
            }
            moves.push(format!("{:.2}", total / 8.0));
        }
        println!(
            "{name:<9} {:>10.2} {:>10.2}   {}",
            distance(&text.get(0)?, &text.get(i + 1)?)?,
            distance(&latents[0], &latents[i + 1])?,
            moves.join(" / ")
        );
    }
    println!(
        "(text move against the reference's norm {text_norm:.2}; distances are L2 over the whole tensor)"
    );
    Ok(())
}
