//! Text-to-video, as diffusers' `WanPipeline`: encode the prompt (and the negative prompt for
//! classifier-free guidance), denoise Gaussian latents step by step, de-normalise, VAE-decode.

use super::wan::{GenerationConfig, WanModel};
use crate::schedulers::Scheduler;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// One generation request. Sizes are in pixels; `num_frames` must be 4k + 1.
#[derive(Debug, Clone)]
pub struct TextToVideo {
    pub prompt: String,
    pub negative_prompt: String,
    pub height: usize,
    pub width: usize,
    pub num_frames: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub max_sequence_length: usize,
    pub seed: u64,
    /// Initial noise `(1, C, T, h, w)` to use instead of drawing it from `seed`.
    pub init_latents: Option<Tensor>,
    /// A given first frame `(3, H, W)` in [0, 1], for models trained with frame conditioning
    /// (vidit's own): its latent frame is held clean at timestep 0 while the rest is generated.
    pub first_frame: Option<Tensor>,
}

pub struct TextToVideoOutput {
    /// Final latents `(1, C, T, h, w)`, before de-normalisation.
    pub latents: Tensor,
    /// Decoded frames `(F, 3, H, W)` in [0, 1].
    pub frames: Tensor,
}

impl TextToVideo {
    /// A text-to-video request with a model's generation defaults.
    pub fn with_defaults(prompt: impl Into<String>, defaults: &GenerationConfig, seed: u64) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            height: defaults.height,
            width: defaults.width,
            num_frames: defaults.num_frames,
            num_inference_steps: defaults.num_inference_steps,
            guidance_scale: defaults.guidance_scale,
            max_sequence_length: defaults.max_sequence_length,
            seed,
            init_latents: None,
            first_frame: None,
        }
    }

    /// The latent shape `(1, C, T, h, w)` for this request.
    pub fn latent_shape(&self, model: &WanModel) -> [usize; 5] {
        let vae = &model.vae.config;
        [
            1,
            model.transformer.config.in_channels,
            (self.num_frames - 1) / vae.temporal_factor() + 1,
            self.height / vae.spatial_factor(),
            self.width / vae.spatial_factor(),
        ]
    }

    /// Runs the pipeline. `on_step(i, n)` is called after each denoising step.
    pub fn run(
        &self,
        model: &WanModel,
        scheduler: &mut dyn Scheduler,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<TextToVideoOutput> {
        let device = &model.device;
        let shape = self.latent_shape(model);
        let cfg = self.guidance_scale > 1.0;

        // Text: conditional and unconditional contexts, batched so one forward serves both.
        let mut prompts = vec![self.prompt.clone()];
        if cfg {
            prompts.push(self.negative_prompt.clone());
        }
        let embeds = model.text.encode(&prompts, self.max_sequence_length, device)?; // (1 or 2, S, d)
        let context = model.transformer.text_context(&embeds)?;

        let mut latents = match &self.init_latents {
            Some(l) if l.dims() == shape => l.to_device(device)?,
            Some(l) => bail!("initial latents have shape {:?}, expected {shape:?}", l.dims()),
            None => crate::noise::randn(self.seed, &shape, device)?,
        };
        // Frame conditioning: the encoded first frame replaces latent frame 0 throughout.
        let given = match &self.first_frame {
            Some(frame) => {
                let pixels = frame.affine(2.0, -1.0)?.unsqueeze(1)?.unsqueeze(0)?; // (1, 3, 1, H, W)
                Some(model.vae.normalize(&model.vae.encode(&pixels)?.mean)?) // (1, C, 1, h, w)
            }
            None => None,
        };
        let hold = |latents: &Tensor| -> Result<Tensor> {
            Ok(match &given {
                Some(g) => Tensor::cat(&[g, &latents.narrow(2, 1, shape[2] - 1)?], 2)?,
                None => latents.clone(),
            })
        };
        let [_, ph, pw] = model.transformer.config.patch_size;
        let tokens_per_frame = (shape[3] / ph) * (shape[4] / pw);
        scheduler.set_timesteps(self.num_inference_steps)?;
        scheduler.seed(self.seed.wrapping_add(1)); // stochastic samplers draw their noise from the seed too
        let timesteps = scheduler.timesteps().to_vec();
        let batch = prompts.len();
        for (i, &t) in timesteps.iter().enumerate() {
            latents = hold(&latents)?;
            let input = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let timestep = match given {
                // Per-token timesteps: 0 on the given frame.
                Some(_) => {
                    let per_token: Vec<f32> = (0..shape[2] * tokens_per_frame)
                        .map(|k| if k < tokens_per_frame { 0.0 } else { t })
                        .collect();
                    Tensor::new(per_token, device)?.unsqueeze(0)?.repeat((batch, 1))?
                }
                None => Tensor::new(vec![t; batch], device)?,
            };
            let velocity = model.transformer.forward(&input, &timestep, &context)?;
            let velocity = if cfg {
                let cond = velocity.narrow(0, 0, 1)?;
                let uncond = velocity.narrow(0, 1, 1)?;
                (&uncond + ((cond - &uncond)? * self.guidance_scale)?)?
            } else {
                velocity
            };
            latents = scheduler.step(&velocity, &latents)?;
            on_step(i + 1, timesteps.len());
        }
        let latents = hold(&latents)?;

        let pixels = model.vae.decode(&model.vae.denormalize(&latents)?)?; // (1, 3, F, H, W) in [−1, 1]
        let frames =
            (pixels * 0.5)?.affine(1.0, 0.5)?.clamp(0f32, 1f32)?.squeeze(0)?.permute((1, 0, 2, 3))?;
        Ok(TextToVideoOutput { latents, frames: frames.contiguous()? })
    }
}
