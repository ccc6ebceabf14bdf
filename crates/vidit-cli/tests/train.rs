//! Training through the binary: a tiny end-to-end run (train-vae → train → generate → eval),
//! and checkpoints that survive a kill -9 in the middle of training.

use anyhow::Result;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn vidit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vidit")).args(args).output().expect("run vidit")
}

fn ok(run: Output) -> String {
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    String::from_utf8_lossy(&run.stdout).into_owned() + &stderr
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `vidit train` up to `steps` on a 2-clip pool, with `extra` flags.
fn train_dit_run(vae: &Path, out: &Path, steps: &str, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--vae", p(vae), "--out", p(out), "--steps", steps, "--batch-size", "2"];
    args.extend(["--pool", "2", "--quiet"]);
    args.extend(extra);
    vidit(&args)
}

/// A 2-step `vidit train --init` of `model` on a 2-clip pool, with `extra` flags.
fn fine_tune(model: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["train", "--init", p(model), "--out", p(out), "--steps", "2", "--batch-size", "2"];
    args.extend(["--pool", "2", "--quiet"]);
    args.extend(extra);
    ok(vidit(&args));
}

/// A 2-step [`train_dit_run`] that must succeed.
fn train_dit(vae: &Path, out: &Path, extra: &[&str]) {
    ok(train_dit_run(vae, out, "2", extra));
}

const TRANSFORMER: &str = "transformer/diffusion_pytorch_model.safetensors";
const TEXT_ENCODER: &str = "text_encoder/model.safetensors";
const VAE: &str = "vae/diffusion_pytorch_model.safetensors";

/// Each tensor of one weight file against the same-named one of another: the largest difference.
fn changes(before: &Path, after: &Path) -> Result<Vec<(String, f32)>> {
    let load = |file: &Path| candle_core::safetensors::load(file, &candle_core::Device::Cpu);
    let (before, after) = (load(before)?, load(after)?);
    assert_eq!(before.len(), after.len());
    let diff = |name: &String, t: &candle_core::Tensor| -> Result<f32> {
        Ok((t - &after[name])?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    };
    before.iter().map(|(name, t)| Ok((name.clone(), diff(name, t)?))).collect()
}

/// A 2-step `vidit train-vae` on 5-frame clips: its VAE folder is `out/vae`.
fn train_vae(out: &Path) {
    ok(vidit(&[
        "train-vae",
        "--out",
        p(out),
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--frames",
        "5",
        "--quiet",
    ]));
}

#[test]
fn train_vae_then_dit_then_generate_and_eval() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vae_run = dir.path().join("vae-run");
    train_vae(&vae_run);
    let log = std::fs::read_to_string(vae_run.join("train_log.csv"))?;
    assert_eq!(log.lines().count(), 3, "header + 2 steps: {log}");
    for file in ["vae/config.json", "checkpoint.safetensors", "loss.png"] {
        assert!(vae_run.join(file).is_file(), "{file} missing");
    }

    let dit_run = dir.path().join("dit-run");
    let vae_dir = vae_run.join("vae");
    train_dit(&vae_dir, &dit_run, &[]);
    let model = dit_run.join("model");
    for file in [
        "model_index.json",
        "generation_config.json",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(model.join(file).is_file(), "{file} missing");
    }

    // The folder runs through the ordinary generate path, with its own defaults (64x64x17).
    let clip = dir.path().join("clip.safetensors");
    let out = ok(vidit(&[
        "generate",
        "--model",
        p(&model),
        "--prompt",
        "a red circle moving purple",
        "--steps",
        "2",
        "--seed",
        "1",
        "--output",
        p(&clip),
    ]));
    assert!(out.contains("outside the model's vocabulary: purple"), "{out}");
    let frames = candle_core::safetensors::load(&clip, &candle_core::Device::Cpu)?.remove("frames").unwrap();
    assert_eq!(frames.dims(), &[17, 3, 64, 64]);

    // Image-to-video through frame conditioning: a given PNG first frame.
    let png = dir.path().join("first.png");
    image::RgbImage::from_fn(64, 64, |x, y| {
        if (20..40).contains(&x) && (20..40).contains(&y) {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([0, 0, 0])
        }
    })
    .save(&png)?;
    let i2v = dir.path().join("i2v.safetensors");
    ok(vidit(&[
        "generate",
        "--model",
        p(&model),
        "--prompt",
        "a red square moving left",
        "--image",
        p(&png),
        "--steps",
        "2",
        "--seed",
        "1",
        "--output",
        p(&i2v),
    ]));

    // The DDPM objective (here with the foreground weighted up) trains an ε-prediction model that
    // samples with DDIM (its config) or DDPM.
    let ddpm_run = dir.path().join("ddpm-run");
    train_dit(&vae_dir, &ddpm_run, &["--objective", "ddpm", "--foreground-weight", "3"]);
    let scheduler = std::fs::read_to_string(ddpm_run.join("model/scheduler/scheduler_config.json"))?;
    assert!(scheduler.contains("DDIMScheduler"), "{scheduler}");
    for sampler in ["ddim", "ddpm"] {
        let out = dir.path().join(format!("{sampler}.safetensors"));
        ok(vidit(&[
            "generate",
            "--model",
            p(&ddpm_run.join("model")),
            "--prompt",
            "a red circle moving left",
            "--scheduler",
            sampler,
            "--steps",
            "3",
            "--seed",
            "2",
            "--output",
            p(&out),
        ]));
    }
    let wrong = vidit(&[
        "generate",
        "--model",
        p(&ddpm_run.join("model")),
        "--prompt",
        "a red circle moving left",
        "--scheduler",
        "unipc",
        "--output",
        p(&dir.path().join("x.mp4")),
    ]);
    assert_eq!(wrong.status.code(), Some(2), "an epsilon model with a flow sampler is refused");

    // x-prediction: the model's scheduler config says it outputs samples; UniPC samples it, Euler
    // (a velocity stepper) is refused naming the config.
    let sample_run = dir.path().join("sample-run");
    train_dit(&vae_dir, &sample_run, &["--prediction", "sample"]);
    let scheduler_path = sample_run.join("model/scheduler/scheduler_config.json");
    let scheduler: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&scheduler_path)?)?;
    assert_eq!(scheduler["prediction_type"], "sample");
    for (sampler, code) in [("unipc", Some(0)), ("euler", Some(2))] {
        let run = vidit(&[
            "generate",
            "--model",
            p(&sample_run.join("model")),
            "--prompt",
            "a red circle moving left",
            "--scheduler",
            sampler,
            "--steps",
            "2",
            "--output",
            p(&dir.path().join("sample.safetensors")),
        ]);
        assert_eq!(run.status.code(), code, "{sampler}: {}", String::from_utf8_lossy(&run.stderr));
        if code == Some(2) {
            assert!(String::from_utf8_lossy(&run.stderr).contains(p(&scheduler_path)));
        }
    }

    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle moving left\na green circle moving up\n")?;
    let table =
        ok(vidit(&["eval", "--model", p(&model), "--prompts", p(&prompts), "--n", "1", "--steps", "1"]));
    assert!(table.contains("seen") && table.contains("held-out"), "{table}");
    // Every conditioned mode runs on rendered clips and reports its own measure (restoration's
    // strength raised so that 2 steps leave one to re-run).
    for (mode, measure) in [
        (vec!["image"], "PSNR of frame 0"),
        (vec!["interpolate"], "straight path"),
        (vec!["extend"], "seam change"),
        (vec!["video"], ""),
        (vec!["restore", "--strength", "0.5"], "vs the clean clip"),
    ] {
        let args =
            ["eval", "--model", p(&model), "--prompts", p(&prompts), "--n", "1", "--steps", "2", "--mode"];
        let table = ok(vidit(&[&args[..], &mode].concat()));
        assert!(table.contains("held-out") && table.contains(measure), "{mode:?}: {table}");
    }
    let zero_weight = vidit(&[
        "train",
        "--vae",
        p(&vae_dir),
        "--out",
        p(&dir.path().join("w0")),
        "--steps",
        "2",
        "--foreground-weight",
        "0",
    ]);
    assert_eq!(zero_weight.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&zero_weight.stderr);
    assert!(stderr.contains("--foreground-weight"), "{stderr}");
    // Fine-tuning a model folder starts from its weights: with a zero learning rate they come
    // back unchanged (to the EMA's rounding), beside its VAE and latent statistics.
    let tuned = dir.path().join("tuned");
    fine_tune(&model, &tuned, &["--lr", "0", "--timestep-uniform", "0.5"]);
    for (name, err) in changes(&model.join(TRANSFORMER), &tuned.join("model").join(TRANSFORMER))? {
        assert!(err < 1e-5, "{name}: {err}");
    }
    // The VAE config, latent statistics included, is written back byte for byte.
    let config = |vae: &Path| std::fs::read_to_string(vae.join("config.json"));
    assert_eq!(config(&model.join("vae"))?, config(&tuned.join("model/vae"))?);
    // Fine-tuning a model's VAE decoder (frame 0 weighted up): the encoder, and so the latents the
    // DiT works on, stay bit for bit; the decoder moves; the config, latent statistics included,
    // is kept.
    let decoder_run = dir.path().join("decoder-run");
    ok(vidit(&[
        "train-vae",
        "--init",
        p(&model.join("vae")),
        "--decoder-only",
        "--first-frame-weight",
        "4",
        "--out",
        p(&decoder_run),
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--quiet",
    ]));
    let mut decoder_moved = 0;
    for (name, err) in changes(&model.join(VAE), &decoder_run.join(VAE))? {
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            decoder_moved += usize::from(err > 0.0);
        } else {
            assert_eq!(err, 0.0, "{name} is the encoder's: it must not move");
        }
    }
    assert!(decoder_moved > 0, "the decoder did not train");
    assert_eq!(config(&model.join("vae"))?, config(&decoder_run.join("vae"))?);
    for (bad_args, named) in [
        (vec!["--init", "/nonexistent/model"], "/nonexistent/model"),
        (vec!["--init", p(&model), "--timestep-uniform", "1.5"], "--timestep-uniform"),
        (vec!["--init", p(&ddpm_run.join("model"))], "--objective flow --prediction velocity trains"),
        (vec!["--init", p(&model), "--prediction", "sample"], "predicting flow_prediction"),
        (vec!["--vae", p(&vae_dir), "--objective", "ddpm", "--prediction", "sample"], "--prediction sample"),
    ] {
        let out = dir.path().join("bad-run");
        let bad = vidit(&[&["train", "--out", p(&out), "--steps", "1"][..], &bad_args].concat());
        assert_eq!(bad.status.code(), Some(2), "{bad_args:?}");
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(stderr.contains(named), "{stderr}");
    }
    // A VAE fine-tune from a folder holding another component's weights, with frame 0 weighted
    // by nothing, or of the decoder alone with nothing to start from.
    for (bad_args, named) in [
        (vec!["--init", p(&model.join("transformer"))], "config.json"),
        (vec!["--init", p(&vae_dir), "--first-frame-weight", "0"], "--first-frame-weight"),
        (vec!["--decoder-only"], "--init"),
    ] {
        let out = dir.path().join("bad-vae-run");
        let bad = vidit(&[&["train-vae", "--out", p(&out), "--steps", "1"][..], &bad_args].concat());
        assert_eq!(bad.status.code(), Some(2), "{bad_args:?}");
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(stderr.contains(named), "{stderr}");
    }
    // --strength belongs to the modes that re-denoise a clip, and lies in (0, 1].
    for (extra, named) in [
        (["--mode", "text", "--strength", "0.5"], "--strength"),
        (["--mode", "restore", "--strength", "1.5"], "--strength 1.5"),
    ] {
        let bad = vidit(&[&["eval", "--model", p(&model), "--prompts", p(&prompts)][..], &extra].concat());
        assert_eq!(bad.status.code(), Some(2), "{extra:?}");
        assert!(String::from_utf8_lossy(&bad.stderr).contains(named), "{extra:?}");
    }
    std::fs::write(&prompts, "a red circle moving sideways\n")?;
    let bad = vidit(&["eval", "--model", p(&model), "--prompts", p(&prompts)]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("prompts.txt:1"));
    Ok(())
}

