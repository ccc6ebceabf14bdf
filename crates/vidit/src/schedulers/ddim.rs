//! `DDIMScheduler` (η = 0): deterministic steps from ε-predictions, for models trained with the
//! DDPM objective.

use super::betas::{BetaScheduleConfig, DiscreteSchedule};
use super::Scheduler;
use anyhow::Result;
use candle_core::Tensor;

pub struct DdimScheduler {
    schedule: DiscreteSchedule,
}

/// x0 = (x − √(1 − ᾱ)·ε) / √ᾱ, clamped when the config asks for it.
pub(crate) fn predict_x0(
    config: &BetaScheduleConfig,
    sample: &Tensor,
    eps: &Tensor,
    alpha_prod: f32,
) -> Result<Tensor> {
    let x0 = (sample - eps.affine((1.0 - alpha_prod).sqrt() as f64, 0.0)?)?
        .broadcast_div(&Tensor::new(alpha_prod.sqrt(), sample.device())?)?;
    Ok(if config.clip_sample {
        let r = config.clip_sample_range as f32;
        x0.clamp(-r, r)?
    } else {
        x0
    })
}

impl DdimScheduler {
    pub fn new(config: BetaScheduleConfig) -> Result<Self> {
        Ok(Self { schedule: DiscreteSchedule::new(config)? })
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.schedule.set_timesteps(num_inference_steps)
    }

    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    fn begin_at(&mut self, index: usize) {
        self.schedule.begin_at(index);
    }

    fn add_noise(&self, sample: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule.add_noise(sample, noise, index)
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        // Before the schedule's start ᾱ is 1 (set_alpha_to_one) or ᾱ_0.
        let final_alpha =
            if self.schedule.config.set_alpha_to_one { 1.0 } else { self.schedule.first_alpha() };
        let a = self.schedule.advance(Some(final_alpha))?;
        let x0 = predict_x0(&self.schedule.config, sample, model_output, a.alpha_prod)?;
        let direction = model_output.affine((1.0 - a.alpha_prev).sqrt() as f64, 0.0)?;
        Ok((x0.affine(a.alpha_prev.sqrt() as f64, 0.0)? + direction)?)
    }
}
