//! `UniPCMultistepScheduler` with flow sigmas (the Wan default): the UniP predictor and UniC corrector
//! in their x0 (data-prediction) B(h) form.
//!
//! The scalar coefficients are computed in f32, as diffusers computes them on 0-dim f32 tensors.

use super::{linspace, shift_sigma, Scheduler};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Mirrors diffusers' config keys and defaults. vidit implements the flow-sigma, x0-prediction path
/// that Wan uses, for models that output the velocity (`flow_prediction`) or the clean sample
/// (`sample`); other options are rejected with the key's name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct UniPcConfig {
    pub num_train_timesteps: usize,
    pub solver_order: usize,
    pub prediction_type: String,
    pub predict_x0: bool,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub disable_corrector: Vec<usize>,
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    pub final_sigmas_type: String,
    pub thresholding: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_dynamic_shifting: bool,
    pub shift_terminal: Option<f64>,
    pub solver_p: Option<serde_json::Value>,
}

impl Default for UniPcConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            predict_x0: true,
            solver_type: "bh2".into(),
            lower_order_final: true,
            disable_corrector: vec![],
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: "zero".into(),
            thresholding: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_dynamic_shifting: false,
            shift_terminal: None,
            solver_p: None,
        }
    }
}

pub struct UniPcMultistepScheduler {
    config: UniPcConfig,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    step_index: usize,
    /// Converted model outputs (x0 predictions) of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Tensor>,
    /// The sample the last predictor started from (the corrector revisits it).
    last_sample: Option<Tensor>,
    /// The order used by the last predictor step.
    this_order: usize,
    lower_order_nums: usize,
}

/// λ = ln α − ln σ for the flow parameterisation α = 1 − σ.
fn lambda(sigma: f32) -> f32 {
    (1.0 - sigma).ln() - sigma.ln()
}

/// Solves the small dense system `a · x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let factor = a[row][col] / a[col][col];
            let pivot_row = a[col].clone();
            for (x, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *x -= factor * p;
            }
            b[row] -= factor * b[col];
        }
    }
    let mut x = vec![0f32; n];
    for row in (0..n).rev() {
        let tail: f32 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    x
}

/// The B(h) coefficients shared by predictor and corrector: h·φ1, B(h), and the right-hand side b.
struct Coefficients {
    h_phi_1: f32,
    b_h: f32,
    rhs: Vec<f32>,
}

impl UniPcMultistepScheduler {
    pub fn new(config: UniPcConfig) -> Result<Self> {
        if !config.use_flow_sigmas || !matches!(config.prediction_type.as_str(), "flow_prediction" | "sample")
        {
            bail!(
                "UniPCMultistepScheduler: only use_flow_sigmas=true with prediction_type \"flow_prediction\" \
                 or \"sample\" is supported"
            );
        }
        let unsupported = [
            (!config.predict_x0, "predict_x0=false"),
            (config.thresholding, "thresholding"),
            (config.use_karras_sigmas, "use_karras_sigmas"),
            (config.use_exponential_sigmas, "use_exponential_sigmas"),
            (config.use_beta_sigmas, "use_beta_sigmas"),
            (config.use_dynamic_shifting, "use_dynamic_shifting"),
            (config.shift_terminal.is_some(), "shift_terminal"),
            (config.solver_p.as_ref().is_some_and(|v| !v.is_null()), "solver_p"),
        ];
        if let Some((_, key)) = unsupported.iter().find(|(on, _)| *on) {
            bail!("UniPCMultistepScheduler option `{key}` is not supported");
        }
        if !matches!(config.solver_type.as_str(), "bh1" | "bh2") {
            bail!("UniPCMultistepScheduler: solver_type `{}` is not one of bh1, bh2", config.solver_type);
        }
        if !matches!(config.final_sigmas_type.as_str(), "zero" | "sigma_min") {
            bail!(
                "UniPCMultistepScheduler: final_sigmas_type `{}` is not one of zero, sigma_min",
                config.final_sigmas_type
            );
        }
        if !(1..=3).contains(&config.solver_order) {
            bail!("UniPCMultistepScheduler: solver_order must be 1, 2 or 3");
        }
        Ok(Self {
            config,
            timesteps: vec![],
            sigmas: vec![],
            step_index: 0,
            model_outputs: vec![],
            last_sample: None,
            this_order: 1,
            lower_order_nums: 0,
        })
    }

