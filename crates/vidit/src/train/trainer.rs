//! The training loop shared by every model: AdamW with gradient clipping, EMA weights, a CSV log,
//! periodic atomic checkpoints (parameters, EMA, optimiser moments, data RNG position) and
//! resuming that continues bit for bit.

use super::optim::{AdamW, AdamWConfig, Ema, LrSchedule};
use crate::error::input_error;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub steps: usize,
    /// `adamw.lr` is the peak learning rate; the schedule scales it step by step.
    pub adamw: AdamWConfig,
    pub lr_schedule: LrSchedule,
    pub grad_clip: Option<f64>,
    pub ema_decay: f64,
    pub checkpoint_every: usize,
    pub seed: u64,
    /// Continue from the run folder's checkpoint.
    pub resume: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 1000,
            adamw: AdamWConfig::default(),
            lr_schedule: LrSchedule::Constant { warmup: 0 },
            grad_clip: Some(1.0),
            ema_decay: 0.999,
            checkpoint_every: 200,
            seed: 0,
            resume: false,
        }
    }
}

/// Set (by a Ctrl-C handler) to stop training after the current step with a checkpoint.
pub static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Training stopped on request; the checkpoint of the last step is on disk.
#[derive(Debug, thiserror::Error)]
#[error("interrupted at step {step}: checkpoint saved to {path}; continue with --resume")]
pub struct Interrupted {
    pub step: usize,
    pub path: String,
}

/// What one step reports to the caller (for a progress bar).
pub struct StepReport {
    pub step: usize,
    pub loss: f32,
    pub grad_norm: f64,
}

/// Watches a run: every step (a progress bar), and every checkpoint with the EMA weights
/// (sample clips). A closure over `&StepReport` watches steps only.
pub trait Observer {
    fn step(&mut self, report: &StepReport);

    fn checkpoint(&mut self, _step: usize, _ema_weights: &HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
}

impl<F: FnMut(&StepReport)> Observer for F {
    fn step(&mut self, report: &StepReport) {
        self(report)
    }
}

/// An observer from a progress closure and a checkpoint closure.
pub struct WithCheckpoints<P, C>(pub P, pub C);

impl<P, C> Observer for WithCheckpoints<P, C>
where
    P: FnMut(&StepReport),
    C: FnMut(usize, &HashMap<String, Tensor>) -> Result<()>,
{
    fn step(&mut self, report: &StepReport) {
        (self.0)(report)
    }

    fn checkpoint(&mut self, step: usize, ema_weights: &HashMap<String, Tensor>) -> Result<()> {
        (self.1)(step, ema_weights)
    }
}

/// Where a run keeps its state.
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint.safetensors")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("train_log.csv")
    }
    /// The fixed random text encoder of a new run trained with it frozen (read back on resume).
    pub fn frozen_text_encoder(&self) -> PathBuf {
        self.root.join("text_encoder_frozen.safetensors")
    }
    /// Sample clips rendered at checkpoints.
    pub fn sample(&self, step: usize, name: &str) -> Result<PathBuf> {
        let dir = self.root.join("samples");
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        Ok(dir.join(format!("step{step:06}_{name}.gif")))
    }

    pub fn loss_curve(&self) -> PathBuf {
        self.root.join("loss.png")
    }
}

/// Parameter names and shapes, so a checkpoint from another config is refused.
fn fingerprint(vars: &HashMap<String, Var>) -> String {
    let mut items: Vec<String> = vars.iter().map(|(k, v)| format!("{k}:{:?}", v.dims())).collect();
    items.sort();
    items.join(";")
}

fn vars_of(varmap: &VarMap) -> HashMap<String, Var> {
    varmap.data().lock().expect("varmap lock").clone()
}

