//! y = x·Wᵀ + b as one matmul into an output that starts as the bias rows, for `x (…, in)` and
//! PyTorch's `W (out, in)` or its transpose `(in, out)`. Backward: dx = g·W, dW = gᵀ·x (or
//! dWᵀ = xᵀ·g), db = Σ_rows g, each one matmul or one pass (candle's route reduces the bias
//! gradient through a generic broadcast reduction).

use super::{as_slice, matmul, with_slice};
use super::{ParamOp, WithParams};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use gemm::Parallelism;

/// How a linear layer's weight is stored.
#[derive(Clone, Copy)]
pub enum WeightLayout {
    /// `(out, in)`, as PyTorch stores it.
    OutIn,
    /// `(in, out)`: gemm's faster operand layout (output features contiguous).
    InOut,
}

impl WeightLayout {
    /// (out, in) of a weight of this layout.
    fn dims(self, shape: &Shape) -> candle_core::Result<(usize, usize)> {
        let (a, b) = shape.dims2()?;
        Ok(match self {
            Self::OutIn => (a, b),
            Self::InOut => (b, a),
        })
    }

    /// Strides (row, column) of the weight read as Wᵀ `(in, out)`.
    fn transposed_strides(self, in_dim: usize, out_dim: usize) -> (isize, isize) {
        match self {
            Self::OutIn => (1, in_dim as isize),
            Self::InOut => (out_dim as isize, 1),
        }
    }
}

/// `x (…, in)` · Wᵀ [+ `bias (out,)`] on the CPU, f32, for a weight W of the given layout.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    let (out_dim, in_dim) = layout.dims(weight.shape())?;
    if x.dim(candle_core::D::Minus1)? != in_dim {
        bail!("linear: input {:?} for weight {:?}", x.dims(), weight.dims());
    }
    let x = x.contiguous()?;
    let w = weight.contiguous()?;
    Ok(match bias {
        Some(b) if b.dims() == [out_dim] => x.apply_op3(&w, &b.contiguous()?, WithParams(Linear(layout)))?,
        Some(b) => bail!("linear: bias {:?} for weight {:?}", b.dims(), weight.dims()),
        None => x.apply_op2(&w, WithParams(Linear(layout)))?,
    })
}

struct Linear(WeightLayout);

fn parallelism() -> Parallelism {
    match super::num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `dst (m × n) = lhs (m × k)·rhs (k × n) [+ dst]` over slices, threaded; strides (row, column).
fn matmul_slices(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    (lhs, lhs_strides): (&[f32], (isize, isize)),
    (rhs, rhs_strides): (&[f32], (isize, isize)),
) {
    debug_assert!(dst.len() >= dims.0 * dims.1);
    let dst_strides = (dims.1 as isize, 1);
    // SAFETY: the callers' strides address m·k elements of lhs and k·n of rhs (checked shapes).
    unsafe {
        matmul(
            dims,
            dst.as_mut_ptr(),
            dst_strides,
            accumulate,
            lhs.as_ptr(),
            lhs_strides,
            rhs.as_ptr(),
            rhs_strides,
            1.0,
            parallelism(),
        )
    }
}

impl ParamOp for Linear {
    const NAMES: [&'static str; 2] = ["linear", "linear-bias"];

    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out_dim, in_dim) = self.0.dims(w.1.shape())?;
        let (xs, ws) = (as_slice(x.0, x.1)?, as_slice(w.0, w.1)?);
        let rows = xs.len() / in_dim;
        let mut out = match bias {
            Some((s, l)) => as_slice(s, l)?.repeat(rows),
            None => vec![0f32; rows * out_dim],
        };
        matmul_slices(
            (rows, out_dim, in_dim),
            &mut out,
            bias.is_some(),
            (xs, (in_dim as isize, 1)),
            (ws, self.0.transposed_strides(in_dim, out_dim)),
        );
        let mut dims = x.1.shape().dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = out_dim;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    /// (dx, dW, db).
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (out_dim, in_dim) = self.0.dims(w.shape())?;
        let rows = x.elem_count() / in_dim;
        let (wt_rows, wt_cols) = self.0.transposed_strides(in_dim, out_dim);
        let (dx, dw, db) = with_slice(x, |xs| {
            with_slice(w, |ws| {
                with_slice(grad, |g| {
                    let mut dx = vec![0f32; rows * in_dim];
                    matmul_slices(
                        (rows, in_dim, out_dim),
                        &mut dx,
                        false,
                        (g, (out_dim as isize, 1)),
                        (ws, (wt_cols, wt_rows)), // W (out, in)
                    );
                    let mut dw = vec![0f32; out_dim * in_dim];
                    match self.0 {
                        WeightLayout::OutIn => matmul_slices(
                            (out_dim, in_dim, rows),
                            &mut dw,
                            false,
                            (g, (1, out_dim as isize)),
                            (xs, (in_dim as isize, 1)),
                        ),
                        WeightLayout::InOut => matmul_slices(
                            (in_dim, out_dim, rows),
                            &mut dw,
                            false,
                            (xs, (1, in_dim as isize)),
                            (g, (out_dim as isize, 1)),
                        ),
                    }
                    let mut db = vec![0f32; out_dim];
                    for row in g.chunks_exact(out_dim) {
                        db.iter_mut().zip(row).for_each(|(d, &v)| *d += v);
                    }
                    (dx, dw, db)
                })
            })
        })???;
        let dev = x.device();
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(dw, w.shape(), dev)?,
            Tensor::from_vec(db, out_dim, dev)?,
        ))
    }
}
