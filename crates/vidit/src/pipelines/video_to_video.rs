//! Video-to-video (SDEdit), as diffusers' `WanVideoToVideoPipeline`: encode the clip, mix noise
//! into it at the timestep `strength` selects, and denoise from there under the prompt.

use super::denoise::{decode_frames, denoise, encode_frames, Condition, Guidance};
use super::text_to_video::{TextToVideo, TextToVideoOutput};
use super::wan::WanModel;
use crate::schedulers::Scheduler;
use anyhow::{bail, Result};

/// The strength restoration (`vidit generate --restore`) re-denoises at: late enough in the
/// schedule that the clip's content stays, early enough to remove noise and artefacts.
pub const RESTORE_STRENGTH: f64 = 0.3;

pub struct VideoToVideo {
    /// Prompt, size, steps, guidance and seed. `num_frames` must be the clip's; `init_latents`,
    /// when given, replace the noised clip altogether (diffusers' `latents` argument).
    pub request: TextToVideo,
    /// The clip `(F, 3, H, W)` in [0, 1], at the request's size.
    pub video: candle_core::Tensor,
    /// In (0, 1]: how much of the schedule is run again (1 = from pure noise).
    pub strength: f64,
    /// The noise mixed into the encoded clip, shaped like its latents (default: drawn from the seed).
    pub noise: Option<candle_core::Tensor>,
}

impl VideoToVideo {
    /// Whether `strength` is one video-to-video takes: in (0, 1].
    pub fn valid_strength(strength: f64) -> bool {
        strength > 0.0 && strength <= 1.0
    }

    /// The step the schedule is entered at: the first of its last ⌊steps·strength⌋ steps.
    pub fn begin_index(steps: usize, strength: f64) -> usize {
        steps - ((steps as f64 * strength) as usize).min(steps)
    }

    pub fn run(
        &self,
        model: &WanModel,
        scheduler: &mut dyn Scheduler,
        on_step: impl FnMut(usize, usize),
    ) -> Result<TextToVideoOutput> {
        let r = &self.request;
        if !Self::valid_strength(self.strength) {
            bail!("strength {} must be in (0, 1]", self.strength);
        }
        let begin = Self::begin_index(r.num_inference_steps, self.strength);
        if begin == r.num_inference_steps {
            bail!("strength {} re-runs none of the {} steps", self.strength, r.num_inference_steps);
        }
        let shape = r.latent_shape(model);
        if model.image_encoder.is_some() {
            bail!("video-to-video takes a text-to-video model; this one is image-to-video (Wan I2V)");
        }
        let guidance = Guidance::new(
            model,
            &r.prompt,
            &r.negative_prompt,
            r.max_sequence_length,
            r.guidance_scale,
            None,
        )?;
        scheduler.set_timesteps(r.num_inference_steps)?;
        scheduler.seed(r.seed.wrapping_add(1));
        let latents = match &r.init_latents {
            Some(l) if l.dims() == shape => l.to_device(&model.device)?,
            Some(l) => bail!("initial latents have shape {:?}, expected {shape:?}", l.dims()),
            None => {
                let clean = encode_frames(model, &self.video)?; // (1, C, T, h, w)
                if clean.dims() != shape {
                    bail!("the clip encodes to latents {:?}, expected {shape:?}", clean.dims());
                }
                let noise = match &self.noise {
                    Some(n) if n.dims() == shape => n.to_device(&model.device)?,
                    Some(n) => bail!("noise has shape {:?}, expected the latents' {shape:?}", n.dims()),
                    None => crate::noise::randn(r.seed, &shape, &model.device)?,
                };
                scheduler.add_noise(&clean, &noise, begin)?
            }
        };
        let latents = denoise(model, scheduler, &guidance, latents, begin, &Condition::None, on_step)?;
        let frames = decode_frames(model, &latents)?;
        Ok(TextToVideoOutput { latents, frames })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_selects_the_last_steps_as_diffusers_does() {
        assert_eq!(VideoToVideo::begin_index(10, 1.0), 0);
        assert_eq!(VideoToVideo::begin_index(10, 0.6), 4);
        assert_eq!(VideoToVideo::begin_index(20, 0.6), 8);
        assert_eq!(VideoToVideo::begin_index(3, 0.5), 2); // int(1.5) = 1 step
        assert_eq!(VideoToVideo::begin_index(10, 0.05), 10); // none: refused by run
    }
}
