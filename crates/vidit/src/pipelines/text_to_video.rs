//! Text-to-video, as diffusers' `WanPipeline`: encode the prompt (and the negative prompt for
//! classifier-free guidance), denoise Gaussian latents step by step, de-normalise, VAE-decode.

use super::denoise::{decode_frames, denoise, encode_frames, GivenFrames, Guidance};
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
        on_step: impl FnMut(usize, usize),
    ) -> Result<TextToVideoOutput> {
        let device = &model.device;
        let shape = self.latent_shape(model);
        let guidance = Guidance::new(
            model,
            &self.prompt,
            &self.negative_prompt,
            self.max_sequence_length,
            self.guidance_scale,
        )?;
        let latents = match &self.init_latents {
            Some(l) if l.dims() == shape => l.to_device(device)?,
            Some(l) => bail!("initial latents have shape {:?}, expected {shape:?}", l.dims()),
            None => crate::noise::randn(self.seed, &shape, device)?,
        };
        // Frame conditioning: the encoded first frame replaces latent frame 0 throughout.
        let given = match &self.first_frame {
            Some(frame) => {
                let first = encode_frames(model, &frame.unsqueeze(0)?)?; // (1, C, 1, h, w)
                let rest =
                    Tensor::zeros((1, shape[1], shape[2] - 1, shape[3], shape[4]), first.dtype(), device)?;
                let mut held = vec![false; shape[2]];
                held[0] = true;
                Some(GivenFrames { latents: Tensor::cat(&[first, rest], 2)?, held })
            }
            None => None,
        };
        scheduler.set_timesteps(self.num_inference_steps)?;
        scheduler.seed(self.seed.wrapping_add(1)); // stochastic samplers draw their noise from the seed too
        let latents = denoise(model, scheduler, &guidance, latents, 0, given.as_ref(), on_step)?;
        let frames = decode_frames(model, &latents)?;
        Ok(TextToVideoOutput { latents, frames })
    }
}
