//! Building blocks shared by the models.

pub mod attention;
pub mod conv2d;
pub mod conv3d;
pub mod norm;

use crate::kernels::linear::WeightLayout;
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::{Module, VarBuilder};

/// A linear layer over checkpoint weights `[out, in]`, as PyTorch stores them. Frozen f32 weights
/// on the CPU (inference) are stored transposed instead, `[in, out]`, once at load: gemm runs
/// 15-40% faster with the output features contiguous (`examples/linear_layouts.rs`), and the
/// copy replaces the original, so memory stays the same. Trained weights (candle `Var`s, updated
/// in place) stay as they are.
pub struct Linear {
    weight: Tensor,
    layout: WeightLayout,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(layer: candle_nn::Linear) -> Result<Self> {
        let (weight, bias) = (layer.weight().clone(), layer.bias().cloned());
        Ok(match crate::kernels::fused(&weight) && !weight.is_variable() {
            true => Self { weight: weight.t()?.contiguous()?, layout: WeightLayout::InOut, bias },
            false => Self { weight, layout: WeightLayout::OutIn, bias },
        })
    }
}

/// A `Linear` with bias.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(candle_nn::linear(in_dim, out_dim, vb)?)
}

/// A `Linear` without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(candle_nn::linear_no_bias(in_dim, out_dim, vb)?)
}

/// Applies a linear layer to a tensor of any rank ≥ 2 (the last dimension is the feature axis):
/// the fused kernel on the CPU, candle's `Linear` elsewhere.
pub fn apply(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    if crate::kernels::fused(x) {
        return crate::kernels::linear::linear(x, &layer.weight, layer.bias.as_ref(), layer.layout);
    }
    let weight = match layer.layout {
        WeightLayout::OutIn => layer.weight.clone(),
        WeightLayout::InOut => layer.weight.t()?,
    };
    Ok(candle_nn::Linear::new(weight, layer.bias.clone()).forward(x)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use anyhow::Result;
    use candle_core::{Device, Tensor, Var};

    /// `fused` and `reference` agree on random inputs, forward and in the gradient of every input
    /// (each `inputs[i]` is scaled, as a variable, by `scales[i]`).
    pub fn fused_matches(
        shapes: &[&[usize]],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
        tolerance: f32,
    ) -> Result<()> {
        let inputs: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Var::from_tensor(&crate::noise::randn(10 + i as u64, s, &Device::Cpu)?).map_err(Into::into)
            })
            .collect::<Result<_>>()?;
        let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&tensors)?, reference(&tensors)?);
        assert_eq!(a.dims(), b.dims());
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        let err = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= tolerance * scale, "forward differs by {err} (of {scale})");
        let r = crate::noise::randn(99, a.dims(), &Device::Cpu)?;
        let (ga, gb) = ((a * &r)?.sum_all()?.backward()?, (b * &r)?.sum_all()?.backward()?);
        for (i, t) in tensors.iter().enumerate() {
            let (da, db) = (ga.get(t).expect("fused gradient"), gb.get(t).expect("reference gradient"));
            let scale = db.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let err = (da - db)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= tolerance * scale, "gradient of input {i} differs by {err} (of {scale})");
        }
        Ok(())
    }

    #[test]
    fn fused_linear_matches_candle() -> Result<()> {
        use super::WeightLayout;
        use candle_nn::Module;
        fused_matches(
            &[&[2, 7, 24], &[40, 24], &[40]],
            |t| crate::kernels::linear::linear(&t[0], &t[1], Some(&t[2]), WeightLayout::OutIn),
            |t| Ok(candle_nn::Linear::new(t[1].clone(), Some(t[2].clone())).forward(&t[0])?),
            1e-5,
        )?;
        fused_matches(
            &[&[9, 16], &[5, 16]],
            |t| crate::kernels::linear::linear(&t[0], &t[1], None, WeightLayout::OutIn),
            |t| Ok(candle_nn::Linear::new(t[1].clone(), None).forward(&t[0])?),
            1e-5,
        )?;
        // The transposed copy of frozen weights, with its gradients (through the transpose).
        fused_matches(
            &[&[3, 6, 24], &[40, 24], &[40]],
            |t| {
                crate::kernels::linear::linear(
                    &t[0],
                    &t[1].t()?.contiguous()?,
                    Some(&t[2]),
                    WeightLayout::InOut,
                )
            },
            |t| Ok(candle_nn::Linear::new(t[1].clone(), Some(t[2].clone())).forward(&t[0])?),
            1e-5,
        )
    }
}
