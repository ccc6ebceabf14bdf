//! `WanTransformer3DModel`: the Wan 2.1 diffusion transformer. Latent video is cut into
//! (1, 2, 2) patches, each a token; blocks of self-attention (3-D RoPE, q/k RMSNorm), cross-attention
//! to the text and a gated feed-forward are modulated by the timestep (adaLN scale/shift/gate).
//! The output is the flow velocity v = ε − x0, shaped like the input latents.
//!
//! Image-to-video checkpoints (Wan 2.1 I2V, `image_dim` set) add an image branch to every
//! cross-attention: CLIP image states, projected by `condition_embedder.image_embedder`, give
//! their own keys and values (`add_k_proj`, `add_v_proj`); the two attention results are summed.

use super::layers::attention::attention;
use super::layers::norm::{gated_add, LayerNorm, RmsNorm};
use super::layers::{apply, linear, Linear};
use crate::kernels::gelu::gelu;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// `transformer/config.json`, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct WanTransformerConfig {
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    pub cross_attn_norm: bool,
    pub qk_norm: Option<String>,
    pub eps: f64,
    pub image_dim: Option<usize>,
    pub added_kv_proj_dim: Option<usize>,
    pub rope_max_seq_len: usize,
    pub pos_embed_seq_len: Option<usize>,
}

impl Default for WanTransformerConfig {
    fn default() -> Self {
        Self {
            patch_size: [1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: 16,
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some("rms_norm_across_heads".into()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        }
    }
}

impl WanTransformerConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Tokens of a latent grid `(F, H, W)`: one per patch.
    pub fn tokens(&self, frames: usize, height: usize, width: usize) -> usize {
        let [pt, ph, pw] = self.patch_size;
        (frames / pt) * (height / ph) * (width / pw)
    }

    /// Multiply-add FLOPs (2 per MAC) of one forward of one sample with `tokens` latent tokens,
    /// the text context ([`WanTransformer3DModel::text_context`]) already computed.
    pub fn forward_flops(&self, tokens: usize, text_tokens: usize) -> f64 {
        let (l, s, d, f) = (tokens as f64, text_tokens as f64, self.inner_dim() as f64, self.ffn_dim as f64);
        let [pt, ph, pw] = self.patch_size;
        let patch = (self.in_channels.max(self.out_channels) * pt * ph * pw) as f64;
        let self_attention = 4.0 * l * d * d + 2.0 * l * l * d; // q, k, v, out; scores and mix
        let cross_attention = 2.0 * l * d * d + 2.0 * l * s * d; // q, out; scores and mix
        let feed_forward = 2.0 * l * d * f;
        let block = 2.0 * (self_attention + cross_attention + feed_forward);
        let time = 2.0 * (self.freq_dim as f64 * d + d * d + 6.0 * d * d); // per timestep row
        2.0 * 2.0 * l * patch * d + self.num_layers as f64 * block + time
    }

    pub fn validate(&self) -> Result<()> {
        if self.image_dim.is_some() != self.added_kv_proj_dim.is_some() {
            bail!("keys `image_dim` and `added_kv_proj_dim` are set together (Wan I2V) or not at all");
        }
        if self.added_kv_proj_dim.is_some_and(|d| d != self.inner_dim()) {
            bail!("key `added_kv_proj_dim` must equal the inner dim {} (heads × head dim)", self.inner_dim());
        }
        if self.pos_embed_seq_len.is_some() && self.image_dim.is_none() {
            bail!("key `pos_embed_seq_len` needs `image_dim`");
        }
        if self.qk_norm.as_deref() != Some("rms_norm_across_heads") {
            bail!("key `qk_norm`: only \"rms_norm_across_heads\" is supported");
        }
        if self.patch_size[0] == 0 || self.patch_size[1] == 0 || self.patch_size[2] == 0 {
            bail!("key `patch_size` must be positive");
        }
        if self.attention_head_dim % 2 != 0 || self.num_attention_heads == 0 {
            bail!("key `attention_head_dim` must be even and `num_attention_heads` positive");
        }
        Ok(())
    }
}

/// adaLN tables start as randn / √dim, as diffusers initialises them.
fn modulation_init(dim: usize) -> candle_nn::Init {
    candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 / (dim as f64).sqrt() }
}

