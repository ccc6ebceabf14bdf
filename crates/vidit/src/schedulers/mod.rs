//! Samplers over the flow-matching trajectory x_σ = (1 − σ)·x0 + σ·ε, each a small object with
//! `set_timesteps` and `step`, configured from the model folder's `scheduler/scheduler_config.json`.

pub mod betas;
pub mod ddim;
pub mod ddpm;
pub mod flow_match_euler;
pub mod unipc;

use crate::error::input_error;
use anyhow::Result;
use candle_core::Tensor;
use std::path::Path;

pub use betas::BetaScheduleConfig;
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use flow_match_euler::{FlowMatchEulerConfig, FlowMatchEulerDiscreteScheduler};
pub use unipc::{UniPcConfig, UniPcMultistepScheduler};

/// What a pipeline needs from a scheduler.
pub trait Scheduler {
    /// Prepares the schedule for `num_inference_steps` denoising steps and resets the solver state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The timesteps the model is called with, one per step, as the model receives them (σ·1000).
    fn timesteps(&self) -> &[f32];
    /// The noise levels: one per step plus the final one.
    fn sigmas(&self) -> &[f32];
    /// Advances `sample` by one step given the model's output at the current step.
    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor>;
    /// Seeds the noise of stochastic samplers (a no-op for deterministic ones).
    fn seed(&mut self, _seed: u64) {}
    /// Makes the next `step` the one at timestep `index` (video-to-video enters the schedule
    /// part-way; diffusers finds that index by looking the first timestep up).
    fn begin_at(&mut self, index: usize);
    /// Mixes `noise` into a clean `sample` at the noise level of timestep `index`
    /// (diffusers' `add_noise` / `scale_noise`).
    fn add_noise(&self, sample: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
}

/// Flow matching's forward process: x_σ = (1 − σ)·x₀ + σ·ε.
fn flow_add_noise(sigmas: &[f32], sample: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
    let sigma =
        *sigmas.get(index).ok_or_else(|| anyhow::anyhow!("timestep index {index} past the schedule"))?;
    Ok((sample.affine(1.0 - sigma as f64, 0.0)? + noise.affine(sigma as f64, 0.0)?)?)
}

/// The schedulers vidit ships, selectable by name on the command line. UniPC and Euler sample
/// flow-matching models; DDPM and DDIM sample ε-prediction models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    UniPc,
    Euler,
    Ddpm,
    Ddim,
}

/// Builds a scheduler from a `scheduler_config.json`. `kind` overrides the class named in the file
/// (keeping the shared keys such as the shift); `shift` overrides the flow shift.
pub fn from_config_file(
    path: &Path,
    kind: Option<SchedulerKind>,
    shift: Option<f64>,
) -> Result<Box<dyn Scheduler>> {
    let value: serde_json::Value = crate::model_folder::read_json(path)?;
    let class = value.get("_class_name").and_then(|v| v.as_str()).unwrap_or("UniPCMultistepScheduler");
    let kind = match (kind, class) {
        (Some(kind), _) => kind,
        (None, "UniPCMultistepScheduler") => SchedulerKind::UniPc,
        (None, "FlowMatchEulerDiscreteScheduler") => SchedulerKind::Euler,
        (None, "DDPMScheduler") => SchedulerKind::Ddpm,
        (None, "DDIMScheduler") => SchedulerKind::Ddim,
        (None, other) => {
            return Err(input_error(format!(
                "{}: scheduler `{other}` is not supported \
                 (UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler, DDPMScheduler, DDIMScheduler)",
                path.display()
            )))
        }
    };
    let flow_config = ["UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"].contains(&class);
    let flow_sampler = matches!(kind, SchedulerKind::UniPc | SchedulerKind::Euler);
    if flow_config != flow_sampler {
        return Err(input_error(format!(
            "{}: a {} model cannot be sampled with {kind:?} (flow-matching: unipc, euler; epsilon: ddpm, ddim)",
            path.display(),
            if flow_config { "flow-matching" } else { "epsilon-prediction" }
        )));
    }
    if kind == SchedulerKind::Euler && value.get("prediction_type").and_then(|v| v.as_str()) == Some("sample")
    {
        return Err(input_error(format!(
            "{}: the model predicts clean samples (prediction_type \"sample\"); Euler steps velocity \
             models: use unipc",
            path.display()
        )));
    }
    // A UniPC config read as Euler keeps its shift, which UniPC calls `flow_shift`.
    let file_shift = value.get("shift").or_else(|| value.get("flow_shift")).and_then(|v| v.as_f64());
    let shift = shift.or(file_shift);
    Ok(match kind {
        SchedulerKind::UniPc => {
            let mut config: UniPcConfig = crate::model_folder::parse_config(path, value)?;
            if let Some(shift) = shift {
                config.flow_shift = shift;
            }
            Box::new(
                UniPcMultistepScheduler::new(config)
                    .map_err(|e| input_error(format!("{}: {e}", path.display())))?,
            )
        }
        SchedulerKind::Ddpm | SchedulerKind::Ddim => {
            let config: BetaScheduleConfig = crate::model_folder::parse_config(path, value)?;
            let named = |e: anyhow::Error| input_error(format!("{}: {e}", path.display()));
            if kind == SchedulerKind::Ddpm {
                Box::new(DdpmScheduler::new(config).map_err(named)?)
            } else {
                Box::new(DdimScheduler::new(config).map_err(named)?)
            }
        }
        SchedulerKind::Euler => {
            let mut config: FlowMatchEulerConfig = if class == "FlowMatchEulerDiscreteScheduler" {
                crate::model_folder::parse_config(path, value)?
            } else {
                FlowMatchEulerConfig::default()
            };
            if let Some(shift) = shift {
                config.shift = shift;
            }
            Box::new(
                FlowMatchEulerDiscreteScheduler::new(config)
                    .map_err(|e| input_error(format!("{}: {e}", path.display())))?,
            )
        }
    })
}

/// Applies the flow shift σ' = s·σ / (1 + (s − 1)·σ).
pub(crate) fn shift_sigma(shift: f64, sigma: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// `numpy.linspace(start, stop, num)` bit for bit: i·step + start, with the endpoint set exactly.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}
