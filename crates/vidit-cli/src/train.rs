//! `vidit train-vae` and `vidit train`: train the built-in model's VAE, then its DiT and text
//! encoder, on the built-in `shapes` dataset; the result is a model folder `vidit generate` runs.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::PathBuf;
use tokenizers::Tokenizer;
use vidit::error::input_error;
use vidit::io::video::write_video;
use vidit::model_folder::{load_config, MappedWeights};
use vidit::models::umt5::{Umt5Config, Umt5EncoderModel};
use vidit::models::wan_transformer::WanTransformerConfig;
use vidit::models::wan_vae::{AutoencoderKLWan, WanVaeConfig};
use vidit::pipelines::wan::WanConfigs;
use vidit::pipelines::{TextToVideo, WanModel};
use vidit::schedulers::from_config_file;
use vidit::train::builtin;
use vidit::train::data::folder::FolderDataset;
use vidit::train::data::shapes::{ShapesDataset, Split};
use vidit::train::data::{fixed_sample, ClipSource};
use vidit::train::dit::{train_dit, DitTraining, DitWeights, LatentPool};
use vidit::train::init::fresh_weights;
use vidit::train::objective::{FlowPrediction, Objective};
use vidit::train::optim::{AdamWConfig, LrSchedule};
use vidit::train::trainer::{RunDir, StepReport, TrainOptions, WithCheckpoints};
use vidit::train::vae::{reconstruction_strip, train_vae, VaeTraining};

#[derive(Clone, Copy, clap::ValueEnum)]
enum LrScheduleArg {
    Constant,
    Cosine,
}

/// Options shared by both trainers.
#[derive(Args)]
pub struct CommonArgs {
    /// Run folder: checkpoint.safetensors, train_log.csv and the trained weights go here.
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps in total (a resumed run continues up to this count).
    #[arg(long)]
    steps: usize,
    #[arg(long)]
    batch_size: Option<usize>,
    /// AdamW learning rate (the peak, with a schedule).
    #[arg(long)]
    lr: Option<f64>,
    /// How the learning rate moves: held after the warm-up, or decayed along a half cosine to 0
    /// at the last step (the curve depends on --steps: extending a run with --resume changes it).
    #[arg(long, value_enum, default_value = "constant")]
    lr_schedule: LrScheduleArg,
    /// Steps of linear learning-rate warm-up from 0.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Clip the global gradient norm to this value.
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// EMA decay of the weights written at the end (0.995 averages over ~200 steps).
    #[arg(long, default_value_t = 0.995)]
    ema_decay: f64,
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A folder of your own clips (.mp4, .gif, PNG-frame folders) listed in captions.jsonl
    /// (lines {"file": ..., "caption": ...}); default: the built-in shapes dataset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Continue from the run folder's checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    quiet: bool,
}

