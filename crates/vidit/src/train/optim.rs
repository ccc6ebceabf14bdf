//! AdamW with decoupled weight decay, global-norm gradient clipping and an EMA of the weights.
//! Written here (not candle's) so that its state can be checkpointed and resumed bit for bit.

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// How the learning rate moves over a run: the factor it is multiplied by at each step.
/// A function of the step alone, so a resumed run follows the same curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    /// Linear warm-up over `warmup` steps, then constant.
    Constant { warmup: usize },
    /// Linear warm-up over `warmup` steps, then a half cosine down to 0 at the last step.
    Cosine { warmup: usize },
}

impl LrSchedule {
    /// The factor for the step taken after `done` steps of a run of `total`.
    pub fn factor(&self, done: usize, total: usize) -> f64 {
        let (Self::Constant { warmup } | Self::Cosine { warmup }) = *self;
        if done < warmup {
            return (done + 1) as f64 / warmup as f64;
        }
        match self {
            Self::Constant { .. } => 1.0,
            Self::Cosine { .. } => {
                let progress = (done - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
            }
        }
    }
}

/// One trainable parameter with its moment estimates.
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

impl Slot {
    /// The AdamW update in one pass over the parameter, its gradient and moments (on the CPU the
    /// dozen tensor ops of the general path cost more than the arithmetic).
    fn update_on_cpu(&mut self, grad: &Tensor, coefs: [f32; 8]) -> Result<()> {
        let [clip, beta1, beta2, bc1, bc2, eps, lr, weight_decay] = coefs;
        let to_vec = |t: &Tensor| crate::kernels::with_slice(t, <[f32]>::to_vec);
        let (mut p, mut m, mut v) = (to_vec(self.var.as_tensor())?, to_vec(&self.m)?, to_vec(&self.v)?);
        crate::kernels::with_slice(grad, |g| {
            for (((p, m), v), &g) in p.iter_mut().zip(&mut m).zip(&mut v).zip(g) {
                let g = g * clip;
                *m = *m * beta1 + g * (1.0 - beta1);
                *v = *v * beta2 + g * g * (1.0 - beta2);
                let update = (*m / bc1) / ((*v / bc2).sqrt() + eps);
                *p = *p * (1.0 - lr * weight_decay) - update * lr;
            }
        })?;
        let (shape, dev) = (self.var.shape().clone(), self.var.device().clone());
        self.m = Tensor::from_vec(m, &shape, &dev)?;
        self.v = Tensor::from_vec(v, &shape, &dev)?;
        self.var.set(&Tensor::from_vec(p, &shape, &dev)?)?;
        Ok(())
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    slots: Vec<Slot>,
    /// Steps taken so far (the bias correction uses it).
    pub step: usize,
}

impl AdamW {
    /// Optimises `vars` (name → variable), in name order so that the state layout is stable.
    pub fn new(vars: &HashMap<String, Var>, config: AdamWConfig) -> Result<Self> {
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let slots = names
            .into_iter()
            .map(|name| {
                let var = vars[name].clone();
                Ok(Slot { name: name.clone(), m: var.zeros_like()?, v: var.zeros_like()?, var })
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, slots, step: 0 })
    }

    /// The global L2 norm of the gradients of all parameters.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0f64;
        for slot in &self.slots {
            if let Some(g) = grads.get(slot.var.as_tensor()) {
                total += if crate::kernels::fused(g) {
                    crate::kernels::with_slice(g, |g| crate::kernels::dot(g, g) as f64)?
                } else {
                    g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?
                };
            }
        }
        Ok(total.sqrt())
    }

    /// One update. Gradients are scaled down so their global norm is at most `max_norm` (if given).
    /// Returns the norm before clipping.
    pub fn step(&mut self, grads: &GradStore, max_norm: Option<f64>) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        if !norm.is_finite() {
            bail!("gradient norm is not finite");
        }
        let clip = match max_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else { continue };
            if crate::kernels::fused(g) {
                let coefs = [clip, beta1, beta2, bc1, bc2, eps, lr, weight_decay].map(|c| c as f32);
                slot.update_on_cpu(g, coefs)?;
                continue;
            }
            let g = g.affine(clip, 0.0)?;
            // Detached: optimiser state must not keep the autograd graph of past steps alive.
            slot.m = ((&slot.m * beta1)? + (&g * (1.0 - beta1))?)?.detach();
            slot.v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?.detach();
            let update = (&slot.m / bc1)?.div(&((&slot.v / bc2)?.sqrt()? + eps)?)?;
            let decayed = (slot.var.as_tensor() * (1.0 - lr * weight_decay))?;
            slot.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(norm)
    }

