//! `AutoencoderKLWan` (Wan 2.1 VAE): a causal 3-D convolutional autoencoder compressing video 8× in
//! space and 4× in time. Encoding runs the first frame alone and then chunks of 4 frames; decoding
//! runs one latent frame at a time. A feature cache carries the last 2 frames of every causal
//! convolution's input across chunks, so memory does not grow with the clip's length.

use super::layers::attention::sdpa;
use super::layers::conv2d::Conv2d;
use super::layers::conv3d::CausalConv3d;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// How many trailing frames each causal convolution keeps for the next chunk.
const CACHE_T: usize = 2;

/// `vae/config.json`, with diffusers' defaults (the Wan 2.1 VAE).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct WanVaeConfig {
    pub base_dim: usize,
    pub decoder_base_dim: Option<usize>,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_scales: Vec<f64>,
    pub temperal_downsample: Vec<bool>,
    pub dropout: f64,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    pub is_residual: bool,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch_size: Option<usize>,
    pub scale_factor_temporal: Option<usize>,
    pub scale_factor_spatial: Option<usize>,
}

impl Default for WanVaeConfig {
    fn default() -> Self {
        Self {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            dropout: 0.0,
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
            ],
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
            scale_factor_temporal: Some(4),
            scale_factor_spatial: Some(8),
        }
    }
}

impl WanVaeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.is_residual || self.patch_size.is_some() {
            bail!("the Wan 2.2 VAE variant (is_residual / patch_size) is not supported");
        }
        if self.dim_mult.is_empty() || self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            bail!("key `temperal_downsample` must have one entry fewer than `dim_mult`");
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            bail!("keys `latents_mean` and `latents_std` must have z_dim ({}) entries", self.z_dim);
        }
        // The pipeline sizes latents by these keys; the network's compression is fixed by the stages.
        let spatial = 1 << self.temperal_downsample.len();
        let temporal = 1 << self.temperal_downsample.iter().filter(|&&t| t).count();
        if self.spatial_factor() != spatial || self.temporal_factor() != temporal {
            bail!(
                "keys `scale_factor_spatial` {} / `scale_factor_temporal` {} do not match the {spatial}x / \
                 {temporal}x compression that `temperal_downsample` builds",
                self.spatial_factor(),
                self.temporal_factor()
            );
        }
        Ok(())
    }

    pub fn temporal_factor(&self) -> usize {
        self.scale_factor_temporal.unwrap_or(4)
    }

    pub fn spatial_factor(&self) -> usize {
        self.scale_factor_spatial.unwrap_or(8)
    }
}

/// One cache slot per causal convolution, visited in a fixed order; the cursor restarts every chunk.
#[derive(Default)]
struct FeatureCache {
    slots: Vec<Slot>,
    cursor: usize,
}

#[derive(Clone)]
enum Slot {
    Empty,
    /// The temporal upsampler saw its first chunk and skipped its time convolution.
    Repeat,
    Frames(Tensor),
}

impl FeatureCache {
    fn next(&mut self) -> usize {
        if self.cursor == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.cursor += 1;
        self.cursor - 1
    }

    fn frames(&self, idx: usize) -> Option<&Tensor> {
        match &self.slots[idx] {
            Slot::Frames(t) => Some(t),
            _ => None,
        }
    }

    /// The last `CACHE_T` frames of `x`; a 1-frame chunk borrows the previous cache's last frame.
    fn tail_of(&self, idx: usize, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(2)?;
        let tail = x.narrow(2, t.saturating_sub(CACHE_T), t.min(CACHE_T))?;
        if tail.dim(2)? < CACHE_T {
            if let Some(prev) = self.frames(idx) {
                let last = prev.narrow(2, prev.dim(2)? - 1, 1)?;
                return Ok(Tensor::cat(&[&last, &tail], 2)?);
            }
        }
        Ok(tail)
    }
}

/// Runs a causal conv with the cache: stores this chunk's tail, feeds the previous one.
fn cached_conv(conv: &CausalConv3d, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
    let idx = cache.next();
    let tail = cache.tail_of(idx, x)?;
    let y = conv.forward(x, cache.frames(idx))?;
    cache.slots[idx] = Slot::Frames(tail);
    Ok(y)
}

/// L2-normalise over channels, times √C and a learned gain (`gamma`); no bias in Wan 2.1.
#[derive(Debug, Clone)]
struct RmsNormChannels {
    gamma: Tensor,
    scale: f64,
}

