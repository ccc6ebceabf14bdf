//! adaLN, fused: the timestep's modulation applied straight from its `(B, S, K, dim)` table
//! (K slots: shift, scale, gate, …), without slicing the table (a slice's gradient in candle is a
//! zero-padded copy of the whole table) or broadcasting it to every token.
//!
//! The S rows of a sample cover its L tokens in equal consecutive groups: S = 1 (one timestep a
//! sample), S = frames (a timestep per latent frame) or S = L (per token).
//!
//! - [`modulated_norm`]: LayerNorm(x)·(1 + scale) + shift;
//! - [`gated_add`]: x + y·gate.

use super::norm::{stats, Kind};
use super::{as_slice, rows_per_task, with_slice};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// LayerNorm (no affine) of `x (B, L, dim)` modulated by slots `shift` and `scale` of
/// `modulation (B, S, K, dim)`.
pub fn modulated_norm(
    x: &Tensor,
    modulation: &Tensor,
    shift: usize,
    scale: usize,
    eps: f64,
) -> Result<Tensor> {
    check(x, modulation, &[shift, scale])?;
    Ok(x.contiguous()?
        .apply_op2(&modulation.contiguous()?, ModulatedNorm { shift, scale, eps: eps as f32 })?)
}

/// `x + y·gate` for `x`, `y (B, L, dim)` and slot `gate` of `modulation (B, S, K, dim)`.
pub fn gated_add(x: &Tensor, y: &Tensor, modulation: &Tensor, gate: usize) -> Result<Tensor> {
    check(x, modulation, &[gate])?;
    if x.dims() != y.dims() {
        bail!("gated add: {:?} + {:?}", x.dims(), y.dims());
    }
    Ok(x.contiguous()?.apply_op3(&y.contiguous()?, &modulation.contiguous()?, GatedAdd { gate })?)
}

fn check(x: &Tensor, modulation: &Tensor, slots: &[usize]) -> Result<()> {
    let (b, l, dim) = x.dims3()?;
    let (mb, s, k, md) = modulation.dims4()?;
    if mb != b || md != dim || s == 0 || l % s != 0 || slots.iter().any(|&i| i >= k) {
        bail!("adaLN: modulation {:?} (slots {slots:?}) does not fit {:?}", modulation.dims(), x.dims());
    }
    Ok(())
}

/// Sizes: B samples of L tokens of `dim`, S modulation rows of K slots a sample.
#[derive(Clone, Copy)]
struct Dims {
    l: usize,
    dim: usize,
    s: usize,
    k: usize,
}

impl Dims {
    fn of(x: &Shape, modulation: &Shape) -> candle_core::Result<Self> {
        let (_, l, dim) = x.dims3()?;
        let (_, s, k, _) = modulation.dims4()?;
        Ok(Self { l, dim, s, k })
    }
    /// Tokens per modulation row.
    fn group(&self) -> usize {
        self.l / self.s
    }
    /// Offset of slot `slot` of the modulation row that token `row` (counted over all samples) uses.
    fn slot(&self, row: usize, slot: usize) -> usize {
        let (sample, token) = (row / self.l, row % self.l);
        ((sample * self.s + token / self.group()) * self.k + slot) * self.dim
    }
}

/// Runs `f(group, gradient of its modulation row)` over the B·S token groups in parallel; each
/// group owns its modulation row, so `f` writes that row's gradient without sharing it.
fn per_group(dims: Dims, dmod: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let row = dims.k * dims.dim;
    dmod.par_chunks_mut(row).enumerate().for_each(|(group, dmod_row)| f(group, dmod_row));
}

struct ModulatedNorm {
    shift: usize,
    scale: usize,
    eps: f32,
}

