//! 3-D (and 2-D) convolution forward, and the kernel gradient of the 2-D convolution training
//! folds the 3-D one into. Forward: spatial stride s, temporal stride s_t, symmetric zero
//! padding in height and width and the causal frames in front in time (zeros, then the previous
//! chunk's cached frames) applied on the fly: per (sample, output frame, band of output rows),
//! the band's input patches are gathered from wherever each frame lives into one column matrix
//! (never a padded or concatenated copy of the clip, never the whole clip's columns) and
//! multiplied by the `(O, C·kt·kh·kw)` kernel matrix straight into the output, which starts as the
//! bias. Bands are spread over the threads.

use super::{as_slice, matmul, SharedMut};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Columns of one band, in elements (about 1 MB).
const BAND_ELEMENTS: usize = 256 * 1024;

/// The frames a causal convolution sees in front of its input: `zeros` frames of zeros, then the
/// `cache` frames `(B, C, Tc, H, W)` (the end of the previous chunk).
#[derive(Clone, Copy)]
pub struct Front<'a> {
    pub zeros: usize,
    pub cache: Option<&'a Tensor>,
}

/// `[front.zeros zero frames, front.cache, x (B, C, T, H, W)]` along time ⊛
/// `weight (O, C, kt, kh, kw)` + `bias (O,)`, `pad = (ph, pw)` zeros around each frame.
pub fn conv3d(
    x: &Tensor,
    front: Front,
    weight: &Tensor,
    bias: &Tensor,
    stride_t: usize,
    pad: (usize, usize),
) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    let (o, wc, kt, _, _) = weight.dims5()?;
    let cache = front.cache.map(|cache| cache.contiguous()).transpose()?;
    let cached = match &cache {
        Some(cache) => match cache.dims5()? {
            (cb, cc, tc, ch, cw) if (cb, cc, ch, cw) == (b, c, h, w) => tc,
            _ => bail!("conv3d: cache {:?} does not match input {:?}", cache.dims(), x.dims()),
        },
        None => 0,
    };
    if wc != c || bias.dims() != [o] || front.zeros + cached + t < kt || stride_t == 0 {
        bail!(
            "conv3d: input {:?} after {} + {cached} frames, weight {:?}, bias {:?}, stride {stride_t}",
            x.dims(),
            front.zeros,
            weight.dims(),
            bias.dims()
        );
    }
    let op = Conv3d { stride_t, stride: 1, pad, front_zeros: front.zeros, cache };
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
    let op = Conv3d { stride_t: 1, stride, pad: (padding, padding), front_zeros: 0, cache: None };
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
    /// Zero frames in front of the cache.
    front_zeros: usize,
    /// Contiguous frames in front of the input, `(B, C, Tc, H, W)`.
    cache: Option<Tensor>,
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
        let cache_storage = self.cache.as_ref().map(|cache| cache.storage_and_layout());
        let (cache, cached) = match &cache_storage {
            Some((storage, layout)) => match &**storage {
                Storage::Cpu(cpu) => (as_slice(cpu, layout)?, layout.shape().dims()[2]),
                _ => candle_core::bail!("conv3d: the cache is not on the CPU"),
            },
            None => (&[][..], 0),
        };
        let (zeros, front) = (vec![0f32; h * wi], self.front_zeros);
        // Input frame `tv` of the virtual clip [zeros, cache, x] for channel `ci` of `sample`.
        let frame = |sample: usize, ci: usize, tv: usize| -> &[f32] {
            let (offset, frames, src) = match tv {
                _ if tv < front => return &zeros,
                _ if tv < front + cached => (tv - front, cached, cache),
                _ => (tv - front - cached, t, x),
            };
            &src[((sample * c + ci) * frames + offset) * h * wi..][..h * wi]
        };
        let t_in = front + cached + t;
        let (ph, pw) = self.pad;
        if h + 2 * ph < kh || wi + 2 * pw < kw || t_in < kt {
            candle_core::bail!("conv3d: kernel {kt}x{kh}x{kw} larger than the padded clip");
        }
        let ss = self.stride;
        let (t_out, h_out, w_out) =
            ((t_in - kt) / self.stride_t + 1, (h + 2 * ph - kh) / ss + 1, (wi + 2 * pw - kw) / ss + 1);
        let k = c * kt * kh * kw;
        let band = (BAND_ELEMENTS / (k * w_out)).clamp(1, h_out);
        let bands = h_out.div_ceil(band);
        let plane = h_out * w_out; // one output frame of one channel
        let mut out = vec![0f32; b * o * t_out * plane];
        let dst = SharedMut(out.as_mut_ptr());
        (0..b * t_out * bands).into_par_iter().for_each_init(
            || vec![0f32; k * band * w_out],
            |cols, task| {
                let (sample, out_frame, band_index) =
                    (task / (t_out * bands), (task / bands) % t_out, task % bands);
                let first_row = band_index * band;
                let rows = band.min(h_out - first_row);
                let n = rows * w_out;
                // Planes in (ci, a) order: input channel ci at virtual frame out_frame·s_t + a.
                let planes = (0..c * kt).map(|p| frame(sample, p / kt, out_frame * self.stride_t + p % kt));
                let frame_dims = Patches { h, w: wi, kh, kw, pad: (ph, pw), stride: ss, w_out };
                gather(planes, frame_dims, first_row, rows, cols);
                // SAFETY: this task alone writes rows [first_row, first_row + rows) of output frame
                // `out_frame` of `sample`, for every output channel.
                unsafe {
                    let base = { dst }.0.add((sample * o * t_out + out_frame) * plane + first_row * w_out);
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
