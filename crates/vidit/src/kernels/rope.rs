//! Rotary position embedding on interleaved pairs, in one pass: for each token's angles θ,
//! (x₀, x₁) → (x₀·cos θ − x₁·sin θ, x₀·sin θ + x₁·cos θ). The backward pass is the rotation by −θ.

use super::{as_slice, rows_per_task, with_slice};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rotates contiguous f32 `x (B, L, H, D)` by the per-token angles given as `cos`, `sin` `(L, D/2)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)?)
}

struct Rope;

/// Rotates every `(L, H, D)` sample of `x` by `sign`·θ.
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], dims: (usize, usize, usize), sign: f32) -> Vec<f32> {
    let (l, h, d) = dims;
    let half = d / 2;
    let mut out = vec![0f32; x.len()];
    let token = h * d;
    let tokens = rows_per_task(x.len() / token, token, 16 * 1024);
    out.par_chunks_mut(tokens * token).zip(x.par_chunks(tokens * token)).enumerate().for_each(
        |(c, (o, x))| {
            for (i, (o, x)) in o.chunks_exact_mut(token).zip(x.chunks_exact(token)).enumerate() {
                let pos = (c * tokens + i) % l; // token index within its sample
                let (cos, sin) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    for j in 0..half {
                        let (x0, x1) = (x[2 * j], x[2 * j + 1]);
                        let (c, s) = (cos[j], sign * sin[j]);
                        o[2 * j] = x0 * c - x1 * s;
                        o[2 * j + 1] = x0 * s + x1 * c;
                    }
                }
            }
        },
    );
    out
}

fn dims(shape: &Shape) -> candle_core::Result<(usize, usize, usize)> {
    let (_, l, h, d) = shape.dims4()?;
    if d % 2 != 0 {
        candle_core::bail!("rope: head dimension {d} is odd");
    }
    Ok((l, h, d))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (l, h, d) = dims(xl.shape())?;
        if cl.shape().dims() != [l, d / 2] || sl.shape().dims() != [l, d / 2] {
            candle_core::bail!("rope: angles {:?} for {:?}", cl.shape(), xl.shape());
        }
        let out = rotate(as_slice(xs, xl)?, as_slice(cs, cl)?, as_slice(ss, sl)?, (l, h, d), 1.0);
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = dims(x.shape())?;
        let dx = with_slice(grad, |g| with_slice(cos, |c| with_slice(sin, |s| rotate(g, c, s, d, -1.0))))???;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), None, None))
    }
}
