//! A Wan model folder loaded whole: text encoder, transformer, VAE and the scheduler config.

use super::prompt::PromptEncoder;
use crate::error::input_error;
use crate::model_folder::{load_config, MappedWeights, ModelFolder};
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
        let text_encoder: Umt5Config = load_config(&text_dir.join("config.json"))?;
        if text_encoder.d_model != transformer.text_dim {
            return Err(input_error(format!(
                "{}: d_model {} does not match the transformer's text_dim {}",
                text_dir.join("config.json").display(),
                text_encoder.d_model,
                transformer.text_dim
            )));
        }
        // Fail now, not after loading gigabytes, if a weight file is missing or unreadable.
        for dir in [&transformer_dir, &vae_dir, &text_dir] {
            MappedWeights::open(&crate::model_folder::weight_files(dir)?)?;
        }
        crate::schedulers::from_config_file(&scheduler_config, None, None)?;
        let generation_path = folder.root.join("generation_config.json");
        let generation = if generation_path.is_file() {
            load_config(&generation_path)?
        } else {
            GenerationConfig::default()
        };
        Ok(Self { folder, transformer, vae, text_encoder, tokenizer_json, scheduler_config, generation })
    }
}

impl WanModel {
    pub fn load(configs: WanConfigs, device: &Device) -> Result<Self> {
        let WanConfigs {
            folder,
            transformer,
            vae,
            text_encoder,
            tokenizer_json,
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
        Ok(Self { folder, text, transformer, vae, scheduler_config, generation, device: device.clone() })
    }

    /// Reads and loads a model folder.
    pub fn open(root: &Path, device: &Device) -> Result<Self> {
        Self::load(WanConfigs::read(root)?, device)
    }
}
