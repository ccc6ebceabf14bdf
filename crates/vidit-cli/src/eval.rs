//! `vidit eval`: generate clips for the shapes grammar and score colour, shape and direction from
//! the pixels with the deterministic analyzer, separately for seen and held-out combinations.

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use std::path::PathBuf;
use vidit::error::input_error;
use vidit::pipelines::{TextToVideo, WanModel};
use vidit::schedulers::from_config_file;
use vidit::train::data::shapes::{analyze, Combination, Split};

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
}

#[derive(Default)]
struct Score {
    clips: usize,
    color: usize,
    shape: usize,
    direction: usize,
    all: usize,
}

impl Score {
    fn add(&mut self, expected: Combination, got: Option<Combination>) {
        self.clips += 1;
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

    fn row(&self, name: &str) -> String {
        let pct = |k: usize| 100.0 * k as f64 / self.clips.max(1) as f64;
        format!(
            "{name:<9} {:>5} {:>6.1}% {:>6.1}% {:>9.1}% {:>6.1}%",
            self.clips,
            pct(self.color),
            pct(self.shape),
            pct(self.direction),
            pct(self.all)
        )
    }
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
                num_inference_steps: args.steps.unwrap_or(g.num_inference_steps),
                guidance_scale: args.guidance.unwrap_or(g.guidance_scale),
                ..TextToVideo::with_defaults(
                    combo.caption(),
                    &g,
                    args.seed.wrapping_add((split * args.n + i) as u64),
                )
            };
            let mut scheduler = from_config_file(&model.scheduler_config, None, None)?;
            let output = request.run(&model, scheduler.as_mut(), |_, _| {})?;
            let got = analyze(&output.frames)?.map(|a| a.combination);
            scores[split].add(combo, got);
        }
    }
    println!("split     clips  color   shape  direction    all");
    for (score, name) in scores.iter().zip(["seen", "held-out"]) {
        if score.clips > 0 {
            println!("{}", score.row(name));
        }
    }
    eprintln!("{} clips in {:.0}s", scores[0].clips + scores[1].clips, started.elapsed().as_secs_f64());
    Ok(())
}
