//! `DDIMScheduler` (η = 0): deterministic steps from ε-predictions, for models trained with the
//! DDPM objective.

use super::betas::BetaScheduleConfig;
use super::Scheduler;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct DdimScheduler {
    config: BetaScheduleConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    step_index: usize,
    num_steps: usize,
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

/// The noise level σ = √((1 − ᾱ)/ᾱ) of each timestep, for reporting.
pub(crate) fn sigmas_of(alphas_cumprod: &[f32], timesteps: &[f32]) -> Vec<f32> {
    let mut s: Vec<f32> = timesteps
        .iter()
        .map(|&t| ((1.0 - alphas_cumprod[t as usize]) / alphas_cumprod[t as usize]).sqrt())
        .collect();
    s.push(0.0);
    s
}

impl DdimScheduler {
    pub fn new(config: BetaScheduleConfig) -> Result<Self> {
        config.validate()?;
        let alphas_cumprod = config.alphas_cumprod();
        Ok(Self { config, alphas_cumprod, timesteps: vec![], sigmas: vec![], step_index: 0, num_steps: 0 })
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.timesteps = self.config.timesteps(num_inference_steps)?.into_iter().map(|t| t as f32).collect();
        self.sigmas = sigmas_of(&self.alphas_cumprod, &self.timesteps);
        self.num_steps = num_inference_steps;
        self.step_index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let Some(&t) = self.timesteps.get(self.step_index) else {
            bail!("scheduler stepped past its last timestep")
        };
        self.step_index += 1;
        let t = t as i64;
        let prev = t - (self.config.num_train_timesteps / self.num_steps) as i64;
        let alpha_prod = self.alphas_cumprod[t as usize];
        let alpha_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else if self.config.set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        };
        let x0 = predict_x0(&self.config, sample, model_output, alpha_prod)?;
        let direction = model_output.affine((1.0 - alpha_prev).sqrt() as f64, 0.0)?;
        Ok((x0.affine(alpha_prev.sqrt() as f64, 0.0)? + direction)?)
    }
}
