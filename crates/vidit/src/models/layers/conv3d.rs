//! Causal 3-D convolution over `(B, C, T, H, W)`, written over candle's conv2d (candle has no conv3d).
//!
//! All temporal padding goes in front (zeros), so output frame t sees input frames ≤ t only. The
//! `kt` temporal taps are folded into the channel axis, so one conv2d computes every tap at once.

use super::conv2d::conv2d;
use crate::kernels::conv3d::Front;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use candle_nn::init::{DEFAULT_KAIMING_UNIFORM, ZERO};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct CausalConv3d {
    /// `[out, in·kt, kh, kw]`, input channels ordered (c, t) as in the `[out, in, kt, kh, kw]` checkpoint.
    weight: Tensor,
    bias: Tensor,
    kt: usize,
    stride_t: usize,
    /// Frames of zeros put in front: twice the configured temporal padding, as Wan does.
    pad_t: usize,
    pad_h: usize,
    pad_w: usize,
}

impl CausalConv3d {
    /// Loads `weight [out, in, kt, kh, kw]` and `bias [out]`. `padding` is (t, h, w) as in PyTorch's Conv3d.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: (usize, usize, usize),
        stride_t: usize,
        padding: (usize, usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        let (kt, kh, kw) = kernel;
        let weight =
            vb.get_with_hints((out_channels, in_channels, kt, kh, kw), "weight", DEFAULT_KAIMING_UNIFORM)?;
        let weight = weight.reshape((out_channels, in_channels * kt, kh, kw))?;
        let bias = vb.get_with_hints(out_channels, "bias", ZERO)?;
        Ok(Self { weight, bias, kt, stride_t, pad_t: 2 * padding.0, pad_h: padding.1, pad_w: padding.2 })
    }