impl CustomOp2 for ModulatedNorm {
    fn name(&self) -> &'static str {
        "modulated-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Dims::of(xl.shape(), ml.shape())?;
        let (x, m) = (as_slice(xs, xl)?, as_slice(ms, ml)?);
        let n = dims.dim;
        let mut out = vec![0f32; x.len()];
        let rows = rows_per_task(x.len() / n, n, 16 * 1024);
        out.par_chunks_mut(rows * n).zip(x.par_chunks(rows * n)).enumerate().for_each(|(c, (out, x))| {
            for (i, (o, x)) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)).enumerate() {
                let r = c * rows + i;
                let (shift, scale) =
                    (&m[dims.slot(r, self.shift)..][..n], &m[dims.slot(r, self.scale)..][..n]);
                let (mean, rstd) = stats(x, Kind::Layer, self.eps);
                for j in 0..n {
                    o[j] = (x[j] - mean) * rstd * (1.0 + scale[j]) + shift[j];
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        modulation: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::of(x.shape(), modulation.shape())?;
        let n = dims.dim;
        let (dx, dmod) = with_slice(x, |x| {
            with_slice(modulation, |m| {
                with_slice(grad, |g| {
                    let mut dx = vec![0f32; x.len()];
                    let mut dmod = vec![0f32; m.len()];
                    let dx_ptr = super::SharedMut(dx.as_mut_ptr());
                    per_group(dims, &mut dmod, |group, dmod_row| {
                        let first = group * dims.group(); // first token row of the group
                        let mut gw = vec![0f32; n];
                        let mut xhat = vec![0f32; n];
                        for r in first..first + dims.group() {
                            let (xr, gr) = (&x[r * n..][..n], &g[r * n..][..n]);
                            let scale = &m[dims.slot(r, self.scale)..][..n];
                            let (mean, rstd) = stats(xr, Kind::Layer, self.eps);
                            for j in 0..n {
                                xhat[j] = (xr[j] - mean) * rstd;
                                gw[j] = gr[j] * (1.0 + scale[j]);
                                dmod_row[self.scale * n + j] += gr[j] * xhat[j];
                                dmod_row[self.shift * n + j] += gr[j];
                            }
                            let mean_gw = super::sum(&gw) / n as f32;
                            let mean_gx = super::dot(&gw, &xhat) / n as f32;
                            // SAFETY: row r belongs to this group alone.
                            let dxr = unsafe { std::slice::from_raw_parts_mut({ dx_ptr }.0.add(r * n), n) };
                            for j in 0..n {
                                dxr[j] = rstd * (gw[j] - mean_gw - xhat[j] * mean_gx);
                            }
                        }
                    });
                    (dx, dmod)
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dmod, modulation.shape(), x.device())?),
        ))
    }
}

struct GatedAdd {
    gate: usize,
}

impl CustomOp3 for GatedAdd {
    fn name(&self) -> &'static str {
        "gated-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Dims::of(xl.shape(), ml.shape())?;
        let (x, y, m) = (as_slice(xs, xl)?, as_slice(ys, yl)?, as_slice(ms, ml)?);
        let n = dims.dim;
        let mut out = x.to_vec();
        let rows = rows_per_task(x.len() / n, n, 16 * 1024);
        out.par_chunks_mut(rows * n).zip(y.par_chunks(rows * n)).enumerate().for_each(|(c, (out, y))| {
            for (i, (o, y)) in out.chunks_exact_mut(n).zip(y.chunks_exact(n)).enumerate() {
                let gate = &m[dims.slot(c * rows + i, self.gate)..][..n];
                o.iter_mut().zip(y).zip(gate).for_each(|((o, &y), &g)| *o += y * g);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        modulation: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::of(x.shape(), modulation.shape())?;
        let n = dims.dim;
        let (dy, dmod) = with_slice(y, |y| {
            with_slice(modulation, |m| {
                with_slice(grad, |g| {
                    let mut dy = vec![0f32; y.len()];
                    let mut dmod = vec![0f32; m.len()];
                    let dy_ptr = super::SharedMut(dy.as_mut_ptr());
                    per_group(dims, &mut dmod, |group, dmod_row| {
                        let first = group * dims.group();
                        for r in first..first + dims.group() {
                            let (yr, gr) = (&y[r * n..][..n], &g[r * n..][..n]);
                            let gate = &m[dims.slot(r, self.gate)..][..n];
                            // SAFETY: row r belongs to this group alone.
                            let dyr = unsafe { std::slice::from_raw_parts_mut({ dy_ptr }.0.add(r * n), n) };
                            for j in 0..n {
                                dyr[j] = gr[j] * gate[j];
                                dmod_row[self.gate * n + j] += gr[j] * yr[j];
                            }
                        }
                    });
                    (dy, dmod)
                })
            })
        })???;
        let dev = x.device();
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(dy, y.shape(), dev)?),
            Some(Tensor::from_vec(dmod, modulation.shape(), dev)?),
        ))
    }
}