impl CommonArgs {
    fn options(&self, lr: f64) -> Result<TrainOptions> {
        if self.steps == 0 || self.checkpoint_every == 0 {
            return Err(input_error("--steps and --checkpoint-every must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(input_error("--ema-decay must be in [0, 1)"));
        }
        if self.warmup >= self.steps {
            return Err(input_error(format!(
                "--warmup {} must be below --steps {}",
                self.warmup, self.steps
            )));
        }
        Ok(TrainOptions {
            steps: self.steps,
            adamw: AdamWConfig {
                lr: self.lr.unwrap_or(lr),
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            lr_schedule: match self.lr_schedule {
                LrScheduleArg::Constant => LrSchedule::Constant { warmup: self.warmup },
                LrScheduleArg::Cosine => LrSchedule::Cosine { warmup: self.warmup },
            },
            grad_clip: Some(self.grad_clip),
            ema_decay: self.ema_decay,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            resume: self.resume,
        })
    }

    fn run_dir(&self) -> Result<RunDir> {
        std::fs::create_dir_all(&self.out)
            .map_err(|e| input_error(format!("{}: cannot create the run folder: {e}", self.out.display())))?;
        vidit::io::video::check_writable(&self.out.join("probe.safetensors"))?;
        Ok(RunDir { root: self.out.clone() })
    }

    /// The training clips, `frames` long at the built-in model's size and frame rate.
    fn dataset(&self, frames: usize) -> Result<Box<dyn ClipSource>> {
        let (w, h) = (builtin::WIDTH, builtin::HEIGHT);
        Ok(match &self.data {
            Some(dir) => Box::new(FolderDataset::load(dir, w, h, frames, builtin::FPS)?),
            None => Box::new(ShapesDataset::new(Split::Train, w, h, frames)?),
        })
    }

    fn progress(&self) -> (ProgressBar, impl FnMut(&StepReport)) {
        let bar = if self.quiet { ProgressBar::hidden() } else { ProgressBar::new(self.steps as u64) };
        bar.set_style(
            ProgressStyle::with_template("step {pos}/{len} loss {msg} [{bar:30}] {per_sec} ETA {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        let handle = bar.clone();
        (bar, move |r: &StepReport| {
            handle.set_position(r.step as u64);
            handle.set_message(format!("{:.4}", r.loss));
        })
    }
}

#[derive(Args)]
pub struct TrainVaeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Frames per training clip (1 + 4k: the causal VAE handles any length the same way).
    #[arg(long, default_value_t = 5)]
    frames: usize,
    #[arg(long, default_value_t = 1e-4)]
    kl_weight: f64,
    /// Train on crops of this size around the shape (0: full frames).
    #[arg(long, default_value_t = 32)]
    crop: usize,
    /// Loss weight of each clip's frame 0 against 1 for the other frames: the causal VAE encodes
    /// it alone, and it is the given image of image-to-video.
    #[arg(long, default_value_t = 1.0)]
    first_frame_weight: f64,
    /// Fine-tune this VAE component folder (e.g. models/shapes/vae) instead of training a new one;
    /// its config, latent statistics included, is kept.
    #[arg(long)]
    init: Option<PathBuf>,
    /// With --init: train the decoder only. The encoder stays exactly as it is, so the latents of
    /// a DiT trained on this VAE do not move, and the new VAE can replace the old in its model.
    #[arg(long, requires = "init")]
    decoder_only: bool,
}

/// A flag's value must be a finite number above 0.
fn positive(flag: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(input_error(format!("{flag} {value}: must be a positive number")))
    }
}

pub fn run_vae(args: TrainVaeArgs) -> Result<()> {
    let options = args.common.options(2e-3)?;
    if args.frames % 4 != 1 {
        return Err(input_error(format!("--frames {}: must be of the form 4k+1", args.frames)));
    }
    positive("--first-frame-weight", args.first_frame_weight)?;
    let (config, init) = match &args.init {
        Some(dir) => {
            let config: WanVaeConfig = load_config(&dir.join("config.json"))?;
            config
                .validate()
                .map_err(|e| input_error(format!("{}: {e:#}", dir.join("config.json").display())))?;
            (config, Some(load_weights(dir)?))
        }
        None => (builtin::vae_config(), None),
    };
    let run = args.common.run_dir()?;
    let data = args.common.dataset(args.frames)?;
    let setup = VaeTraining {
        config,
        batch_size: args.common.batch_size.unwrap_or(8),
        kl_weight: args.kl_weight,
        crop: (args.crop > 0).then_some(args.crop),
        first_frame_weight: args.first_frame_weight,
        init,
        decoder_only: args.decoder_only,
    };
    let (bar, on_step) = args.common.progress();
    let started = std::time::Instant::now();
    // At each checkpoint: one clip beside its reconstruction by the EMA weights.
    let (probe, _) = fixed_sample(data.as_ref(), 7, &Device::Cpu)?;
    let samples = |step: usize, ema: &HashMap<String, Tensor>| -> Result<()> {
        let strip = reconstruction_strip(&setup.config, &setup.whole(ema.clone()), &probe)?;
        write_video(&run.sample(step, "reconstruction")?, &strip, builtin::FPS)
    };
    let observer = WithCheckpoints(on_step, samples);
    let weights = train_vae(&setup, data.as_ref(), &options, &run, &Device::Cpu, observer)?;
    bar.finish_and_clear();
    let dir = run.root.join("vae");
    vidit::model_folder::save_component(
        &dir,
        "AutoencoderKLWan",
        &setup.config,
        "diffusion_pytorch_model.safetensors",
        &weights,
    )?;
    if !args.common.quiet {
        eprintln!("wrote {} ({:.0}s)", dir.display(), started.elapsed().as_secs_f64());
    }
    Ok(())
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ObjectiveArg {
    Flow,
    Ddpm,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PredictionArg {
    Velocity,
    Sample,
}

/// A flag's value as written on the command line.
fn flag_value(value: impl clap::ValueEnum) -> String {
    value.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The trained VAE component folder (from `vidit train-vae`: RUN/vae).
    #[arg(long, required_unless_present = "init")]
    vae: Option<PathBuf>,
    /// Fine-tune this model folder (vidit's layout, e.g. models/shapes) instead of training a new
    /// DiT: its transformer and text encoder are the starting weights, and its VAE, tokenizer,
    /// configs and latent statistics are kept.
    #[arg(long, conflicts_with = "vae")]
    init: Option<PathBuf>,
    /// A config.json for the new DiT (the keys of diffusers' `WanTransformer3DModel`) instead of
    /// the built-in model's: its in/out_channels must be the VAE's z_dim, its text_dim 64 (the
    /// text encoder's width), its patch must tile the latents.
    #[arg(long, conflicts_with = "init")]
    transformer_config: Option<PathBuf>,
    /// Clips encoded once into the training pool of latents.
    #[arg(long, default_value_t = 2048)]
    pool: usize,
    /// Training objective: flow matching (sampled with UniPC) or DDPM ε-prediction (sampled with DDIM).
    #[arg(long, value_enum, default_value = "flow")]
    objective: ObjectiveArg,
    /// What a flow-matching DiT outputs: the velocity (as Wan) or the clean latents (x-prediction,
    /// scored on the velocity it implies; the model's scheduler config says `sample`).
    #[arg(long, value_enum, default_value = "velocity")]
    prediction: PredictionArg,
    /// Flow shift of the timestep sampling (and of the sampler written with the model).
    #[arg(long, default_value_t = 3.0)]
    shift: f64,
    /// Share of flow-matching timesteps drawn uniformly on (0, 1) instead of from the shifted
    /// logit-normal, which all but skips the low noise levels.
    #[arg(long, default_value_t = 0.0)]
    timestep_uniform: f64,
    /// Probability of an empty caption (classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    caption_dropout: f64,
    /// Loss weight of the latent positions that differ from the pool's median there (the moving
    /// object on a static background) against 1 for the rest.
    #[arg(long, default_value_t = 1.0)]
    foreground_weight: f64,
    /// Keep the text encoder fixed instead of training it with the DiT: the --init model's, or a
    /// new random one (kept in RUN/text_encoder_frozen.safetensors, which --resume reads back).
    #[arg(long)]
    freeze_text_encoder: bool,
}

/// What `vidit train` starts from: a VAE alone (a new DiT), or a whole model folder (`--init`).
struct Start {
    vae_dir: PathBuf,
    vae_config: WanVaeConfig,
    /// The folder's configs, tokenizer and weights when fine-tuning.
    init: Option<(WanConfigs, Tokenizer, DitWeights)>,
}

impl Start {
    fn read(args: &TrainArgs) -> Result<Self> {
        let Some(dir) = &args.init else {
            let vae_dir = args.vae.clone().ok_or_else(|| input_error("--vae or --init is needed"))?;
            let vae_config = load_config(&vae_dir.join("config.json"))?;
            return Ok(Self { vae_dir, vae_config, init: None });
        };
        let configs = WanConfigs::read(dir)?;
        let vae_dir = configs.folder.component("vae")?;
        if configs.vae.latents_mean.len() != configs.vae.z_dim
            || configs.vae.latents_std.len() != configs.vae.z_dim
        {
            return Err(input_error(format!(
                "{}: latents_mean / latents_std must hold z_dim {} values each to fine-tune on",
                vae_dir.join("config.json").display(),
                configs.vae.z_dim
            )));
        }
        let tokenizer = vidit::pipelines::prompt::load_tokenizer(&configs.tokenizer_json)?;
        let component = |name: &str| load_weights(&configs.folder.component(name)?);
        let weights =
            DitWeights { transformer: component("transformer")?, text_encoder: component("text_encoder")? };
        Ok(Self { vae_dir, vae_config: configs.vae.clone(), init: Some((configs, tokenizer, weights)) })
    }
}

/// A new run's text encoder at its random initialisation, written into the run folder so that
/// `--resume` continues with the same one; on resume, read back from there.
fn frozen_random_text_encoder(
    run: &RunDir,
    config: &Umt5Config,
    resume: bool,
) -> Result<HashMap<String, Tensor>> {
    let path = run.frozen_text_encoder();
    if resume {
        if !path.exists() {
            return Err(input_error(format!(
                "--resume --freeze-text-encoder: {} is missing (was the run started with --freeze-text-encoder?)",
                path.display()
            )));
        }
        return Ok(candle_core::safetensors::load(&path, &Device::Cpu)?);
    }
    let weights = fresh_weights(&Device::Cpu, |vb| Umt5EncoderModel::new(config.clone(), vb))?;
    std::fs::create_dir_all(&run.root).with_context(|| format!("{}: cannot create", run.root.display()))?;
    vidit::io::tensors::write_tensors(&path, &weights)?;
    Ok(weights)
}

/// `--transformer-config`: a DiT config that fits the VAE's latents and the text encoder.
fn read_transformer_config(
    path: &std::path::Path,
    vae: &WanVaeConfig,
    text_dim: usize,
) -> Result<WanTransformerConfig> {
    let config: WanTransformerConfig = load_config(path)?;
    let bad = |key: &str, why: String| input_error(format!("{}: {key}: {why}", path.display()));
    for (key, value) in [("in_channels", config.in_channels), ("out_channels", config.out_channels)] {
        if value != vae.z_dim {
            return Err(bad(
                key,
                format!("{value}, but the VAE's latents have z_dim {} channels", vae.z_dim),
            ));
        }
    }
    if config.text_dim != text_dim {
        return Err(bad(
            "text_dim",
            format!("{}, but the text encoder's output is {text_dim} wide", config.text_dim),
        ));
    }
    if config.image_dim.is_some() {
        return Err(bad("image_dim", "must be null: vidit trains text-to-video DiTs".into()));
    }
    let latent = [builtin::HEIGHT / vae.spatial_factor(), builtin::WIDTH / vae.spatial_factor()];
    let [pt, ph, pw] = config.patch_size;
    if pt != 1 || ph == 0 || pw == 0 || latent[0] % ph != 0 || latent[1] % pw != 0 {
        return Err(bad(
            "patch_size",
            format!(
                "{:?} must be [1, p, q] with p, q dividing the {}x{} latents",
                config.patch_size, latent[0], latent[1]
            ),
        ));
    }
    Ok(config)
}

/// Every tensor of a component folder's weight files, on the CPU.
fn load_weights(dir: &std::path::Path) -> Result<HashMap<String, Tensor>> {
    let mut weights = HashMap::new();
    for file in vidit::model_folder::weight_files(dir)? {
        weights.extend(candle_core::safetensors::load(&file, &Device::Cpu)?);
    }
    Ok(weights)
}

pub fn run_dit(args: TrainArgs) -> Result<()> {
    let options = args.common.options(1e-3)?;
    positive("--foreground-weight", args.foreground_weight)?;
    if !(0.0..=1.0).contains(&args.timestep_uniform) {
        return Err(input_error(format!("--timestep-uniform {}: must be in [0, 1]", args.timestep_uniform)));
    }
    let objective = match (args.objective, args.prediction) {
        (ObjectiveArg::Flow, prediction) => Objective::FlowMatching {
            shift: args.shift,
            uniform: args.timestep_uniform,
            prediction: match prediction {
                PredictionArg::Velocity => FlowPrediction::Velocity,
                PredictionArg::Sample => FlowPrediction::Sample,
            },
        },
        (ObjectiveArg::Ddpm, PredictionArg::Velocity) => Objective::Ddpm,
        (ObjectiveArg::Ddpm, PredictionArg::Sample) => {
            return Err(input_error("--prediction sample: only with --objective flow (DDPM predicts ε)"))
        }
    };
    let run = args.common.run_dir()?;
    let device = Device::Cpu;
    let start = Start::read(&args)?;
    let vae =
        AutoencoderKLWan::new(start.vae_config.clone(), MappedWeights::var_builder(&start.vae_dir, &device)?)
            .map_err(|e| input_error(format!("{}: {e:#}", start.vae_dir.display())))?;
    let data = args.common.dataset(builtin::FRAMES)?;
    let scheduler = builtin::scheduler_config(objective)?;
    let (tokenizer, transformer, text_encoder, generation, init) = match start.init {
        Some((configs, tokenizer, weights)) => {
            // A model keeps the objective it was trained with (its sampler depends on it).
            let theirs: serde_json::Value = load_config(&configs.scheduler_config)?;
            let kind = |config: &serde_json::Value| {
                let prediction = config["prediction_type"].as_str().unwrap_or("epsilon").to_string();
                (config["_class_name"].as_str().unwrap_or("?").to_string(), prediction)
            };
            let (theirs, ours) = (kind(&theirs), kind(&scheduler));
            if theirs != ours {
                return Err(input_error(format!(
                    "{}: a {} model predicting {}; --objective {} --prediction {} trains a {} model predicting {}",
                    configs.scheduler_config.display(),
                    theirs.0,
                    theirs.1,
                    flag_value(args.objective),
                    flag_value(args.prediction),
                    ours.0,
                    ours.1
                )));
            }
            let unknown = vidit::pipelines::prompt::unknown_words(&tokenizer, &data.vocabulary().join(" "));
            if !unknown.is_empty() {
                eprintln!(
                    "warning: caption words outside {}'s vocabulary (read as <unk>): {}",
                    configs.folder.root.display(),
                    unknown.join(", ")
                );
            }
            (tokenizer, configs.transformer, configs.text_encoder, configs.generation, Some(weights))
        }
        None => {
            let tokenizer = builtin::word_tokenizer(&data.vocabulary())?;
            let text_encoder = builtin::text_encoder_config(tokenizer.get_vocab_size(true));
            let transformer = match &args.transformer_config {
                Some(path) => read_transformer_config(path, &start.vae_config, text_encoder.d_model)?,
                None => builtin::transformer_config(start.vae_config.z_dim, text_encoder.d_model),
            };
            (tokenizer, transformer, text_encoder, builtin::generation_config(), None)
        }
    };
    let frozen_text_encoder = match (&init, args.freeze_text_encoder) {
        (_, false) => None,
        (Some(weights), true) => Some(weights.text_encoder.clone()),
        (None, true) => Some(frozen_random_text_encoder(&run, &text_encoder, args.common.resume)?),
    };
    let setup = DitTraining {
        transformer,
        text_encoder,
        objective,
        batch_size: args.common.batch_size.unwrap_or(32),
        max_sequence_length: generation.max_sequence_length,
        caption_dropout: args.caption_dropout,
        foreground_weight: args.foreground_weight,
        pool_size: args.pool,
        pool_seed: args.common.seed ^ 0x5eed,
        init,
        frozen_text_encoder,
    };
    let started = std::time::Instant::now();
    if !args.common.quiet {
        eprintln!("encoding {} clips into the latent pool", setup.pool_size);
    }
    let mut pool = LatentPool::encode(&vae, data.as_ref(), setup.pool_size, setup.pool_seed, &device)?;
    if setup.init.is_some() {
        // The fine-tuned DiT keeps working in its own latent units.
        pool =
            pool.with_stats(start.vae_config.latents_mean.clone(), start.vae_config.latents_std.clone())?;
    }
    if !args.common.quiet {
        eprintln!("pool ready ({:.0}s)", started.elapsed().as_secs_f64());
        if setup.foreground_weight != 1.0 {
            let foreground = pool.foreground()?.mean_all()?.to_scalar::<f32>()?;
            eprintln!("foreground: {:.1}% of latent positions", 100.0 * foreground);
        }
    }
    let vae_weights = load_weights(&start.vae_dir)?;
    let vae_config =
        WanVaeConfig { latents_mean: pool.mean.clone(), latents_std: pool.std.clone(), ..start.vae_config };
    let model_dir = run.root.join("model");
    let write_model = |weights: &DitWeights| {
        builtin::write_model_folder(
            &model_dir,
            &builtin::ModelParts {
                vae: &vae_config,
                vae_weights: &vae_weights,
                transformer: &setup.transformer,
                transformer_weights: &weights.transformer,
                text_encoder: &setup.text_encoder,
                text_encoder_weights: &weights.text_encoder,
                tokenizer: &tokenizer,
                scheduler: &scheduler,
                generation: &generation,
            },
        )
    };
    // At each checkpoint: the model folder from the EMA weights, and clips it generates for the
    // first two captions of the pool.
    let mut prompts: Vec<&String> = pool.captions.iter().collect();
    prompts.dedup();
    prompts.truncate(2);
    let samples = |step: usize, ema: &HashMap<String, Tensor>| -> Result<()> {
        write_model(&setup.weights(ema))?;
        let model = WanModel::open(&model_dir, &device)?;
        for (i, prompt) in prompts.iter().enumerate() {
            let mut scheduler = from_config_file(&model.scheduler_config, None, None)?;
            let output = TextToVideo::with_defaults(*prompt, &model.generation, 0).run(
                &model,
                scheduler.as_mut(),
                |_, _| {},
            )?;
            write_video(&run.sample(step, &format!("prompt{i}"))?, &output.frames, generation.fps)?;
        }
        Ok(())
    };
    let (bar, on_step) = args.common.progress();
    let weights =
        train_dit(&setup, &pool, &tokenizer, &options, &run, &device, WithCheckpoints(on_step, samples))?;
    bar.finish_and_clear();
    write_model(&weights)?;
    if !args.common.quiet {
        eprintln!("wrote {} ({:.0}s)", model_dir.display(), started.elapsed().as_secs_f64());
    }
    Ok(())
}