impl RmsNormChannels {
    /// `rank` is the rank of the input (5 for video, 4 for per-frame images): gamma is `(C, 1, …)`.
    fn new(dim: usize, rank: usize, vb: VarBuilder) -> Result<Self> {
        let shape: Vec<usize> = std::iter::once(dim).chain(std::iter::repeat_n(1, rank - 2)).collect();
        let gamma = vb.get_with_hints(shape, "gamma", candle_nn::Init::Const(1.0))?.unsqueeze(0)?;
        Ok(Self { gamma, scale: (dim as f64).sqrt() })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // F.normalize: x / max(‖x‖₂, 1e-12) along the channel axis.
        let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
        let normed = x.broadcast_div(&norm)?;
        Ok(normed.affine(self.scale, 0.0)?.broadcast_mul(&self.gamma)?)
    }
}

/// Applies a per-frame 2-D op to `(B, C, T, H, W)`.
fn per_frame(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    let frames = x.permute((0, 2, 1, 3, 4))?.reshape((b * t, c, h, w))?; // (B·T, C, H, W)
    let y = f(&frames)?;
    let (_, c2, h2, w2) = y.dims4()?;
    Ok(y.reshape((b, t, c2, h2, w2))?.permute((0, 2, 1, 3, 4))?.contiguous()?)
}

struct ResidualBlock {
    norm1: RmsNormChannels,
    conv1: CausalConv3d,
    norm2: RmsNormChannels,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: RmsNormChannels::new(in_dim, 5, vb.pp("norm1"))?,
            conv1: CausalConv3d::new(in_dim, out_dim, (3, 3, 3), 1, (1, 1, 1), vb.pp("conv1"))?,
            norm2: RmsNormChannels::new(out_dim, 5, vb.pp("norm2"))?,
            conv2: CausalConv3d::new(out_dim, out_dim, (3, 3, 3), 1, (1, 1, 1), vb.pp("conv2"))?,
            shortcut: if in_dim != out_dim {
                Some(CausalConv3d::new(in_dim, out_dim, (1, 1, 1), 1, (0, 0, 0), vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let residual = match &self.shortcut {
            Some(conv) => conv.forward(x, None)?,
            None => x.clone(),
        };
        let h = self.norm1.forward(x)?.silu()?;
        let h = cached_conv(&self.conv1, &h, cache)?;
        let h = self.norm2.forward(&h)?.silu()?; // dropout is 0 at inference
        let h = cached_conv(&self.conv2, &h, cache)?;
        Ok((h + residual)?)
    }
}

/// Single-head self-attention within each frame (mid blocks).
struct AttentionBlock {
    norm: RmsNormChannels,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl AttentionBlock {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: RmsNormChannels::new(dim, 4, vb.pp("norm"))?,
            to_qkv: Conv2d::new(dim, dim * 3, 1, 0, 1, vb.pp("to_qkv"))?,
            proj: Conv2d::new(dim, dim, 1, 0, 1, vb.pp("proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let attended = per_frame(x, |frames| {
            let (n, c, h, w) = frames.dims4()?;
            let qkv = self.to_qkv.forward(&self.norm.forward(frames)?)?; // (N, 3C, H, W)
            let qkv = qkv.reshape((n, 1, 3 * c, h * w))?.transpose(2, 3)?; // (N, 1, HW, 3C)
            let q = qkv.narrow(D::Minus1, 0, c)?;
            let k = qkv.narrow(D::Minus1, c, c)?;
            let v = qkv.narrow(D::Minus1, 2 * c, c)?;
            let out = sdpa(&q, &k, &v, 1.0 / (c as f64).sqrt(), None)?; // (N, 1, HW, C)
            let out = out.squeeze(1)?.transpose(1, 2)?.reshape((n, c, h, w))?;
            self.proj.forward(&out)
        })?;
        Ok((attended + x)?)
    }
}

struct MidBlock {
    res0: ResidualBlock,
    attn: AttentionBlock,
    res1: ResidualBlock,
}

impl MidBlock {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            res0: ResidualBlock::new(dim, dim, vb.pp("resnets.0"))?,
            attn: AttentionBlock::new(dim, vb.pp("attentions.0"))?,
            res1: ResidualBlock::new(dim, dim, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let x = self.res0.forward(x, cache)?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x, cache)
    }
}

enum ResampleMode {
    Up2d,
    Up3d(CausalConv3d),
    Down2d,
    Down3d(CausalConv3d),
}

/// Spatial (and optionally temporal) up- or down-sampling.
struct Resample {
    mode: ResampleMode,
    conv: Conv2d,
}

impl Resample {
    fn upsample(dim: usize, temporal: bool, vb: VarBuilder) -> Result<Self> {
        let conv = Conv2d::new(dim, dim / 2, 3, 1, 1, vb.pp("resample.1"))?;
        let mode = if temporal {
            ResampleMode::Up3d(CausalConv3d::new(dim, dim * 2, (3, 1, 1), 1, (1, 0, 0), vb.pp("time_conv"))?)
        } else {
            ResampleMode::Up2d
        };
        Ok(Self { mode, conv })
    }

