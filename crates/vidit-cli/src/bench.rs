//! `vidit bench`: how fast one denoising step, the text encoder and the VAE decoder run on this
//! machine, against its arithmetic peak. For a model folder (default: the built-in model) or a
//! named transformer config with random weights; `--save` writes that config's weights and inputs
//! for the diffusers peer benchmark (`tools/bench/`).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vidit::error::input_error;
use vidit::models::wan_transformer::{TextContext, WanTransformer3DModel, WanTransformerConfig};
use vidit::pipelines::{TextToVideo, WanModel};
use vidit::schedulers::{Scheduler, UniPcConfig, UniPcMultistepScheduler};

#[derive(Args)]
pub struct BenchArgs {
    /// Model folder (diffusers layout) [default: the built-in model].
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A named transformer config with random weights instead of a model folder.
    #[arg(long, value_enum)]
    config: Option<NamedConfig>,
    /// With --config: write the random weights (`DIR/transformer/`), the inputs and vidit's output
    /// (`DIR/inputs.safetensors`) here, for `tools/bench/peer_diffusers.py`.
    #[arg(long, requires = "config")]
    save: Option<PathBuf>,
    /// Timed repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Compute device: cpu, or cuda / cuda:N (needs the `cuda` build feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Time DiT + text encoder training steps of the built-in model's config instead (random
    /// latents, batch --batch-size, flow matching, AdamW, EMA).
    #[arg(long, conflicts_with_all = ["model", "config"])]
    train: bool,
    /// Batch size of --train.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum NamedConfig {
    /// WanTransformer3DModel, 4 layers, dim 256 (4 heads x 64), ffn 1024, text_dim 4096, patch
    /// (1,2,2); latents [1,16,5,16,16] (320 tokens), 512 text tokens.
    Moderate,
}

impl NamedConfig {
    fn transformer(self) -> WanTransformerConfig {
        match self {
            Self::Moderate => WanTransformerConfig {
                num_layers: 4,
                num_attention_heads: 4,
                attention_head_dim: 64,
                ffn_dim: 1024,
                text_dim: 4096,
                freq_dim: 256,
                patch_size: [1, 2, 2],
                in_channels: 16,
                out_channels: 16,
                ..Default::default()
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Moderate => "moderate (random weights)",
        }
    }

    /// Latents `(B, C, F, H, W)` and text tokens of the benchmark input.
    fn inputs(self) -> ([usize; 5], usize) {
        match self {
            Self::Moderate => ([1, 16, 5, 16, 16], 512),
        }
    }
}

/// A timed measurement: the median wall time of one repetition, and how many cores the process
/// kept busy over all timed repetitions (CPU time of all its threads over wall time; a thread
/// spinning while it waits for work counts as busy).
struct Timing {
    ms: f64,
    cores: Option<f64>,
}

/// Times `f`: `warmup` untimed repetitions, then `iters` timed ones.
fn time_ms<T>(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<T>) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(iters);
    let (wall, cpu) = (Instant::now(), cpu_ms());
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let wall_ms = wall.elapsed().as_secs_f64() * 1e3;
    let cores = cpu.zip(cpu_ms()).map(|(start, end)| (end - start) / wall_ms);
    times.sort_by(f64::total_cmp);
    Ok(Timing { ms: times[times.len() / 2], cores })
}

/// User + system CPU time of the whole process (every thread, joined ones included), in ms.
#[cfg(unix)]
fn cpu_ms() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is handed and nothing else.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    Some(ms(usage.ru_utime) + ms(usage.ru_stime))
}

#[cfg(not(unix))]
fn cpu_ms() -> Option<f64> {
    None
}

