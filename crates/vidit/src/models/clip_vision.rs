//! `CLIPVisionModel` (transformers), the image encoder of Wan 2.1 I2V: a ViT over square patches
//! with a class token and learned positions, pre-LayerNorm encoder layers. Wan reads the
//! **penultimate** layer's hidden states (`hidden_states[-2]`), so the last layer and the pooled
//! head are never run.

use super::layers::attention::attention;
use super::layers::norm::LayerNorm;
use super::layers::{apply, linear, Linear};
use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// `image_encoder/config.json` (transformers' `CLIPVisionConfig`), with its defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.hidden_act.as_str(), "gelu" | "quick_gelu") {
            bail!("key `hidden_act`: {:?} is not supported (gelu, quick_gelu)", self.hidden_act);
        }
        if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            bail!(
                "key `image_size` {} must be a multiple of `patch_size` {}",
                self.image_size,
                self.patch_size
            );
        }
        if self.num_hidden_layers < 2 {
            bail!("key `num_hidden_layers`: the penultimate layer's states need at least 2 layers");
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            bail!("key `hidden_size` must be a multiple of `num_attention_heads`");
        }
        Ok(())
    }

    /// Tokens per image: one per patch plus the class token.
    pub fn tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::affine(d, eps, vb.pp("layer_norm1"))?,
            q_proj: linear(d, d, attn.pp("q_proj"))?,
            k_proj: linear(d, d, attn.pp("k_proj"))?,
            v_proj: linear(d, d, attn.pp("v_proj"))?,
            out_proj: linear(d, d, attn.pp("out_proj"))?,
            layer_norm2: LayerNorm::affine(d, eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
        })
    }

    /// `x (B, L, d)` → `(B, L, d)`.
    fn forward(&self, x: &Tensor, cfg: &ClipVisionConfig) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let heads = cfg.num_attention_heads;
        let split = |t: Tensor| t.reshape((b, l, heads, d / heads)); // (B, L, H, D)
        let h = self.layer_norm1.forward(x)?;
        let q = split(apply(&self.q_proj, &h)?)?;
        let k = split(apply(&self.k_proj, &h)?)?;
        let v = split(apply(&self.v_proj, &h)?)?;
        let attn = attention(&q, &k, &v, 1.0 / ((d / heads) as f64).sqrt())?.reshape((b, l, d))?;
        let x = (x + apply(&self.out_proj, &attn)?)?;
        let h = apply(&self.fc1, &self.layer_norm2.forward(&x)?)?; // (B, L, intermediate)
        let h = match cfg.hidden_act.as_str() {
            "quick_gelu" => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            _ => h.gelu_erf()?, // "gelu" is the exact (erf) GELU in transformers
        };
        Ok((x + apply(&self.fc2, &h)?)?)
    }
}

pub struct ClipVisionModel {
    pub config: ClipVisionConfig,
    /// `(d, C·p·p)`: the stride-p patch convolution (no bias) as a matmul.
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    /// All but the last layer: only the penultimate states are read.
    layers: Vec<EncoderLayer>,
}

impl ClipVisionModel {
    /// Weights under `vision_model.` (transformers 4 checkpoints, as Wan's) or at the top level
    /// (transformers 5 writes them so); `vb` is the component's root.
    pub fn new(config: ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let vb = if vb.contains_tensor("vision_model.embeddings.class_embedding") {
            vb.pp("vision_model")
        } else {
            vb
        };
        let (d, p, c) = (config.hidden_size, config.patch_size, config.num_channels);
        let emb = vb.pp("embeddings");
        let patch_weight = emb.get((d, c, p, p), "patch_embedding.weight")?.reshape((d, c * p * p))?;
        let layers = (0..config.num_hidden_layers - 1)
            .map(|i| EncoderLayer::new(&config, vb.pp("encoder.layers").pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_weight,
            class_embedding: emb.get(d, "class_embedding")?,
            position_embedding: emb.get((config.tokens(), d), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::affine(d, config.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            config,
        })
    }

    /// `pixel_values (B, C, S, S)`, normalised as the image processor does → the penultimate
    /// layer's hidden states `(B, 1 + (S/p)², d)`.
    pub fn penultimate_hidden_states(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let (s, p, d) = (self.config.image_size, self.config.patch_size, self.config.hidden_size);
        if c != self.config.num_channels || h != s || w != s {
            bail!("image encoder input {:?}: expected (B, {c}, {s}, {s})", pixel_values.dims());
        }
        let g = s / p;
        let patches = pixel_values
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))? // (B, g, g, C, p, p)
            .reshape((b, g * g, c * p * p))?;
        let patches = patches.broadcast_matmul(&self.patch_weight.t()?)?; // (B, g², d)
        let class = self.class_embedding.reshape((1, 1, d))?.repeat((b, 1, 1))?;
        let x = Tensor::cat(&[class, patches], 1)?.broadcast_add(&self.position_embedding)?; // (B, L, d)
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, &self.config)?;
        }
        Ok(x)
    }
}
