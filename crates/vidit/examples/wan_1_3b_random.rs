//! Real-size check without downloading anything: writes a random-weight f32 checkpoint of the
//! Wan2.1-T2V-1.3B transformer (its real config), loads it memory-mapped, and runs denoising steps
//! on small latents. Prints load time, step times and peak RSS.
//!
//!     cargo run --release -p vidit --example wan_1_3b_random -- /tmp/wan-1.3b-random
//!
//! The checkpoint (5.7 GB) is written once into the given folder and reused.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vidit::model_folder::MappedWeights;
use vidit::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};

/// `transformer/config.json` of Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
const CONFIG: &str = r#"{
  "_class_name": "WanTransformer3DModel",
  "added_kv_proj_dim": null,
  "attention_head_dim": 128,
  "cross_attn_norm": true,
  "eps": 1e-06,
  "ffn_dim": 8960,
  "freq_dim": 256,
  "image_dim": null,
  "in_channels": 16,
  "num_attention_heads": 12,
  "num_layers": 30,
  "out_channels": 16,
  "patch_size": [1, 2, 2],
  "qk_norm": "rms_norm_across_heads",
  "rope_max_seq_len": 1024,
  "text_dim": 4096
}"#;

/// Records the (name, shape) of every parameter the model asks for, handing out free broadcast zeros.
type Params = Vec<(String, Vec<usize>)>;

struct Recorder(Arc<Mutex<Params>>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap().push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros(1, dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: shape needed")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn peak_rss_mb() -> f64 {
    status_kb("VmHWM") / 1024.0
}

fn rss_mb() -> f64 {
    status_kb("VmRSS") / 1024.0
}

fn status_kb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// Streams a safetensors file of uniform random f32 values: weights ±√(3/fan_in), norm gains 1 ± 0.1,
/// biases ± 0.05, from a xorshift generator (no full copy in memory).
fn write_checkpoint(path: &Path, params: &[(String, Vec<usize>)]) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in params {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp)?);
    file.write_all(&(json.len() as u64).to_le_bytes())?;
    file.write_all(&json)?;
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut buf = Vec::with_capacity(1 << 20);
    for (name, shape) in params {
        let n: usize = shape.iter().product();
        let (offset, bound) = if shape.len() >= 2 {
            (0.0, (3.0 / shape[1..].iter().product::<usize>() as f64).sqrt())
        } else if name.ends_with("weight") {
            (1.0, 0.1)
        } else {
            (0.0, 0.05)
        };
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            buf.extend_from_slice(&((offset + (2.0 * u - 1.0) * bound) as f32).to_le_bytes());
            if buf.len() >= 1 << 20 {
                file.write_all(&buf)?;
                buf.clear();
            }
        }
    }
    file.write_all(&buf)?;
    file.flush()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn main() -> Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "/tmp/wan-1.3b-random".into());
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    let config: WanTransformerConfig = serde_json::from_str(CONFIG)?;
    let device = Device::Cpu;
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    if !weights.exists() {
        let names = Arc::new(Mutex::new(Vec::new()));
        let vb = VarBuilder::from_backend(Box::new(Recorder(names.clone())), DType::F32, device.clone());
        WanTransformer3DModel::new(config.clone(), vb)?;
        let mut params = names.lock().unwrap().clone();
        params.sort();
        let count: usize = params.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        let started = Instant::now();
        write_checkpoint(&weights, &params).context("writing the checkpoint")?;
        println!(
            "wrote {} tensors, {:.3} B parameters in {:.1}s",
            params.len(),
            count as f64 / 1e9,
            started.elapsed().as_secs_f64()
        );
    }
    let size_gb = std::fs::metadata(&weights)?.len() as f64 / 1e9;

    let started = Instant::now();
    let model = WanTransformer3DModel::new(config, MappedWeights::var_builder(dir, &device)?)?;
    let load_s = started.elapsed().as_secs_f64();
    println!(
        "checkpoint {size_gb:.2} GB f32; load {load_s:.2}s; RSS after load {:.0} MB, peak {:.0} MB",
        rss_mb(),
        peak_rss_mb()
    );

    // 1×16×3×16×16 latents (192 tokens), 512 text tokens; CFG batch of 2 as the pipeline runs it.
    let latents = vidit::noise::randn(1, &[2, 16, 3, 16, 16], &device)?;
    let text = vidit::noise::randn(2, &[2, 512, 4096], &device)?;
    let timestep = Tensor::new(&[999f32, 999.0], &device)?;
    let started = Instant::now();
    let context = model.text_context(&text)?;
    println!("text context (2 x 512 tokens, 30 blocks' K/V): {:.2}s", started.elapsed().as_secs_f64());
    for i in 0..3 {
        let started = Instant::now();
        let out = model.forward(&latents, &timestep, &context)?;
        let mean = out.abs()?.mean_all()?.to_scalar::<f32>()?;
        println!(
            "step {i}: {:.2}s (CFG batch 2, 192 tokens); |v| mean {mean:.3}",
            started.elapsed().as_secs_f64()
        );
    }
    println!("peak RSS {:.0} MB", peak_rss_mb());
    Ok(())
}