#[test]
fn a_transformer_config_file_shapes_the_new_dit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    train_vae(&dir.path().join("vae-run"));
    let vae_dir = dir.path().join("vae-run/vae");
    let builtin = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/shapes/transformer/config.json");
    let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(builtin)?)?;
    let write = |name: &str, changes: serde_json::Value| -> Result<std::path::PathBuf> {
        let mut config = base.clone();
        for (key, value) in changes.as_object().unwrap() {
            config[key] = value.clone();
        }
        let path = dir.path().join(name);
        std::fs::write(&path, serde_json::to_string(&config)?)?;
        Ok(path)
    };
    // A narrower, shallower DiT than the built-in one trains and is written with its config.
    let small = write("small.json", serde_json::json!({"num_attention_heads": 2, "num_layers": 1}))?;
    let run = dir.path().join("small");
    train_dit(&vae_dir, &run, &["--transformer-config", p(&small)]);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("model/transformer/config.json"))?)?;
    assert_eq!((written["num_attention_heads"].as_u64(), written["num_layers"].as_u64()), (Some(2), Some(1)));
    let weights =
        candle_core::safetensors::load(run.join("model").join(TRANSFORMER), &candle_core::Device::Cpu)?;
    assert_eq!(weights["patch_embedding.weight"].dims()[0], 2 * 32);
    assert!(!weights.contains_key("blocks.1.ffn.net.2.weight"), "one layer only");
    // A config that does not fit the VAE, the text encoder or the latents is refused, naming the
    // file and the key; resuming with another config, as another model's checkpoint.
    for (name, changes, named) in [
        ("channels.json", serde_json::json!({"in_channels": 16}), "in_channels"),
        ("text.json", serde_json::json!({"text_dim": 4096}), "text_dim"),
        ("patch.json", serde_json::json!({"patch_size": [1, 3, 3]}), "patch_size"),
    ] {
        let path = write(name, changes)?;
        let bad = train_dit_run(&vae_dir, &dir.path().join("bad"), "1", &["--transformer-config", p(&path)]);
        assert_eq!(bad.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(stderr.contains(name) && stderr.contains(named), "{stderr}");
    }
    let bad = train_dit_run(&vae_dir, &run, "4", &["--resume"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("another model config"));
    Ok(())
}

#[test]
fn a_frozen_text_encoder_stays_as_it_started() -> Result<()> {
    let dir = tempfile::tempdir()?;
    train_vae(&dir.path().join("vae-run"));
    let vae_dir = dir.path().join("vae-run/vae");
    // A new run's random text encoder is kept in the run folder and written with the model as
    // it is, through a resume; the transformer trains.
    let run = dir.path().join("frozen");
    train_dit(&vae_dir, &run, &["--freeze-text-encoder"]);
    let frozen = run.join("text_encoder_frozen.safetensors");
    let unchanged =
        |a: &Path, b: &Path| -> Result<bool> { Ok(changes(a, b)?.iter().all(|(_, err)| *err == 0.0)) };
    assert!(unchanged(&frozen, &run.join("model").join(TEXT_ENCODER))?);
    let after_two = dir.path().join("after-two.safetensors");
    std::fs::copy(run.join("model").join(TRANSFORMER), &after_two)?;
    ok(train_dit_run(&vae_dir, &run, "4", &["--freeze-text-encoder", "--resume"]));
    assert!(unchanged(&frozen, &run.join("model").join(TEXT_ENCODER))?);
    assert!(!unchanged(&after_two, &run.join("model").join(TRANSFORMER))?, "the transformer did not train");
    // Fine-tuning with it frozen keeps the --init model's text encoder.
    let tuned = dir.path().join("tuned");
    let model = run.join("model");
    fine_tune(&model, &tuned, &["--freeze-text-encoder"]);
    assert!(unchanged(&model.join(TEXT_ENCODER), &tuned.join("model").join(TEXT_ENCODER))?);
    // Resuming a frozen run without the flag (another set of variables), or with it where the
    // run has no frozen encoder, is refused.
    std::fs::remove_file(&frozen)?;
    for (extra, named) in
        [(vec![], "another model config"), (vec!["--freeze-text-encoder"], "text_encoder_frozen")]
    {
        let bad = train_dit_run(&vae_dir, &run, "6", &[&["--resume"][..], &extra].concat());
        assert_eq!(bad.status.code(), Some(2), "{extra:?}");
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains(named),
            "{}",
            String::from_utf8_lossy(&bad.stderr)
        );
    }
    Ok(())
}

