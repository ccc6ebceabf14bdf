//! Seeded Gaussian noise: the same seed gives the same latents on every platform and build.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Standard normal samples of `shape`, from ChaCha20 (stable across rand versions) and Box–Muller.
pub fn randn(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut values = Vec::with_capacity(n + 1);
    while values.len() < n {
        // u1 in (0, 1] so that ln(u1) is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        values.push((radius * angle.cos()) as f32);
        values.push((radius * angle.sin()) as f32);
    }
    values.truncate(n);
    Ok(Tensor::from_vec(values, shape, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_roughly_standard() -> Result<()> {
        let a = randn(7, &[40, 1000], &Device::Cpu)?;
        let b = randn(7, &[40, 1000], &Device::Cpu)?;
        let c = randn(8, &[40, 1000], &Device::Cpu)?;
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        assert_ne!(a.to_vec2::<f32>()?, c.to_vec2::<f32>()?);
        let mean = a.mean_all()?.to_scalar::<f32>()?;
        let var = a.sqr()?.mean_all()?.to_scalar::<f32>()? - mean * mean;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
        Ok(())
    }
}