    /// The optimiser state as named tensors (`m.NAME`, `v.NAME`), for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for slot in &self.slots {
            out.insert(format!("m.{}", slot.name), slot.m.clone());
            out.insert(format!("v.{}", slot.name), slot.v.clone());
        }
        out
    }

    /// Restores [`Self::state`]; every moment must be present with the parameter's shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for slot in &mut self.slots {
            for (prefix, target) in [("m", &mut slot.m), ("v", &mut slot.v)] {
                let key = format!("{prefix}.{}", slot.name);
                let Some(t) = state.get(&key) else { bail!("optimizer state has no `{key}`") };
                if t.dims() != slot.var.dims() {
                    bail!("optimizer state `{key}` has shape {:?}, expected {:?}", t.dims(), slot.var.dims());
                }
                *target = t.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Exponential moving average of parameters: ema ← decay·ema + (1 − decay)·param.
pub struct Ema {
    pub decay: f64,
    pub weights: HashMap<String, Tensor>,
}

impl Ema {
    pub fn new(vars: &HashMap<String, Var>, decay: f64) -> Result<Self> {
        let weights =
            vars.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect::<Result<_>>()?;
        Ok(Self { decay, weights })
    }

    pub fn update(&mut self, vars: &HashMap<String, Var>) -> Result<()> {
        for (name, w) in self.weights.iter_mut() {
            let p = vars[name].as_tensor().detach();
            if crate::kernels::fused(&p) {
                let decay = self.decay as f32;
                let mut ema = crate::kernels::with_slice(w, <[f32]>::to_vec)?;
                crate::kernels::with_slice(&p, |p| {
                    ema.iter_mut().zip(p).for_each(|(e, &p)| *e = *e * decay + p * (1.0 - decay))
                })?;
                *w = Tensor::from_vec(ema, p.shape(), p.device())?;
                continue;
            }
            *w = ((&*w * self.decay)? + (p * (1.0 - self.decay))?)?.detach();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_minimises_a_quadratic_and_clips() -> Result<()> {
        let target = Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu)?;
        let x = Var::zeros(3, candle_core::DType::F32, &Device::Cpu)?;
        let vars = HashMap::from([("x".to_string(), x.clone())]);
        let mut opt = AdamW::new(&vars, AdamWConfig { lr: 0.05, weight_decay: 0.0, ..Default::default() })?;
        let loss0 = (x.as_tensor() - &target)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        for _ in 0..400 {
            let loss = (x.as_tensor() - &target)?.sqr()?.sum_all()?;
            let norm = opt.step(&loss.backward()?, Some(1.0))?;
            assert!(norm.is_finite());
        }
        let loss = (x.as_tensor() - &target)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(loss < 1e-3 * loss0, "loss {loss} from {loss0}");
        // The state holds no autograd graph (that would keep every past step in memory).
        assert!(opt.state().values().all(|t| !t.track_op()));
        let mut ema = Ema::new(&vars, 0.9)?;
        ema.update(&vars)?;
        assert!(ema.weights.values().all(|t| !t.track_op()));
        Ok(())
    }
}

#[test]
fn lr_schedules_warm_up_then_hold_or_decay() {
    let constant = LrSchedule::Constant { warmup: 4 };
    assert_eq!([0, 1, 3, 4, 99].map(|d| constant.factor(d, 100)), [0.25, 0.5, 1.0, 1.0, 1.0]);
    let cosine = LrSchedule::Cosine { warmup: 0 };
    assert_eq!(cosine.factor(0, 100), 1.0);
    assert!((cosine.factor(50, 100) - 0.5).abs() < 1e-12);
    let last = cosine.factor(99, 100);
    assert!(last > 0.0 && last < 1e-3, "the last step still moves: {last}");
    let mut previous = f64::INFINITY;
    for done in 0..100 {
        let f = cosine.factor(done, 100);
        assert!(f <= previous);
        previous = f;
    }
}