#[test]
fn kill_during_training_leaves_a_loadable_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let args = [
        "train-vae",
        "--out",
        p(&run),
        "--steps",
        "100000",
        "--checkpoint-every",
        "1",
        "--batch-size",
        "1",
        "--frames",
        "1",
        "--crop",
        "32",
        "--quiet",
    ];
    let checkpoint = run.join("checkpoint.safetensors");
    let mut last_step = 0;
    for wait_ms in [1500u64, 700, 1100] {
        let resume: &[&str] = if checkpoint.exists() { &["--resume"] } else { &[] };
        let mut child = Command::new(env!("CARGO_BIN_EXE_vidit")).args(args).args(resume).spawn()?;
        std::thread::sleep(Duration::from_millis(wait_ms));
        // Wait until at least one checkpoint exists, then kill -9 at an arbitrary moment.
        while !checkpoint.exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(wait_ms / 3));
        child.kill()?; // SIGKILL
        child.wait()?;
        let ckpt = vidit::train::trainer::Checkpoint::load(&checkpoint)?;
        assert!(ckpt.step >= last_step, "a resumed run continues from its checkpoint");
        last_step = ckpt.step;
    }
    assert!(last_step > 0);
    Ok(())
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_vidit"))
        .args([
            "train-vae",
            "--out",
            p(&run),
            "--steps",
            "100000",
            "--checkpoint-every",
            "100000",
            "--batch-size",
            "1",
        ])
        .args(["--frames", "1", "--crop", "32", "--quiet"])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Let it take a few steps (the CSV gets a row per step, flushed at checkpoints only).
    std::thread::sleep(Duration::from_millis(2500));
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
    assert!(status.success());
    let out = child.wait_with_output()?;
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("continue with --resume"));
    let ckpt = vidit::train::trainer::Checkpoint::load(&run.join("checkpoint.safetensors"))?;
    assert!(ckpt.step >= 1);
    Ok(())
}

