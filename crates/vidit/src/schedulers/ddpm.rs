//! `DDPMScheduler`: ancestral sampling from ε-predictions (posterior mean plus fresh noise of the
//! "fixed_small" variance), for models trained with the DDPM objective.

use super::betas::{BetaScheduleConfig, DiscreteSchedule};
use super::ddim::predict_x0;
use super::Scheduler;
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct DdpmScheduler {
    schedule: DiscreteSchedule,
    rng: ChaCha8Rng,
}

impl DdpmScheduler {
    pub fn new(config: BetaScheduleConfig) -> Result<Self> {
        if config.variance_type != "fixed_small" {
            bail!("variance_type `{}` is not supported (fixed_small)", config.variance_type);
        }
        Ok(Self { schedule: DiscreteSchedule::new(config)?, rng: ChaCha8Rng::seed_from_u64(0) })
    }

    /// One step with the given noise (shaped like the sample), as diffusers computes it.
    pub fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let a = self.schedule.advance(None)?;
        let (beta_prod, beta_prev) = (1.0 - a.alpha_prod, 1.0 - a.alpha_prev);
        let current_alpha = a.alpha_prod / a.alpha_prev;
        let current_beta = 1.0 - current_alpha;
        let x0 = predict_x0(&self.schedule.config, sample, model_output, a.alpha_prod)?;
        let x0_coeff = a.alpha_prev.sqrt() * current_beta / beta_prod;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta_prod;
        let mean = (x0.affine(x0_coeff as f64, 0.0)? + sample.affine(sample_coeff as f64, 0.0)?)?;
        if a.t == 0 {
            return Ok(mean);
        }
        let variance = (beta_prev / beta_prod * current_beta).max(1e-20);
        Ok((mean + noise.affine(variance.sqrt() as f64, 0.0)?)?)
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.schedule.set_timesteps(num_inference_steps)
    }

    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    fn seed(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    fn begin_at(&mut self, index: usize) {
        self.schedule.begin_at(index);
    }

    fn add_noise(&self, sample: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule.add_noise(sample, noise, index)
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let noise = crate::noise::randn(self.rng.random(), sample.dims(), sample.device())?;
        self.step_with_noise(model_output, sample, &noise)
    }
}
