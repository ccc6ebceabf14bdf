//! The discrete β schedule shared by the DDPM and DDIM schedulers (ε-prediction), computed in f32
//! exactly as diffusers computes it.

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Config keys common to `DDPMScheduler` and `DDIMScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct BetaScheduleConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub prediction_type: String,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub timestep_spacing: String,
    pub variance_type: String,
    pub thresholding: bool,
}

impl Default for BetaScheduleConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            prediction_type: "epsilon".into(),
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            timestep_spacing: "leading".into(),
            variance_type: "fixed_small".into(),
            thresholding: false,
        }
    }
}

/// `torch.linspace` in f32: symmetric, from the start for the first half and from the end after.
fn torch_linspace(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 }).collect()
}

impl BetaScheduleConfig {
    pub fn validate(&self) -> Result<()> {
        if self.prediction_type != "epsilon" {
            bail!("prediction_type `{}` is not supported (epsilon)", self.prediction_type);
        }
        if self.thresholding {
            bail!("option `thresholding` is not supported");
        }
        if !matches!(self.beta_schedule.as_str(), "linear" | "scaled_linear") {
            bail!("beta_schedule `{}` is not supported (linear, scaled_linear)", self.beta_schedule);
        }
        if !matches!(self.timestep_spacing.as_str(), "leading" | "trailing" | "linspace") {
            bail!(
                "timestep_spacing `{}` is not supported (leading, trailing, linspace)",
                self.timestep_spacing
            );
        }
        Ok(())
    }

    /// ᾱ_t for t = 0 … N − 1.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas = match self.beta_schedule.as_str() {
            "scaled_linear" => {
                torch_linspace((self.beta_start as f32).sqrt(), (self.beta_end as f32).sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            _ => torch_linspace(self.beta_start as f32, self.beta_end as f32, n),
        };
        let mut prod = 1f32;
        betas
            .iter()
            .map(|b| {
                prod *= 1.0 - b;
                prod
            })
            .collect()
    }

    /// Integer timesteps of an `steps`-step schedule, high to low, as diffusers spaces them.
    pub fn timesteps(&self, steps: usize) -> Result<Vec<i64>> {
        let n = self.num_train_timesteps;
        if steps == 0 || steps > n {
            bail!("the number of steps must be between 1 and {n}");
        }
        Ok(match self.timestep_spacing.as_str() {
            "linspace" => super::linspace(0.0, (n - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t.round() as i64)
                .collect(),
            "trailing" => {
                let ratio = n as f64 / steps as f64;
                (0..steps).map(|i| (n as f64 - i as f64 * ratio).round() as i64 - 1).collect()
            }
            _ => {
                let ratio = n / steps;
                (0..steps).rev().map(|i| (i * ratio + self.steps_offset) as i64).collect()
            }
        })
    }
}

/// The timestep bookkeeping DDPM and DDIM share: the schedule, the current step, and ᾱ at the
/// current and the previous timestep.
pub(crate) struct DiscreteSchedule {
    pub config: BetaScheduleConfig,
    alphas_cumprod: Vec<f32>,
    pub timesteps: Vec<f32>,
    /// σ = √((1 − ᾱ)/ᾱ) per step, then 0, for reporting.
    pub sigmas: Vec<f32>,
    step_index: usize,
    num_steps: usize,
}

/// One step's position in the schedule.
pub(crate) struct StepAlphas {
    pub t: i64,
    pub alpha_prod: f32,
    pub alpha_prev: f32,
}

impl DiscreteSchedule {
    pub fn new(config: BetaScheduleConfig) -> Result<Self> {
        config.validate()?;
        let alphas_cumprod = config.alphas_cumprod();
        Ok(Self { config, alphas_cumprod, timesteps: vec![], sigmas: vec![], step_index: 0, num_steps: 0 })
    }

    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.timesteps = self.config.timesteps(steps)?.into_iter().map(|t| t as f32).collect();
        let ac = &self.alphas_cumprod;
        self.sigmas =
            self.timesteps.iter().map(|&t| ((1.0 - ac[t as usize]) / ac[t as usize]).sqrt()).collect();
        self.sigmas.push(0.0);
        self.num_steps = steps;
        self.step_index = 0;
        Ok(())
    }

    pub fn begin_at(&mut self, index: usize) {
        self.step_index = index;
    }

    /// √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε at the timestep t of step `index`.
    pub fn add_noise(&self, sample: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let Some(&t) = self.timesteps.get(index) else { bail!("timestep index {index} past the schedule") };
        let a = self.alphas_cumprod[t as usize] as f64;
        Ok((sample.affine(a.sqrt(), 0.0)? + noise.affine((1.0 - a).sqrt(), 0.0)?)?)
    }

    /// Advances to the next step; the previous timestep is t − N/steps, with ᾱ = `final_alpha`
    /// before the start of the schedule.
    pub fn advance(&mut self, final_alpha: Option<f32>) -> Result<StepAlphas> {
        let Some(&t) = self.timesteps.get(self.step_index) else {
            bail!("scheduler stepped past its last timestep")
        };
        self.step_index += 1;
        let t = t as i64;
        let prev = t - (self.config.num_train_timesteps / self.num_steps) as i64;
        let alpha_prev =
            if prev >= 0 { self.alphas_cumprod[prev as usize] } else { final_alpha.unwrap_or(1.0) };
        Ok(StepAlphas { t, alpha_prod: self.alphas_cumprod[t as usize], alpha_prev })
    }

    pub fn first_alpha(&self) -> f32 {
        self.alphas_cumprod[0]
    }
}