/// 3-D rotary position embedding: the head dimension is split into time/height/width parts
/// (h = w = 2⌊d/6⌋, t = the rest), each a 1-D table over integer positions, built in f64.
pub struct WanRotaryPosEmbed {
    /// Per axis (t, h, w): (cos, sin) of `max_seq_len × part/2` angles, row-major.
    tables: Vec<(Vec<f32>, Vec<f32>)>,
    halves: [usize; 3],
    max_seq_len: usize,
    patch_size: [usize; 3],
    device: Device,
}

impl WanRotaryPosEmbed {
    pub fn new(head_dim: usize, patch_size: [usize; 3], max_seq_len: usize, device: &Device) -> Result<Self> {
        let hw = 2 * (head_dim / 6);
        let parts = [head_dim - 2 * hw, hw, hw];
        let tables = parts
            .iter()
            .map(|&dim| {
                let half = dim / 2;
                let mut cos = Vec::with_capacity(max_seq_len * half);
                let mut sin = Vec::with_capacity(max_seq_len * half);
                for pos in 0..max_seq_len {
                    for j in 0..half {
                        let freq = 1.0 / 10000f64.powf((2 * j) as f64 / dim as f64);
                        let angle = pos as f64 * freq;
                        cos.push(angle.cos() as f32);
                        sin.push(angle.sin() as f32);
                    }
                }
                (cos, sin)
            })
            .collect();
        Ok(Self { tables, halves: parts.map(|p| p / 2), max_seq_len, patch_size, device: device.clone() })
    }

    /// (cos, sin) per token for a latent grid `(F, H, W)`: each `(L, head_dim/2)`, tokens in (f, h, w) order.
    pub fn forward(&self, frames: usize, height: usize, width: usize) -> Result<(Tensor, Tensor)> {
        let grid = [frames / self.patch_size[0], height / self.patch_size[1], width / self.patch_size[2]];
        if grid.iter().any(|&g| g > self.max_seq_len) {
            bail!("latent grid {grid:?} exceeds rope_max_seq_len {}", self.max_seq_len);
        }
        let half: usize = self.halves.iter().sum();
        let tokens = grid[0] * grid[1] * grid[2];
        let (mut cos, mut sin) = (Vec::with_capacity(tokens * half), Vec::with_capacity(tokens * half));
        for f in 0..grid[0] {
            for h in 0..grid[1] {
                for w in 0..grid[2] {
                    for (axis, pos) in [f, h, w].into_iter().enumerate() {
                        let n = self.halves[axis];
                        cos.extend_from_slice(&self.tables[axis].0[pos * n..][..n]);
                        sin.extend_from_slice(&self.tables[axis].1[pos * n..][..n]);
                    }
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (tokens, half), &self.device)?,
            Tensor::from_vec(sin, (tokens, half), &self.device)?,
        ))
    }
}

/// Rotates interleaved pairs of `x (B, L, H, D)` by the per-token angles `(L, D/2)`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::kernels::fused(x) {
        return crate::kernels::rope::rope(x, cos, sin);
    }
    apply_rope_composed(x, cos, sin)
}

fn apply_rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, l, h, d) = x.dims4()?;
    let pairs = x.reshape((b, l, h, d / 2, 2))?;
    let x1 = pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?; // (B, L, H, D/2)
    let x2 = pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let cos = cos.reshape((1, l, 1, d / 2))?;
    let sin = sin.reshape((1, l, 1, d / 2))?;
    let even = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let odd = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
    Ok(Tensor::stack(&[even, odd], D::Minus1)?.reshape((b, l, h, d))?)
}

/// The image branch of an I2V cross-attention: keys (RMS-normed) and values of the image states.
struct AddedKv {
    add_k_proj: Linear,
    add_v_proj: Linear,
    norm_added_k: RmsNorm,
}

/// Attention with q/k RMSNorm across all heads (before the head split), as `WanAttention`.
pub struct WanAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    added: Option<AddedKv>,
    heads: usize,
}

/// Keys and values `(B, S, H, D)` a query attends to.
pub type KeyValues = (Tensor, Tensor);

