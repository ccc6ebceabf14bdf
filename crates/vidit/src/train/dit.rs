//! Training the diffusion transformer and a small text encoder jointly on VAE latents.
//!
//! The clips are encoded once into a fixed pool of latents (posterior means), normalised with the
//! pool's per-channel mean and std (written into the VAE config, as Wan's `latents_mean/std`).
//! Each step draws a batch from the pool, drops ~10% of captions for classifier-free guidance,
//! picks a per-frame conditioning (none / first / first+last / first k) and regresses the target,
//! optionally weighting the latent positions of the foreground (the moving object) up.

use super::data::{batch, ClipSource};
use super::init::StartFrom;
use super::objective::{masked_mse, FrameCondition, Objective};
use super::trainer::{train, Observer, RunDir, TrainOptions};
use crate::models::umt5::{zero_padding, Umt5Config, Umt5EncoderModel};
use crate::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
use crate::models::wan_vae::AutoencoderKLWan;
use crate::pipelines::prompt::tokenize_padded;
use anyhow::{bail, Result};
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
    /// Loss weight of the foreground latent positions ([`LatentPool::foreground`]) against 1 for
    /// the rest.
    pub foreground_weight: f64,
    /// Clips encoded into the latent pool, and the seed that draws them.
    pub pool_size: usize,
    pub pool_seed: u64,
    /// Weights to start from (fine-tuning a trained model) instead of a fresh initialisation;
    /// their names and shapes must be exactly the configs' (the EMA starts from them too).
    pub init: Option<DitWeights>,
    /// Text-encoder weights to keep fixed (constants, as Wan trains on a frozen UMT5) instead of
    /// training the encoder with the DiT; with `init`, they replace its text encoder.
    pub frozen_text_encoder: Option<HashMap<String, Tensor>>,
}

impl DitTraining {
    /// The model's weights from the trained ones (a run's variables, or their EMA): a frozen
    /// text encoder's are not among them and are added back.
    pub fn weights(&self, trained: &HashMap<String, Tensor>) -> DitWeights {
        let mut weights = DitWeights::split(trained);
        if let Some(frozen) = &self.frozen_text_encoder {
            weights.text_encoder = frozen.clone();
        }
        weights
    }
}

