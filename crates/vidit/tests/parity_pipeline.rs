//! A full 3-step WanPipeline run with CFG from given latents, against diffusers' frames.

mod common;

use anyhow::Result;
use candle_core::Device;
use common::{assert_close, get, load, tiny_wan};
use vidit::pipelines::{TextToVideo, WanModel};
use vidit::schedulers::{from_config_file, SchedulerKind};

fn request(init: &candle_core::Tensor) -> TextToVideo {
    TextToVideo {
        prompt: "a cat dancing in a red field".into(),
        negative_prompt: "blurry low quality".into(),
        height: 48,
        width: 64,
        num_frames: 5,
        num_inference_steps: 3,
        guidance_scale: 5.0,
        max_sequence_length: 32,
        seed: 0,
        init_latents: Some(init.clone()),
        keyframes: Default::default(),
    }
}

#[test]
fn three_step_runs_match_diffusers() -> Result<()> {
    let model = WanModel::open(&tiny_wan(), &Device::Cpu)?;
    for (name, kind) in [("unipc", SchedulerKind::UniPc), ("euler", SchedulerKind::Euler)] {
        let record = load(&format!("pipeline_{name}.safetensors"))?;
        let mut scheduler = from_config_file(&model.scheduler_config, Some(kind), None)?;
        let mut steps = 0;
        let out = request(get(&record, "latents")).run(&model, scheduler.as_mut(), |_, _| steps += 1)?;
        assert_eq!(steps, 3);
        let expected_t: Vec<f32> = get(&record, "timesteps").to_dtype(candle_core::DType::F32)?.to_vec1()?;
        assert_eq!(scheduler.timesteps(), expected_t.as_slice(), "{name} timesteps");
        assert_close(&format!("{name} final latents"), &out.latents, get(&record, "step.2.latents"), 1e-5)?;
        // diffusers returns (1, F, H, W, 3); vidit (F, 3, H, W).
        let expected = get(&record, "frames").squeeze(0)?.permute((0, 3, 1, 2))?;
        assert_close(&format!("{name} frames"), &out.frames, &expected, 1e-4)?;
    }
    Ok(())
}
