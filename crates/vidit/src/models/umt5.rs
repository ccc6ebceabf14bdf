//! `UMT5EncoderModel`: the T5 encoder variant Wan uses for text, with a relative position bias in
//! every layer (T5 has one in the first layer only), unscaled q·k, RMS layer norms and gated-GELU
//! feed-forwards.

use super::layers::attention::sdpa;
use super::layers::norm::RmsNorm;
use super::layers::{apply, linear_no_bias, Linear};
use crate::kernels::gelu::gelu;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Embedding, Module, VarBuilder};
use serde::{Deserialize, Serialize};

/// `text_encoder/config.json` (transformers' `UMT5Config`), with its defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Umt5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub feed_forward_proj: String,
}

impl Default for Umt5Config {
    fn default() -> Self {
        Self {
            vocab_size: 250112,
            d_model: 512,
            d_kv: 64,
            d_ff: 1024,
            num_layers: 8,
            num_heads: 6,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        }
    }
}

/// The bucket of a key at `relative` = key − query positions (bidirectional: half the buckets
/// per direction, exact up to half of those, then log-spaced up to `max_distance`).
fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let distance = relative.abs();
    let max_exact = half / 2;
    if distance < max_exact {
        bucket += distance;
    } else {
        // In f32 as transformers computes it, truncated towards zero.
        let ratio =
            (distance as f32 / max_exact as f32).ln() / (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as usize
}

struct Umt5Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `[num_buckets, heads]`
    relative_bias: Embedding,
    ff_norm: RmsNorm,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

pub struct Umt5EncoderModel {
    pub config: Umt5Config,
    embed: Embedding,
    layers: Vec<Umt5Layer>,
    final_norm: RmsNorm,
}

impl Umt5EncoderModel {
    pub fn new(config: Umt5Config, vb: VarBuilder) -> Result<Self> {
        if config.feed_forward_proj != "gated-gelu" {
            bail!(
                "key `feed_forward_proj`: only \"gated-gelu\" is supported, not {:?}",
                config.feed_forward_proj
            );
        }
        let (d, inner, eps) = (config.d_model, config.num_heads * config.d_kv, config.layer_norm_epsilon);
        // transformers ties `encoder.embed_tokens` to `shared` and saves only the latter.
        let embed_name =
            if !vb.contains_tensor("shared.weight") && vb.contains_tensor("encoder.embed_tokens.weight") {
                "encoder.embed_tokens"
            } else {
                "shared"
            };
        let embed = candle_nn::embedding(config.vocab_size, d, vb.pp(embed_name))?;
        let enc = vb.pp("encoder");
        let layers = (0..config.num_layers)
            .map(|i| {
                let block = enc.pp("block").pp(i).pp("layer");
                let sa = block.pp("0").pp("SelfAttention");
                let ff = block.pp("1").pp("DenseReluDense");
                Ok(Umt5Layer {
                    attn_norm: RmsNorm::new(d, eps, block.pp("0").pp("layer_norm"))?,
                    q: linear_no_bias(d, inner, sa.pp("q"))?,
                    k: linear_no_bias(d, inner, sa.pp("k"))?,
                    v: linear_no_bias(d, inner, sa.pp("v"))?,
                    o: linear_no_bias(inner, d, sa.pp("o"))?,
                    relative_bias: candle_nn::embedding(
                        config.relative_attention_num_buckets,
                        config.num_heads,
                        sa.pp("relative_attention_bias"),
                    )?,
                    ff_norm: RmsNorm::new(d, eps, block.pp("1").pp("layer_norm"))?,
                    wi_0: linear_no_bias(d, config.d_ff, ff.pp("wi_0"))?,
                    wi_1: linear_no_bias(d, config.d_ff, ff.pp("wi_1"))?,
                    wo: linear_no_bias(config.d_ff, d, ff.pp("wo"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { final_norm: RmsNorm::new(d, eps, enc.pp("final_layer_norm"))?, embed, layers, config })
    }

    fn bucket_ids(&self, len: usize, device: &Device) -> Result<Tensor> {
        let ids: Vec<u32> = (0..len)
            .flat_map(|q| {
                (0..len).map(move |k| {
                    relative_bucket(
                        k as i64 - q as i64,
                        self.config.relative_attention_num_buckets,
                        self.config.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        Ok(Tensor::from_vec(ids, (len, len), device)?)
    }

    /// The last hidden state `(B, S, d_model)` for token ids `(B, S)` and an attention mask
    /// `(B, S)` (1 = token, 0 = padding; padding keys are masked out).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let (heads, d_kv) = (self.config.num_heads, self.config.d_kv);
        let buckets = self.bucket_ids(s, input_ids.device())?;
        // (1 − mask) · f32::MIN on the keys, as transformers' extended attention mask.
        let mask_bias = attention_mask
            .to_dtype(DType::F32)?
            .affine(-1.0, 1.0)?
            .affine(f32::MIN as f64, 0.0)?
            .reshape((b, 1, 1, s))?;
        let mut h = self.embed.forward(input_ids)?; // (B, S, d)
        for layer in &self.layers {
            let position_bias = layer.relative_bias.forward(&buckets)?.permute((2, 0, 1))?.unsqueeze(0)?; // (1, H, S, S)
            let bias = position_bias.broadcast_add(&mask_bias)?; // (B, H, S, S)
            let x = layer.attn_norm.forward(&h)?;
            let split = |t: Tensor| t.reshape((b, s, heads, d_kv)).and_then(|t| t.transpose(1, 2)); // (B, H, S, d_kv)
            let q = split(apply(&layer.q, &x)?)?;
            let k = split(apply(&layer.k, &x)?)?;
            let v = split(apply(&layer.v, &x)?)?;
            let attn = sdpa(&q, &k, &v, 1.0, Some(&bias))?.transpose(1, 2)?.reshape((b, s, heads * d_kv))?;
            h = (h + apply(&layer.o, &attn)?)?;
            let x = layer.ff_norm.forward(&h)?;
            let gated = (gelu(&apply(&layer.wi_0, &x)?)? * apply(&layer.wi_1, &x)?)?;
            h = (h + apply(&layer.wo, &gated)?)?;
        }
        self.final_norm.forward(&h.contiguous()?)
    }

    /// Hidden width of the output.
    pub fn hidden_size(&self) -> usize {
        self.config.d_model
    }
}

/// Zeroes the rows past each sequence's real length, as the Wan pipelines pad prompt embeddings.
pub fn zero_padding(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?; // (B, S, 1)
    let zeros = hidden.zeros_like()?;
    Ok(mask.broadcast_as(hidden.shape())?.ne(0f32)?.where_cond(hidden, &zeros)?)
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn buckets_match_t5_definition() {
        // 32 buckets, max distance 128: 16 per direction, 8 exact, then log-spaced.
        assert_eq!(relative_bucket(0, 32, 128), 0);
        assert_eq!(relative_bucket(-3, 32, 128), 3);
        assert_eq!(relative_bucket(3, 32, 128), 19);
        assert_eq!(relative_bucket(-8, 32, 128), 8);
        assert_eq!(relative_bucket(-16, 32, 128), 10);
        assert_eq!(relative_bucket(-1000, 32, 128), 15);
        assert_eq!(relative_bucket(1000, 32, 128), 31);
    }
}
