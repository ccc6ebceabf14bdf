//! `vidit eval`: generate clips for the shapes grammar and score colour, shape and direction from
//! the pixels with the deterministic analyzer, separately for seen and held-out combinations.
//! Besides text-to-video, each conditioned mode is scored on rendered ground-truth clips:
//! image-to-video (and how well frame 0 keeps the image), keyframe interpolation (distance of the
//! shape from the straight path between the keyframes), extension (the new frames, and the seam)
//! video-to-video (the colour changed to the prompt's, the motion kept) and restoration (a clip
//! with pixel noise re-denoised under its own caption: how close it comes back to the clean one).

use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use vidit::error::input_error;
use vidit::noise::randn;
use vidit::pipelines::extend::extend;
use vidit::pipelines::video_to_video::RESTORE_STRENGTH;
use vidit::pipelines::{Keyframes, TextToVideo, VideoToVideo, WanModel};
use vidit::schedulers::from_config_file;
use vidit::train::data::shapes::{analyze, centroids, render, Combination, Motion, Split, COLORS, SHAPES};

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum Mode {
    /// Text-to-video.
    Text,
    /// Image-to-video from the first frame of a rendered clip.
    Image,
    /// From the first and the last frame of a rendered clip.
    Interpolate,
    /// A rendered clip continued by one window.
    Extend,
    /// A rendered clip of another colour restyled to the prompt's at strength 0.6.
    Video,
    /// A rendered clip with Gaussian pixel noise restored under its own caption at strength 0.3.
    Restore,
}

/// Frames extension continues from (as `vidit generate --extend`).
const EXTEND_CONTEXT: usize = 5;
const VIDEO_STRENGTH: f64 = 0.6;
/// Standard deviation of the pixel noise restoration is scored on (pixels in [0, 1]).
const RESTORE_NOISE: f64 = 0.1;

#[derive(Args)]
pub struct EvalArgs {
    /// Model folder (a model trained on the shapes grammar).
    #[arg(long)]
    model: PathBuf,
    /// Captions to evaluate, one per line (default: the whole grammar).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Clips per split (seen, held-out), cycling through its captions.
    #[arg(long, default_value_t = 100)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Denoising steps [model's generation_config.json].
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale [model's generation_config.json].
    #[arg(long)]
    guidance: Option<f64>,
    /// What to generate and score.
    #[arg(long, value_enum, default_value = "text")]
    mode: Mode,
    /// Strength of --mode video and restore [0.6; restore: as `vidit generate --restore`].
    #[arg(long)]
    strength: Option<f64>,
}

#[derive(Default)]
struct Score {
    clips: usize,
    color: usize,
    shape: usize,
    direction: usize,
    all: usize,
    /// The mode's own measure, summed over clips (PSNR of frame 0, centroid error, seam ratio).
    measure: f64,
    /// Clips by prompted shape (rows) and the shape read off the pixels (columns; the last: no
    /// shape found).
    shapes: [[usize; SHAPES.len() + 1]; SHAPES.len()],
}

impl Score {
    fn add(&mut self, expected: Combination, got: Option<Combination>) {
        self.clips += 1;
        self.shapes[expected.shape][got.map_or(SHAPES.len(), |g| g.shape)] += 1;
        if let Some(got) = got {
            let (c, s, d) = (
                got.color == expected.color,
                got.shape == expected.shape,
                got.direction == expected.direction,
            );
            self.color += usize::from(c);
            self.shape += usize::from(s);
            self.direction += usize::from(d);
            self.all += usize::from(c && s && d);
        }
    }

    fn row(&self, name: &str, mode: Mode) -> String {
        let pct = |k: usize| 100.0 * k as f64 / self.clips.max(1) as f64;
        let mut row = format!(
            "{name:<9} {:>5} {:>6.1}% {:>6.1}% {:>9.1}% {:>6.1}%",
            self.clips,
            pct(self.color),
            pct(self.shape),
            pct(self.direction),
            pct(self.all)
        );
        if let Some(what) = measure_name(mode) {
            row += &format!("   {what}: {:.2}", self.measure / self.clips.max(1) as f64);
        }
        row
    }

