//! `DDPMScheduler`: ancestral sampling from ε-predictions (posterior mean plus fresh noise of the
//! "fixed_small" variance), for models trained with the DDPM objective.

use super::betas::BetaScheduleConfig;
use super::ddim::{predict_x0, sigmas_of};
use super::Scheduler;
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct DdpmScheduler {
    config: BetaScheduleConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    step_index: usize,
    num_steps: usize,
    rng: ChaCha8Rng,
}

impl DdpmScheduler {
    pub fn new(config: BetaScheduleConfig) -> Result<Self> {
        config.validate()?;
        if config.variance_type != "fixed_small" {
            bail!("variance_type `{}` is not supported (fixed_small)", config.variance_type);
        }
        let alphas_cumprod = config.alphas_cumprod();
        Ok(Self {
            config,
            alphas_cumprod,
            timesteps: vec![],
            sigmas: vec![],
            step_index: 0,
            num_steps: 0,
            rng: ChaCha8Rng::seed_from_u64(0),
        })
    }

    /// One step with the given noise (shaped like the sample), as diffusers computes it.
    pub fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let Some(&t) = self.timesteps.get(self.step_index) else {
            bail!("scheduler stepped past its last timestep")
        };
        self.step_index += 1;
        let t = t as i64;
        let prev = t - (self.config.num_train_timesteps / self.num_steps) as i64;
        let alpha_prod = self.alphas_cumprod[t as usize];
        let alpha_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { 1.0 };
        let (beta_prod, beta_prev) = (1.0 - alpha_prod, 1.0 - alpha_prev);
        let current_alpha = alpha_prod / alpha_prev;
        let current_beta = 1.0 - current_alpha;
        let x0 = predict_x0(&self.config, sample, model_output, alpha_prod)?;
        let x0_coeff = alpha_prev.sqrt() * current_beta / beta_prod;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta_prod;
        let mean = (x0.affine(x0_coeff as f64, 0.0)? + sample.affine(sample_coeff as f64, 0.0)?)?;
        if t == 0 {
            return Ok(mean);
        }
        let variance = (beta_prev / beta_prod * current_beta).max(1e-20);
        Ok((mean + noise.affine(variance.sqrt() as f64, 0.0)?)?)
    }
}

impl Scheduler for DdpmScheduler {
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

    fn seed(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let noise = crate::noise::randn(self.rng.random(), sample.dims(), sample.device())?;
        self.step_with_noise(model_output, sample, &noise)
    }
}
