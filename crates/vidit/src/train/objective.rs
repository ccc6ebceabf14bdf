//! Diffusion training objectives over clean latents `(B, C, T, h, w)`, with per-latent-frame
//! conditioning: conditioned frames stay clean, carry timestep 0 (per-token timesteps, as Wan2.2's
//! TI2V) and are left out of the loss, so one model learns text-to-video, image-to-video,
//! keyframe interpolation and extension.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Rectified flow: x_σ = (1 − σ)·x0 + σ·ε, loss on the velocity v = ε − x0, σ logit-normal
    /// then shifted, except for a share `uniform` of the draws, uniform on (0, 1): shift 3 puts
    /// 2.6% of the draws below σ 0.3, where the last sampling steps refine the details.
    FlowMatching { shift: f64, uniform: f64, prediction: FlowPrediction },
    /// DDPM ε-prediction with diffusers' linear β schedule (1e-4 … 0.02 over 1000 steps).
    Ddpm,
}

/// What a flow-matching model's output is. Either way the loss is on the velocity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowPrediction {
    /// The velocity v itself (Wan's `flow_prediction`).
    Velocity,
    /// The clean latents x̂0 (diffusers' `sample`), turned into v̂ = (x_σ − x̂0)/σ for the loss,
    /// as in Li & He, "Back to Basics: Let Denoising Generative Models Denoise" (2025): clean
    /// latents lie near a low-dimensional set a narrow network can reach, where v carries the full
    /// noise it must reproduce exactly at low σ.
    Sample,
}

impl FlowPrediction {
    /// The scheduler config's `prediction_type` for this output.
    pub fn prediction_type(self) -> &'static str {
        match self {
            Self::Velocity => "flow_prediction",
            Self::Sample => "sample",
        }
    }
}

/// The smallest σ a sample prediction is divided by: below it v̂ would amplify the model's error
/// without bound (Li & He clip 1 − t the same way).
pub const SAMPLE_SIGMA_MIN: f64 = 0.05;

/// Which latent frames of a clip are given (clean) rather than generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameCondition {
    None,
    First,
    FirstAndLast,
    FirstK(usize),
}

impl FrameCondition {
    /// A random condition: none half of the time, else first / first+last / first k frames.
    pub fn sample(rng: &mut ChaCha8Rng, latent_frames: usize) -> Self {
        let r: f64 = rng.random();
        match r {
            _ if r < 0.5 || latent_frames < 2 => Self::None,
            _ if r < 0.75 => Self::First,
            _ if r < 0.9 => Self::FirstAndLast,
            _ => Self::FirstK(rng.random_range(1..latent_frames)),
        }
    }