    fn downsample(dim: usize, temporal: bool, vb: VarBuilder) -> Result<Self> {
        let conv = Conv2d::new(dim, dim, 3, 0, 2, vb.pp("resample.1"))?;
        let mode = if temporal {
            ResampleMode::Down3d(CausalConv3d::new(dim, dim, (3, 1, 1), 2, (0, 0, 0), vb.pp("time_conv"))?)
        } else {
            ResampleMode::Down2d
        };
        Ok(Self { mode, conv })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let mut x = x.clone();
        if let ResampleMode::Up3d(time_conv) = &self.mode {
            let idx = cache.next();
            match cache.slots[idx].clone() {
                // First chunk: no temporal upsampling (1 latent frame → 1 frame).
                Slot::Empty => cache.slots[idx] = Slot::Repeat,
                // Later chunks (after `Repeat`, the conv's own zero padding stands in for the cache;
                // diffusers prepends explicit zeros to a 1-frame tail there, which is the same).
                _ => {
                    let tail = cache.tail_of(idx, &x)?;
                    let (b, c, t, h, w) = x.dims5()?;
                    let y = time_conv.forward(&x, cache.frames(idx))?; // (B, 2C, T, H, W)
                    cache.slots[idx] = Slot::Frames(tail);
                    // The two channel halves are frames 2t and 2t + 1.
                    x = y.reshape((b, 2, c, t, h, w))?.permute((0, 2, 3, 1, 4, 5))?.reshape((
                        b,
                        c,
                        t * 2,
                        h,
                        w,
                    ))?;
                }
            }
        }
        x = per_frame(&x, |frames| {
            let frames = match self.mode {
                ResampleMode::Up2d | ResampleMode::Up3d(_) => {
                    let (_, _, h, w) = frames.dims4()?;
                    frames.upsample_nearest2d(h * 2, w * 2)?
                }
                // ZeroPad2d((0, 1, 0, 1)): one column on the right, one row at the bottom.
                ResampleMode::Down2d | ResampleMode::Down3d(_) => {
                    frames.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?
                }
            };
            self.conv.forward(&frames)
        })?;
        if let ResampleMode::Down3d(time_conv) = &self.mode {
            let idx = cache.next();
            match cache.frames(idx).cloned() {
                None => cache.slots[idx] = Slot::Frames(x.clone()),
                Some(prev) => {
                    let t = x.dim(2)?;
                    let last_prev = prev.narrow(2, prev.dim(2)? - 1, 1)?;
                    let tail = x.narrow(2, t - 1, 1)?;
                    x = time_conv.forward(&Tensor::cat(&[&last_prev, &x], 2)?, None)?;
                    cache.slots[idx] = Slot::Frames(tail);
                }
            }
        }
        Ok(x)
    }
}

enum EncoderLayer {
    Residual(ResidualBlock),
    Attention(AttentionBlock),
    Resample(Resample),
}

struct Encoder {
    conv_in: CausalConv3d,
    layers: Vec<EncoderLayer>,
    mid: MidBlock,
    norm_out: RmsNormChannels,
    conv_out: CausalConv3d,
}

impl Encoder {
    fn new(cfg: &WanVaeConfig, vb: VarBuilder) -> Result<Self> {
        let dims: Vec<usize> =
            std::iter::once(1).chain(cfg.dim_mult.iter().copied()).map(|m| m * cfg.base_dim).collect();
        let conv_in = CausalConv3d::new(cfg.in_channels, dims[0], (3, 3, 3), 1, (1, 1, 1), vb.pp("conv_in"))?;
        let mut layers = Vec::new();
        let mut scale = 1.0;
        let blocks = vb.pp("down_blocks");
        for i in 0..cfg.dim_mult.len() {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                layers.push(EncoderLayer::Residual(ResidualBlock::new(
                    in_dim,
                    out_dim,
                    blocks.pp(layers.len()),
                )?));
                if cfg.attn_scales.contains(&scale) {
                    layers.push(EncoderLayer::Attention(AttentionBlock::new(
                        out_dim,
                        blocks.pp(layers.len()),
                    )?));
                }
                in_dim = out_dim;
            }
            if i != cfg.dim_mult.len() - 1 {
                let temporal = cfg.temperal_downsample[i];
                layers.push(EncoderLayer::Resample(Resample::downsample(
                    out_dim,
                    temporal,
                    blocks.pp(layers.len()),
                )?));
                scale /= 2.0;
            }
        }
        let top = *dims.last().expect("dims has entries");
        Ok(Self {
            conv_in,
            layers,
            mid: MidBlock::new(top, vb.pp("mid_block"))?,
            norm_out: RmsNormChannels::new(top, 5, vb.pp("norm_out"))?,
            conv_out: CausalConv3d::new(top, cfg.z_dim * 2, (3, 3, 3), 1, (1, 1, 1), vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let mut x = cached_conv(&self.conv_in, x, cache)?;
        for layer in &self.layers {
            x = match layer {
                EncoderLayer::Residual(block) => block.forward(&x, cache)?,
                EncoderLayer::Attention(block) => block.forward(&x)?,
                EncoderLayer::Resample(block) => block.forward(&x, cache)?,
            };
        }
        let x = self.mid.forward(&x, cache)?;
        let x = self.norm_out.forward(&x)?.silu()?;
        cached_conv(&self.conv_out, &x, cache)
    }
}

struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
}

struct Decoder {
    conv_in: CausalConv3d,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNormChannels,
    conv_out: CausalConv3d,
}

impl Decoder {
    fn new(cfg: &WanVaeConfig, vb: VarBuilder) -> Result<Self> {
        let base = cfg.decoder_base_dim.unwrap_or(cfg.base_dim);
        let top_mult = *cfg.dim_mult.last().expect("validated");
        let dims: Vec<usize> =
            std::iter::once(top_mult).chain(cfg.dim_mult.iter().rev().copied()).map(|m| m * base).collect();
        let temporal_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        for i in 0..cfg.dim_mult.len() {
            // Every upsampler halves the channels, so blocks after the first start at half width.
            let in_dim = if i > 0 { dims[i] / 2 } else { dims[i] };
            let out_dim = dims[i + 1];
            let vb_block = vb.pp("up_blocks").pp(i);
            let resnets = (0..=cfg.num_res_blocks)
                .map(|j| {
                    ResidualBlock::new(
                        if j == 0 { in_dim } else { out_dim },
                        out_dim,
                        vb_block.pp("resnets").pp(j),
                    )
                })
                .collect::<Result<_>>()?;
            let upsampler = if i != cfg.dim_mult.len() - 1 {
                Some(Resample::upsample(out_dim, temporal_up[i], vb_block.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let out = *dims.last().expect("dims has entries");
        Ok(Self {
            conv_in: CausalConv3d::new(cfg.z_dim, dims[0], (3, 3, 3), 1, (1, 1, 1), vb.pp("conv_in"))?,
            mid: MidBlock::new(dims[0], vb.pp("mid_block"))?,
            up_blocks,
            norm_out: RmsNormChannels::new(out, 5, vb.pp("norm_out"))?,
            conv_out: CausalConv3d::new(out, cfg.out_channels, (3, 3, 3), 1, (1, 1, 1), vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let mut x = cached_conv(&self.conv_in, x, cache)?;
        x = self.mid.forward(&x, cache)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x, cache)?;
            }
            if let Some(up) = &block.upsampler {
                x = up.forward(&x, cache)?;
            }
        }
        let x = self.norm_out.forward(&x)?.silu()?;
        cached_conv(&self.conv_out, &x, cache)
    }
}

/// The diagonal Gaussian posterior of an encoded clip.
pub struct Posterior {
    pub mean: Tensor,
    pub logvar: Tensor,
}

pub struct AutoencoderKLWan {
    pub config: WanVaeConfig,
    encoder: Encoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    decoder: Decoder,
}

impl AutoencoderKLWan {
    pub fn new(config: WanVaeConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let z = config.z_dim;
        Ok(Self {
            encoder: Encoder::new(&config, vb.pp("encoder"))?,
            quant_conv: CausalConv3d::new(z * 2, z * 2, (1, 1, 1), 1, (0, 0, 0), vb.pp("quant_conv"))?,
            post_quant_conv: CausalConv3d::new(z, z, (1, 1, 1), 1, (0, 0, 0), vb.pp("post_quant_conv"))?,
            decoder: Decoder::new(&config, vb.pp("decoder"))?,
            config,
        })
    }

    /// Encodes `(B, 3, T, H, W)` pixels in [−1, 1] (T = 1 + 4k) into the latent posterior
    /// `(B, z, 1 + k, H/8, W/8)`: the first frame alone, then chunks of 4 frames.
    pub fn encode(&self, video: &Tensor) -> Result<Posterior> {
        let frames = video.dim(2)?;
        let mut cache = FeatureCache::default();
        let mut chunks = Vec::new();
        for i in 0..1 + (frames - 1) / 4 {
            cache.cursor = 0;
            let (start, len) =
                if i == 0 { (0, 1) } else { (1 + 4 * (i - 1), 4.min(frames - 1 - 4 * (i - 1))) };
            chunks.push(self.encoder.forward(&video.narrow(2, start, len)?, &mut cache)?);
        }
        let h = self.quant_conv.forward(&Tensor::cat(&chunks, 2)?, None)?; // (B, 2z, T', h, w)
        let z = self.config.z_dim;
        Ok(Posterior { mean: h.narrow(1, 0, z)?, logvar: h.narrow(1, z, z)?.clamp(-30f32, 20f32)? })
    }

    /// Decodes latents `(B, z, T', h, w)` one latent frame at a time, handing each chunk of pixels
    /// (`(B, 3, 1 or 4, H, W)`, clamped to [−1, 1]) to `sink` as soon as it is ready.
    pub fn decode_streaming(
        &self,
        latents: &Tensor,
        mut sink: impl FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        self.decode_chunks(latents, |chunk| sink(chunk.clamp(-1f32, 1f32)?))
    }

    fn decode_chunks(&self, latents: &Tensor, mut sink: impl FnMut(Tensor) -> Result<()>) -> Result<()> {
        let x = self.post_quant_conv.forward(latents, None)?;
        let mut cache = FeatureCache::default();
        for i in 0..x.dim(2)? {
            cache.cursor = 0;
            sink(self.decoder.forward(&x.narrow(2, i, 1)?, &mut cache)?)?;
        }
        Ok(())
    }

    /// Decodes latents to pixels `(B, 3, 1 + 4(T' − 1), H, W)` in [−1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_unclamped(latents)?.clamp(-1f32, 1f32).map_err(Into::into)
    }

    /// [`Self::decode`] without the final clamp, whose zero gradient would stall training.
    pub fn decode_unclamped(&self, latents: &Tensor) -> Result<Tensor> {
        let mut chunks = Vec::new();
        self.decode_chunks(latents, |chunk| {
            chunks.push(chunk);
            Ok(())
        })?;
        Ok(Tensor::cat(&chunks, 2)?)
    }

    fn channel_stats(&self, values: &[f64], like: &Tensor) -> Result<Tensor> {
        let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, (1, self.config.z_dim, 1, 1, 1), like.device())?)
    }

    /// Latent normalisation as the Wan pipelines apply it: (z − mean) · (1/std).
    pub fn normalize(&self, z: &Tensor) -> Result<Tensor> {
        let mean = self.channel_stats(&self.config.latents_mean, z)?;
        let inv_std = self.channel_stats(&self.config.latents_std, z)?.recip()?;
        Ok(z.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?)
    }

    /// The inverse, computed as diffusers does: z / (1/std) + mean.
    pub fn denormalize(&self, z: &Tensor) -> Result<Tensor> {
        let mean = self.channel_stats(&self.config.latents_mean, z)?;
        let inv_std = self.channel_stats(&self.config.latents_std, z)?.recip()?;
        Ok(z.broadcast_div(&inv_std)?.broadcast_add(&mean)?)
    }
}