/// What one denoising step is timed on.
struct StepInputs {
    latents: Tensor,
    text: Tensor,
    scheduler: Box<dyn Scheduler>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.iters == 0 {
        return Err(input_error("--iters: must be at least 1"));
    }
    let device = crate::generate::parse_device(&args.device)?;
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine());
    report.insert("matmul_1024".into(), matmul_1024(&device, args.warmup, args.iters)?);
    if args.train {
        report.insert("model".into(), json!("built-in config (random weights)"));
        report.insert("train_step".into(), training_step(args.batch_size, args.warmup, args.iters, &device)?);
        return finish(report, args.json);
    }
    match args.config {
        Some(named) => {
            let (transformer, mut inputs) = named_case(named, args.save.as_deref(), &device)?;
            report.insert("model".into(), json!(named.name()));
            report.insert(
                "denoising_step".into(),
                denoising_step(&transformer, &mut inputs, args.warmup, args.iters)?,
            );
            if let Some(dir) = &args.save {
                save_output(dir, &transformer, &inputs)?;
            }
        }
        None => {
            let dir = match &args.model {
                Some(dir) => dir.clone(),
                None => crate::builtin::model_dir()?,
            };
            let model = WanModel::open(&dir, &device)?;
            let mut inputs = folder_inputs(&model)?;
            report.insert("model".into(), json!(dir.display().to_string()));
            let step = denoising_step(&model.transformer, &mut inputs, args.warmup, args.iters)?;
            report.insert("denoising_step".into(), step);
            report.insert("text_encoder".into(), text_encoder(&model, args.warmup, args.iters)?);
            report.insert("vae_decode".into(), vae_decode(&model, &inputs.latents, args.warmup, args.iters)?);
        }
    }
    finish(report, args.json)
}