    /// 1 for a given frame, 0 for a generated one.
    pub fn mask(&self, latent_frames: usize) -> Vec<f32> {
        (0..latent_frames)
            .map(|t| {
                let given = match *self {
                    Self::None => false,
                    Self::First => t == 0,
                    Self::FirstAndLast => t == 0 || t + 1 == latent_frames,
                    Self::FirstK(k) => t < k,
                };
                if given {
                    1.0
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// One noised batch: what the model sees and what it must predict.
pub struct NoisedBatch {
    pub inputs: Tensor,
    /// Per-token timesteps `(B, L)`: 0 on conditioned frames.
    pub timesteps: Tensor,
    pub target: Tensor,
    /// `(B, 1, T, 1, 1)`: 1 where the loss counts.
    pub loss_mask: Tensor,
    /// For sample prediction, the per-sample max(σ, [`SAMPLE_SIGMA_MIN`]) `(B, 1, 1, 1, 1)`
    /// that turns x̂0 into a velocity.
    sample_sigma: Option<Tensor>,
}

impl NoisedBatch {
    /// The model's output in the target's units: itself, or for sample prediction the velocity
    /// (x_σ − x̂0)/σ it implies.
    pub fn prediction(&self, output: &Tensor) -> Result<Tensor> {
        Ok(match &self.sample_sigma {
            None => output.clone(),
            Some(sigma) => (&self.inputs - output)?.broadcast_div(sigma)?,
        })
    }
}

impl Objective {
    /// Noises clean latents `x0 (B, C, T, h, w)`. `tokens_per_frame` is (h/ph)·(w/pw).
    pub fn noise(
        &self,
        x0: &Tensor,
        conditions: &[FrameCondition],
        tokens_per_frame: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<NoisedBatch> {
        let (b, _, t, _, _) = x0.dims5()?;
        if conditions.len() != b {
            bail!("one frame condition per sample");
        }
        let device = x0.device();
        let noise = crate::noise::randn(rng.random(), x0.dims(), device)?;
        let mut keep = Vec::with_capacity(b * t); // 1 on given frames
        let mut coef_x0 = Vec::with_capacity(b);
        let mut coef_noise = Vec::with_capacity(b);
        let mut model_t = Vec::with_capacity(b);
        // The schedule DDPM / DDIM sampling uses (diffusers' linear betas, in f32).
        let alphas_cumprod = match self {
            Objective::Ddpm => crate::schedulers::BetaScheduleConfig::default().alphas_cumprod(),
            Objective::FlowMatching { .. } => vec![],
        };
        let mut sample_sigma = Vec::with_capacity(b);
        for condition in conditions {
            keep.extend(condition.mask(t));
            match *self {
                Objective::FlowMatching { shift, uniform, .. } => {
                    // Without a uniform share no extra number is drawn: older runs keep their stream.
                    let sigma = if uniform > 0.0 && rng.random::<f64>() < uniform {
                        1.0 - rng.random::<f64>() // (0, 1]
                    } else {
                        let u = 1.0 / (1.0 + (-rand_distr_normal(rng)).exp());
                        shift * u / (1.0 + (shift - 1.0) * u)
                    };
                    coef_x0.push((1.0 - sigma) as f32);
                    coef_noise.push(sigma as f32);
                    model_t.push((sigma * 1000.0) as f32);
                    sample_sigma.push(sigma.max(SAMPLE_SIGMA_MIN) as f32);
                }
                Objective::Ddpm => {
                    let step = rng.random_range(0..alphas_cumprod.len());
                    let abar = alphas_cumprod[step] as f64;
                    coef_x0.push(abar.sqrt() as f32);
                    coef_noise.push((1.0 - abar).sqrt() as f32);
                    model_t.push(step as f32);
                }
            }
        }
        let keep = Tensor::from_vec(keep, (b, 1, t, 1, 1), device)?;
        let per_sample = |v: Vec<f32>| Tensor::from_vec(v, (b, 1, 1, 1, 1), device);
        let (a, s) = (per_sample(coef_x0)?, per_sample(coef_noise)?);
        let noised = (x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?;
        // Given frames stay clean.
        let inputs = (x0.broadcast_mul(&keep)? + noised.broadcast_mul(&keep.affine(-1.0, 1.0)?)?)?;
        let (target, sample_sigma) = match *self {
            Objective::FlowMatching { prediction: FlowPrediction::Velocity, .. } => ((&noise - x0)?, None),
            // v = (x_σ − x0)/σ, divided by the same clipped σ as the prediction (equal to ε − x0
            // above the clip); 0 on given frames, where x_σ = x0.
            Objective::FlowMatching { prediction: FlowPrediction::Sample, .. } => {
                let sigma = per_sample(sample_sigma)?;
                ((&inputs - x0)?.broadcast_div(&sigma)?, Some(sigma))
            }
            Objective::Ddpm => (noise, None),
        };
        // (B, T) frame timesteps → (B, T·tokens_per_frame).
        let frame_t = Tensor::from_vec(model_t, (b, 1), device)?
            .broadcast_mul(&keep.reshape((b, t))?.affine(-1.0, 1.0)?)?;
        let timesteps = frame_t
            .unsqueeze(2)?
            .broadcast_as((b, t, tokens_per_frame))?
            .reshape((b, t * tokens_per_frame))?;
        Ok(NoisedBatch { inputs, timesteps, target, loss_mask: keep.affine(-1.0, 1.0)?, sample_sigma })
    }
}

/// A standard normal sample by Box–Muller (rand_distr is not needed for one number).
fn rand_distr_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Mean squared error weighted by `mask` (broadcastable; 0 leaves a position out).
pub fn masked_mse(prediction: &Tensor, target: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let diff = (prediction - target)?.sqr()?.broadcast_mul(mask)?;
    let count = mask.broadcast_as(prediction.shape())?.sum_all()?.to_dtype(DType::F32)?;
    let count = count.maximum(&Tensor::new(1f32, &Device::Cpu)?.to_device(prediction.device())?)?;
    Ok(diff.sum_all()?.broadcast_div(&count)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn given_frames_stay_clean_with_timestep_zero() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let x0 = crate::noise::randn(1, &[2, 4, 3, 4, 4], &Device::Cpu)?;
        let flow = |prediction| Objective::FlowMatching { shift: 3.0, uniform: 0.5, prediction };
        for objective in [flow(FlowPrediction::Velocity), flow(FlowPrediction::Sample), Objective::Ddpm] {
            let conditions = [FrameCondition::First, FrameCondition::None];
            let batch = objective.noise(&x0, &conditions, 4, &mut rng)?;
            let diff = (&batch.inputs - &x0)?.abs()?;
            // Sample 0, frame 0 is given: unchanged; its other frames and all of sample 1 are noised.
            assert_eq!(diff.get(0)?.narrow(1, 0, 1)?.max_all()?.to_scalar::<f32>()?, 0.0);
            assert!(diff.get(0)?.narrow(1, 1, 2)?.max_all()?.to_scalar::<f32>()? > 0.0);
            let t: Vec<Vec<f32>> = batch.timesteps.to_vec2()?;
            assert_eq!(t[0][..4], [0.0; 4]);
            assert!(t[0][4..].iter().all(|&v| v > 0.0 && v == t[0][4]));
            assert!(t[1].iter().all(|&v| v == t[1][0]));
            let mask: Vec<f32> = batch.loss_mask.flatten_all()?.to_vec1()?;
            assert_eq!(mask, [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        }
        Ok(())
    }

    #[test]
    fn uniform_share_reaches_low_sigma() -> Result<()> {
        // The share of σ < 0.3 draws: 2.6% from the shifted logit-normal alone, plus 0.3 × the
        // uniform share.
        let x0 = Tensor::zeros((1, 1, 1, 1, 1), DType::F32, &Device::Cpu)?;
        let low_share = |uniform: f64| -> Result<f64> {
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let objective =
                Objective::FlowMatching { shift: 3.0, uniform, prediction: FlowPrediction::Velocity };
            let mut low = 0;
            for _ in 0..20_000 {
                let t = objective.noise(&x0, &[FrameCondition::None], 1, &mut rng)?.timesteps;
                low += usize::from(t.flatten_all()?.to_vec1::<f32>()?[0] < 300.0);
            }
            Ok(low as f64 / 20_000.0)
        };
        let (alone, mixed) = (low_share(0.0)?, low_share(0.5)?);
        assert!((alone - 0.026).abs() < 0.005, "{alone}");
        assert!((mixed - (0.5 * 0.026 + 0.5 * 0.3)).abs() < 0.01, "{mixed}");
        Ok(())
    }

    #[test]
    fn sample_prediction_is_scored_as_the_velocity_it_implies() -> Result<()> {
        // All draws uniform, so that some fall below the clip.
        let x0 = crate::noise::randn(2, &[256, 2, 2, 2, 2], &Device::Cpu)?;
        let conditions = vec![FrameCondition::First; 256];
        let noise_for = |prediction| -> Result<NoisedBatch> {
            let objective = Objective::FlowMatching { shift: 3.0, uniform: 1.0, prediction };
            objective.noise(&x0, &conditions, 4, &mut ChaCha8Rng::seed_from_u64(3))
        };
        let (velocity, sample) = (noise_for(FlowPrediction::Velocity)?, noise_for(FlowPrediction::Sample)?);
        let max_abs = |t: Tensor| -> Result<f32> { Ok(t.abs()?.max_all()?.to_scalar::<f32>()?) };
        // The same draws, so the same noised inputs; a velocity model's output passes unchanged.
        assert_eq!(max_abs((&velocity.inputs - &sample.inputs)?)?, 0.0);
        assert_eq!(max_abs((velocity.prediction(&x0)? - &x0)?)?, 0.0);
        // Per sample, on its generated frame 1: the target is ε − x0, and an x̂0 off by δ costs
        // δ / max(σ, σ_min) in velocity units.
        let delta = 0.01;
        let off = sample.prediction(&x0.affine(1.0, delta)?)?;
        let frame1 = |t: &Tensor, i: usize| t.get(i).and_then(|t| t.narrow(1, 1, 1));
        let sigmas: Vec<f32> = sample.timesteps.narrow(1, 4, 1)?.flatten_all()?.to_vec1()?;
        let mut clipped = 0;
        for (i, &t) in sigmas.iter().enumerate() {
            let sigma = f64::from(t) / 1000.0;
            let clip = sigma.max(SAMPLE_SIGMA_MIN);
            clipped += usize::from(sigma < SAMPLE_SIGMA_MIN);
            let exact = max_abs((frame1(&sample.target, i)? - frame1(&velocity.target, i)?)?)?;
            if sigma > SAMPLE_SIGMA_MIN {
                assert!(exact < 1e-5 / clip as f32, "σ {sigma}: target off by {exact}");
            }
            let cost = (frame1(&off, i)? - frame1(&sample.target, i)?)?.mean_all()?.to_scalar::<f32>()?;
            assert!((cost + (delta / clip) as f32).abs() < 1e-3, "σ {sigma}: {cost}");
        }
        assert!(clipped > 0 && clipped < 256, "the draws reach below and above the clip: {clipped}");
        Ok(())
    }

    #[test]
    fn condition_masks() {
        assert_eq!(FrameCondition::FirstAndLast.mask(4), [1.0, 0.0, 0.0, 1.0]);
        assert_eq!(FrameCondition::FirstK(2).mask(4), [1.0, 1.0, 0.0, 0.0]);
        assert_eq!(FrameCondition::None.mask(2), [0.0, 0.0]);
    }
}