impl WanAttention {
    fn new(dim: usize, heads: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            added: None,
            to_q: linear(dim, dim, vb.pp("to_q"))?,
            to_k: linear(dim, dim, vb.pp("to_k"))?,
            to_v: linear(dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            norm_q: RmsNorm::new(dim, eps, vb.pp("norm_q"))?,
            norm_k: RmsNorm::new(dim, eps, vb.pp("norm_k"))?,
            heads,
        })
    }

    /// With the image branch (`add_k_proj`, `add_v_proj`, `norm_added_k`) of I2V checkpoints.
    fn with_added_kv(mut self, dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        self.added = Some(AddedKv {
            add_k_proj: linear(dim, dim, vb.pp("add_k_proj"))?,
            add_v_proj: linear(dim, dim, vb.pp("add_v_proj"))?,
            norm_added_k: RmsNorm::new(dim, eps, vb.pp("norm_added_k"))?,
        });
        Ok(self)
    }

    /// The image branch's keys and values of projected image states `(B, S, dim)`.
    fn added_key_values(&self, image: &Tensor) -> Result<KeyValues> {
        let Some(added) = &self.added else { bail!("this attention has no image branch") };
        let k = added.norm_added_k.forward(&apply(&added.add_k_proj, image)?)?;
        Ok((self.split_heads(&k)?, self.split_heads(&apply(&added.add_v_proj, image)?)?))
    }

    /// Projects the keys and values of a context `(B, S, dim)` into `(B, S, H, D)`.
    pub fn key_values(&self, context: &Tensor, rope: Option<&(Tensor, Tensor)>) -> Result<KeyValues> {
        let k = self.norm_k.forward(&apply(&self.to_k, context)?)?;
        let v = apply(&self.to_v, context)?;
        let mut k = self.split_heads(&k)?; // (B, S, H, D)
        if let Some((cos, sin)) = rope {
            k = apply_rope(&k, cos, sin)?;
        }
        Ok((k, self.split_heads(&v)?))
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, dim) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, dim / self.heads))?)
    }

    /// `x (B, L, dim)` attends to the keys/values from [`Self::key_values`]; RoPE on q when given.
    pub fn forward(&self, x: &Tensor, kv: &KeyValues, rope: Option<&(Tensor, Tensor)>) -> Result<Tensor> {
        self.forward_with_image(x, kv, None, rope)
    }

    /// [`Self::forward`], plus the image branch's attention (same queries) added before `to_out`.
    fn forward_with_image(
        &self,
        x: &Tensor,
        kv: &KeyValues,
        image_kv: Option<&KeyValues>,
        rope: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, l, dim) = x.dims3()?;
        let q = self.norm_q.forward(&apply(&self.to_q, x)?)?;
        let mut q = self.split_heads(&q)?; // (B, L, H, D)
        if let Some((cos, sin)) = rope {
            q = apply_rope(&q, cos, sin)?;
        }
        let head_dim = dim / self.heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut out = attention(&q, &kv.0, &kv.1, scale)?; // (B, L, H, D)
        if let Some((k, v)) = image_kv {
            out = (out + attention(&q, k, v, scale)?)?;
        }
        let out = out.reshape((b, l, dim))?;
        apply(&self.to_out, &out)
    }
}

pub struct WanTransformerBlock {
    norm1: LayerNorm,
    attn1: WanAttention,
    norm2: Option<LayerNorm>,
    attn2: WanAttention,
    norm3: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    /// `(1, 6, dim)`: shift, scale, gate (attention) and shift, scale, gate (feed-forward).
    scale_shift_table: Tensor,
}

impl WanTransformerBlock {
    fn new(cfg: &WanTransformerConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.inner_dim();
        let heads = cfg.num_attention_heads;
        let attn2 = WanAttention::new(dim, heads, cfg.eps, vb.pp("attn2"))?;
        Ok(Self {
            norm1: LayerNorm::plain(cfg.eps),
            attn1: WanAttention::new(dim, heads, cfg.eps, vb.pp("attn1"))?,
            norm2: if cfg.cross_attn_norm {
                Some(LayerNorm::affine(dim, cfg.eps, vb.pp("norm2"))?)
            } else {
                None
            },
            attn2: match cfg.added_kv_proj_dim {
                Some(_) => attn2.with_added_kv(dim, cfg.eps, vb.pp("attn2"))?,
                None => attn2,
            },
            norm3: LayerNorm::plain(cfg.eps),
            ffn_in: linear(dim, cfg.ffn_dim, vb.pp("ffn.net.0.proj"))?,
            ffn_out: linear(cfg.ffn_dim, dim, vb.pp("ffn.net.2"))?,
            scale_shift_table: vb.get_with_hints((1, 6, dim), "scale_shift_table", modulation_init(dim))?,
        })
    }

