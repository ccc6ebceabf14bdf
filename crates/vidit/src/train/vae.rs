//! Training the causal 3-D VAE: reconstruction (with extra weight on the foreground, which is
//! small in synthetic clips) plus a small KL term.

use super::data::{batch, ClipSource};
use super::init::StartFrom;
use super::trainer::{train, Observer, RunDir, TrainOptions};
use crate::models::wan_vae::{AutoencoderKLWan, WanVaeConfig};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use std::collections::HashMap;

pub struct VaeTraining {
    pub config: WanVaeConfig,
    pub batch_size: usize,
    pub kl_weight: f64,
    /// Train on square crops of this size around the content (the VAE is convolutional, so it
    /// applies to full frames unchanged); `None` trains on full frames.
    pub crop: Option<usize>,
    /// Loss weight of frame 0's pixels against 1 for the others'. The causal VAE encodes frame 0
    /// alone: it is the whole input of image-to-video but one frame of 17 in a clip's loss.
    pub first_frame_weight: f64,
    /// Trained weights to start from (fine-tuning) instead of a fresh initialisation.
    pub init: Option<HashMap<String, Tensor>>,
    /// With `init`: train the decoder only. The encoder, and so the latents a DiT was trained on,
    /// stay exactly as they are.
    pub decoder_only: bool,
}