    /// `cache` holds the last frames of the previous chunk's input; they replace front padding.
    pub fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Result<Tensor> {
        let cache = cache.filter(|_| self.pad_t > 0);
        let pad_front = self.pad_t.saturating_sub(cache.map(|c| c.dim(2)).transpose()?.unwrap_or(0));
        // Inference on the CPU: the direct kernel, which reads the padding and the cache in place.
        // Training keeps the conv2d route (its backward) over a concatenated, padded copy.
        if crate::kernels::fused(x) && !(x.track_op() || self.weight.track_op()) {
            let (o, c, kh, kw) = self.weight.dims4()?;
            let weight = self.weight.reshape((o, c / self.kt, self.kt, kh, kw))?;
            let front = Front { zeros: pad_front, cache };
            return crate::kernels::conv3d::conv3d(
                x,
                front,
                &weight,
                &self.bias,
                self.stride_t,
                (self.pad_h, self.pad_w),
            );
        }
        let mut x = match cache {
            Some(cache) => Tensor::cat(&[cache, x], 2)?,
            None => x.clone(),
        };
        if pad_front > 0 {
            x = x.pad_with_zeros(2, pad_front, 0)?;
        }
        let (b, c, t, h, w) = x.dims5()?;
        if t < self.kt {
            bail!("causal conv3d: {t} frames are fewer than the kernel's {}", self.kt);
        }
        let t_out = (t - self.kt) / self.stride_t + 1;
        // Gather the kt frame taps of every output frame: (B, C, kt, T_out, H, W).
        let taps: Vec<Tensor> = (0..self.kt)
            .map(|k| {
                if self.stride_t == 1 {
                    x.narrow(2, k, t_out)
                } else {
                    let idx: Vec<u32> = (0..t_out).map(|i| (i * self.stride_t + k) as u32).collect();
                    x.index_select(&Tensor::new(idx, x.device())?, 2)
                }
            })
            .collect::<candle_core::Result<_>>()?;
        let stacked = if self.kt == 1 { taps[0].unsqueeze(2)? } else { Tensor::stack(&taps, 2)? };
        let frames = stacked
            .permute((0, 3, 1, 2, 4, 5))? // (B, T_out, C, kt, H, W)
            .reshape((b * t_out, c * self.kt, h, w))?;
        let frames = if self.pad_h == self.pad_w {
            conv2d(&frames, &self.weight, self.pad_h, 1)?
        } else {
            let padded = frames.pad_with_zeros(D::Minus2, self.pad_h, self.pad_h)?.pad_with_zeros(
                D::Minus1,
                self.pad_w,
                self.pad_w,
            )?;
            conv2d(&padded, &self.weight, 0, 1)?
        };
        let (_, o, ho, wo) = frames.dims4()?;
        let y = frames.broadcast_add(&self.bias.reshape((1, o, 1, 1))?)?;
        Ok(y.reshape((b, t_out, o, ho, wo))?.permute((0, 2, 1, 3, 4))?.contiguous()?)
        // (B, O, T_out, H', W')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// A direct 3-D convolution by definition, to check the conv2d folding against.
    fn reference(
        x: &[f32],
        dims: [usize; 4],
        w: &[f32],
        wd: [usize; 5],
        bias: &[f32],
        pad: [usize; 3],
        stride_t: usize,
    ) -> Vec<f32> {
        let [c, t, h, wi] = dims;
        let [o, _, kt, kh, kw] = wd;
        let tp = t + 2 * pad[0];
        let t_out = (tp - kt) / stride_t + 1;
        let (ho, wo) = (h + 2 * pad[1] - kh + 1, wi + 2 * pad[2] - kw + 1);
        let mut out = vec![0f32; o * t_out * ho * wo];
        for oc in 0..o {
            for to in 0..t_out {
                for yo in 0..ho {
                    for xo in 0..wo {
                        let mut acc = bias[oc];
                        for ic in 0..c {
                            for a in 0..kt {
                                for bb in 0..kh {
                                    for cc in 0..kw {
                                        let ti = (to * stride_t + a) as isize - 2 * pad[0] as isize;
                                        let yi = (yo + bb) as isize - pad[1] as isize;
                                        let xi = (xo + cc) as isize - pad[2] as isize;
                                        if ti < 0 || yi < 0 || xi < 0 || yi >= h as isize || xi >= wi as isize
                                        {
                                            continue;
                                        }
                                        let xv =
                                            x[((ic * t + ti as usize) * h + yi as usize) * wi + xi as usize];
                                        let wv = w[(((oc * c + ic) * kt + a) * kh + bb) * kw + cc];
                                        acc += xv * wv;
                                    }
                                }
                            }
                        }
                        out[((oc * t_out + to) * ho + yo) * wo + xo] = acc;
                    }
                }
            }
        }
        out
    }

    fn check(kernel: (usize, usize, usize), stride_t: usize, pad: (usize, usize, usize)) -> Result<()> {
        let dev = Device::Cpu;
        let (c, o, t, h, w) = (3, 4, 5, 6, 7);
        let x = crate::noise::randn(1, &[1, c, t, h, w], &dev)?;
        let weight = crate::noise::randn(2, &[o, c, kernel.0, kernel.1, kernel.2], &dev)?;
        let bias = crate::noise::randn(3, &[o], &dev)?;
        let vb = VarBuilder::from_tensors(
            HashMap::from([("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())]),
            DType::F32,
            &dev,
        );
        let conv = CausalConv3d::new(c, o, kernel, stride_t, pad, vb)?;
        let expected = reference(
            &x.flatten_all()?.to_vec1()?,
            [c, t, h, w],
            &weight.flatten_all()?.to_vec1()?,
            [o, c, kernel.0, kernel.1, kernel.2],
            &bias.to_vec1()?,
            [pad.0, pad.1, pad.2],
            stride_t,
        );
        // The inference kernel, and the differentiable route training takes (a tracked input).
        let tracked = candle_core::Var::from_tensor(&x)?;
        for (route, y) in [("kernel", conv.forward(&x, None)?), ("autograd", conv.forward(&tracked, None)?)] {
            let got = y.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(got.len(), expected.len());
            let err = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "{route}: max error {err}");
        }
        Ok(())
    }

    #[test]
    fn matches_direct_convolution() -> Result<()> {
        check((3, 3, 3), 1, (1, 1, 1))?;
        check((3, 1, 1), 2, (0, 0, 0))?;
        check((3, 1, 1), 1, (1, 0, 0))?;
        check((1, 1, 1), 1, (0, 0, 0))
    }

    #[test]
    fn cache_replaces_front_padding() -> Result<()> {
        // Running a clip in chunks with a cache of its last frames (one frame, then two: the
        // kernel puts one and no zero frames in front) equals running it whole, on both routes.
        let dev = Device::Cpu;
        let vb = VarBuilder::from_tensors(
            HashMap::from([
                ("weight".to_string(), crate::noise::randn(4, &[2, 2, 3, 3, 3], &dev)?),
                ("bias".to_string(), crate::noise::randn(5, &[2], &dev)?),
            ]),
            DType::F32,
            &dev,
        );
        let conv = CausalConv3d::new(2, 2, (3, 3, 3), 1, (1, 1, 1), vb)?;
        let x = crate::noise::randn(6, &[2, 2, 5, 4, 4], &dev)?;
        let tracked = candle_core::Var::from_tensor(&x)?;
        for (route, x) in [("kernel", &x), ("autograd", tracked.as_tensor())] {
            let whole = conv.forward(x, None)?;
            let chunked = Tensor::cat(
                &[
                    conv.forward(&x.narrow(2, 0, 1)?, None)?,
                    conv.forward(&x.narrow(2, 1, 2)?, Some(&x.narrow(2, 0, 1)?))?,
                    conv.forward(&x.narrow(2, 3, 2)?, Some(&x.narrow(2, 1, 2)?))?,
                ],
                2,
            )?;
            let err = (whole - chunked)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "{route}: {err}");
        }
        Ok(())
    }
}
