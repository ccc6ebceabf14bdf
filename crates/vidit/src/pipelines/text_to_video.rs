//! Text-to-video, as diffusers' `WanPipeline`: encode the prompt (and the negative prompt for
//! classifier-free guidance), denoise Gaussian latents step by step, de-normalise, VAE-decode.
//! With keyframes, image-to-video as `WanImageToVideoPipeline` for Wan checkpoints (2.1 I2V and
//! FLF2V; 2.2 TI2V), and frame conditioning for vidit's own models.

use super::clip_image::ImageEncoder;
use super::denoise::{decode_frames, denoise, encode_frames, Condition, GivenFrames, Guidance};
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
    /// Given frames: for Wan 2.1 I2V checkpoints the conditioning channels and CLIP image
    /// states; otherwise (vidit's own models, Wan 2.2 TI2V) the latent frames they encode to,
    /// held clean at timestep 0 while the rest is generated.
    pub keyframes: Keyframes,
}

/// Pixel frames in [0, 1] a frame-conditioned model is given.
#[derive(Debug, Clone, Default)]
pub enum Keyframes {
    #[default]
    None,
    /// The first frame `(3, H, W)`: image-to-video.
    First(Tensor),
    /// The first and the last frame: keyframe interpolation. The last latent frame is encoded
    /// from the last image held still over its frames.
    FirstLast(Tensor, Tensor),
    /// The first 1 + 4k frames `(F, 3, H, W)`: video extension.
    Prefix(Tensor),
}

impl Keyframes {
    /// The conditioning for a clip of latent `shape` `(1, C, T, h, w)`, and the CLIP image states
    /// for Wan I2V checkpoints.
    fn condition(&self, model: &WanModel, shape: [usize; 5]) -> Result<(Condition, Option<Tensor>)> {
        if let Some(encoder) = &model.image_encoder {
            return self.image_channels(model, encoder, shape);
        }
        if model.folder.expand_timesteps && matches!(self, Keyframes::FirstLast(..)) {
            // diffusers' TI2V pipeline would drop the last image without a word.
            bail!("Wan 2.2 TI2V (expand_timesteps) conditions on the first frame only; no last image");
        }
        Ok((self.held_frames(model, shape)?.map_or(Condition::None, Condition::Frames), None))
    }

    /// Wan 2.1 I2V: `[first, grey…]` or `[first, grey…, last]` VAE-encoded, behind a 4-channel
    /// mask of the given pixel frames; the images' CLIP states.
    fn image_channels(
        &self,
        model: &WanModel,
        encoder: &ImageEncoder,
        shape: [usize; 5],
    ) -> Result<(Condition, Option<Tensor>)> {
        let [_, _, t, h, w] = shape;
        let temporal = model.vae.config.temporal_factor();
        let frames = (t - 1) * temporal + 1;
        let (first, last) = match self {
            Keyframes::First(first) => (first, None),
            Keyframes::FirstLast(first, last) => (first, Some(last)),
            Keyframes::None => bail!("this image-to-video model (Wan I2V) needs a first frame"),
            Keyframes::Prefix(_) => {
                bail!("video extension needs a frame-conditioned model; this one is Wan I2V")
            }
        };
        // Grey (0 in the VAE's [−1, 1]) where nothing is given.
        let grey = Tensor::full(0.5f32, first.dims(), first.device())?.unsqueeze(0)?;
        let mut clip = vec![first.unsqueeze(0)?];
        let middle = frames - 1 - usize::from(last.is_some());
        clip.extend(std::iter::repeat_n(grey, middle));
        if let Some(last) = last {
            clip.push(last.unsqueeze(0)?);
        }
        let encoded = encode_frames(model, &Tensor::cat(&clip, 0)?)?; // (1, C, T, h, w)

        // Mask of the given pixel frames, the first repeated `temporal` times, folded so that each
        // latent frame carries its `temporal` pixel frames as channels.
        let given = |j: usize| j == 0 || (last.is_some() && j == frames - 1);
        let mut mask = vec![0f32; temporal * t * h * w];
        for f in 0..t {
            for c in 0..temporal {
                let pixel_frame = (temporal * f + c).saturating_sub(temporal - 1);
                if given(pixel_frame) {
                    let at = (c * t + f) * h * w;
                    mask[at..at + h * w].fill(1.0);
                }
            }
        }
        let mask = Tensor::from_vec(mask, (1, temporal, t, h, w), &model.device)?;
        let images: Vec<&Tensor> = std::iter::once(first).chain(last).collect();
        let states = encoder.encode(&images)?; // (N, S, d)
        Ok((Condition::Channels(Tensor::cat(&[mask, encoded], 1)?), Some(states)))
    }

    /// The held latents of frame-conditioned models.
    fn held_frames(&self, model: &WanModel, shape: [usize; 5]) -> Result<Option<GivenFrames>> {
        let t = shape[2];
        let (clip, held): (Tensor, Vec<usize>) = match self {
            Keyframes::None => return Ok(None),
            Keyframes::First(image) => (image.unsqueeze(0)?, vec![0]),
            Keyframes::FirstLast(first, last) => {
                let temporal = model.vae.config.temporal_factor();
                let frames = (t - 1) * temporal + 1;
                let mut clip = vec![first.unsqueeze(0)?];
                clip.extend(std::iter::repeat_n(last.unsqueeze(0)?, frames - 1));
                (Tensor::cat(&clip, 0)?, vec![0, t - 1])
            }
            Keyframes::Prefix(frames) => {
                let latent_frames = (frames.dim(0)? - 1) / model.vae.config.temporal_factor() + 1;
                if latent_frames >= t {
                    bail!("{} given frames leave nothing to generate in {t} latent frames", frames.dim(0)?);
                }
                (frames.clone(), (0..latent_frames).collect())
            }
        };
        let encoded = encode_frames(model, &clip)?; // (1, C, T', h, w)
        let rest = t - encoded.dim(2)?;
        let latents = if rest > 0 {
            let pad = Tensor::zeros((1, shape[1], rest, shape[3], shape[4]), encoded.dtype(), &model.device)?;
            Tensor::cat(&[encoded, pad], 2)?
        } else {
            encoded
        };
        let mut flags = vec![false; t];
        for i in held {
            flags[i] = true;
        }
        Ok(Some(GivenFrames { latents, held: flags }))
    }
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
            keyframes: Keyframes::None,
        }
    }

    /// The latent shape `(1, C, T, h, w)` for this request.
    pub fn latent_shape(&self, model: &WanModel) -> [usize; 5] {
        let vae = &model.vae.config;
        [
            1,
            vae.z_dim,
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
        let (condition, image_states) = self.keyframes.condition(model, shape)?;
        let guidance = Guidance::new(
            model,
            &self.prompt,
            &self.negative_prompt,
            self.max_sequence_length,
            self.guidance_scale,
            image_states.as_ref(),
        )?;
        let latents = match &self.init_latents {
            Some(l) if l.dims() == shape => l.to_device(device)?,
            Some(l) => bail!("initial latents have shape {:?}, expected {shape:?}", l.dims()),
            None => crate::noise::randn(self.seed, &shape, device)?,
        };
        scheduler.set_timesteps(self.num_inference_steps)?;
        scheduler.seed(self.seed.wrapping_add(1)); // stochastic samplers draw their noise from the seed too
        let latents = denoise(model, scheduler, &guidance, latents, 0, &condition, on_step)?;
        let frames = decode_frames(model, &latents)?;
        Ok(TextToVideoOutput { latents, frames })
    }
}