/// The decoder's tensors (`post_quant_conv` maps latents into it): what `decoder_only` trains.
fn is_decoder(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// Crops `(B, 3, F, H, W)` to `size`², each clip around the centroid of its bright pixels in the
/// middle frame, jittered by up to a quarter of the crop.
pub fn crop_around_content(video: &Tensor, size: usize, rng: &mut impl Rng) -> Result<Tensor> {
    let (b, _, f, h, w) = video.dims5()?;
    if size >= h.min(w) {
        return Ok(video.clone());
    }
    let mut crops = Vec::with_capacity(b);
    for i in 0..b {
        let clip = video.get(i)?; // (3, F, H, W) in [−1, 1]
        let frame = clip.narrow(1, f / 2, 1)?.squeeze(1)?.max(0)?.affine(0.5, 0.5)?; // (H, W) in [0, 1]
        let total = frame.sum_all()?.to_scalar::<f32>()?.max(1e-6);
        let ys = Tensor::arange(0f32, h as f32, video.device())?.reshape((h, 1))?;
        let xs = Tensor::arange(0f32, w as f32, video.device())?.reshape((1, w))?;
        let cy = frame.broadcast_mul(&ys)?.sum_all()?.to_scalar::<f32>()? / total;
        let cx = frame.broadcast_mul(&xs)?.sum_all()?.to_scalar::<f32>()? / total;
        let jitter = (size / 4) as f32;
        let mut origin = |c: f32, extent: usize| -> usize {
            let c = c + rng.random_range(-jitter..=jitter) - size as f32 / 2.0;
            c.round().clamp(0.0, (extent - size) as f32) as usize
        };
        let (y0, x0) = (origin(cy, h), origin(cx, w));
        crops.push(clip.narrow(2, y0, size)?.narrow(3, x0, size)?);
    }
    Ok(Tensor::stack(&crops, 0)?)
}

/// Reconstruction + KL loss of one batch `(B, 3, F, H, W)` in [−1, 1], frame 0's pixels weighted
/// `first_frame_weight`.
pub fn vae_loss(
    vae: &AutoencoderKLWan,
    video: &Tensor,
    kl_weight: f64,
    first_frame_weight: f64,
    seed: u64,
) -> Result<Tensor> {
    let posterior = vae.encode(video)?;
    let eps = crate::noise::randn(seed, posterior.mean.dims(), video.device())?;
    let z = (&posterior.mean + (posterior.logvar.affine(0.5, 0.0)?.exp()? * eps)?)?;
    let recon = vae.decode_unclamped(&z)?;
    // Pixels of the foreground (brighter than black) count 5× more.
    let mut weight = video.max_keepdim(1)?.affine(2.0, 3.0)?.clamp(1f32, 5f32)?; // (B, 1, F, H, W)
    let frames = video.dim(2)?;
    if first_frame_weight != 1.0 {
        let per_frame: Vec<f32> =
            (0..frames).map(|f| if f == 0 { first_frame_weight as f32 } else { 1.0 }).collect();
        let per_frame = Tensor::from_vec(per_frame, (1, 1, frames, 1, 1), video.device())?;
        weight = weight.broadcast_mul(&per_frame)?;
    }
    let rec = (recon - video)?.sqr()?.broadcast_mul(&weight)?.mean_all()?;
    let (m, lv) = (&posterior.mean, &posterior.logvar);
    let kl = ((m.sqr()? + lv.exp()? - lv)? - 1.0)?.affine(0.5, 0.0)?.mean_all()?;
    Ok((rec + (kl * kl_weight)?)?)
}

/// Trains a VAE from scratch or from `setup.init`; returns its EMA weights (with the fixed
/// encoder's when training the decoder only), named as in the checkpoint.
pub fn train_vae(
    setup: &VaeTraining,
    data: &dyn ClipSource,
    options: &TrainOptions,
    run: &RunDir,
    device: &Device,
    observer: impl Observer,
) -> Result<HashMap<String, Tensor>> {
    let varmap = VarMap::new();
    let build = |vb: VarBuilder| AutoencoderKLWan::new(setup.config.clone(), vb);
    let vae = match &setup.init {
        Some(init) => {
            let trainable = if setup.decoder_only { is_decoder } else { |_: &str| true };
            StartFrom::new("--init", init.clone(), &varmap, trainable).build(device, build)?
        }
        None if setup.decoder_only => bail!("training the decoder only needs weights to start from"),
        None => build(VarBuilder::from_varmap(&varmap, DType::F32, device))?,
    };
    // A fixed encoder's KL term is a constant: leave it out.
    let kl_weight = if setup.decoder_only { 0.0 } else { setup.kl_weight };
    let loss = |rng: &mut rand_chacha::ChaCha8Rng| -> Result<Tensor> {
        let (mut video, _) = batch(data, setup.batch_size, rng, device)?;
        if let Some(size) = setup.crop {
            video = crop_around_content(&video, size, rng)?;
        }
        vae_loss(&vae, &video, kl_weight, setup.first_frame_weight, rng.random())
    };
    Ok(setup.whole(train(&varmap, options, run, loss, observer)?))
}

impl VaeTraining {
    /// The whole VAE's weights from the trained ones: with `decoder_only`, the fixed encoder's
    /// are added.
    pub fn whole(&self, trained: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
        match (&self.init, self.decoder_only) {
            (Some(init), true) => {
                let mut weights: HashMap<String, Tensor> = init
                    .iter()
                    .filter(|(name, _)| !is_decoder(name))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                weights.extend(trained);
                weights
            }
            _ => trained,
        }
    }
}

/// Input beside its reconstruction by the VAE with `weights`: `(F, 3, H, 2W)` in [0, 1] from a
/// clip `(F, 3, H, W)` in [0, 1].
pub fn reconstruction_strip(
    config: &WanVaeConfig,
    weights: &HashMap<String, Tensor>,
    clip: &Tensor,
) -> Result<Tensor> {
    let vae = AutoencoderKLWan::new(
        config.clone(),
        VarBuilder::from_tensors(weights.clone(), DType::F32, clip.device()),
    )?;
    let x = clip.permute((1, 0, 2, 3))?.affine(2.0, -1.0)?.unsqueeze(0)?; // (1, 3, F, H, W)
    let recon = vae.decode(&vae.encode(&x)?.mean)?.squeeze(0)?.permute((1, 0, 2, 3))?.affine(0.5, 0.5)?;
    Ok(Tensor::cat(&[clip, &recon], 3)?)
}
