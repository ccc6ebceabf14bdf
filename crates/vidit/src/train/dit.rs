//! Training the diffusion transformer and a small text encoder jointly on VAE latents.
//!
//! The clips are encoded once into a fixed pool of latents (posterior means), normalised with the
//! pool's per-channel mean and std (written into the VAE config, as Wan's `latents_mean/std`).
//! Each step draws a batch from the pool, drops ~10% of captions for classifier-free guidance,
//! picks a per-frame conditioning (none / first / first+last / first k) and regresses the target.

use super::data::{batch, ClipSource};
use super::objective::{masked_mse, FrameCondition, Objective};
use super::trainer::{train, Observer, RunDir, TrainOptions};
use crate::models::umt5::{zero_padding, Umt5Config, Umt5EncoderModel};
use crate::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
use crate::models::wan_vae::AutoencoderKLWan;
use crate::pipelines::prompt::tokenize_padded;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use tokenizers::Tokenizer;

pub struct DitTraining {
    pub transformer: WanTransformerConfig,
    pub text_encoder: Umt5Config,
    pub objective: Objective,
    pub batch_size: usize,
    pub max_sequence_length: usize,
    /// Probability of training on the empty caption (for classifier-free guidance).
    pub caption_dropout: f64,
    /// Clips encoded into the latent pool, and the seed that draws them.
    pub pool_size: usize,
    pub pool_seed: u64,
}

/// The encoded clips.
pub struct LatentPool {
    /// Normalised latents `(N, C, T, h, w)`.
    pub latents: Tensor,
    pub captions: Vec<String>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl LatentPool {
    /// Encodes `n` clips drawn with `seed`, `chunk` at a time.
    pub fn encode(
        vae: &AutoencoderKLWan,
        data: &dyn ClipSource,
        n: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut parts = Vec::new();
        let mut captions = Vec::new();
        let chunk = 8;
        for start in (0..n).step_by(chunk) {
            let (video, caps) = batch(data, chunk.min(n - start), &mut rng, device)?;
            parts.push(vae.encode(&video)?.mean);
            captions.extend(caps);
        }
        let raw = Tensor::cat(&parts, 0)?; // (N, C, T, h, w)
        let per_channel = raw.transpose(0, 1)?.flatten_from(1)?; // (C, N·T·h·w)
        let mean_t = per_channel.mean_keepdim(1)?;
        let std_t = per_channel.broadcast_sub(&mean_t)?.sqr()?.mean_keepdim(1)?.sqrt()?;
        let mean: Vec<f64> = mean_t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        let std: Vec<f64> =
            std_t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|s| f64::from(s).max(1e-4)).collect();
        let shape = (1, mean.len(), 1, 1, 1);
        let m = Tensor::from_vec(mean.iter().map(|&v| v as f32).collect(), shape, device)?;
        let s = Tensor::from_vec(std.iter().map(|&v| v as f32).collect(), shape, device)?;
        let latents = raw.broadcast_sub(&m)?.broadcast_div(&s)?;
        Ok(Self { latents, captions, mean, std })
    }
}

/// The trained weights, split by component.
pub struct DitWeights {
    pub transformer: HashMap<String, Tensor>,
    pub text_encoder: HashMap<String, Tensor>,
}

pub fn train_dit(
    setup: &DitTraining,
    pool: &LatentPool,
    tokenizer: &Tokenizer,
    options: &TrainOptions,
    run: &RunDir,
    device: &Device,
    observer: impl Observer,
) -> Result<DitWeights> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let text_encoder = Umt5EncoderModel::new(setup.text_encoder.clone(), vb.pp("text_encoder"))?;
    let transformer = WanTransformer3DModel::new(setup.transformer.clone(), vb.pp("transformer"))?;
    let (n, _, t, h, w) = pool.latents.dims5()?;
    let [_, ph, pw] = setup.transformer.patch_size;
    let tokens_per_frame = (h / ph) * (w / pw);
    let loss = |rng: &mut ChaCha8Rng| -> Result<Tensor> {
        let picks: Vec<u32> = (0..setup.batch_size).map(|_| rng.random_range(0..n) as u32).collect();
        let x0 = pool.latents.index_select(&Tensor::new(picks.as_slice(), device)?, 0)?;
        let captions: Vec<String> = picks
            .iter()
            .map(|&i| {
                if rng.random::<f64>() < setup.caption_dropout {
                    String::new()
                } else {
                    pool.captions[i as usize].clone()
                }
            })
            .collect();
        let (ids, mask) = tokenize_padded(tokenizer, &captions, setup.max_sequence_length, device)?;
        let text = zero_padding(&text_encoder.forward(&ids, &mask)?, &mask)?;
        let context = transformer.text_context(&text)?;
        let conditions: Vec<FrameCondition> =
            (0..setup.batch_size).map(|_| FrameCondition::sample(rng, t)).collect();
        let noised = setup.objective.noise(&x0, &conditions, tokens_per_frame, rng)?;
        let prediction = transformer.forward(&noised.inputs, &noised.timesteps, &context)?;
        masked_mse(&prediction, &noised.target, &noised.loss_mask)
    };
    Ok(DitWeights::split(&train(&varmap, options, run, loss, observer)?))
}

impl DitWeights {
    /// Splits the jointly trained weights (`transformer.*`, `text_encoder.*`) by component.
    pub fn split(weights: &HashMap<String, Tensor>) -> Self {
        let part = |prefix: &str| -> HashMap<String, Tensor> {
            let p = format!("{prefix}.");
            weights.iter().filter_map(|(k, v)| Some((k.strip_prefix(&p)?.to_string(), v.clone()))).collect()
        };
        Self { transformer: part("transformer"), text_encoder: part("text_encoder") }
    }
}
