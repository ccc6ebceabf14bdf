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
