//! `vidit generate`: validate everything, load the model, run text-to-video, write the clip.

use anyhow::Result;
use candle_core::Device;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vidit::error::input_error;
use vidit::io::media::read_image;
use vidit::io::media::Resize;
use vidit::io::video::{check_writable, write_video, OutputFormat};
use vidit::pipelines::extend::{extend, interpolate};
use vidit::pipelines::video_to_video::RESTORE_STRENGTH;
use vidit::pipelines::wan::WanConfigs;
use vidit::pipelines::{Keyframes, TextToVideo, VideoToVideo, WanModel};
use vidit::schedulers::{from_config_file, SchedulerKind};

#[derive(Clone, Copy, ValueEnum)]
pub enum SchedulerArg {
    /// UniPC multistep with flow sigmas (the Wan default).
    Unipc,
    /// Flow-matching Euler.
    Euler,
    /// DDPM ancestral sampling (ε-prediction models).
    Ddpm,
    /// DDIM, deterministic (ε-prediction models).
    Ddim,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ResizeArg {
    /// Scale to cover, cut the overflow around the centre.
    Crop,
    /// Scale to fit, black bars.
    Pad,
    /// Scale each axis on its own.
    Stretch,
}

impl From<ResizeArg> for Resize {
    fn from(arg: ResizeArg) -> Self {
        match arg {
            ResizeArg::Crop => Resize::Crop,
            ResizeArg::Pad => Resize::Pad,
            ResizeArg::Stretch => Resize::Stretch,
        }
    }
}

/// What to run.
enum Job {
    /// Text-to-video, with given keyframes or not.
    Text(TextToVideo),
    /// Video-to-video (also restoration).
    Video(VideoToVideo),
    /// Continue `video` by `frames`, window by window.
    Extend { request: TextToVideo, video: candle_core::Tensor, frames: usize },
    /// `factor − 1` new frames between each pair of `video`.
    Interpolate { request: TextToVideo, video: candle_core::Tensor, factor: usize },
}

/// Defaults are those of diffusers' `WanPipeline` call and of the model's own configs.
#[derive(Args)]
pub struct GenerateArgs {
    /// Model folder in the diffusers layout (model_index.json, transformer/, vae/, …);
    /// the built-in shapes model when not given.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt, as a positional argument (the same as --prompt).
    #[arg(conflicts_with = "prompt", required_unless_present = "prompt")]
    text: Option<String>,
    /// What the clip shows.
    #[arg(long)]
    prompt: Option<String>,
    /// What to steer away from (classifier-free guidance).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Denoising steps [model's generation_config.json, else 50].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; 1 or less turns guidance off [model's, else 5.0].
    #[arg(long)]
    guidance: Option<f64>,
    /// Height in pixels, a multiple of the VAE and patch factors (16 for Wan) [model's, else 480].
    #[arg(long)]
    height: Option<usize>,
    /// Width in pixels [model's, else 832].
    #[arg(long)]
    width: Option<usize>,
    /// Frames (with --extend / --interpolate: of each generated window); rounded down to the
    /// form 4k + 1 as diffusers does [model's, else 81].
    #[arg(long)]
    frames: Option<usize>,
    /// Frame rate of the written clip [model's, else 16].
    #[arg(long)]
    fps: Option<f64>,
    /// Noise seed; the same seed gives the same clip on the same build. Random when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// Sampler [the model's scheduler config]: unipc/euler for flow-matching models, ddpm/ddim
    /// for ε-prediction models.
    #[arg(long, value_enum)]
    scheduler: Option<SchedulerArg>,
    /// Flow shift; by default the scheduler config's.
    #[arg(long)]
    shift: Option<f64>,
    /// Text length the prompt embeddings are padded to; the padding takes part in
    /// cross-attention [model's, else 512].
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// Initial noise: tensor `latents` [1, C, T, h, w] in a safetensors file, instead of drawing it.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// First frame (PNG/JPEG): image-to-video, for Wan 2.1 I2V / FLF2V and Wan 2.2 TI2V
    /// checkpoints as diffusers' WanImageToVideoPipeline, and for frame-conditioned models
    /// (vidit's own).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Last frame (PNG/JPEG), with --image: keyframe interpolation from the first to the last
    /// (Wan FLF2V checkpoints, frame-conditioned models).
    #[arg(long, requires = "image")]
    last_image: Option<PathBuf>,
    /// Input clip (.mp4, .gif, or a folder of PNG/JPEG frames in name order), resampled to the
    /// model's frame rate and fitted to the size. Alone: video-to-video (SDEdit), its frame count
    /// (rounded down to 4k + 1) replacing --frames; or with --extend, --interpolate, --restore.
    #[arg(long, conflicts_with = "image")]
    video: Option<PathBuf>,
    /// How much of the schedule video-to-video runs again, in (0, 1]: low keeps the clip, 1
    /// starts from noise [0.8; 0.3 with --restore].
    #[arg(long, requires = "video")]
    strength: Option<f64>,
    /// Continue the clip by N frames (window by window, each conditioned on the last 5 frames so
    /// far), for frame-conditioned models (the built-in one).
    #[arg(long, requires = "video", conflicts_with_all = ["interpolate", "restore", "strength", "noise"])]
    extend: Option<usize>,
    /// Frame-rate up-conversion: K − 1 new frames between each pair, through first-and-last
    /// keyframe generation (frame-conditioned models); the output rate is K times the input's.
    #[arg(long, requires = "video", conflicts_with_all = ["restore", "strength", "noise"])]
    interpolate: Option<usize>,
    /// Restoration: re-denoise a noisy or compressed clip at low strength (0.3 unless --strength),
    /// keeping its content.
    #[arg(long, requires = "video")]
    restore: bool,
    /// The noise video-to-video mixes into the encoded clip: tensor `noise` shaped like the
    /// latents, in a safetensors file (to match another implementation given the same noise).
    #[arg(long, requires = "video")]
    noise: Option<PathBuf>,
    /// How an input image or clip of another aspect ratio is fitted.
    #[arg(long, value_enum, default_value = "crop")]
    resize: ResizeArg,
    /// First frame of the input clip to use (after frame-rate resampling).
    #[arg(long, requires = "video", default_value_t = 0)]
    start: usize,
    /// At most this many frames of the input clip.
    #[arg(long, requires = "video")]
    max_frames: Option<usize>,
    /// Also write the final latents (tensor `latents`) to this safetensors file.
    #[arg(long, conflicts_with_all = ["extend", "interpolate"])]
    save_latents: Option<PathBuf>,
    /// Output: .mp4, .gif, .safetensors (tensor `frames`), or a folder path ending in / for PNGs.
    #[arg(long, short, default_value = "clip.mp4")]
    output: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Compute device: cpu, or cuda / cuda:N (needs the `cuda` build feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = cuda
                .strip_prefix("cuda:")
                .map(str::parse::<usize>)
                .transpose()
                .map_err(|_| input_error(format!("--device {name}: expected cuda:N")))?;
            if !candle_core::utils::cuda_is_available() {
                return Err(input_error(format!(
                    "--device {name}: this build has no CUDA support (build with --features cuda)"
                )));
            }
            Ok(Device::new_cuda(ordinal.unwrap_or(0))?)
        }
        _ => Err(input_error(format!("--device {name}: expected cpu or cuda[:N]"))),
    }
}

