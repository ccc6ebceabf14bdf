//! `FlowMatchEulerDiscreteScheduler`: first-order Euler steps along the predicted flow velocity.

use super::{linspace, shift_sigma, Scheduler};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Mirrors diffusers' config keys and defaults; the options vidit does not implement are rejected.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct FlowMatchEulerConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub invert_sigmas: bool,
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            invert_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

pub struct FlowMatchEulerDiscreteScheduler {
    config: FlowMatchEulerConfig,
    /// σ_min of the training schedule, computed in f32 as diffusers does (it is already shifted once).
    sigma_min: f32,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    step_index: usize,
}

impl FlowMatchEulerDiscreteScheduler {
    pub fn new(config: FlowMatchEulerConfig) -> Result<Self> {
        let unsupported = [
            (config.use_dynamic_shifting, "use_dynamic_shifting"),
            (config.shift_terminal.is_some(), "shift_terminal"),
            (config.use_karras_sigmas, "use_karras_sigmas"),
            (config.use_exponential_sigmas, "use_exponential_sigmas"),
            (config.use_beta_sigmas, "use_beta_sigmas"),
            (config.invert_sigmas, "invert_sigmas"),
            (config.stochastic_sampling, "stochastic_sampling"),
        ];
        if let Some((_, key)) = unsupported.iter().find(|(on, _)| *on) {
            bail!("FlowMatchEulerDiscreteScheduler option `{key}` is not supported");
        }
        if config.num_train_timesteps == 0 || config.shift <= 0.0 {
            bail!("num_train_timesteps and shift must be positive");
        }
        let n = config.num_train_timesteps as f32;
        // In f32 as torch does it, with the Python scalars rounded to f32 first.
        let sigma = 1.0 / n; // the last training timestep, 1/N
        let sigma_min = config.shift as f32 * sigma / (1.0 + (config.shift - 1.0) as f32 * sigma);
        Ok(Self { config, sigma_min, timesteps: vec![], sigmas: vec![], step_index: 0 })
    }
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 {
            bail!("the number of steps must be at least 1");
        }
        let n = self.config.num_train_timesteps as f64;
        // linspace(σ_max·N, σ_min·N) with σ_max = 1, then shift again: the endpoint ends up shifted twice.
        let sigmas: Vec<f32> = linspace(n, self.sigma_min as f64 * n, num_inference_steps)
            .into_iter()
            .map(|t| shift_sigma(self.config.shift, t / n) as f32)
            .collect();
        self.timesteps = sigmas.iter().map(|s| s * self.config.num_train_timesteps as f32).collect();
        self.sigmas = sigmas;
        self.sigmas.push(0.0);
        self.step_index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn begin_at(&mut self, index: usize) {
        self.step_index = index;
    }

    fn add_noise(&self, sample: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        super::flow_add_noise(&self.sigmas, sample, noise, index)
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        if i + 1 >= self.sigmas.len() {
            bail!("scheduler stepped past its last timestep");
        }
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        self.step_index += 1;
        Ok((sample + model_output.affine(dt as f64, 0.0)?)?)
    }
}
