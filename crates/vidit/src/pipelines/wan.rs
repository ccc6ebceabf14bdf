//! A Wan model folder loaded whole: text encoder, transformer, VAE, the scheduler config, and
//! for image-to-video checkpoints (Wan 2.1 I2V) the CLIP image encoder and its processor.

use super::clip_image::{ClipImageProcessor, ImageEncoder};
use super::prompt::PromptEncoder;
use crate::error::input_error;
use crate::model_folder::{load_config, MappedWeights, ModelFolder};
use crate::models::clip_vision::{ClipVisionConfig, ClipVisionModel};
use crate::models::umt5::{Umt5Config, Umt5EncoderModel};
use crate::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
use crate::models::wan_vae::{AutoencoderKLWan, WanVaeConfig};
use anyhow::Result;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Generation defaults a model folder may carry (`generation_config.json`, vidit's own file);
/// without it, diffusers' `WanPipeline` defaults apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    pub height: usize,
    pub width: usize,
    pub num_frames: usize,
    pub fps: f64,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub max_sequence_length: usize,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            height: 480,
            width: 832,
            num_frames: 81,
            fps: 16.0,
            num_inference_steps: 50,
            guidance_scale: 5.0,
            max_sequence_length: 512,
        }
    }
}

pub struct WanModel {
    pub folder: ModelFolder,
    pub text: PromptEncoder,
    pub transformer: WanTransformer3DModel,
    pub vae: AutoencoderKLWan,
    /// Present when the transformer takes image states (`image_dim`).
    pub image_encoder: Option<ImageEncoder>,
    pub scheduler_config: PathBuf,
    pub generation: GenerationConfig,
    pub device: Device,
}

/// The configs of a folder, read and checked before any weights are touched.
pub struct WanConfigs {
    pub folder: ModelFolder,
    pub transformer: WanTransformerConfig,
    pub vae: WanVaeConfig,
    pub text_encoder: Umt5Config,
    pub tokenizer_json: PathBuf,
    pub image_encoder: Option<(ClipVisionConfig, ClipImageProcessor)>,
    pub scheduler_config: PathBuf,
    pub generation: GenerationConfig,
}

/// A loading failure names its component; all of them are problems with the folder's files.
fn in_component<T>(dir: &Path, result: Result<T>) -> Result<T> {
    result.map_err(|e| {
        if crate::error::is_input_error(&e) {
            e
        } else {
            input_error(format!("{}: {e:#}", dir.display()))
        }
    })
}

impl WanConfigs {
    pub fn read(root: &Path) -> Result<Self> {
        let folder = ModelFolder::open(root)?;
        let transformer_dir = folder.component("transformer")?;
        let vae_dir = folder.component("vae")?;
        let text_dir = folder.component("text_encoder")?;
        let tokenizer_json = folder.component("tokenizer")?.join("tokenizer.json");
        if !tokenizer_json.is_file() {
            return Err(input_error(format!("{}: file missing", tokenizer_json.display())));
        }
        let scheduler_config = folder.component("scheduler")?.join("scheduler_config.json");
        let transformer: WanTransformerConfig = load_config(&transformer_dir.join("config.json"))?;
        in_component(&transformer_dir.join("config.json"), transformer.validate())?;
        let vae: WanVaeConfig = load_config(&vae_dir.join("config.json"))?;
        in_component(&vae_dir.join("config.json"), vae.validate())?;
        // I2V checkpoints take the noisy latents, a frame mask (one channel per pixel frame of a
        // latent frame) and the encoded condition clip.
        let latent_channels = match transformer.image_dim {
            Some(_) => 2 * vae.z_dim + vae.temporal_factor(),
            None => vae.z_dim,
        };
        if transformer.in_channels != latent_channels || transformer.out_channels != vae.z_dim {
            return Err(input_error(format!(
                "{}: in_channels {} / out_channels {} do not fit the VAE's z_dim {}",
                transformer_dir.join("config.json").display(),
                transformer.in_channels,
                transformer.out_channels,
                vae.z_dim
            )));
        }
        let text_encoder: Umt5Config = load_config(&text_dir.join("config.json"))?;
        if text_encoder.d_model != transformer.text_dim {
            return Err(input_error(format!(
                "{}: d_model {} does not match the transformer's text_dim {}",
                text_dir.join("config.json").display(),
                text_encoder.d_model,
                transformer.text_dim
            )));
        }
        let image_encoder = match transformer.image_dim {
            Some(image_dim) => Some(read_image_encoder(&folder, image_dim)?),
            None => None,
        };
        // Fail now, not after loading gigabytes, if a weight file is missing or unreadable.
        let mut weight_dirs = vec![transformer_dir, vae_dir, text_dir];
        if image_encoder.is_some() {
            weight_dirs.push(folder.component("image_encoder")?);
        }
        for dir in &weight_dirs {
            MappedWeights::open(&crate::model_folder::weight_files(dir)?)?;
        }
        crate::schedulers::from_config_file(&scheduler_config, None, None)?;
        let generation_path = folder.root.join("generation_config.json");
        let generation = if generation_path.is_file() {
            load_config(&generation_path)?
        } else {
            GenerationConfig::default()
        };
        Ok(Self {
            folder,
            transformer,
            vae,
            text_encoder,
            tokenizer_json,
            image_encoder,
            scheduler_config,
            generation,
        })
    }
}