    fn coefficients(&self, h: f32, order: usize) -> Coefficients {
        let hh = -h; // x0 prediction
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.config.solver_type == "bh1" { hh } else { hh.exp_m1() };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1f32;
        let mut rhs = Vec::with_capacity(order);
        for i in 1..=order {
            rhs.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Coefficients { h_phi_1, b_h, rhs }
    }

    /// The history terms D1_k = (m_{k} − m0)/r_k and their ratios r_k, going back from step `base`.
    fn history(&self, base: usize, order: usize, h: f32) -> Result<(Vec<f32>, Vec<Tensor>)> {
        let m0 = &self.model_outputs[self.model_outputs.len() - 1];
        let lambda_s0 = lambda(self.sigmas[base]);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..order {
            let mi = &self.model_outputs[self.model_outputs.len() - 1 - i];
            let rk = (lambda(self.sigmas[base - i]) - lambda_s0) / h;
            // A true division, as torch divides by the 0-dim r_k (not a multiplication by 1/r_k).
            d1s.push((mi - m0)?.broadcast_div(&Tensor::new(rk, m0.device())?)?);
            rks.push(rk);
        }
        Ok((rks, d1s))
    }

    /// Σ_k ρ_k·D1_k.
    fn weighted(rhos: &[f32], d1s: &[Tensor]) -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (rho, d1) in rhos.iter().zip(d1s) {
            let term = d1.affine(*rho as f64, 0.0)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        Ok(acc)
    }

    fn vandermonde(rks: &[f32], size: usize) -> Vec<Vec<f32>> {
        (0..size).map(|i| rks.iter().take(size).map(|r| r.powi(i as i32)).collect()).collect()
    }

    /// UniP: from `sample` at step i to step i + 1.
    fn predict(&self, sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.step_index;
        let (sigma_t, sigma_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let alpha_t = 1.0 - sigma_t;
        let h = lambda(sigma_t) - lambda(sigma_s0);
        let (mut rks, d1s) = self.history(i, order, h)?;
        rks.push(1.0);
        let c = self.coefficients(h, order);
        let m0 = &self.model_outputs[self.model_outputs.len() - 1];
        let x_t = (sample.affine((sigma_t / sigma_s0) as f64, 0.0)?
            - m0.affine((alpha_t * c.h_phi_1) as f64, 0.0)?)?;
        if d1s.is_empty() {
            return Ok(x_t);
        }
        let rhos = if order == 2 {
            vec![0.5]
        } else {
            solve(Self::vandermonde(&rks, order - 1), c.rhs[..order - 1].to_vec())
        };
        let res = Self::weighted(&rhos, &d1s)?.expect("order > 1 has history");
        Ok((x_t - res.affine((alpha_t * c.b_h) as f64, 0.0)?)?)
    }

    /// UniC: corrects `this_sample` (the predictor's result at step i) using the new model output.
    fn correct(&self, this_model_output: &Tensor, last_sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.step_index;
        let (sigma_t, sigma_s0) = (self.sigmas[i], self.sigmas[i - 1]);
        let alpha_t = 1.0 - sigma_t;
        let h = lambda(sigma_t) - lambda(sigma_s0);
        let (mut rks, d1s) = self.history(i - 1, order, h)?;
        rks.push(1.0);
        let c = self.coefficients(h, order);
        let rhos = if order == 1 { vec![0.5] } else { solve(Self::vandermonde(&rks, order), c.rhs.clone()) };
        let m0 = &self.model_outputs[self.model_outputs.len() - 1];
        let x_t = (last_sample.affine((sigma_t / sigma_s0) as f64, 0.0)?
            - m0.affine((alpha_t * c.h_phi_1) as f64, 0.0)?)?;
        let d1_t = (this_model_output - m0)?;
        let (rho_last, rho_hist) = rhos.split_last().expect("at least one coefficient");
        let mut res = d1_t.affine(*rho_last as f64, 0.0)?;
        if let Some(hist) = Self::weighted(rho_hist, &d1s)? {
            res = (hist + res)?;
        }
        Ok((x_t - res.affine((alpha_t * c.b_h) as f64, 0.0)?)?)
    }
}

impl Scheduler for UniPcMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 {
            bail!("the number of steps must be at least 1");
        }
        let n = self.config.num_train_timesteps as f64;
        // In f64 as numpy does; σ[0] is nudged below 1 so that ln(1 − σ) stays finite.
        let mut sigmas: Vec<f64> = linspace(1.0, 1.0 / n, num_inference_steps + 1)[..num_inference_steps]
            .iter()
            .map(|&s| shift_sigma(self.config.flow_shift, s))
            .collect();
        if (sigmas[0] - 1.0).abs() < 1e-6 {
            sigmas[0] -= 1e-6;
        }
        // Timesteps are cast to int64 (truncation) and reach the model as those integers.
        self.timesteps = sigmas.iter().map(|s| (s * n) as i64 as f32).collect();
        let last = if self.config.final_sigmas_type == "zero" { 0.0 } else { sigmas[sigmas.len() - 1] };
        self.sigmas = sigmas.iter().map(|&s| s as f32).collect();
        self.sigmas.push(last as f32);
        self.step_index = 0;
        self.model_outputs.clear();
        self.last_sample = None;
        self.this_order = 1;
        self.lower_order_nums = 0;
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
        if i >= self.timesteps.len() {
            bail!("scheduler stepped past its last timestep");
        }
        // Flow prediction → x0 = x − σ·v; a sample prediction is x0.
        let x0 = if self.config.prediction_type == "sample" {
            model_output.clone()
        } else {
            (sample - model_output.affine(self.sigmas[i] as f64, 0.0)?)?
        };
        let use_corrector = i > 0 && !self.config.disable_corrector.contains(&(i - 1));
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.correct(&x0, last, self.this_order)?,
            _ => sample.clone(),
        };
        if self.model_outputs.len() == self.config.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(x0);
        let order = if self.config.lower_order_final {
            self.config.solver_order.min(self.timesteps.len() - i)
        } else {
            self.config.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predict(&sample, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.config.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev)
    }
}
