//! GELU, tanh approximation (PyTorch's `approximate="tanh"`, diffusers' `gelu-approximate`):
//! 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), forward and backward in one pass each.

use super::{as_slice, fused, with_slice};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;
const CHUNK: usize = 16 * 1024;

/// GELU (tanh approximation) of `x`; fused on the CPU, candle's `gelu` elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return Ok(x.gelu()?);
    }
    Ok(x.contiguous()?.apply_op1(Gelu)?)
}

struct Gelu;

#[inline(always)]
fn forward(x: f32) -> f32 {
    0.5 * x * (1.0 + super::tanh(SQRT_2_OVER_PI * (x + CUBIC * x * x * x)))
}

/// d/dx GELU(x) = 0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²).
#[inline(always)]
fn derivative(x: f32) -> f32 {
    let t = super::tanh(SQRT_2_OVER_PI * (x + CUBIC * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x)
}

super::multiversion! {
    fn forward_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = forward(x);
        }
    }
}

super::multiversion! {
    fn backward_chunk(x: &[f32], g: &[f32], out: &mut [f32]) {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
            *o = g * derivative(x);
        }
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = as_slice(storage, layout)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| forward_chunk(x, o));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = with_slice(x, |x| {
            with_slice(grad, |g| {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                    .for_each(|(o, (x, g))| backward_chunk(x, g, o));
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candles_gelu_and_its_gradient() -> Result<()> {
        let x = Var::from_tensor(&(crate::noise::randn(1, &[3, 1000], &Device::Cpu)? * 3.0)?)?;
        let r = crate::noise::randn(2, &[3, 1000], &Device::Cpu)?;
        let ours = gelu(&x)?;
        let theirs = x.gelu()?;
        let err = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "forward {err}");
        let g_ours = (ours * &r)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &r)?.sum_all()?.backward()?;
        let (a, b) = (g_ours.get(&x).expect("grad"), g_theirs.get(&x).expect("grad"));
        let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "backward {err}");
        Ok(())
    }
}