#[test]
fn trains_on_a_folder_of_clips_and_names_what_it_skips() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("clips");
    std::fs::create_dir(&data)?;
    let clip = vidit::noise::randn(4, &[6, 3, 40, 56], &candle_core::Device::Cpu)?.affine(0.2, 0.5)?;
    vidit::io::video::write_video(&data.join("mine.mp4"), &clip.clamp(0f32, 1f32)?, 8.0)?;
    std::fs::write(data.join("bad.gif"), b"GIF89a truncated")?;
    std::fs::write(
        data.join("captions.jsonl"),
        "{\"file\": \"mine.mp4\", \"caption\": \"my own clip\"}\n{\"file\": \"bad.gif\", \"caption\": \"broken\"}\n",
    )?;
    let run = dir.path().join("run");
    let args = ["train-vae", "--data", p(&data), "--out", p(&run), "--steps", "1", "--batch-size", "1"];
    let log = ok(vidit(&[&args[..], &["--frames", "5", "--quiet"]].concat()));
    assert!(log.contains("warning: skipped") && log.contains("bad.gif"), "{log}");
    assert!(run.join("vae/config.json").exists());

    std::fs::remove_file(data.join("captions.jsonl"))?;
    let bad = vidit(&[&args[..], &["--frames", "5", "--quiet"]].concat());
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("captions.jsonl"));
    Ok(())
}
