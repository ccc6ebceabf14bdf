//! LayerNorm and RMSNorm over the last dimension, one pass per row forward and backward, with
//! two-pass statistics as PyTorch computes them.
//!
//! Backward with x̂ the normalised row, r = 1/√(var + ε) and ĝ = g·w (g without a weight):
//! LayerNorm dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)); RMSNorm dx = r·(ĝ − x̂·mean(ĝ·x̂));
//! dw = Σ_rows g·x̂, db = Σ_rows g.

use super::{as_slice, rows_per_task, with_slice};
use super::{ParamOp, WithParams};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// (x − mean) / √(var + ε)
    Layer,
    /// x / √(mean(x²) + ε)
    Rms,
}

/// Normalises the rows of contiguous f32 `x (…, n)` on the CPU; `weight` and `bias` are `(n,)`.
/// RMSNorm takes a weight and no bias.
pub fn norm(
    x: &Tensor,
    kind: Kind,
    eps: f64,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let op = NormOp { kind, eps: eps as f32 };
    let x = x.contiguous()?;
    Ok(match (weight, bias) {
        (None, None) => x.apply_op1(op)?,
        (Some(w), None) => x.apply_op2(&w.contiguous()?, WithParams(op))?,
        (Some(w), Some(b)) => x.apply_op3(&w.contiguous()?, &b.contiguous()?, WithParams(op))?,
        (None, Some(_)) => anyhow::bail!("a norm bias needs a weight"),
    })
}

#[derive(Clone, Copy)]
struct NormOp {
    kind: Kind,
    eps: f32,
}

/// Mean (LayerNorm; 0 for RMSNorm) and 1/√(var + ε) of one row.
#[inline(always)]
pub(crate) fn stats(row: &[f32], kind: Kind, eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = match kind {
        Kind::Layer => super::sum(row) / n,
        Kind::Rms => 0.0,
    };
    let var = match kind {
        Kind::Layer => row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n,
        Kind::Rms => super::dot(row, row) / n,
    };
    (mean, 1.0 / (var + eps).sqrt())
}

impl NormOp {
    fn forward_rows(&self, x: &[f32], weight: Option<&[f32]>, bias: Option<&[f32]>, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        let rows = rows_per_task(x.len() / n, n, 16 * 1024);
        out.par_chunks_mut(rows * n).zip(x.par_chunks(rows * n)).for_each(|(out, x)| {
            for (o, row) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                let (mean, rstd) = stats(row, self.kind, self.eps);
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - mean) * rstd;
                }
                if let Some(w) = weight {
                    o.iter_mut().zip(w).for_each(|(o, &w)| *o *= w);
                }
                if let Some(b) = bias {
                    o.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
                }
            }
        });
        out
    }

    /// (dx, dw, db); dw and db are all zeros when there is no weight / bias.
    fn backward_rows(
        &self,
        x: &[f32],
        g: &[f32],
        weight: Option<&[f32]>,
        n: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut dx = vec![0f32; x.len()];
        let rows = rows_per_task(x.len() / n, n, 16 * 1024);
        let (dw, db) = dx
            .par_chunks_mut(rows * n)
            .zip(x.par_chunks(rows * n))
            .zip(g.par_chunks(rows * n))
            .map(|((dx, x), g)| {
                let mut dw = vec![0f32; n];
                let mut db = vec![0f32; n];
                let mut gw = vec![0f32; n];
                let mut xhat = vec![0f32; n];
                for ((dx, x), g) in dx.chunks_exact_mut(n).zip(x.chunks_exact(n)).zip(g.chunks_exact(n)) {
                    let (mean, rstd) = stats(x, self.kind, self.eps);
                    for i in 0..n {
                        xhat[i] = (x[i] - mean) * rstd;
                        gw[i] = weight.map_or(g[i], |w| g[i] * w[i]);
                        dw[i] += g[i] * xhat[i];
                        db[i] += g[i];
                    }
                    let mean_gw = match self.kind {
                        Kind::Layer => super::sum(&gw) / n as f32,
                        Kind::Rms => 0.0,
                    };
                    let mean_gx = super::dot(&gw, &xhat) / n as f32;
                    for i in 0..n {
                        dx[i] = rstd * (gw[i] - mean_gw - xhat[i] * mean_gx);
                    }
                }
                (dw, db)
            })
            .reduce(
                || (vec![0f32; n], vec![0f32; n]),
                |(mut a, mut b), (c, d)| {
                    a.iter_mut().zip(c).for_each(|(a, c)| *a += c);
                    b.iter_mut().zip(d).for_each(|(b, d)| *b += d);
                    (a, b)
                },
            );
        (dx, dw, db)
    }

    fn fwd(
        &self,
        x: (&CpuStorage, &Layout),
        weight: Option<(&CpuStorage, &Layout)>,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = x.1.shape().clone();
        let n = *shape.dims().last().unwrap_or(&1);
        let xs = as_slice(x.0, x.1)?;
        let w = weight.map(|(s, l)| as_slice(s, l)).transpose()?;
        let b = bias.map(|(s, l)| as_slice(s, l)).transpose()?;
        for p in w.iter().chain(b.iter()) {
            if p.len() != n {
                candle_core::bail!("norm: parameter of {} elements for rows of {n}", p.len());
            }
        }
        Ok((CpuStorage::F32(self.forward_rows(xs, w, b, n)), shape))
    }

    /// Gradients of x, and of the weight and bias when given.
    fn bwd_all(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let n = x.dim(candle_core::D::Minus1)?;
        let w = weight.map(|w| w.flatten_all()?.to_vec1::<f32>()).transpose()?;
        let (dx, dw, db) =
            with_slice(x, |xs| with_slice(grad, |g| self.backward_rows(xs, g, w.as_deref(), n)))??;
        let dev = x.device();
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(dw, n, dev)?,
            Tensor::from_vec(db, n, dev)?,
        ))
    }
}

impl CustomOp1 for NormOp {
    fn name(&self) -> &'static str {
        "norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd((s, l), None, None)
    }
    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.bwd_all(x, None, grad)?.0))
    }
}

impl ParamOp for NormOp {
    const NAMES: [&'static str; 2] = ["norm-weight", "norm-affine"];
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        weight: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd(x, Some(weight), bias)
    }
    fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        self.bwd_all(x, Some(weight), grad)
    }
}