    /// Where the shapes go wrong: for each prompted shape, what the analyzer read.
    fn shape_confusion(&self, name: &str) -> String {
        let mut lines = format!("{name}: prompted shape -> read as {}, none", SHAPES.join(", "));
        for (shape, reads) in SHAPES.iter().zip(&self.shapes) {
            let counts: Vec<String> = reads.iter().map(|k| k.to_string()).collect();
            lines += &format!("\n  {shape:<9} {}", counts.join(", "));
        }
        lines
    }
}

fn measure_name(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::Text | Mode::Video => None,
        Mode::Restore => Some("mean PSNR vs the clean clip (dB)"),
        Mode::Image => Some("mean PSNR of frame 0 vs the image (dB)"),
        Mode::Interpolate => Some("mean centroid distance from the keyframes' straight path (px)"),
        Mode::Extend => Some("mean seam change / mean frame-to-frame change"),
    }
}

/// Peak signal-to-noise ratio of two frames `(3, H, W)`, or clips, in [0, 1].
fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    let mse = (a - b)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok(-10.0 * mse.max(1e-12).log10())
}

/// Mean absolute change between consecutive frames of `(F, 3, H, W)`, per pair.
fn frame_changes(frames: &Tensor) -> Result<Vec<f64>> {
    let n = frames.dim(0)?;
    let diff = (frames.narrow(0, 1, n - 1)? - frames.narrow(0, 0, n - 1)?)?.abs()?;
    Ok(diff.flatten_from(1)?.mean(1)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

/// Generates one clip for `combo` in `mode` and scores it; the request's seed draws both the
/// noise and the ground truth's motion.
fn score_one(
    model: &WanModel,
    request: TextToVideo,
    mode: Mode,
    strength: f64,
    combo: Combination,
    score: &mut Score,
) -> Result<()> {
    let g = &model.generation;
    let (w, h, f) = (g.width, g.height, g.num_frames);
    let mut scheduler = from_config_file(&model.scheduler_config, None, None)?;
    // Video-to-video starts from the same motion in another colour.
    let source_combo = match mode {
        Mode::Video => {
            Combination { color: (combo.color + 1 + request.seed as usize % 6) % COLORS.len(), ..combo }
        }
        _ => combo,
    };
    let motion = Motion::from_seed(request.seed ^ 0x7275_7468, source_combo, w, h, f);
    let truth = render(source_combo, &motion, w, h, f, &model.device)?; // (F, 3, H, W)
    let (scored, measure) = match mode {
        Mode::Text => (request.run(model, scheduler.as_mut(), |_, _| {})?.frames, 0.0),
        Mode::Image => {
            let request = TextToVideo { keyframes: Keyframes::First(truth.get(0)?), ..request };
            let frames = request.run(model, scheduler.as_mut(), |_, _| {})?.frames;
            let fidelity = psnr(&frames.get(0)?, &truth.get(0)?)?;
            (frames, fidelity)
        }
        Mode::Interpolate => {
            let keys = Keyframes::FirstLast(truth.get(0)?, truth.get(f - 1)?);
            let frames =
                TextToVideo { keyframes: keys, ..request }.run(model, scheduler.as_mut(), |_, _| {})?.frames;
            // The shape moves in a straight line at constant speed: the path is the truth's.
            let errors: Vec<f64> = centroids(&frames)?
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let [tx, ty] = motion.centre(combo, i);
                    c.map_or(w as f64, |[x, y]| ((x - tx) as f64).hypot((y - ty) as f64))
                })
                .collect();
            (frames, errors.iter().sum::<f64>() / errors.len() as f64)
        }
        Mode::Extend => {
            let clip = extend(
                model,
                scheduler.as_mut(),
                &request,
                &truth,
                f - EXTEND_CONTEXT,
                EXTEND_CONTEXT,
                |_, _| {},
            )?;
            let new = clip.narrow(0, f, clip.dim(0)? - f)?;
            // The seam is the change from the last given frame to the first new one.
            let changes = frame_changes(&clip)?;
            let typical = changes.iter().sum::<f64>() / changes.len() as f64;
            (new, changes[f - 1] / typical.max(1e-9))
        }
        Mode::Video => {
            let v2v = VideoToVideo { request, video: truth, strength, noise: None };
            (v2v.run(model, scheduler.as_mut(), |_, _| {})?.frames, 0.0)
        }
        Mode::Restore => {
            let grain = randn(request.seed ^ 0x6e6f_6973, truth.dims(), &model.device)?;
            let noisy = (&truth + (grain * RESTORE_NOISE)?)?.clamp(0f32, 1f32)?;
            let v2v = VideoToVideo { request, video: noisy, strength, noise: None };
            let frames = v2v.run(model, scheduler.as_mut(), |_, _| {})?.frames;
            let fidelity = psnr(&frames, &truth)?;
            (frames, fidelity)
        }
    };
    score.add(combo, analyze(&scored)?.map(|a| a.combination));
    score.measure += measure;
    Ok(())
}

