//! Scaled dot-product attention, tiled over query blocks: per (sample, head, block of queries)
//! the block's scores against all keys, their softmax and the weighted sum of values, so memory is
//! one block × keys per task (never queries × keys), and the tasks are spread over the threads.
//! Tensors stay token-major `(B, L, H, D)`, as the projections produce them: no transposes.
//!
//! The backward pass recomputes each block's probabilities P and, with δ = rowsum(dO ∘ O):
//! dV = Σ Pᵀ·dO, dS = P ∘ (dO·Vᵀ − δ), dQ = scale·dS·K, dK = scale·Σ dSᵀ·Q.

use super::{as_slice, matmul, with_slice, SharedMut};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Queries per task.
const BLOCK: usize = 64;

/// softmax(scale·q·kᵀ)·v for contiguous f32 `q (B, Lq, H, D)`, `k`, `v (B, Lk, H, D)` on the CPU;
/// returns `(B, Lq, H, D)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _, h, d) = q.dims4()?;
    let (bk, lk, hk, dk) = k.dims4()?;
    if (bk, hk, dk) != (b, h, d) || v.dims() != k.dims() {
        bail!("attention: q {:?}, k {:?}, v {:?} do not fit", q.dims(), k.dims(), v.dims());
    }
    if lk == 0 {
        bail!("attention: no keys");
    }
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { scale: scale as f32 })?)
}

struct Attention {
    scale: f32,
}

/// Sizes and strides of one call; rows of every tensor are `H·D` apart.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    lq: usize,
    lk: usize,
    h: usize,
    d: usize,
}

impl Dims {
    fn row(&self) -> isize {
        (self.h * self.d) as isize
    }
    /// Offset of (sample, token, head) in a `(B, L, H, D)` tensor with `l` tokens.
    fn at(&self, l: usize, sample: usize, token: usize, head: usize) -> usize {
        ((sample * l + token) * self.h + head) * self.d
    }
}

/// Scores of `rows` queries starting at `q` against all keys, softmaxed in place into `p`
/// (`rows × lk`, normalised).
unsafe fn probabilities(dims: Dims, scale: f32, q: *const f32, k: *const f32, rows: usize, p: &mut [f32]) {
    let (lk, row) = (dims.lk, dims.row());
    // S = scale · Q·Kᵀ: Kᵀ's element (i, j) is k[j·row + i].
    matmul(
        (rows, lk, dims.d),
        p.as_mut_ptr(),
        (lk as isize, 1),
        false,
        q,
        (row, 1),
        k,
        (1, row),
        scale,
        Parallelism::None,
    );
    p.chunks_exact_mut(lk).for_each(softmax);
}

super::multiversion! {
    /// Softmax of one row of scores, in place.
    fn softmax(scores: &mut [f32]) {
        let max = super::max(scores);
        scores.iter_mut().for_each(|s| *s = super::exp(*s - max));
        let inv = 1.0 / super::sum(scores);
        scores.iter_mut().for_each(|s| *s *= inv);
    }
}

impl Attention {
    fn forward(&self, dims: Dims, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let Dims { b, lq, lk, h, d } = dims;
        let mut out = vec![0f32; b * lq * h * d];
        let dst = SharedMut(out.as_mut_ptr());
        let blocks = lq.div_ceil(BLOCK);
        (0..b * h * blocks).into_par_iter().for_each_init(
            || vec![0f32; BLOCK * lk],
            |p, task| {
                let (sample, head, block) = (task / (h * blocks), (task / blocks) % h, task % blocks);
                let first = block * BLOCK;
                let rows = BLOCK.min(lq - first);
                let p = &mut p[..rows * lk];
                // SAFETY: offsets stay inside the (B, L, H, D) buffers; each task writes only its
                // own (sample, head, query block) rows of `out`.
                unsafe {
                    probabilities(
                        dims,
                        self.scale,
                        q.as_ptr().add(dims.at(lq, sample, first, head)),
                        k.as_ptr().add(dims.at(lk, sample, 0, head)),
                        rows,
                        p,
                    );
                    let o = { dst }.0.add(dims.at(lq, sample, first, head));
                    let vp = v.as_ptr().add(dims.at(lk, sample, 0, head));
                    matmul(
                        (rows, d, lk),
                        o,
                        (dims.row(), 1),
                        false,
                        p.as_ptr(),
                        (lk as isize, 1),
                        vp,
                        (dims.row(), 1),
                        1.0,
                        Parallelism::None,
                    );
                }
            },
        );
        out
    }