fn finish(mut report: serde_json::Map<String, Value>, as_json: bool) -> Result<()> {
    report.insert("peak_rss_mb".into(), json!(peak_rss_mb()));
    let report = Value::Object(report);
    if as_json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Training steps of the built-in model's DiT and text encoder on a pool of random latents, timed
/// step by step through the trainer (forward, backward, clipping, AdamW, EMA).
fn training_step(batch_size: usize, warmup: usize, iters: usize, device: &Device) -> Result<Value> {
    use vidit::train::builtin;
    use vidit::train::data::shapes::{Combination, Split};
    use vidit::train::dit::{train_dit, DitTraining, LatentPool};
    use vidit::train::objective::{FlowPrediction, Objective};
    use vidit::train::trainer::{RunDir, StepReport, TrainOptions};
    if batch_size == 0 {
        return Err(input_error("--batch-size: must be at least 1"));
    }
    let tokenizer = builtin::word_tokenizer(&vidit::train::data::shapes::vocabulary())?;
    let vae = builtin::vae_config();
    let generation = builtin::generation_config();
    let setup = DitTraining {
        transformer: builtin::transformer_config(vae.z_dim, 64),
        text_encoder: builtin::text_encoder_config(tokenizer.get_vocab_size(true)),
        objective: Objective::FlowMatching { shift: 3.0, uniform: 0.0, prediction: FlowPrediction::Velocity },
        batch_size,
        max_sequence_length: generation.max_sequence_length,
        caption_dropout: 0.1,
        foreground_weight: 1.0,
        pool_size: 256,
        pool_seed: 0,
        init: None,
        frozen_text_encoder: None,
    };
    let frames = (builtin::FRAMES - 1) / vae.temporal_factor() + 1;
    let (h, w) = (builtin::HEIGHT / vae.spatial_factor(), builtin::WIDTH / vae.spatial_factor());
    let combos = Combination::all(Split::Train);
    let pool = LatentPool::from_latents(
        &vidit::noise::randn(5, &[setup.pool_size, vae.z_dim, frames, h, w], device)?,
        (0..setup.pool_size).map(|i| combos[i % combos.len()].caption()).collect(),
    )?;
    let dir = tempfile::tempdir()?;
    let run = RunDir { root: dir.path().to_path_buf() };
    let options = TrainOptions { steps: warmup + iters, checkpoint_every: usize::MAX, ..Default::default() };
    // (wall clock, process CPU time) at the start and after each step.
    let mut marks = vec![(Instant::now(), cpu_ms())];
    train_dit(&setup, &pool, &tokenizer, &options, &run, device, |_: &StepReport| {
        marks.push((Instant::now(), cpu_ms()))
    })?;
    let (first, last) = (marks[warmup], marks[marks.len() - 1]);
    let cores = first.1.zip(last.1).map(|(a, b)| (b - a) / ((last.0 - first.0).as_secs_f64() * 1e3));
    let mut times: Vec<f64> =
        marks.windows(2).skip(warmup).map(|w| (w[1].0 - w[0].0).as_secs_f64() * 1e3).collect();
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    let tokens = setup.transformer.tokens(frames, h, w);
    Ok(
        json!({ "batch_size": batch_size, "tokens": tokens, "ms": ms, "samples_per_s": batch_size as f64 * 1e3 / ms, "cores": cores }),
    )
}

/// Random weights for a named config (written to `save/transformer/` when given) and its inputs.
fn named_case(
    named: NamedConfig,
    save: Option<&Path>,
    device: &Device,
) -> Result<(WanTransformer3DModel, StepInputs)> {
    let config = named.transformer();
    let (shape, text_tokens) = named.inputs();
    // Initialised as trainable variables, then rebuilt from plain tensors: a loaded model's
    // weights are frozen, which is what inference kernels may rely on.
    let weights =
        vidit::train::init::fresh_weights(device, |vb| WanTransformer3DModel::new(config.clone(), vb))?;
    if let Some(dir) = save.map(|dir| dir.join("transformer")) {
        std::fs::create_dir_all(&dir).with_context(|| format!("--save: cannot create {}", dir.display()))?;
        vidit::io::tensors::write_tensors(&dir.join("diffusion_pytorch_model.safetensors"), &weights)?;
        let mut config_json = serde_json::to_value(&config)?;
        config_json["_class_name"] = json!("WanTransformer3DModel");
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config_json)?)?;
    }
    let transformer = WanTransformer3DModel::new(
        config.clone(),
        candle_nn::VarBuilder::from_tensors(weights, DType::F32, device),
    )?;
    let latents = vidit::noise::randn(0, &shape, device)?;
    let text = vidit::noise::randn(1, &[shape[0], text_tokens, config.text_dim], device)?;
    // Wan's sampler: UniPC on flow sigmas, shift 3.
    let scheduler = UniPcMultistepScheduler::new(UniPcConfig {
        prediction_type: "flow_prediction".into(),
        use_flow_sigmas: true,
        flow_shift: 3.0,
        ..Default::default()
    })?;
    Ok((transformer, StepInputs { latents, text, scheduler: Box::new(scheduler) }))
}

/// The model's own defaults: its generation size, an encoded prompt and its scheduler.
fn folder_inputs(model: &WanModel) -> Result<StepInputs> {
    let request = TextToVideo::with_defaults("a red circle moving left", &model.generation, 0);
    let latents = vidit::noise::randn(0, &request.latent_shape(model), &model.device)?;
    let text = model.text.encode(
        std::slice::from_ref(&request.prompt),
        request.max_sequence_length,
        &model.device,
    )?;
    let scheduler = vidit::schedulers::from_config_file(&model.scheduler_config, None, None)?;
    Ok(StepInputs { latents, text, scheduler })
}