fn check_latents_path(flag: &str, path: &Path) -> Result<()> {
    if OutputFormat::from_path(path).ok() != Some(OutputFormat::Safetensors) {
        return Err(input_error(format!("{flag} {}: must be a .safetensors file", path.display())));
    }
    Ok(())
}

/// The request after flags and the model's defaults are combined.
struct Settings {
    steps: usize,
    guidance: f64,
    height: usize,
    width: usize,
    frames: usize,
    fps: f64,
    max_sequence_length: usize,
}

/// Everything that can be checked without loading weights, in the order a user would fix it.
fn validate(args: &GenerateArgs) -> Result<(WanConfigs, Job, Device, f64)> {
    check_writable(&args.output)?;
    if let Some(path) = &args.save_latents {
        check_latents_path("--save-latents", path)?;
        check_writable(path)?;
    }
    let prompt = args.prompt.clone().or_else(|| args.text.clone()).unwrap_or_default();
    if vidit::pipelines::prompt::clean_prompt(&prompt).is_empty() {
        return Err(input_error("--prompt: the prompt is empty"));
    }
    if args.shift.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        return Err(input_error("--shift: must be positive"));
    }
    let device = parse_device(&args.device)?;
    let model_dir = match &args.model {
        Some(dir) => dir.clone(),
        None => crate::builtin::model_dir()?,
    };
    let configs = WanConfigs::read(&model_dir)?;
    if configs.image_encoder.is_some() {
        // Wan 2.1 I2V / FLF2V: conditioning channels and CLIP states of a first (and last) frame.
        if args.video.is_some() {
            return Err(input_error(format!(
                "--video: {} is an image-to-video model (Wan I2V); video modes need a text-to-video or frame-conditioned one",
                model_dir.display()
            )));
        }
        if args.image.is_none() {
            return Err(input_error(format!(
                "--image: {} is an image-to-video model (Wan I2V); give the first frame",
                model_dir.display()
            )));
        }
        // First-last-frame checkpoints (FLF2V) carry a position table over both images' states.
        match (configs.transformer.pos_embed_seq_len.is_some(), args.last_image.is_some()) {
            (true, false) => {
                return Err(input_error(format!(
                    "--last-image: {} is a first-last-frame model (Wan FLF2V); give the last frame too",
                    model_dir.display()
                )))
            }
            (false, true) => {
                return Err(input_error(format!(
                    "--last-image: {} is a first-frame model (Wan I2V, no pos_embed_seq_len); it takes no last frame",
                    model_dir.display()
                )))
            }
            _ => {}
        }
    }
    if configs.folder.expand_timesteps && args.last_image.is_some() {
        return Err(input_error(format!(
            "--last-image: {} is Wan 2.2 TI2V (expand_timesteps), which conditions on the first frame only",
            model_dir.display()
        )));
    }
    let d = &configs.generation;
    let s = Settings {
        steps: args.steps.unwrap_or(d.num_inference_steps),
        guidance: args.guidance.unwrap_or(d.guidance_scale),
        height: args.height.unwrap_or(d.height),
        width: args.width.unwrap_or(d.width),
        frames: args.frames.unwrap_or(d.num_frames),
        fps: args.fps.unwrap_or(d.fps),
        max_sequence_length: args.max_sequence_length.unwrap_or(d.max_sequence_length),
    };
    if s.steps == 0 {
        return Err(input_error("--steps: must be at least 1"));
    }
    if !s.guidance.is_finite() {
        return Err(input_error("--guidance: must be a finite number"));
    }
    if !(s.fps.is_finite() && s.fps > 0.0) {
        return Err(input_error("--fps: must be positive"));
    }
    if s.max_sequence_length == 0 {
        return Err(input_error("--max-sequence-length: must be at least 1"));
    }
    if s.frames == 0 {
        return Err(input_error("--frames: must be at least 1"));
    }

    let spatial = configs.vae.spatial_factor()
        * configs.transformer.patch_size[1].max(configs.transformer.patch_size[2]);
    for (flag, value) in [("--height", s.height), ("--width", s.width)] {
        if value == 0 || value % spatial != 0 {
            return Err(input_error(format!(
                "{flag} {value}: must be a positive multiple of {spatial} for this model"
            )));
        }
    }
    OutputFormat::from_path(&args.output)?.check_size(&args.output, s.width, s.height)?;
    let temporal = configs.vae.temporal_factor();
    let strength = args.strength.unwrap_or(if args.restore { RESTORE_STRENGTH } else { 0.8 });
    if !VideoToVideo::valid_strength(strength) {
        return Err(input_error(format!("--strength {strength}: must be in (0, 1]")));
    }
    if args.extend == Some(0) || args.interpolate.is_some_and(|k| k < 2) {
        return Err(input_error("--extend must be at least 1, --interpolate at least 2"));
    }
    // Video-to-video runs over the whole clip; extension and interpolation over model windows.
    let whole_clip = args.extend.is_none() && args.interpolate.is_none();
    if args.video.is_some() && whole_clip && VideoToVideo::begin_index(s.steps, strength) == s.steps {
        return Err(input_error(format!(
            "--strength {strength} with --steps {} re-runs no step; raise either",
            s.steps
        )));
    }
    if args.video.is_some() && whole_clip && args.frames.is_some() {
        return Err(input_error(
            "--frames: video-to-video takes the clip's length (trim it with --max-frames)",
        ));
    }
    let video = match &args.video {
        Some(path) => Some(read_clip(path, args, &s, if whole_clip { temporal } else { 1 })?),
        None => None,
    };
    let mut frames = match &video {
        Some(v) if whole_clip => v.dim(0)?,
        _ => s.frames,
    };
    if let (Some(v), Some(_)) = (&video, args.extend) {
        if v.dim(0)? < EXTEND_CONTEXT {
            return Err(input_error(format!(
                "--video: {} frames; --extend continues from the last {EXTEND_CONTEXT}",
                v.dim(0)?
            )));
        }
    }
    if frames % temporal != 1 {
        let rounded = (frames / temporal * temporal + 1).max(1);
        eprintln!("warning: --frames {frames} is not of the form {temporal}k+1; rounding to {rounded} as diffusers does");
        frames = rounded;
    }
    // The scheduler config (and an overriding --shift) must build.
    from_config_file(&configs.scheduler_config, args.scheduler.map(scheduler_kind), args.shift)?;

    let mut request = TextToVideo {
        prompt,
        negative_prompt: args.negative_prompt.clone(),
        height: s.height,
        width: s.width,
        num_frames: frames,
        num_inference_steps: s.steps,
        guidance_scale: s.guidance,
        max_sequence_length: s.max_sequence_length,
        seed: args.seed.unwrap_or_else(random_seed),
        init_latents: None,
        keyframes: Keyframes::None,
    };
    let read_image = |path: &PathBuf| read_image(path, s.width, s.height, args.resize.into(), &device);
    request.keyframes = match (&args.image, &args.last_image) {
        (Some(first), Some(last)) => Keyframes::FirstLast(read_image(first)?, read_image(last)?),
        (Some(first), None) => Keyframes::First(read_image(first)?),
        _ => Keyframes::None,
    };
    let vae = &configs.vae;
    let shape = [
        1,
        vae.z_dim,
        (frames - 1) / temporal + 1,
        s.height / vae.spatial_factor(),
        s.width / vae.spatial_factor(),
    ];
    if let Some(path) = &args.init_latents {
        request.init_latents = Some(vidit::io::tensors::read_tensor(path, "latents", Some(&shape), &device)?);
    }
    let job = match (video, args.extend, args.interpolate) {
        (Some(video), Some(frames), _) => Job::Extend { request, video: video.to_device(&device)?, frames },
        (Some(video), None, Some(factor)) => {
            Job::Interpolate { request, video: video.to_device(&device)?, factor }
        }
        (Some(video), None, None) => Job::Video(VideoToVideo {
            request,
            video: video.to_device(&device)?,
            strength,
            noise: match &args.noise {
                Some(path) => Some(vidit::io::tensors::read_tensor(path, "noise", Some(&shape), &device)?),
                None => None,
            },
        }),
        (None, _, _) => Job::Text(request),
    };
    Ok((configs, job, device, s.fps))
}