    /// (dq, dk, dv) given the output `o` and its gradient `g`.
    fn backward(&self, dims: Dims, q: &[f32], k: &[f32], v: &[f32], o: &[f32], g: &[f32]) -> [Vec<f32>; 3] {
        let Dims { b, lq, lk, h, d } = dims;
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        let (dq_p, dk_p, dv_p) =
            (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        let row = dims.row();
        // dK and dV sum over all query blocks: one task per (sample, head), blocks in sequence.
        (0..b * h).into_par_iter().for_each_init(
            || (vec![0f32; BLOCK * lk], vec![0f32; BLOCK * lk]),
            |(p, dp), task| {
                let (sample, head) = (task / h, task % h);
                let kv = dims.at(lk, sample, 0, head);
                for (block, first) in (0..lq).step_by(BLOCK).enumerate() {
                    let rows = BLOCK.min(lq - first);
                    let (p, dp) = (&mut p[..rows * lk], &mut dp[..rows * lk]);
                    let at = dims.at(lq, sample, first, head);
                    // SAFETY: as in `forward`; this task alone writes (sample, head) of dq, dk, dv.
                    unsafe {
                        let (qp, gp) = (q.as_ptr().add(at), g.as_ptr().add(at));
                        let (kp, vp) = (k.as_ptr().add(kv), v.as_ptr().add(kv));
                        probabilities(dims, self.scale, qp, kp, rows, p);
                        let lkr = lk as isize;
                        // dV += Pᵀ·dO
                        matmul(
                            (lk, d, rows),
                            { dv_p }.0.add(kv),
                            (row, 1),
                            block > 0,
                            p.as_ptr(),
                            (1, lkr),
                            gp,
                            (row, 1),
                            1.0,
                            Parallelism::None,
                        );
                        // dP = dO·Vᵀ
                        matmul(
                            (rows, lk, d),
                            dp.as_mut_ptr(),
                            (lkr, 1),
                            false,
                            gp,
                            (row, 1),
                            vp,
                            (1, row),
                            1.0,
                            Parallelism::None,
                        );
                        // dS = P ∘ (dP − δ), δ_i = dO_i · O_i
                        for i in 0..rows {
                            let (gi, oi) = (&g[at + i * h * d..][..d], &o[at + i * h * d..][..d]);
                            let delta = super::dot(gi, oi);
                            let (pi, dpi) = (&p[i * lk..][..lk], &mut dp[i * lk..][..lk]);
                            dpi.iter_mut().zip(pi).for_each(|(ds, &pij)| *ds = pij * (*ds - delta));
                        }
                        // dQ = scale·dS·K
                        matmul(
                            (rows, d, lk),
                            { dq_p }.0.add(at),
                            (row, 1),
                            false,
                            dp.as_ptr(),
                            (lkr, 1),
                            kp,
                            (row, 1),
                            self.scale,
                            Parallelism::None,
                        );
                        // dK += scale·dSᵀ·Q
                        matmul(
                            (lk, d, rows),
                            { dk_p }.0.add(kv),
                            (row, 1),
                            block > 0,
                            dp.as_ptr(),
                            (1, lkr),
                            qp,
                            (row, 1),
                            self.scale,
                            Parallelism::None,
                        );
                    }
                }
            },
        );
        [dq, dk, dv]
    }
}

fn dims_of(q: &Shape, k: &Shape) -> candle_core::Result<Dims> {
    let (b, lq, h, d) = q.dims4()?;
    let (_, lk, _, _) = k.dims4()?;
    Ok(Dims { b, lq, lk, h, d })
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = dims_of(ql.shape(), kl.shape())?;
        let out = self.forward(dims, as_slice(qs, ql)?, as_slice(ks, kl)?, as_slice(vs, vl)?);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = dims_of(q.shape(), k.shape())?;
        let [dq, dk, dv] = with_slice(q, |qs| {
            with_slice(k, |ks| {
                with_slice(v, |vs| {
                    with_slice(out, |os| with_slice(grad, |gs| self.backward(dims, qs, ks, vs, os, gs)))
                })
            })
        })?????;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
