//! The diffusers folder layout: `model_index.json` and one sub-folder per component
//! (`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), each with its config and
//! safetensors weights (one file or shards listed in `*.safetensors.index.json`).
//!
//! Weights are memory-mapped and read by the checkpoint's own key names. Each tensor is copied once
//! into f32 compute memory and its mapped pages are released right after, so a checkpoint is never
//! resident twice.

use crate::error::input_error;
use anyhow::{Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::{Mmap, UncheckedAdvice};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Reads a JSON file; a missing or malformed file is the user's error, named by path.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| input_error(format!("{}: cannot read: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| input_error(format!("{}: invalid JSON: {e}", path.display())))
}

/// Deserialises a config value; errors name the file and the key (`a.b[2]`) that is wrong.
pub fn parse_config<T: DeserializeOwned>(path: &Path, value: serde_json::Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        input_error(format!("{}: key `{key}`: {}", path.display(), e.inner()))
    })
}

/// Reads and deserialises a `config.json`.
pub fn load_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    parse_config(path, read_json(path)?)
}

/// A model folder in the diffusers layout.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    pub root: PathBuf,
    /// `_class_name` of `model_index.json`, e.g. `WanPipeline`.
    pub pipeline_class: String,
    /// Component name → class name, for the components present (`[null, null]` entries left out).
    pub components: HashMap<String, String>,
    /// `expand_timesteps` (Wan 2.2 TI2V): the first latent frame is the image's, at timestep 0.
    pub expand_timesteps: bool,
}

impl ModelFolder {
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(input_error(format!("{}: model folder not found", root.display())));
        }
        let index_path = root.join("model_index.json");
        let index = read_json(&index_path)?;
        let object = index
            .as_object()
            .ok_or_else(|| input_error(format!("{}: expected a JSON object", index_path.display())))?;
        let pipeline_class =
            object.get("_class_name").and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let components = object
            .iter()
            .filter_map(|(name, value)| {
                let pair = value.as_array()?;
                let class = pair.get(1)?.as_str()?;
                Some((name.clone(), class.to_string()))
            })
            .collect();
        let expand_timesteps = object.get("expand_timesteps").and_then(|v| v.as_bool()).unwrap_or(false);
        Ok(Self { root: root.to_path_buf(), pipeline_class, components, expand_timesteps })
    }

    /// The folder of a component, which must be listed in `model_index.json` and exist.
    pub fn component(&self, name: &str) -> Result<PathBuf> {
        if !self.components.contains_key(name) {
            return Err(input_error(format!(
                "{}: model_index.json lists no `{name}` component",
                self.root.join("model_index.json").display()
            )));
        }
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(input_error(format!("{}: component folder missing", dir.display())));
        }
        Ok(dir)
    }
}

/// The safetensors files of a component folder: a single `*.safetensors`, or the shards named by
/// a `*.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| input_error(format!("{}: cannot read: {e}", dir.display())))?;
    let mut names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    if let Some(index) = names.iter().find(|n| n.ends_with(".safetensors.index.json")) {
        let path = dir.join(index);
        let json = read_json(&path)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| input_error(format!("{}: no `weight_map` object", path.display())))?;
        let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let singles: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors")).collect();
    match singles.as_slice() {
        [] => Err(input_error(format!("{}: no .safetensors weights", dir.display()))),
        [one] => Ok(vec![dir.join(one)]),
        _ => Err(input_error(format!(
            "{}: several .safetensors files and no *.safetensors.index.json to say which to use",
            dir.display()
        ))),
    }
}

/// Memory-mapped safetensors shards, looked up by key. Implements candle's `SimpleBackend` so
/// models load through an ordinary `VarBuilder`, with errors that name the key and the file.
pub struct MappedWeights {
    files: Vec<(PathBuf, Mmap)>,
    /// key → (file index, byte offset of the data in the map, byte length)
    routing: HashMap<String, (usize, usize, usize)>,
}

impl MappedWeights {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path)
                .map_err(|e| input_error(format!("{}: cannot open: {e}", path.display())))?;
            // SAFETY: the map is read-only; a file truncated under us is the user's to avoid, as with any mmap loader.
            let mmap =
                unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
            let tensors = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| input_error(format!("{}: not a valid safetensors file: {e}", path.display())))?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in tensors.tensors() {
                let offset = view.data().as_ptr() as usize - base;
                routing.insert(name, (index, offset, view.data().len()));
            }
            files.push((path.clone(), mmap));
        }
        Ok(Self { files, routing })
    }

    /// Opens a component folder's weights as a `VarBuilder` producing f32 tensors on `device`.
    pub fn var_builder(dir: &Path, device: &Device) -> Result<VarBuilder<'static>> {
        let weights = Self::open(&weight_files(dir)?)?;
        Ok(VarBuilder::from_backend(Box::new(weights), DType::F32, device.clone()))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(String::as_str)
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        // Plain messages (no `bail!`, which attaches a backtrace); the caller names the folder.
        let Some(&(index, offset, len)) = self.routing.get(name) else {
            return Err(candle_core::Error::Msg(format!("weights have no tensor `{name}`")));
        };
        let (path, mmap) = &self.files[index];
        let tensors = safetensors::SafeTensors::deserialize(mmap)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let view =
            tensors.tensor(name).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let tensor = view.load(device)?.to_dtype(dtype)?;
        // The data now lives in `tensor`: let the kernel drop the mapped pages so they are not resident twice.
        let page = 4096;
        let start = offset / page * page;
        // SAFETY: the map is read-only and file-backed; dropped pages are re-read from the file if touched again.
        unsafe {
            let _ = mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, offset + len - start);
        }
        Ok(tensor)
    }
}

impl SimpleBackend for MappedWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, dev)?;
        if tensor.shape() != &shape {
            let path = &self.files[self.routing[name].0].0;
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            return Err(candle_core::Error::Msg(format!(
                "{file}: tensor `{name}` has shape {:?}, expected {:?}",
                tensor.dims(),
                shape.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}

/// Writes one component folder: `config.json` (with `_class_name`) and its weights, each atomically.
pub fn save_component(
    dir: &Path,
    class_name: &str,
    config: &impl Serialize,
    weights_file: &str,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut json = serde_json::to_value(config)?;
    if let Some(object) = json.as_object_mut() {
        object.insert("_class_name".into(), class_name.into());
    }
    write_json(&dir.join("config.json"), &json)?;
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)?;
    crate::io::atomic::write_file(&dir.join(weights_file), |tmp| Ok(std::fs::write(tmp, &bytes)?))
}

/// Writes pretty JSON atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    crate::io::atomic::write_file(path, |tmp| Ok(std::fs::write(tmp, text.as_bytes())?))
}