    /// `x (B, L, dim)`; `timestep_proj (B, S, 6, dim)` with S = 1 or L; `context` this block's
    /// cross-attention keys and values ([`WanTransformer3DModel::text_context`]).
    pub fn forward(
        &self,
        x: &Tensor,
        timestep_proj: &Tensor,
        context: &BlockContext,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        self.forward_traced(x, timestep_proj, context, rope, &mut None)
    }

    /// [`Self::forward`], recording the inner stages as diffusers' module hooks see them.
    fn forward_traced(
        &self,
        x: &Tensor,
        timestep_proj: &Tensor,
        context: &BlockContext,
        rope: &(Tensor, Tensor),
        trace: &mut Option<&mut Trace>,
    ) -> Result<Tensor> {
        // Slots: shift, scale, gate (attention); shift, scale, gate (feed-forward).
        let modulation = timestep_proj.broadcast_add(&self.scale_shift_table.unsqueeze(0)?)?; // (B, S, 6, dim)

        // 1. Self-attention on the modulated norm, gated residual.
        if trace.is_some() {
            Trace::record(trace, "norm1", &self.norm1.forward(x)?);
        }
        let h = self.norm1.modulated(x, &modulation, 0, 1)?; // (B, L, dim)
        let self_kv = self.attn1.key_values(&h, Some(rope))?;
        let attn = self.attn1.forward(&h, &self_kv, Some(rope))?;
        Trace::record(trace, "attn1", &attn);
        let x = gated_add(x, &attn, &modulation, 2)?;

        // 2. Cross-attention to the text (and the image, for I2V): plain residual, no modulation.
        let h = match &self.norm2 {
            Some(norm) => norm.forward(&x)?,
            None => x.clone(),
        };
        Trace::record(trace, "norm2", &h);
        let attn = self.attn2.forward_with_image(&h, &context.text, context.image.as_ref(), None)?;
        Trace::record(trace, "attn2", &attn);
        let x = (&x + attn)?;

        // 3. Feed-forward (GELU, tanh approximation) on the modulated norm, gated residual.
        if trace.is_some() {
            Trace::record(trace, "norm3", &self.norm3.forward(&x)?);
        }
        let h = self.norm3.modulated(&x, &modulation, 3, 4)?;
        let ff = apply(&self.ffn_out, &gelu(&apply(&self.ffn_in, &h)?)?)?;
        Trace::record(trace, "ffn", &ff);
        gated_add(&x, &ff, &modulation, 5)
    }
}

/// One block's cross-attention keys and values: the text's, and the image's for I2V.
pub struct BlockContext {
    text: KeyValues,
    image: Option<KeyValues>,
}

/// The text (and image) context projected once per prompt, with every block's cross-attention
/// keys and values. The same at every denoising step, so a pipeline computes it once.
pub struct TextContext {
    blocks: Vec<BlockContext>,
}

/// `condition_embedder.image_embedder` (`WanImageEmbedding`): CLIP states → the model width.
struct ImageEmbedder {
    norm1: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    norm2: LayerNorm,
    /// `(1, pos_embed_seq_len, image_dim)`, added to the two images' states of first-last-frame
    /// checkpoints (Wan 2.1 FLF2V).
    pos_embed: Option<Tensor>,
}

