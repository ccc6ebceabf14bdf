//! The parts every Wan pipeline shares: prompt contexts, the guided denoising loop over a
//! scheduler (optionally entered part-way, optionally conditioned on given frames), and
//! decoding latents into frames.

use super::wan::WanModel;
use crate::models::wan_transformer::TextContext;
use crate::schedulers::Scheduler;
use anyhow::Result;
use candle_core::Tensor;

/// Cross-attention context for the prompt and, with guidance, the negative prompt (batched).
pub struct Guidance {
    context: TextContext,
    scale: f64,
    batch: usize,
}

impl Guidance {
    /// Guidance is on when `scale > 1`, as in diffusers. `image_states`: the CLIP states of the
    /// given image(s) for Wan I2V checkpoints, the same for the prompt and the negative prompt.
    pub fn new(
        model: &WanModel,
        prompt: &str,
        negative: &str,
        max_len: usize,
        scale: f64,
        image_states: Option<&Tensor>,
    ) -> Result<Self> {
        let mut prompts = vec![prompt.to_string()];
        if scale > 1.0 {
            prompts.push(negative.to_string());
        }
        let embeds = model.text.encode(&prompts, max_len, &model.device)?; // (1 or 2, S, d)
        let context = match image_states {
            Some(image) => model.transformer.text_image_context(&embeds, image)?,
            None => model.transformer.text_context(&embeds)?,
        };
        Ok(Self { context, scale, batch: prompts.len() })
    }
}

/// What the generated latents are conditioned on besides the text.
pub enum Condition {
    None,
    /// Given latent frames held clean at timestep 0: vidit's own frame-conditioned models and
    /// Wan 2.2 TI2V (`expand_timesteps`).
    Frames(GivenFrames),
    /// Wan 2.1 I2V: mask and encoded condition clip `(1, 4 + C, T, h, w)`, concatenated to the
    /// latents' channels at every step.
    Channels(Tensor),
}

/// Latent frames held clean (timestep 0) while the others are denoised: the frame
/// conditioning vidit's own models are trained with.
pub struct GivenFrames {
    /// `(1, C, T, h, w)`; only the frames flagged in `held` are read.
    pub latents: Tensor,
    pub held: Vec<bool>,
}

impl GivenFrames {
    fn hold(&self, latents: &Tensor) -> Result<Tensor> {
        let frames: Vec<Tensor> = self
            .held
            .iter()
            .enumerate()
            .map(|(t, &held)| if held { self.latents.narrow(2, t, 1) } else { latents.narrow(2, t, 1) })
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&frames, 2)?)
    }
}

/// Denoises `latents` from the scheduler's step `begin` to the end. `on_step(i, n)` is called
/// after each step.
pub fn denoise(
    model: &WanModel,
    scheduler: &mut dyn Scheduler,
    guidance: &Guidance,
    mut latents: Tensor,
    begin: usize,
    condition: &Condition,
    mut on_step: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let given = match condition {
        Condition::Frames(given) => Some(given),
        _ => None,
    };
    let device = &model.device;
    let (_, _, frames, h, w) = latents.dims5()?;
    let [_, ph, pw] = model.transformer.config.patch_size;
    let tokens_per_frame = (h / ph) * (w / pw);
    let timesteps = scheduler.timesteps()[begin..].to_vec();
    scheduler.begin_at(begin);
    let hold = |x: &Tensor| -> Result<Tensor> { given.map_or_else(|| Ok(x.clone()), |g| g.hold(x)) };
    for (i, &t) in timesteps.iter().enumerate() {
        latents = hold(&latents)?;
        let input = match condition {
            Condition::Channels(c) => Tensor::cat(&[&latents, c], 1)?,
            _ => latents.clone(),
        };
        let input = if guidance.batch == 2 { Tensor::cat(&[&input, &input], 0)? } else { input };
        let timestep = match given {
            // Per-token timesteps: 0 on the held frames.
            Some(g) => {
                let per_token: Vec<f32> = (0..frames * tokens_per_frame)
                    .map(|k| if g.held[k / tokens_per_frame] { 0.0 } else { t })
                    .collect();
                Tensor::new(per_token, device)?.unsqueeze(0)?.repeat((guidance.batch, 1))?
            }
            None => Tensor::new(vec![t; guidance.batch], device)?,
        };
        let velocity = model.transformer.forward(&input, &timestep, &guidance.context)?;
        let velocity = if guidance.batch == 2 {
            let cond = velocity.narrow(0, 0, 1)?;
            let uncond = velocity.narrow(0, 1, 1)?;
            (&uncond + ((cond - &uncond)? * guidance.scale)?)?
        } else {
            velocity
        };
        latents = scheduler.step(&velocity, &latents)?;
        on_step(i + 1, timesteps.len());
    }
    hold(&latents)
}

/// Clip pixels `(F, 3, H, W)` in [0, 1] → normalised latents `(1, C, T, h, w)` (posterior mean).
pub fn encode_frames(model: &WanModel, frames: &Tensor) -> Result<Tensor> {
    let pixels = frames.affine(2.0, -1.0)?.permute((1, 0, 2, 3))?.unsqueeze(0)?; // (1, 3, F, H, W)
    model.vae.normalize(&model.vae.encode(&pixels)?.mean)
}

/// Normalised latents `(1, C, T, h, w)` → frames `(F, 3, H, W)` in [0, 1].
pub fn decode_frames(model: &WanModel, latents: &Tensor) -> Result<Tensor> {
    let pixels = model.vae.decode(&model.vae.denormalize(latents)?)?; // (1, 3, F, H, W) in [−1, 1]
    let frames = (pixels * 0.5)?.affine(1.0, 0.5)?.clamp(0f32, 1f32)?.squeeze(0)?.permute((1, 0, 2, 3))?;
    Ok(frames.contiguous()?)
}