/// The CLIP configs of an I2V folder, checked against the transformer's `image_dim`.
fn read_image_encoder(
    folder: &ModelFolder,
    image_dim: usize,
) -> Result<(ClipVisionConfig, ClipImageProcessor)> {
    let config_path = folder.component("image_encoder")?.join("config.json");
    let config: ClipVisionConfig = load_config(&config_path)?;
    in_component(&config_path, config.validate())?;
    if config.hidden_size != image_dim {
        return Err(input_error(format!(
            "{}: hidden_size {} does not match the transformer's image_dim {image_dim}",
            config_path.display(),
            config.hidden_size
        )));
    }
    let processor_path = folder.component("image_processor")?.join("preprocessor_config.json");
    Ok((config, load_config(&processor_path)?))
}

impl WanModel {
    pub fn load(configs: WanConfigs, device: &Device) -> Result<Self> {
        let WanConfigs {
            folder,
            transformer,
            vae,
            text_encoder,
            tokenizer_json,
            image_encoder,
            scheduler_config,
            generation,
        } = configs;
        let dir = folder.component("text_encoder")?;
        let model = in_component(
            &dir,
            MappedWeights::var_builder(&dir, device).and_then(|vb| Umt5EncoderModel::new(text_encoder, vb)),
        )?;
        let text = PromptEncoder::new(&tokenizer_json, model)?;
        let dir = folder.component("transformer")?;
        let transformer = in_component(
            &dir,
            MappedWeights::var_builder(&dir, device)
                .and_then(|vb| WanTransformer3DModel::new(transformer, vb)),
        )?;
        let dir = folder.component("vae")?;
        let vae = in_component(
            &dir,
            MappedWeights::var_builder(&dir, device).and_then(|vb| AutoencoderKLWan::new(vae, vb)),
        )?;
        let image_encoder = match image_encoder {
            Some((config, processor)) => {
                let dir = folder.component("image_encoder")?;
                let model = in_component(
                    &dir,
                    MappedWeights::var_builder(&dir, device).and_then(|vb| ClipVisionModel::new(config, vb)),
                )?;
                Some(ImageEncoder { processor, model })
            }
            None => None,
        };
        Ok(Self {
            folder,
            text,
            transformer,
            vae,
            image_encoder,
            scheduler_config,
            generation,
            device: device.clone(),
        })
    }

    /// Reads and loads a model folder.
    pub fn open(root: &Path, device: &Device) -> Result<Self> {
        Self::load(WanConfigs::read(root)?, device)
    }
}