/// Writes a checkpoint atomically: a crash mid-write leaves the previous one intact.
fn save_checkpoint(
    path: &Path,
    vars: &HashMap<String, Var>,
    ema: &Ema,
    optimizer: &AdamW,
    rng: &ChaCha8Rng,
    seed: u64,
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in vars {
        tensors.insert(format!("param.{name}"), var.as_tensor().detach());
    }
    for (name, w) in &ema.weights {
        tensors.insert(format!("ema.{name}"), w.clone());
    }
    for (name, t) in optimizer.state() {
        tensors.insert(format!("adam.{name}"), t);
    }
    let metadata = HashMap::from([
        ("step".to_string(), optimizer.step.to_string()),
        ("seed".to_string(), seed.to_string()),
        ("rng_word_pos".to_string(), rng.get_word_pos().to_string()),
        ("fingerprint".to_string(), fingerprint(vars)),
    ]);
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))?;
    crate::io::atomic::write_file(path, |tmp| Ok(std::fs::write(tmp, &bytes)?))
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub step: usize,
    pub seed: u64,
    pub rng_word_pos: u128,
    pub fingerprint: String,
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|e| input_error(format!("{}: cannot read: {e}", path.display())))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| input_error(format!("{}: not a checkpoint: {e}", path.display())))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| input_error(format!("{}: checkpoint has no `{k}`", path.display())))
        };
        let parse = |k: &str| -> Result<u128> {
            field(k)?
                .parse()
                .map_err(|_| input_error(format!("{}: checkpoint `{k}` is not a number", path.display())))
        };
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        Ok(Self {
            step: parse("step")? as usize,
            seed: parse("seed")? as u64,
            rng_word_pos: parse("rng_word_pos")?,
            fingerprint: field("fingerprint")?,
            tensors,
        })
    }

    /// Tensors under `prefix.` with the prefix removed.
    pub fn group(&self, prefix: &str) -> HashMap<String, Tensor> {
        let p = format!("{prefix}.");
        self.tensors.iter().filter_map(|(k, v)| Some((k.strip_prefix(&p)?.to_string(), v.clone()))).collect()
    }
}

/// Trains the variables of `varmap` for `options.steps` steps. `loss_fn(rng)` draws a batch from
/// the data RNG and returns the scalar loss. With `options.resume`, continues from the run
/// folder's checkpoint. `on_step` sees every step. Returns the EMA weights at the end.
pub fn train(
    varmap: &VarMap,
    options: &TrainOptions,
    run: &RunDir,
    mut loss_fn: impl FnMut(&mut ChaCha8Rng) -> Result<Tensor>,
    mut observer: impl Observer,
) -> Result<HashMap<String, Tensor>> {
    std::fs::create_dir_all(&run.root).with_context(|| format!("{}: cannot create", run.root.display()))?;
    let vars = vars_of(varmap);
    let mut optimizer = AdamW::new(&vars, options.adamw)?;
    let mut ema = Ema::new(&vars, options.ema_decay)?;
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    if options.resume {
        let path = run.checkpoint();
        if !path.exists() {
            return Err(input_error(format!("{}: no checkpoint to resume from", path.display())));
        }
        let ckpt = Checkpoint::load(&path)?;
        if ckpt.fingerprint != fingerprint(&vars) {
            return Err(input_error(format!(
                "{}: checkpoint is from another model config (parameter names or shapes differ)",
                path.display()
            )));
        }
        for (name, t) in ckpt.group("param") {
            vars[&name].set(&t.to_device(vars[&name].device())?)?;
        }
        ema.weights = ckpt.group("ema");
        optimizer.load_state(&ckpt.group("adam"), ckpt.step)?;
        rng = ChaCha8Rng::seed_from_u64(ckpt.seed);
        rng.set_word_pos(ckpt.rng_word_pos);
    }
    let mut log = open_log(&run.log(), optimizer.step)?;
    let started = std::time::Instant::now();
    while optimizer.step < options.steps {
        let loss = loss_fn(&mut rng)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            bail!(
                "loss became {value} at step {}; stopped, the last good checkpoint ({}) is kept",
                optimizer.step + 1,
                run.checkpoint().display()
            );
        }
        let grads = loss.backward()?;
        optimizer.config.lr = options.adamw.lr * options.lr_schedule.factor(optimizer.step, options.steps);
        let grad_norm = optimizer.step(&grads, options.grad_clip)?;
        ema.update(&vars)?;
        let step = optimizer.step;
        writeln!(log, "{step},{value},{grad_norm},{:.3}", started.elapsed().as_secs_f64())?;
        observer.step(&StepReport { step, loss: value, grad_norm });
        let stop = STOP.load(std::sync::atomic::Ordering::SeqCst);
        if step % options.checkpoint_every == 0 || step == options.steps || stop {
            log.flush()?;
            save_checkpoint(&run.checkpoint(), &vars, &ema, &optimizer, &rng, options.seed)?;
            super::plot::write_loss_curve(&run.log(), &run.loss_curve())?;
            observer.checkpoint(step, &ema.weights)?;
        }
        if stop {
            return Err(Interrupted { step, path: run.checkpoint().display().to_string() }.into());
        }
    }
    log.flush()?;
    Ok(ema.weights)
}

