//! 2-D convolution with a backward pass built from forward convolutions and one matmul.
//!
//! candle differentiates `conv2d` through `conv_transpose2d`, whose CPU kernel is a scalar loop
//! (a dot product over the input channels per output pixel): with the VAE's few channels it was
//! most of a training step. Here the input gradient is a stride-1 convolution of the (dilated)
//! output gradient with the flipped, transposed kernel, and the kernel gradient is one
//! im2col matmul, both on candle's fast paths. Inference never pays for it: the custom op is
//! only inserted when autograd tracks the inputs, and only on the CPU.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use candle_nn::init::{DEFAULT_KAIMING_UNIFORM, ZERO};
use candle_nn::VarBuilder;

/// `(B, C, H, W)` ⊛ `(O, C, kh, kw)` with symmetric zero `padding` and `stride`.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    // Other devices keep candle's conv2d and its backward (their conv_transpose2d is not the
    // scalar loop).
    if !crate::kernels::fused(x) {
        return Ok(x.conv2d(weight, padding, stride, 1, 1)?);
    }
    let y = crate::kernels::conv3d::conv2d(&x.detach(), &weight.detach(), None, padding, stride)?;
    if !(x.track_op() || weight.track_op()) {
        return Ok(y);
    }
    Ok(x.apply_op3(weight, &y, Conv2dGrad { padding, stride })?)
}

/// A conv2d layer: `weight [out, in, k, k]`, `bias [out]`, as PyTorch's `nn.Conv2d` stores them.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_channels, in_channels, kernel, kernel),
            "weight",
            DEFAULT_KAIMING_UNIFORM,
        )?;
        let bias = vb.get_with_hints(out_channels, "bias", ZERO)?;
        Ok(Self { weight, bias, padding, stride })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d(x, &self.weight, self.padding, self.stride)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?)
    }
}

/// Passes the precomputed output through; its backward is the point.
struct Conv2dGrad {
    padding: usize,
    stride: usize,
}

impl CustomOp3 for Conv2dGrad {
    fn name(&self) -> &'static str {
        "conv2d-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        y_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // `y` is contiguous from offset 0 (made so above); a copy keeps the op graph honest.
        if !y_layout.is_contiguous() || y_layout.start_offset() != 0 {
            candle_core::bail!("conv2d-grad expects a contiguous output");
        }
        Ok((y.clone(), y_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = (|| -> Result<_> {
            Ok((grad_input(x, weight, grad, self.padding, self.stride)?, grad_weight(x, weight, grad, self)?))
        })()
        .map_err(|e| candle_core::Error::Msg(format!("conv2d backward: {e:#}")))?;
        Ok((Some(grads.0), Some(grads.1), None))
    }
}

/// ∂L/∂x: the output gradient, dilated by the stride, convolved with the kernel turned around.
fn grad_input(x: &Tensor, weight: &Tensor, grad: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let flip = |t: &Tensor, dim: usize, n: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n as u32).rev().collect();
        Ok(t.index_select(&Tensor::new(idx, t.device())?, dim)?)
    };
    let turned = flip(&flip(&weight.transpose(0, 1)?.contiguous()?, 2, kh)?, 3, kw)?; // (C, O, kh, kw)
    let mut g = grad.clone(); // (B, O, Ho, Wo)
    if stride > 1 {
        g = dilate(&dilate(&g, 2, stride)?, 3, stride)?;
    }
    // Pad by k−1−p on each side (a kernel-sized pad less what the forward padded).
    let (ph, pw) = (kh - 1 - padding, kw - 1 - padding);
    let g = g.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
    let gx = crate::kernels::conv3d::conv2d(&g, &turned, None, 0, 1)?; // (B, C, H − r, W − r)
                                                                       // Rows and columns the strided forward never reached get zero gradient.
    let (_, _, gh, gw) = gx.dims4()?;
    Ok(gx.pad_with_zeros(2, 0, h - gh)?.pad_with_zeros(3, 0, w - gw)?)
}