/// Frames of the input clip extension continues from.
const EXTEND_CONTEXT: usize = 5;

/// The input clip: resampled to the output rate, trimmed, cut to `multiple`·k + 1 frames (with a
/// warning), fitted to the size; `(F, 3, H, W)` in [0, 1].
fn read_clip(path: &Path, args: &GenerateArgs, s: &Settings, multiple: usize) -> Result<candle_core::Tensor> {
    use vidit::io::media::{fit, read_media, resample_fps, to_tensor};
    let clip = read_media(path)?;
    let frames = resample_fps(clip.frames, clip.fps, s.fps);
    let available = frames.len().saturating_sub(args.start);
    let take = args.max_frames.map_or(available, |m| m.min(available));
    if take == 0 {
        return Err(input_error(format!(
            "{}: no frames left after --start {} ({} frames at {} fps)",
            path.display(),
            args.start,
            frames.len(),
            s.fps
        )));
    }
    let usable = (take - 1) / multiple * multiple + 1;
    if usable != take {
        eprintln!("warning: {}: {take} frames cut to {usable} (the form {multiple}k+1)", path.display());
    }
    let fitted: Vec<_> = frames[args.start..args.start + usable]
        .iter()
        .map(|f| fit(f, s.width, s.height, args.resize.into()))
        .collect();
    to_tensor(&fitted, &Device::Cpu)
}