/// Opens the CSV log for appending, dropping rows past `step` (a resumed run rewrites them).
fn open_log(path: &Path, step: usize) -> Result<std::io::BufWriter<std::fs::File>> {
    let mut kept = String::from("step,loss,grad_norm,seconds\n");
    if step > 0 {
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines().skip(1) {
                if line.split(',').next().and_then(|s| s.parse::<usize>().ok()).is_some_and(|s| s <= step) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
    }
    std::fs::write(path, kept)?;
    Ok(std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::{Module, VarBuilder};
    use rand::Rng;

    /// A tiny regression problem with data drawn from the RNG.
    fn setup() -> Result<(VarMap, candle_nn::Linear)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let layer = candle_nn::linear(3, 1, vb.pp("lin"))?;
        // candle's initialisers are not seeded: start from zeros so the test is deterministic.
        for var in vars_of(&varmap).values() {
            var.set(&var.zeros_like()?)?;
        }
        Ok((varmap, layer))
    }

    fn loss(layer: &candle_nn::Linear, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let x: Vec<f32> = (0..12).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x = Tensor::from_vec(x, (4, 3), &Device::Cpu)?;
        let y = x.matmul(&Tensor::new(&[[1f32], [-2.0], [0.5]], &Device::Cpu)?)?;
        Ok((layer.forward(&x)? - y)?.sqr()?.mean_all()?)
    }

    fn options(steps: usize) -> TrainOptions {
        TrainOptions {
            steps,
            adamw: AdamWConfig { lr: 0.1, ..Default::default() },
            // Resuming mid-warm-up must pick the curve up where it was.
            lr_schedule: LrSchedule::Constant { warmup: 12 },
            checkpoint_every: 5,
            ema_decay: 0.9,
            ..Default::default()
        }
    }

    #[test]
    fn training_reduces_the_loss_and_resume_is_bit_exact() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let copy_weights = |from: &VarMap, to: &VarMap| -> Result<()> {
            for (name, var) in vars_of(to) {
                var.set(vars_of(from)[&name].as_tensor())?;
            }
            Ok(())
        };
        // Reference: 20 uninterrupted steps.
        let (reference, layer_ref) = setup()?;
        let (split, layer_split) = setup()?;
        copy_weights(&reference, &split)?;
        let run_ref = RunDir { root: dir.path().join("reference") };
        let mut losses = Vec::new();
        let ema_ref = train(
            &reference,
            &options(20),
            &run_ref,
            |rng| loss(&layer_ref, rng),
            |r: &StepReport| losses.push(r.loss),
        )?;
        assert!(losses[19] < 0.35 * losses[0], "loss {} -> {}", losses[0], losses[19]);

        // The same run stopped after 10 steps, then resumed into freshly built (random) weights.
        let run_split = RunDir { root: dir.path().join("split") };
        train(&split, &options(10), &run_split, |rng| loss(&layer_split, rng), |_: &StepReport| {})?;
        let (resumed, layer_resumed) = setup()?;
        let ema_resumed = train(
            &resumed,
            &TrainOptions { resume: true, ..options(20) },
            &run_split,
            |rng| loss(&layer_resumed, rng),
            |_: &StepReport| {},
        )?;
        for (name, var) in vars_of(&reference) {
            assert_eq!(flat(var.as_tensor())?, flat(vars_of(&resumed)[&name].as_tensor())?, "{name}");
            assert_eq!(flat(&ema_ref[&name])?, flat(&ema_resumed[&name])?, "EMA {name}");
        }
        let log = std::fs::read_to_string(run_split.log())?;
        assert_eq!(log.lines().count(), 21, "header + one row per step");
        Ok(())
    }

    fn flat(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_vec1()?)
    }

    #[test]
    fn resume_refuses_another_config_and_nan_keeps_the_checkpoint() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let run = RunDir { root: dir.path().to_path_buf() };
        let (varmap, layer) = setup()?;
        train(&varmap, &options(5), &run, |rng| loss(&layer, rng), |_: &StepReport| {})?;
        let saved = std::fs::read(run.checkpoint())?;

        let other = VarMap::new();
        let vb = VarBuilder::from_varmap(&other, DType::F32, &Device::Cpu);
        let wide = candle_nn::linear(4, 1, vb.pp("lin"))?;
        let err = train(
            &other,
            &TrainOptions { resume: true, ..options(10) },
            &run,
            |_| Ok(wide.weight().sum_all()?),
            |_: &StepReport| {},
        )
        .unwrap_err();
        assert!(
            crate::error::is_input_error(&err) && err.to_string().contains("another model config"),
            "{err}"
        );

        let err = train(
            &varmap,
            &TrainOptions { resume: true, ..options(10) },
            &run,
            |_| Ok(Tensor::new(f32::NAN, &Device::Cpu)?),
            |_: &StepReport| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("last good checkpoint"), "{err}");
        assert_eq!(std::fs::read(run.checkpoint())?, saved, "the good checkpoint is untouched");
        Ok(())
    }
}