/// One denoising step: the transformer forward without and with guidance (prompt and negative
/// batched), and the scheduler's update. The text context (projection and cross-attention keys
/// and values) is computed once per prompt, so it is timed apart.
fn denoising_step(
    t: &WanTransformer3DModel,
    inputs: &mut StepInputs,
    warmup: usize,
    iters: usize,
) -> Result<Value> {
    let device = inputs.latents.device().clone();
    let b = inputs.latents.dim(0)?;
    let context = t.text_context(&inputs.text)?;
    let pair = Tensor::cat(&[&inputs.text, &inputs.text], 0)?;
    let context_cfg = t.text_context(&pair)?;
    let latents_cfg = Tensor::cat(&[&inputs.latents, &inputs.latents], 0)?;
    let forward = |x: &Tensor, ctx: &TextContext| -> Result<()> {
        let timestep = Tensor::new(vec![500f32; x.dim(0)?], &device)?;
        t.forward(x, &timestep, ctx)?.to_device(&Device::Cpu)?; // waits for the device
        Ok(())
    };
    let single = time_ms(warmup, iters, || forward(&inputs.latents, &context))?;
    let guided = time_ms(warmup, iters, || forward(&latents_cfg, &context_cfg))?;
    let context_ms = time_ms(warmup, iters, || t.text_context(&pair))?.ms;
    let scheduler = &mut inputs.scheduler;
    scheduler.set_timesteps(warmup + iters + 1)?;
    let velocity = vidit::noise::randn(2, inputs.latents.dims(), &device)?;
    let mut sample = inputs.latents.clone();
    let scheduler_ms = time_ms(warmup, iters, || {
        sample = scheduler.step(&velocity, &sample)?;
        sample.to_device(&Device::Cpu)?;
        Ok(())
    })?
    .ms;
    let (_, _, f, h, w) = inputs.latents.dims5()?;
    let tokens = t.config.tokens(f, h, w);
    let text_tokens = inputs.text.dim(1)?;
    let flops = t.config.forward_flops(tokens, text_tokens) * b as f64;
    Ok(json!({
        "tokens": tokens,
        "text_tokens": text_tokens,
        "forward_ms": single.ms,
        "forward_gflops": flops / single.ms / 1e6,
        "forward_cores": single.cores,
        "forward_cfg_ms": guided.ms,
        "forward_cfg_gflops": 2.0 * flops / guided.ms / 1e6,
        "forward_cfg_cores": guided.cores,
        "scheduler_ms": scheduler_ms,
        "step_cfg_ms": guided.ms + scheduler_ms,
        "text_context_per_prompt_ms": context_ms,
    }))
}

fn text_encoder(model: &WanModel, warmup: usize, iters: usize) -> Result<Value> {
    let prompts = ["a red circle moving left".to_string(), String::new()];
    let len = model.generation.max_sequence_length;
    let timing = time_ms(warmup, iters, || model.text.encode(&prompts, len, &model.device))?;
    Ok(json!({ "prompts": 2, "tokens": len, "ms": timing.ms, "cores": timing.cores }))
}

fn vae_decode(model: &WanModel, latents: &Tensor, warmup: usize, iters: usize) -> Result<Value> {
    let timing = time_ms(warmup, iters, || model.vae.decode(latents))?;
    let frames = model.generation.num_frames;
    Ok(json!({
        "frames": frames,
        "ms": timing.ms,
        "ms_per_frame": timing.ms / frames as f64,
        "cores": timing.cores,
    }))
}

/// f32 matmul 1024³ (2·1024³ FLOP).
fn matmul_1024(device: &Device, warmup: usize, iters: usize) -> Result<Value> {
    let a = vidit::noise::randn(3, &[1024, 1024], device)?;
    let b = vidit::noise::randn(4, &[1024, 1024], device)?;
    let timing = time_ms(warmup, iters, || {
        a.matmul(&b)?.to_device(&Device::Cpu)?; // waits for the device
        Ok(())
    })?;
    Ok(json!({ "ms": timing.ms, "gflops": 2.0 * 1024f64.powi(3) / timing.ms / 1e6, "cores": timing.cores }))
}

