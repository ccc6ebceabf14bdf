//! 3-D convolution forward (inference), spatial stride 1, temporal stride s, symmetric zero
//! padding in height and width applied on the fly: per (sample, output frame, band of output
//! rows), the band's input patches are gathered into one column matrix (never a padded copy of the
//! clip, never the whole clip's columns) and multiplied by the `(O, C·kt·kh·kw)` kernel matrix
//! straight into the output, which starts as the bias. Bands are spread over the threads.

use super::{as_slice, SharedMut};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Columns of one band, in elements (about 1 MB).
const BAND_ELEMENTS: usize = 256 * 1024;

/// `x (B, C, T, H, W)` ⊛ `weight (O, C, kt, kh, kw)` + `bias (O,)`, no temporal padding (the
/// caller puts causal padding in front), `pad = (ph, pw)` zeros around each frame.
pub fn conv3d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride_t: usize,
    pad: (usize, usize),
) -> Result<Tensor> {
    let (_, c, t, _, _) = x.dims5()?;
    let (o, wc, kt, _, _) = weight.dims5()?;
    if wc != c || bias.dims() != [o] || t < kt || stride_t == 0 {
        bail!(
            "conv3d: input {:?}, weight {:?}, bias {:?}, stride {stride_t}",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    let op = Conv3d { stride_t, pad };
    Ok(x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)?)
}

struct Conv3d {
    stride_t: usize,
    pad: (usize, usize),
}

impl CustomOp3 for Conv3d {
    fn name(&self) -> &'static str {
        "conv3d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (as_slice(xs, xl)?, as_slice(ws, wl)?, as_slice(bs, bl)?);
        let (b, c, t, h, wi) = xl.shape().dims5()?;
        let (o, _, kt, kh, kw) = wl.shape().dims5()?;
        let (ph, pw) = self.pad;
        if h + 2 * ph < kh || wi + 2 * pw < kw {
            candle_core::bail!("conv3d: kernel {kh}x{kw} larger than the padded frame");
        }
        let (t_out, h_out, w_out) = ((t - kt) / self.stride_t + 1, h + 2 * ph - kh + 1, wi + 2 * pw - kw + 1);
        let k = c * kt * kh * kw;
        let band = (BAND_ELEMENTS / (k * w_out)).clamp(1, h_out);
        let bands = h_out.div_ceil(band);
        let plane = h_out * w_out; // one output frame of one channel
        let mut out = vec![0f32; b * o * t_out * plane];
        let dst = SharedMut(out.as_mut_ptr());
        (0..b * t_out * bands).into_par_iter().for_each_init(
            || vec![0f32; k * band * w_out],
            |cols, task| {
                let (sample, frame, band_index) =
                    (task / (t_out * bands), (task / bands) % t_out, task % bands);
                let first_row = band_index * band;
                let rows = band.min(h_out - first_row);
                let n = rows * w_out;
                // Gather: cols[(ci, a, i, j)][(r, xo)] = x[sample, ci, frame·s + a, first_row + r + i − ph, xo + j − pw].
                for ci in 0..c {
                    for a in 0..kt {
                        let src =
                            &x[((sample * c + ci) * t + frame * self.stride_t + a) * h * wi..][..h * wi];
                        for i in 0..kh {
                            for j in 0..kw {
                                let row_of_k = ((ci * kt + a) * kh + i) * kw + j;
                                let col = &mut cols[row_of_k * n..][..n];
                                for r in 0..rows {
                                    let dst_row = &mut col[r * w_out..][..w_out];
                                    let y = (first_row + r + i) as isize - ph as isize;
                                    if y < 0 || y >= h as isize {
                                        dst_row.fill(0.0);
                                        continue;
                                    }
                                    let src_row = &src[y as usize * wi..][..wi];
                                    // xo + j − pw in [0, wi): xo in [pw − j, wi + pw − j).
                                    let lo = pw.saturating_sub(j).min(w_out);
                                    let hi = (wi + pw).saturating_sub(j).min(w_out);
                                    dst_row[..lo].fill(0.0);
                                    if hi > lo {
                                        dst_row[lo..hi].copy_from_slice(&src_row[lo + j - pw..hi + j - pw]);
                                    }
                                    dst_row[hi.max(lo)..].fill(0.0);
                                }
                            }
                        }
                    }
                }
                // SAFETY: this task alone writes rows [first_row, first_row + rows) of output frame
                // `frame` of `sample`, for every output channel.
                unsafe {
                    let base = { dst }.0.add((sample * o * t_out + frame) * plane + first_row * w_out);
                    let channel_stride = (t_out * plane) as isize;
                    for (oc, &bv) in bias.iter().enumerate() {
                        std::slice::from_raw_parts_mut(base.offset(oc as isize * channel_stride), n).fill(bv);
                    }
                    gemm::gemm(
                        o,
                        n,
                        k,
                        base,
                        1,
                        channel_stride,
                        true,
                        w.as_ptr(),
                        1,
                        k as isize,
                        cols.as_ptr(),
                        1,
                        n as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, o, t_out, h_out, w_out))))
    }
}