fn scheduler_kind(arg: SchedulerArg) -> SchedulerKind {
    match arg {
        SchedulerArg::Unipc => SchedulerKind::UniPc,
        SchedulerArg::Euler => SchedulerKind::Euler,
        SchedulerArg::Ddpm => SchedulerKind::Ddpm,
        SchedulerArg::Ddim => SchedulerKind::Ddim,
    }
}

fn random_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    (nanos as u64) ^ (std::process::id() as u64).rotate_left(32)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let (configs, job, device, fps) = validate(&args)?;
    let request = match &job {
        Job::Text(r) | Job::Extend { request: r, .. } | Job::Interpolate { request: r, .. } => r,
        Job::Video(v) => &v.request,
    };
    if args.seed.is_none() && request.init_latents.is_none() && !args.quiet {
        eprintln!("seed: {}", request.seed);
    }
    let started = std::time::Instant::now();
    let model = WanModel::load(configs, &device)?;
    if !args.quiet {
        eprintln!("loaded {} in {:.1}s", model.folder.root.display(), started.elapsed().as_secs_f64());
    }
    let unknown = model.text.unknown_words(&request.prompt);
    if !unknown.is_empty() {
        eprintln!("warning: words outside the model's vocabulary: {}", unknown.join(", "));
    }
    let mut scheduler =
        from_config_file(&model.scheduler_config, args.scheduler.map(scheduler_kind), args.shift)?;

    let bar =
        if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(request.num_inference_steps as u64) };
    bar.set_style(
        ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {per_sec} ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let on_step = |i: usize, n: usize| {
        bar.set_length(n as u64);
        bar.set_position(i as u64)
    };
    let (frames, latents, fps) = match &job {
        Job::Text(r) => {
            let out = r.run(&model, scheduler.as_mut(), on_step)?;
            (out.frames, Some(out.latents), fps)
        }
        Job::Video(v) => {
            let out = v.run(&model, scheduler.as_mut(), on_step)?;
            (out.frames, Some(out.latents), fps)
        }
        Job::Extend { request, video, frames } => {
            let clip = extend(&model, scheduler.as_mut(), request, video, *frames, EXTEND_CONTEXT, on_step)?;
            (clip, None, fps)
        }
        Job::Interpolate { request, video, factor } => {
            let clip = interpolate(&model, scheduler.as_mut(), request, video, *factor, on_step)?;
            (clip, None, fps * *factor as f64)
        }
    };
    bar.finish_and_clear();

    write_video(&args.output, &frames, fps)?;
    if let (Some(path), Some(latents)) = (&args.save_latents, latents) {
        vidit::io::tensors::write_tensors(path, &HashMap::from([("latents".to_string(), latents)]))?;
    }
    if !args.quiet {
        eprintln!("wrote {} ({:.1}s)", args.output.display(), started.elapsed().as_secs_f64());
    }
    Ok(())
}