impl ImageEmbedder {
    fn new(cfg: &WanTransformerConfig, image_dim: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            // FP32LayerNorm at PyTorch's default eps.
            norm1: LayerNorm::affine(image_dim, 1e-5, vb.pp("norm1"))?,
            ff_in: linear(image_dim, image_dim, vb.pp("ff.net.0.proj"))?,
            ff_out: linear(image_dim, dim, vb.pp("ff.net.2"))?,
            norm2: LayerNorm::affine(dim, 1e-5, vb.pp("norm2"))?,
            pos_embed: match cfg.pos_embed_seq_len {
                Some(len) => {
                    Some(vb.get_with_hints((1, len, image_dim), "pos_embed", candle_nn::init::ZERO)?)
                }
                None => None,
            },
        })
    }

    /// `images (N, S, image_dim)`: N = 1, or N = 2 (first and last frame) concatenated into one
    /// sequence when the model has `pos_embed` → `(1, N·S, dim)`.
    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let (n, s, d) = images.dims3()?;
        let x = match &self.pos_embed {
            Some(pos) => {
                if n * s != pos.dim(1)? {
                    bail!("{n} image(s) of {s} tokens do not fit pos_embed_seq_len {}", pos.dim(1)?);
                }
                images.reshape((1, n * s, d))?.broadcast_add(pos)?
            }
            None if n == 1 => images.clone(),
            None => bail!("{n} images given; a model without pos_embed (not FLF2V) takes one"),
        };
        let h = self.norm1.forward(&x)?;
        let h = apply(&self.ff_out, &apply(&self.ff_in, &h)?.gelu_erf()?)?; // (1, N·S, dim)
        self.norm2.forward(&h)
    }
}

pub struct WanTransformer3DModel {
    pub config: WanTransformerConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    time_linear_1: Linear,
    time_linear_2: Linear,
    time_proj: Linear,
    text_linear_1: Linear,
    text_linear_2: Linear,
    image_embedder: Option<ImageEmbedder>,
    pub blocks: Vec<WanTransformerBlock>,
    norm_out: LayerNorm,
    proj_out: Linear,
    scale_shift_table: Tensor,
    rope: WanRotaryPosEmbed,
}

/// Per-token timesteps `(B, L)` as `(B, frames)` when every frame's tokens share one value; else
/// unchanged.
fn per_frame_if_constant(timestep: &Tensor, frames: usize) -> Result<Tensor> {
    let (b, l) = timestep.dims2()?;
    if l % frames != 0 || l == frames {
        return Ok(timestep.clone());
    }
    let values = timestep.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let per_frame = l / frames;
    if values.chunks_exact(per_frame).all(|frame| frame.iter().all(|&v| v == frame[0])) {
        let firsts: Vec<f32> = values.iter().step_by(per_frame).copied().collect();
        return Ok(Tensor::from_vec(firsts, (b, frames), timestep.device())?.to_dtype(timestep.dtype())?);
    }
    Ok(timestep.clone())
}

/// Intermediate tensors of one forward pass, for parity checks against the reference.
#[derive(Default)]
pub struct Trace {
    pub tensors: Vec<(String, Tensor)>,
}

impl Trace {
    fn record(trace: &mut Option<&mut Trace>, name: impl Into<String>, t: &Tensor) {
        if let Some(trace) = trace {
            trace.tensors.push((name.into(), t.clone()));
        }
    }
}

impl WanTransformer3DModel {
    pub fn new(config: WanTransformerConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let dim = config.inner_dim();
        let [pt, ph, pw] = config.patch_size;
        let patch_weight = vb.get_with_hints(
            (dim, config.in_channels, pt, ph, pw),
            "patch_embedding.weight",
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
        )?;
        let patch_bias = vb.get_with_hints(dim, "patch_embedding.bias", candle_nn::init::ZERO)?;
        let ce = vb.pp("condition_embedder");
        let blocks = (0..config.num_layers)
            .map(|i| WanTransformerBlock::new(&config, vb.pp("blocks").pp(i)))
            .collect::<Result<_>>()?;
        let out_dim = config.out_channels * pt * ph * pw;
        Ok(Self {
            // A view of the parameter, never a copy: a copy made here would freeze the training
            // forward at the initial weights while the optimiser updates the parameter.
            patch_weight: patch_weight.reshape((dim, ()))?, // (dim, C·pt·ph·pw)
            patch_bias,
            time_linear_1: linear(config.freq_dim, dim, ce.pp("time_embedder.linear_1"))?,
            time_linear_2: linear(dim, dim, ce.pp("time_embedder.linear_2"))?,
            time_proj: linear(dim, dim * 6, ce.pp("time_proj"))?,
            text_linear_1: linear(config.text_dim, dim, ce.pp("text_embedder.linear_1"))?,
            text_linear_2: linear(dim, dim, ce.pp("text_embedder.linear_2"))?,
            image_embedder: match config.image_dim {
                Some(image_dim) => Some(ImageEmbedder::new(&config, image_dim, ce.pp("image_embedder"))?),
                None => None,
            },
            blocks,
            norm_out: LayerNorm::plain(config.eps),
            proj_out: linear(dim, out_dim, vb.pp("proj_out"))?,
            scale_shift_table: vb.get_with_hints((1, 2, dim), "scale_shift_table", modulation_init(dim))?,
            rope: WanRotaryPosEmbed::new(
                config.attention_head_dim,
                config.patch_size,
                config.rope_max_seq_len,
                vb.device(),
            )?,
            config,
        })
    }

