//! 3-D (and 2-D) convolution forward, and the kernel gradient of the 2-D convolution training
//! folds the 3-D one into. Forward: spatial stride s, temporal stride s_t, symmetric zero
//! padding in height and width applied on the fly: per (sample, output frame, band of output
//! rows), the band's input patches are gathered into one column matrix (never a padded copy of the
//! clip, never the whole clip's columns) and multiplied by the `(O, C·kt·kh·kw)` kernel matrix
//! straight into the output, which starts as the bias. Bands are spread over the threads.

use super::{as_slice, matmul, SharedMut};
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
    let op = Conv3d { stride_t, stride: 1, pad };
    Ok(x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)?)
}

/// How patches are taken from `h × w` planes: kernel `kh × kw`, zero padding, stride, and the
/// output width.
#[derive(Clone, Copy)]
pub(crate) struct Patches {
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub pad: (usize, usize),
    pub stride: usize,
    pub w_out: usize,
}

/// im2col for output rows `[first_row, first_row + rows)`: `cols[(plane, i, j)][(r, xo)]` =
/// plane[(first_row + r)·s + i − ph][xo·s + j − pw], zero outside the plane.
pub(crate) fn gather<'a>(
    planes: impl Iterator<Item = &'a [f32]>,
    d: Patches,
    first_row: usize,
    rows: usize,
    cols: &mut [f32],
) {
    let n = rows * d.w_out;
    let (ph, pw, s) = (d.pad.0 as isize, d.pad.1 as isize, d.stride as isize);
    for (p, src) in planes.enumerate() {
        for i in 0..d.kh {
            for j in 0..d.kw {
                let col = &mut cols[((p * d.kh + i) * d.kw + j) * n..][..n];
                for r in 0..rows {
                    let dst = &mut col[r * d.w_out..][..d.w_out];
                    let y = (first_row + r) as isize * s + i as isize - ph;
                    if y < 0 || y >= d.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src_row = &src[y as usize * d.w..][..d.w];
                    for (xo, v) in dst.iter_mut().enumerate() {
                        let x = xo as isize * s + j as isize - pw;
                        *v = if x >= 0 && x < d.w as isize { src_row[x as usize] } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// ∂L/∂W of a 2-D convolution: `x (N, C, H, W)`, output gradient `g (N, O, Ho, Wo)`, kernel
/// `kh × kw`, symmetric `padding`, `stride`; returns `(O, C·kh·kw)`. Per (sample, band of output
/// rows), the band's patches go into a reused column buffer and one matmul adds g·colsᵀ into the
/// thread's partial sum (no whole-batch column matrix, no fresh pages each call).
pub(crate) fn conv2d_grad_weight(x: &[f32], xd: [usize; 4], g: &[f32], o: usize, d: Patches) -> Vec<f32> {
    let [nb, c, h, w] = xd;
    let h_out = (h + 2 * d.pad.0 - d.kh) / d.stride + 1;
    let k = c * d.kh * d.kw;
    let band = (BAND_ELEMENTS / (k * d.w_out)).clamp(1, h_out);
    let bands = h_out.div_ceil(band);
    (0..nb * bands)
        .into_par_iter()
        .fold(
            || (vec![0f32; o * k], vec![0f32; k * band * d.w_out]),
            |(mut dw, mut cols), task| {
                let (sample, first_row) = (task / bands, (task % bands) * band);
                let rows = band.min(h_out - first_row);
                let n = rows * d.w_out;
                let planes = (0..c).map(|ci| &x[(sample * c + ci) * h * w..][..h * w]);
                gather(planes, d, first_row, rows, &mut cols);
                let gp = &g[sample * o * h_out * d.w_out + first_row * d.w_out..];
                // SAFETY: g rows of this band: o·(Ho·Wo) + n ≤ the sample's gradient; cols is k × n.
                unsafe {
                    let g_strides = ((h_out * d.w_out) as isize, 1);
                    // g (O × n) · colsᵀ (n × K): colsᵀ's element (p, kk) is cols[kk·n + p].
                    let (gp, cp) = (gp.as_ptr(), cols.as_ptr());
                    matmul(
                        (o, k, n),
                        dw.as_mut_ptr(),
                        (k as isize, 1),
                        true,
                        gp,
                        g_strides,
                        cp,
                        (1, n as isize),
                        1.0,
                        Parallelism::None,
                    );
                }
                (dw, cols)
            },
        )
        .map(|(dw, _)| dw)
        .reduce(
            || vec![0f32; o * k],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// `x (B, C, H, W)` ⊛ `weight (O, C, kh, kw)` [+ `bias`], symmetric zero `padding`, `stride`:
/// the same kernel with one frame (no backward; [`crate::models::layers::conv2d`] adds it).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c || stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
        bail!("conv2d: input {:?}, weight {:?}, padding {padding}, stride {stride}", x.dims(), weight.dims());
    }
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(o, x.dtype(), x.device())?;
            &zeros
        }
    };
    let op = Conv3d { stride_t: 1, stride, pad: (padding, padding) };
    let y = x.reshape((b, c, 1, h, w))?.contiguous()?.apply_op3_no_bwd(
        &weight.reshape((o, c, 1, kh, kw))?.contiguous()?,
        &bias.contiguous()?,
        &op,
    )?;
    Ok(y.squeeze(2)?)
}

struct Conv3d {
    stride_t: usize,
    /// Spatial stride (height and width).
    stride: usize,
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
        let ss = self.stride;
        let (t_out, h_out, w_out) =
            ((t - kt) / self.stride_t + 1, (h + 2 * ph - kh) / ss + 1, (wi + 2 * pw - kw) / ss + 1);
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
                // Planes in (ci, a) order: input channel ci at frame frame·s + a.
                let planes = (0..c * kt).map(|p| {
                    let (ci, a) = (p / kt, p % kt);
                    &x[((sample * c + ci) * t + frame * self.stride_t + a) * h * wi..][..h * wi]
                });
                let frame_dims = Patches { h, w: wi, kh, kw, pad: (ph, pw), stride: ss, w_out };
                gather(planes, frame_dims, first_row, rows, cols);
                // SAFETY: this task alone writes rows [first_row, first_row + rows) of output frame
                // `frame` of `sample`, for every output channel.
                unsafe {
                    let base = { dst }.0.add((sample * o * t_out + frame) * plane + first_row * w_out);
                    let channel_stride = (t_out * plane) as isize;
                    for (oc, &bv) in bias.iter().enumerate() {
                        std::slice::from_raw_parts_mut(base.offset(oc as isize * channel_stride), n).fill(bv);
                    }
                    let (wp, cp) = (w.as_ptr(), cols.as_ptr());
                    matmul(
                        (o, n, k),
                        base,
                        (channel_stride, 1),
                        true,
                        wp,
                        (k as isize, 1),
                        cp,
                        (n as isize, 1),
                        1.0,
                        Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, o, t_out, h_out, w_out))))
    }
}