fn read_prompts(path: &PathBuf) -> Result<Vec<Combination>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| input_error(format!("{}: cannot read: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let combo = Combination::parse(line.trim()).ok_or_else(|| {
            input_error(format!(
                "{}:{}: not a caption of the shapes grammar: {line:?}",
                path.display(),
                i + 1
            ))
        })?;
        out.push(combo);
    }
    if out.is_empty() {
        return Err(input_error(format!("{}: no captions", path.display())));
    }
    Ok(out)
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.n == 0 {
        return Err(input_error("--n: must be at least 1"));
    }
    let combos = match &args.prompts {
        Some(path) => read_prompts(path)?,
        None => Combination::all(Split::All),
    };
    let model = WanModel::open(&args.model, &Device::Cpu)?;
    let g = model.generation.clone();
    let steps = args.steps.unwrap_or(g.num_inference_steps);
    let strength =
        args.strength.unwrap_or(if args.mode == Mode::Restore { RESTORE_STRENGTH } else { VIDEO_STRENGTH });
    if args.strength.is_some() && !matches!(args.mode, Mode::Video | Mode::Restore) {
        return Err(input_error("--strength: only with --mode video or restore"));
    }
    if !VideoToVideo::valid_strength(strength) {
        return Err(input_error(format!("--strength {strength}: must be in (0, 1]")));
    }
    if matches!(args.mode, Mode::Video | Mode::Restore) && VideoToVideo::begin_index(steps, strength) == steps
    {
        return Err(input_error(format!("--steps {steps}: strength {strength} would re-run no step")));
    }
    let mut scores = [Score::default(), Score::default()];
    let started = std::time::Instant::now();
    for (split, held_out) in [(0usize, false), (1, true)] {
        let pool: Vec<Combination> = combos.iter().copied().filter(|c| c.is_held_out() == held_out).collect();
        if pool.is_empty() {
            continue;
        }
        for i in 0..args.n {
            let combo = pool[i % pool.len()];
            let request = TextToVideo {
                num_inference_steps: steps,
                guidance_scale: args.guidance.unwrap_or(g.guidance_scale),
                ..TextToVideo::with_defaults(
                    combo.caption(),
                    &g,
                    args.seed.wrapping_add((split * args.n + i) as u64),
                )
            };
            score_one(&model, request, args.mode, strength, combo, &mut scores[split])?;
        }
    }
    println!("split     clips  color   shape  direction    all");
    for (score, name) in scores.iter().zip(["seen", "held-out"]) {
        if score.clips > 0 {
            println!("{}", score.row(name, args.mode));
        }
    }
    for (score, name) in scores.iter().zip(["seen", "held-out"]) {
        if score.clips > 0 {
            println!("{}", score.shape_confusion(name));
        }
    }
    eprintln!("{} clips in {:.0}s", scores[0].clips + scores[1].clips, started.elapsed().as_secs_f64());
    Ok(())
}