/// Writes vidit's inputs and output next to the saved weights, for the peer benchmark to compare.
fn save_output(dir: &Path, t: &WanTransformer3DModel, inputs: &StepInputs) -> Result<()> {
    let timestep = Tensor::new(vec![500f32; inputs.latents.dim(0)?], inputs.latents.device())?;
    let output = t.forward(&inputs.latents, &timestep, &t.text_context(&inputs.text)?)?;
    let tensors: HashMap<String, Tensor> = [
        ("latents", inputs.latents.clone()),
        ("timestep", timestep),
        ("encoder_hidden_states", inputs.text.clone()),
        ("vidit_output", output),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    vidit::io::tensors::write_tensors(&dir.join("inputs.safetensors"), &tensors)
}

/// CPU model, threads and an estimate of the f32 FMA peak (2 FMA units per core, the vector
/// width the CPU supports, the clock /proc/cpuinfo reports).
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    let threads = vidit::kernels::num_threads();
    let lanes = f32_lanes();
    let ghz = field("cpu MHz").and_then(|m| m.parse::<f64>().ok()).map(|m| m / 1e3);
    let peak = ghz.map(|ghz| threads as f64 * 2.0 * lanes as f64 * 2.0 * ghz);
    json!({
        "cpu": field("model name"),
        "threads": threads,
        "f32_lanes": lanes,
        "ghz": ghz,
        "peak_gflops_estimate": peak,
    })
}

/// f32 lanes of the widest FMA the CPU has (4: a 128-bit guess elsewhere).
fn f32_lanes() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return 16;
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return 8;
        }
    }
    4
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn print_table(r: &Value) {
    let num = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    let cores = |v: &Value| v.as_f64().map_or(String::new(), |x| format!("  {x:.2} cores busy"));
    let m = &r["machine"];
    println!(
        "machine: {} · {} threads · {} f32 lanes · {} GHz · peak ≈ {} GFLOP/s",
        m["cpu"].as_str().unwrap_or("?"),
        m["threads"],
        m["f32_lanes"],
        num(&m["ghz"]),
        num(&m["peak_gflops_estimate"])
    );
    println!("model: {}", r["model"].as_str().unwrap_or("?"));
    println!(
        "matmul 1024³ f32:       {:>9} ms  {:>8} GFLOP/s{}",
        num(&r["matmul_1024"]["ms"]),
        num(&r["matmul_1024"]["gflops"]),
        cores(&r["matmul_1024"]["cores"])
    );
    if let Some(t) = r.get("train_step") {
        println!(
            "training step (batch {}, {} tokens): {} ms, {} samples/s{}",
            t["batch_size"],
            t["tokens"],
            num(&t["ms"]),
            num(&t["samples_per_s"]),
            cores(&t["cores"])
        );
        println!("peak RSS: {} MB", num(&r["peak_rss_mb"]));
        return;
    }
    let s = &r["denoising_step"];
    println!("tokens: {} latent, {} text", s["tokens"], s["text_tokens"]);
    println!(
        "forward (no CFG):       {:>9} ms  {:>8} GFLOP/s{}",
        num(&s["forward_ms"]),
        num(&s["forward_gflops"]),
        cores(&s["forward_cores"])
    );
    println!(
        "forward (CFG, batch 2): {:>9} ms  {:>8} GFLOP/s{}",
        num(&s["forward_cfg_ms"]),
        num(&s["forward_cfg_gflops"]),
        cores(&s["forward_cfg_cores"])
    );
    println!("scheduler step:         {:>9} ms", num(&s["scheduler_ms"]));
    println!("denoising step (CFG):   {:>9} ms", num(&s["step_cfg_ms"]));
    println!("text context, per prompt (not per step): {} ms", num(&s["text_context_per_prompt_ms"]));
    if let Some(t) = r.get("text_encoder") {
        println!(
            "text encoder ({} prompts x {} tokens): {} ms{}",
            t["prompts"],
            t["tokens"],
            num(&t["ms"]),
            cores(&t["cores"])
        );
    }
    if let Some(v) = r.get("vae_decode") {
        println!(
            "VAE decode ({} frames): {} ms, {} ms/frame{}",
            v["frames"],
            num(&v["ms"]),
            num(&v["ms_per_frame"]),
            cores(&v["cores"])
        );
    }
    println!("peak RSS: {} MB", num(&r["peak_rss_mb"]));
}
