//! Scheduler timesteps, sigmas and trajectories against diffusers.

mod common;

use anyhow::Result;
use candle_core::Tensor;
use common::{assert_close, get, load};
use vidit::schedulers::{
    FlowMatchEulerConfig, FlowMatchEulerDiscreteScheduler, Scheduler, UniPcConfig, UniPcMultistepScheduler,
};

fn build(kind: &str, shift: f64) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        "unipc" => Box::new(UniPcMultistepScheduler::new(UniPcConfig {
            prediction_type: "flow_prediction".into(),
            use_flow_sigmas: true,
            flow_shift: shift,
            ..Default::default()
        })?),
        _ => Box::new(FlowMatchEulerDiscreteScheduler::new(FlowMatchEulerConfig {
            shift,
            ..Default::default()
        })?),
    })
}

#[test]
fn timesteps_and_sigmas_are_exact() -> Result<()> {
    let record = load("schedulers.safetensors")?;
    for kind in ["unipc", "euler"] {
        for shift in [3.0, 5.0] {
            for steps in [3usize, 4, 6, 10, 50] {
                let key = format!("{kind}.shift{shift}.steps{steps}");
                let mut s = build(kind, shift)?;
                s.set_timesteps(steps)?;
                let expected_t: Vec<f32> =
                    get(&record, &format!("{key}.timesteps")).to_dtype(candle_core::DType::F32)?.to_vec1()?;
                let expected_s: Vec<f32> = get(&record, &format!("{key}.sigmas")).to_vec1()?;
                assert_eq!(s.timesteps(), expected_t.as_slice(), "{key} timesteps");
                assert_eq!(s.sigmas(), expected_s.as_slice(), "{key} sigmas");
            }
        }
    }
    Ok(())
}

#[test]
fn trajectories_from_fixed_model_outputs() -> Result<()> {
    let record = load("schedulers.safetensors")?;
    let sample0 = get(&record, "trajectory.sample");
    let outputs = get(&record, "trajectory.model_outputs");
    for kind in ["unipc", "euler"] {
        for shift in [3.0, 5.0] {
            let key = format!("{kind}.shift{shift}.steps6");
            let mut s = build(kind, shift)?;
            s.set_timesteps(6)?;
            let mut x: Tensor = sample0.clone();
            for i in 0..6 {
                x = s.step(&outputs.get(i)?, &x)?;
                assert_close(
                    &format!("{key} step {i}"),
                    &x,
                    get(&record, &format!("{key}.trajectory.{i}")),
                    1e-6,
                )?;
            }
        }
    }
    Ok(())
}

/// diffusers' UniPC reads a `sample` output as x0 itself, a `flow_prediction` one as x − σ·v: fed
/// the x0 the fixture's velocities imply, the sample-prediction path follows the same trajectory.
#[test]
fn unipc_sample_prediction_follows_the_flow_trajectory() -> Result<()> {
    let record = load("schedulers.safetensors")?;
    let sample0 = get(&record, "trajectory.sample");
    let outputs = get(&record, "trajectory.model_outputs");
    let mut s = UniPcMultistepScheduler::new(UniPcConfig {
        prediction_type: "sample".into(),
        use_flow_sigmas: true,
        flow_shift: 3.0,
        ..Default::default()
    })?;
    s.set_timesteps(6)?;
    let mut x: Tensor = sample0.clone();
    for i in 0..6 {
        let x0 = (&x - outputs.get(i)?.affine(s.sigmas()[i] as f64, 0.0)?)?;
        x = s.step(&x0, &x)?;
        assert_close(
            &format!("sample prediction step {i}"),
            &x,
            get(&record, &format!("unipc.shift3.steps6.trajectory.{i}")),
            1e-6,
        )?;
    }
    Ok(())
}

#[test]
fn ddpm_and_ddim_match_diffusers() -> Result<()> {
    use vidit::schedulers::{BetaScheduleConfig, DdimScheduler, DdpmScheduler};
    let record = load("schedulers.safetensors")?;
    let config = BetaScheduleConfig { clip_sample: false, ..Default::default() };
    for steps in [6usize, 50] {
        for kind in ["ddpm", "ddim"] {
            let mut s: Box<dyn Scheduler> = if kind == "ddpm" {
                Box::new(DdpmScheduler::new(config.clone())?)
            } else {
                Box::new(DdimScheduler::new(config.clone())?)
            };
            s.set_timesteps(steps)?;
            let expected: Vec<f32> = get(&record, &format!("{kind}.steps{steps}.timesteps"))
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?;
            assert_eq!(s.timesteps(), expected.as_slice(), "{kind} {steps} timesteps");
        }
    }
    let sample0 = get(&record, "trajectory.sample");
    let outputs = get(&record, "trajectory.model_outputs");
    let noise = get(&record, "ddpm.variance_noise");
    let mut ddpm = DdpmScheduler::new(config.clone())?;
    let mut ddim = DdimScheduler::new(config)?;
    ddpm.set_timesteps(6)?;
    ddim.set_timesteps(6)?;
    let (mut x, mut y) = (sample0.clone(), sample0.clone());
    for i in 0..6 {
        x = ddpm.step_with_noise(&outputs.get(i)?, &x, &noise.get(i)?)?;
        y = ddim.step(&outputs.get(i)?, &y)?;
        // Random ε outputs blow the sample up (x0 divides by √ᾱ ≈ 0.03): compare relative to its size.
        for (name, got, key) in
            [("ddpm", &x, "ddpm.steps6.trajectory"), ("ddim", &y, "ddim.steps6.trajectory")]
        {
            let expected = get(&record, &format!("{key}.{i}"));
            let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            assert_close(&format!("{name} step {i} (scale {scale:.0})"), got, expected, 1e-6 * scale)?;
        }
    }
    Ok(())
}