/// Distance (L2 over channels, in units of the normalised latents) from the pool's typical value
/// at a position beyond which a clip's latent there counts as foreground ([`LatentPool::foreground`]).
pub const FOREGROUND_DISTANCE: f32 = 1.0;

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
        Self::from_latents(&Tensor::cat(&parts, 0)?, captions)
    }

    /// A pool of raw latents `(N, C, T, h, w)`, normalised per channel.
    pub fn from_latents(raw: &Tensor, captions: Vec<String>) -> Result<Self> {
        let device = raw.device();
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

    /// The same latents normalised by another per-channel `mean` and `std` (a trained model's,
    /// when fine-tuning it: its DiT saw latents in its own units).
    pub fn with_stats(self, mean: Vec<f64>, std: Vec<f64>) -> Result<Self> {
        let channels = self.latents.dim(1)?;
        if mean.len() != channels || std.len() != channels || !std.iter().all(|&s| s > 0.0) {
            bail!(
                "latent statistics: {} means and {} stds (all positive) for {channels} channels",
                mean.len(),
                std.len()
            );
        }
        let device = self.latents.device();
        let column = |v: &[f64]| {
            Tensor::from_vec(v.iter().map(|&x| x as f32).collect(), (1, channels, 1, 1, 1), device)
        };
        let (old_mean, old_std) = (column(&self.mean)?, column(&self.std)?);
        let (new_mean, new_std) = (column(&mean)?, column(&std)?);
        let raw = self.latents.broadcast_mul(&old_std)?.broadcast_add(&old_mean)?;
        let latents = raw.broadcast_sub(&new_mean)?.broadcast_div(&new_std)?;
        Ok(Self { latents, captions: self.captions, mean, std })
    }

    /// `(N, 1, T, h, w)`: 1 where a clip's latent is more than [`FOREGROUND_DISTANCE`] from the
    /// pool's per-position median, else 0. On a static background (the shapes data: 18% of the
    /// positions) these are the moving object's, which a uniform loss all but ignores.
    pub fn foreground(&self) -> Result<Tensor> {
        let (n, c, t, h, w) = self.latents.dims5()?;
        let per_clip = c * t * h * w;
        let data = self.latents.flatten_all()?.to_vec1::<f32>()?;
        let mut typical = vec![0f32; per_clip]; // (C, T, h, w)
        let mut column = vec![0f32; n];
        for (i, value) in typical.iter_mut().enumerate() {
            for (k, v) in column.iter_mut().enumerate() {
                *v = data[k * per_clip + i];
            }
            *value = *column.select_nth_unstable_by(n / 2, f32::total_cmp).1;
        }
        let positions = t * h * w;
        let mut mask = vec![0f32; n * positions];
        for (k, clip_mask) in mask.chunks_mut(positions).enumerate() {
            for (p, m) in clip_mask.iter_mut().enumerate() {
                let distance: f32 = (0..c)
                    .map(|ch| (data[k * per_clip + ch * positions + p] - typical[ch * positions + p]).powi(2))
                    .sum();
                *m = f32::from(distance.sqrt() > FOREGROUND_DISTANCE);
            }
        }
        Ok(Tensor::from_vec(mask, (n, 1, t, h, w), self.latents.device())?)
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
    let build = |vb: VarBuilder| -> Result<_> {
        Ok((
            Umt5EncoderModel::new(setup.text_encoder.clone(), vb.pp("text_encoder"))?,
            WanTransformer3DModel::new(setup.transformer.clone(), vb.pp("transformer"))?,
        ))
    };
    let (text_encoder, transformer) = match (&setup.init, &setup.frozen_text_encoder) {
        (None, None) => build(VarBuilder::from_varmap(&varmap, DType::F32, device))?,
        (Some(init), None) => {
            StartFrom::new("--init", init.joined(), &varmap, |_| true).build(device, build)?
        }
        (Some(init), Some(frozen)) => {
            let weights = DitWeights { transformer: init.transformer.clone(), text_encoder: frozen.clone() };
            StartFrom::new("--init", weights.joined(), &varmap, |name| name.starts_with("transformer."))
                .build(device, build)?
        }
        (None, Some(frozen)) => (
            Umt5EncoderModel::new(
                setup.text_encoder.clone(),
                VarBuilder::from_tensors(frozen.clone(), DType::F32, device),
            )?,
            WanTransformer3DModel::new(
                setup.transformer.clone(),
                VarBuilder::from_varmap(&varmap, DType::F32, device).pp("transformer"),
            )?,
        ),
    };
    let (n, _, t, h, w) = pool.latents.dims5()?;
    let [_, ph, pw] = setup.transformer.patch_size;
    let tokens_per_frame = (h / ph) * (w / pw);
    // Loss weights per position, 1 + (weight − 1) · foreground: `(N, 1, T, h, w)`.
    let position_weight = if setup.foreground_weight == 1.0 {
        None
    } else {
        Some(pool.foreground()?.affine(setup.foreground_weight - 1.0, 1.0)?)
    };
    let loss = |rng: &mut ChaCha8Rng| -> Result<Tensor> {
        let picks: Vec<u32> = (0..setup.batch_size).map(|_| rng.random_range(0..n) as u32).collect();
        let picks_t = Tensor::new(picks.as_slice(), device)?;
        let x0 = pool.latents.index_select(&picks_t, 0)?;
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
        let output = transformer.forward(&noised.inputs, &noised.timesteps, &context)?;
        let weight = match &position_weight {
            None => noised.loss_mask.clone(),
            Some(w) => noised.loss_mask.broadcast_mul(&w.index_select(&picks_t, 0)?)?, // (B, 1, T, h, w)
        };
        masked_mse(&noised.prediction(&output)?, &noised.target, &weight)
    };
    Ok(setup.weights(&train(&varmap, options, run, loss, observer)?))
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

    /// The inverse of [`Self::split`]: one map, names prefixed by their component.
    pub fn joined(&self) -> HashMap<String, Tensor> {
        let prefixed = |prefix: &str, part: &HashMap<String, Tensor>| {
            part.iter().map(move |(k, v)| (format!("{prefix}.{k}"), v.clone())).collect::<Vec<_>>()
        };
        prefixed("transformer", &self.transformer)
            .into_iter()
            .chain(prefixed("text_encoder", &self.text_encoder))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreground_is_what_differs_from_the_pool_there() -> Result<()> {
        // Three 2-channel clips of one 2x2 frame, all at the same background (which varies over
        // positions), except clip 1 at position 3, off by 2 in channel 0, and clip 2 at position 0,
        // off by 0.1. Channel 0's std is 0.68, so in normalised units they are 2.9 (beyond the
        // distance) and 0.15 (within it) away.
        let background = [0.2f32, -0.4, 0.9, 0.0, 0.5, 0.5, -1.0, 0.3];
        let mut raw = [background; 3];
        raw[1][3] += 2.0;
        raw[2][0] += 0.1;
        let raw: Vec<f32> = raw.iter().flatten().copied().collect();
        let pool = LatentPool::from_latents(&Tensor::from_vec(raw, (3, 2, 1, 2, 2), &Device::Cpu)?, vec![])?;
        let mask: Vec<f32> = pool.foreground()?.flatten_all()?.to_vec1()?;
        assert_eq!(mask, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        Ok(())
    }
}