    /// Sinusoidal timestep features `[cos | sin]` (flip_sin_to_cos, shift 0), in f32 as diffusers.
    fn timestep_features(&self, t: &Tensor) -> Result<Tensor> {
        let half = self.config.freq_dim / 2;
        let exponent = -(10000f64.ln() as f32);
        let freqs: Vec<f32> = (0..half).map(|j| (exponent * j as f32 / half as f32).exp()).collect();
        let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
        let args = t.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?.broadcast_mul(&freqs)?; // (N, half)
        Ok(Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?)
    }

    /// Projects text embeddings `(B, S, text_dim)` and precomputes every block's cross-attention
    /// keys and values.
    pub fn text_context(&self, encoder_hidden_states: &Tensor) -> Result<TextContext> {
        self.text_context_traced(encoder_hidden_states, None, &mut None)
    }

    /// [`Self::text_context`] for I2V checkpoints: with the CLIP image states `(N, S, image_dim)`
    /// (N = 2 for first and last frame), shared by every sample of the text batch.
    pub fn text_image_context(&self, text: &Tensor, image: &Tensor) -> Result<TextContext> {
        self.text_context_traced(text, Some(image), &mut None)
    }

    fn text_context_traced(
        &self,
        text: &Tensor,
        image: Option<&Tensor>,
        trace: &mut Option<&mut Trace>,
    ) -> Result<TextContext> {
        let h = gelu(&apply(&self.text_linear_1, text)?)?;
        let h = apply(&self.text_linear_2, &h)?; // (B, S, dim)
        Trace::record(trace, "condition_embedder.2", &h);
        let image = match (image, &self.image_embedder) {
            (Some(states), Some(embedder)) => Some(embedder.forward(states)?), // (1, N·S, dim)
            (None, None) => None,
            (Some(_), None) => bail!("image states given to a transformer without image_dim"),
            (None, Some(_)) => bail!("this image-to-video transformer needs the image's CLIP states"),
        };
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(BlockContext {
                    text: b.attn2.key_values(&h, None)?,
                    image: match &image {
                        // One image for the whole batch (the prompt and the negative prompt).
                        Some(i) => {
                            let (k, v) = b.attn2.added_key_values(i)?;
                            let batch = (h.dim(0)?, 1, 1, 1);
                            Some((k.repeat(batch)?, v.repeat(batch)?))
                        }
                        None => None,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(TextContext { blocks })
    }

    /// Predicts the flow velocity for latents `(B, C, F, H, W)` at `timestep` (`(B,)`, or `(B, L)`
    /// per token) given the text context.
    pub fn forward(&self, latents: &Tensor, timestep: &Tensor, text: &TextContext) -> Result<Tensor> {
        self.forward_traced(latents, timestep, text, &mut None)
    }

    /// [`Self::forward`] on raw text embeddings, recording every stage (for parity tests).
    pub fn forward_with_trace(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        text: &Tensor,
    ) -> Result<(Tensor, Trace)> {
        let mut trace = Trace::default();
        let context = self.text_context_traced(text, None, &mut Some(&mut trace))?;
        let out = self.forward_traced(latents, timestep, &context, &mut Some(&mut trace))?;
        Ok((out, trace))
    }

    fn forward_traced(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        text: &TextContext,
        trace: &mut Option<&mut Trace>,
    ) -> Result<Tensor> {
        let (b, c, f, h, w) = latents.dims5()?;
        let [pt, ph, pw] = self.config.patch_size;
        if c != self.config.in_channels || f % pt != 0 || h % ph != 0 || w % pw != 0 {
            bail!(
                "latents {:?} do not fit in_channels {} and patch size {:?}",
                latents.dims(),
                self.config.in_channels,
                self.config.patch_size
            );
        }
        let (gf, gh, gw) = (f / pt, h / ph, w / pw);
        let tokens = gf * gh * gw;
        let dim = self.config.inner_dim();
        let rope = self.rope.forward(f, h, w)?;

        // Patch embedding: a Conv3d with kernel = stride = patch, as one matmul over patches.
        let patches = latents
            .reshape(&[b, c, gf, pt, gh, ph, gw, pw][..])?
            .permute(&[0usize, 2, 4, 6, 1, 3, 5, 7][..])? // (B, F', H', W', C, pt, ph, pw)
            .reshape((b, tokens, c * pt * ph * pw))?;
        let x = patches.broadcast_matmul(&self.patch_weight.t()?)?.broadcast_add(&self.patch_bias)?; // (B, L, dim)
        Trace::record(trace, "patch_embedding", &x);

        // Timestep embedding: (B, S, dim), one row per sample (S = 1), per latent frame (S = F',
        // when per-token timesteps are constant over each frame, as frame conditioning makes
        // them) or per token (S = L).
        let timestep = match timestep.rank() {
            1 => timestep.unsqueeze(1)?,
            _ => per_frame_if_constant(timestep, gf)?,
        };
        let s = timestep.dim(1)?;
        let features = self.timestep_features(&timestep.flatten_all()?)?; // (B·S, freq_dim)
        let temb = apply(&self.time_linear_2, &apply(&self.time_linear_1, &features)?.silu()?)?; // (B·S, dim)
        let timestep_proj = apply(&self.time_proj, &temb.silu()?)?; // (B·S, 6·dim)
        Trace::record(trace, "condition_embedder.0", &temb);
        Trace::record(trace, "condition_embedder.1", &timestep_proj);
        let temb = temb.reshape((b, s, dim))?;
        let timestep_proj = timestep_proj.reshape((b, s, 6, dim))?;

        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let mut inner = Trace::default();
            let record_inner = trace.is_some();
            let traced = if record_inner { &mut Some(&mut inner) } else { &mut None };
            x = block.forward_traced(&x, &timestep_proj, &text.blocks[i], &rope, traced)?;
            if let Some(trace) = trace {
                for (name, t) in inner.tensors {
                    trace.tensors.push((format!("blocks.{i}.{name}"), t));
                }
            }
            Trace::record(trace, format!("blocks.{i}"), &x);
        }

        // Output head, modulated by temb (not the 6-way projection).
        let modulation = temb.unsqueeze(2)?.broadcast_add(&self.scale_shift_table.unsqueeze(0)?)?; // (B, S, 2, dim)
        if trace.is_some() {
            Trace::record(trace, "norm_out", &self.norm_out.forward(&x)?);
        }
        let x = self.norm_out.modulated(&x, &modulation, 0, 1)?;
        let x = apply(&self.proj_out, &x)?; // (B, L, C_out·pt·ph·pw)
        Trace::record(trace, "proj_out", &x);

        // Unpatchify: (B, F', H', W', pt, ph, pw, C) → (B, C, F, H, W).
        let out_c = self.config.out_channels;
        Ok(x.reshape(&[b, gf, gh, gw, pt, ph, pw, out_c][..])?
            .permute(&[0usize, 7, 1, 4, 2, 5, 3, 6][..])?
            .reshape((b, out_c, f, h, w))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::layers::tests::fused_matches;

    #[test]
    fn fused_rope_matches_the_composed_rotation() -> Result<()> {
        let rope = WanRotaryPosEmbed::new(12, [1, 2, 2], 16, &Device::Cpu)?;
        let (cos, sin) = rope.forward(3, 4, 2)?; // 6 tokens
        fused_matches(
            &[&[2, 6, 3, 12]],
            |t| crate::kernels::rope::rope(&t[0], &cos, &sin),
            |t| apply_rope_composed(&t[0], &cos, &sin),
            1e-6,
        )
    }
}