/// Puts `stride − 1` zeros between neighbours along `dim`.
fn dilate(t: &Tensor, dim: usize, stride: usize) -> Result<Tensor> {
    let n = t.dim(dim)?;
    let zeros = t.zeros_like()?;
    let parts: Vec<&Tensor> = std::iter::once(t).chain(std::iter::repeat_n(&zeros, stride - 1)).collect();
    let interleaved = Tensor::stack(&parts, dim + 1)?; // (…, n, stride, …)
    let mut dims = t.dims().to_vec();
    dims[dim] = n * stride;
    Ok(interleaved.reshape(dims)?.narrow(dim, 0, (n - 1) * stride + 1)?)
}

/// ∂L/∂W = Σ over batch and positions of grad ⊗ the input patch (im2col in bands, one matmul
/// each: [`crate::kernels::conv3d::conv2d_grad_weight`]).
fn grad_weight(x: &Tensor, weight: &Tensor, grad: &Tensor, op: &Conv2dGrad) -> Result<Tensor> {
    use crate::kernels::{conv3d::Patches, with_slice};
    let (o, c, kh, kw) = weight.dims4()?;
    let (b, xc, h, w) = x.dims4()?;
    let (_, _, _, w_out) = grad.dims4()?;
    let patches = Patches { h, w, kh, kw, pad: (op.padding, op.padding), stride: op.stride, w_out };
    let dw = with_slice(x, |xs| {
        with_slice(grad, |g| crate::kernels::conv3d::conv2d_grad_weight(xs, [b, xc, h, w], g, o, patches))
    })??;
    Ok(Tensor::from_vec(dw, (o, c, kh, kw), x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// conv2d(x, w) and the gradients of Σ (conv2d(x, w) ⊙ r) match candle's own conv2d and its backward.
    fn check(c: usize, o: usize, k: usize, padding: usize, stride: usize, hw: (usize, usize)) -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&crate::noise::randn(1, &[2, c, hw.0, hw.1], &dev)?)?;
        let w = Var::from_tensor(&crate::noise::randn(2, &[o, c, k, k], &dev)?)?;
        let ours = conv2d(&x, &w, padding, stride)?;
        let theirs = x.conv2d(&w, padding, stride, 1, 1)?;
        assert_eq!(ours.dims(), theirs.dims());
        let forward_err = (&ours - &theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(forward_err < 1e-4, "forward: k {k} p {padding} s {stride}: {forward_err}");
        let r = crate::noise::randn(3, ours.dims(), &dev)?;
        let g_ours = (ours * &r)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &r)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("w", &w)] {
            let (a, b) = (g_ours.get(v).expect("grad"), g_theirs.get(v).expect("grad"));
            let err = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(err <= 1e-4 * scale.max(1.0), "{name}: k {k} p {padding} s {stride}: {err} (of {scale})");
        }
        Ok(())
    }

    #[test]
    fn backward_matches_candles_conv_transpose_route() -> Result<()> {
        check(3, 4, 3, 1, 1, (6, 7))?; // the VAE's 3×3 convs
        check(5, 2, 1, 0, 1, (4, 5))?; // 1×1 shortcuts and projections
        check(3, 3, 3, 0, 2, (9, 9))?; // the downsampler, odd size: every row reached
        check(3, 3, 3, 0, 2, (8, 10))?; // even size: the last row is never reached
        Ok(())
    }

    #[test]
    fn inference_skips_the_custom_op() -> Result<()> {
        let dev = Device::Cpu;
        let x = crate::noise::randn(1, &[1, 2, 5, 5], &dev)?;
        let w = crate::noise::randn(2, &[3, 2, 3, 3], &dev)?;
        assert!(!conv2d(&x, &w, 1, 1)?.track_op());
        Ok(())
    }
}
