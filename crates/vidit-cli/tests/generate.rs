//! `vidit generate` through the binary itself: parity with diffusers given the same latents,
//! determinism, and the bad-input contract (one line, status 2, no output left behind).

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The arguments of the diffusers fixture run.
fn fixture_args(model: &Path, output: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "generate",
        "--prompt",
        "a cat dancing in a red field",
        "--negative-prompt",
        "blurry low quality",
        "--height",
        "48",
        "--width",
        "64",
        "--frames",
        "5",
        "--steps",
        "3",
        "--guidance",
        "5",
        "--max-sequence-length",
        "32",
        "--quiet",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "--model".into(),
        model.display().to_string(),
        "--output".into(),
        output.display().to_string(),
    ]);
    args
}

fn vidit(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vidit")).args(args).output().expect("run vidit")
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Runs vidit and compares its frames (≤ 1e-4) and final latents (≤ 1e-5) with a diffusers record
/// whose last step is `step.2`.
fn assert_run_matches(
    args: &[String],
    record: &Path,
    frames: &Path,
    latents: &Path,
    what: &str,
) -> Result<()> {
    let run = vidit(args);
    assert!(run.status.success(), "{what}: {}", String::from_utf8_lossy(&run.stderr));
    let expected = load(record)?;
    let ours = load(frames)?.remove("frames").expect("tensor `frames`");
    let reference = expected["frames"].squeeze(0)?.permute((0, 3, 1, 2))?; // (F, 3, H, W)
    let err = max_abs_diff(&ours, &reference)?;
    eprintln!("{what}: CLI frames vs diffusers max abs error {err:.3e}");
    assert!(err <= 1e-4, "{what}: {err}");
    let final_latents = load(latents)?.remove("latents").expect("tensor `latents`");
    let mut recorded = expected["step.2.latents"].clone();
    let mut ours = final_latents;
    if what == "ti2v" {
        // diffusers records the latents before it puts the image's frame back in as frame 0.
        let t = ours.dim(2)?;
        (ours, recorded) = (ours.narrow(2, 1, t - 1)?, recorded.narrow(2, 1, t - 1)?);
    }
    assert!(max_abs_diff(&ours, &recorded)? <= 1e-5, "{what}");
    Ok(())
}

#[test]
fn cli_writes_the_frames_diffusers_wrote() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let init = fixtures().join("init_latents.safetensors");
    for (scheduler, record) in
        [("unipc", "pipeline_unipc.safetensors"), ("euler", "pipeline_euler.safetensors")]
    {
        let out = dir.path().join(format!("{scheduler}.safetensors"));
        let latents = dir.path().join(format!("{scheduler}-latents.safetensors"));
        let args = with(
            fixture_args(&fixtures().join("tiny-wan"), &out),
            &[
                "--scheduler",
                scheduler,
                "--init-latents",
                init.to_str().unwrap(),
                "--save-latents",
                latents.to_str().unwrap(),
            ],
        );
        assert_run_matches(&args, &fixtures().join(record), &out, &latents, &format!("{scheduler} t2v"))?;
    }
    Ok(())
}

#[test]
fn same_seed_same_clip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = fixtures().join("tiny-wan");
    let run = |name: &str, seed: &str| -> Result<Tensor> {
        let out = dir.path().join(name);
        let status = vidit(&with(fixture_args(&model, &out), &["--seed", seed])).status;
        assert!(status.success());
        Ok(load(&out)?.remove("frames").expect("frames"))
    };
    let a = run("a.safetensors", "7")?;
    let b = run("b.safetensors", "7")?;
    let c = run("c.safetensors", "8")?;
    assert_eq!(max_abs_diff(&a, &b)?, 0.0);
    assert!(max_abs_diff(&a, &c)? > 1e-3, "a different seed must give a different clip");
    // Every format writes from the same run path.
    for name in ["clip.mp4", "clip.gif", "frames/"] {
        let out = dir.path().join(name);
        let run = vidit(&with(fixture_args(&model, &out), &["--seed", "7"]));
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        assert!(out.exists());
    }
    assert_eq!(std::fs::read_dir(dir.path().join("frames"))?.count(), 5);
    Ok(())
}

#[test]
fn frame_count_is_rounded_with_a_warning() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("clip.safetensors");
    let mut args = fixture_args(&fixtures().join("tiny-wan"), &out);
    let i = args.iter().position(|a| a == "--frames").unwrap();
    args[i + 1] = "7".into();
    let run = vidit(&with(args, &["--seed", "1"]));
    assert!(run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("rounding to 5"));
    assert_eq!(load(&out)?["frames"].dims(), &[5, 3, 48, 64]);
    Ok(())
}

/// Copies the tiny model folder so a test can break one file of it.
fn model_copy(dir: &Path) -> Result<PathBuf> {
    let dst = dir.join("model");
    let src = fixtures().join("tiny-wan");
    for entry in walk(&src)? {
        let rel = entry.strip_prefix(&src)?;
        std::fs::create_dir_all(dst.join(rel).parent().unwrap())?;
        std::fs::copy(&entry, dst.join(rel))?;
    }
    Ok(dst)
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// Runs a bad invocation: status 2, a single error line naming `needle`, and no output file.
fn expect_input_error(args: Vec<String>, output: &Path, needle: &str) {
    let run = vidit(&args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "expected status 2 for {needle}; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "`{needle}` not in: {stderr}");
    assert!(!output.exists(), "no output may be left behind");
    let parent = output.parent().unwrap();
    if parent.is_dir() {
        let stray: Vec<_> = std::fs::read_dir(parent)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp"))
            .collect();
        assert!(stray.is_empty(), "temporary files left: {stray:?}");
    }
}

#[test]
fn bad_flags_and_paths_are_one_line_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = fixtures().join("tiny-wan");
    let out = dir.path().join("clip.mp4");
    let base = || fixture_args(&model, &out);
    let set = |flag: &str, value: &str| {
        let mut args = base();
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value.into();
        args
    };
    expect_input_error(set("--height", "40"), &out, "--height 40");
    expect_input_error(set("--width", "72"), &out, "--width 72");
    expect_input_error(set("--prompt", "   "), &out, "--prompt");
    expect_input_error(set("--steps", "0"), &out, "--steps");
    expect_input_error(fixture_args(&dir.path().join("no-such-model"), &out), &out, "no-such-model");
    let missing_dir = dir.path().join("no/such/dir/clip.mp4");
    expect_input_error(fixture_args(&model, &missing_dir), &missing_dir, "does not exist");
    let avi = dir.path().join("clip.avi");
    expect_input_error(fixture_args(&model, &avi), &avi, "clip.avi");

    // --init-latents: wrong shape, wrong key.
    let wrong = dir.path().join("wrong.safetensors");
    let zeros = Tensor::zeros((1, 16, 3, 6, 8), candle_core::DType::F32, &Device::Cpu)?;
    candle_core::safetensors::save(&HashMap::from([("latents".to_string(), zeros.clone())]), &wrong)?;
    expect_input_error(
        with(base(), &["--init-latents", wrong.to_str().unwrap()]),
        &out,
        "shape [1, 16, 3, 6, 8]",
    );
    let other = dir.path().join("other.safetensors");
    candle_core::safetensors::save(&HashMap::from([("noise".to_string(), zeros)]), &other)?;
    expect_input_error(
        with(base(), &["--init-latents", other.to_str().unwrap()]),
        &out,
        "no tensor `latents`",
    );
    expect_input_error(
        with(base(), &["--save-latents", dir.path().join("l.bin").to_str().unwrap()]),
        &out,
        "l.bin",
    );
    Ok(())
}

#[test]
fn broken_model_files_are_one_line_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("clip.safetensors");

    // A config key of the wrong type names the file and the key.
    let model = model_copy(&dir.path().join("a"))?;
    let config = model.join("transformer/config.json");
    let text = std::fs::read_to_string(&config)?.replace("\"num_layers\": 2", "\"num_layers\": \"two\"");
    std::fs::write(&config, text)?;
    expect_input_error(fixture_args(&model, &out), &out, "transformer/config.json: key `num_layers`");

    // Missing weights.
    let model = model_copy(&dir.path().join("b"))?;
    std::fs::remove_file(model.join("vae/diffusion_pytorch_model.safetensors"))?;
    expect_input_error(fixture_args(&model, &out), &out, "no .safetensors weights");

    // A tensor missing, and a tensor of the wrong shape: named by key and file.
    for (case, key, change) in
        [("c", "blocks.1.ffn.net.2.bias", None), ("d", "proj_out.weight", Some((64usize, 63usize)))]
    {
        let model = model_copy(&dir.path().join(case))?;
        let file = model.join("transformer/diffusion_pytorch_model.safetensors");
        let mut tensors = load(&file)?;
        match change {
            None => {
                tensors.remove(key);
            }
            Some(shape) => {
                tensors.insert(key.into(), Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu)?);
            }
        }
        candle_core::safetensors::save(&tensors, &file)?;
        expect_input_error(fixture_args(&model, &out), &out, key);
    }

    // Not a safetensors file at all.
    let model = model_copy(&dir.path().join("e"))?;
    std::fs::write(model.join("text_encoder/model.safetensors"), b"garbage")?;
    expect_input_error(fixture_args(&model, &out), &out, "text_encoder/model.safetensors");

    // No model_index.json.
    let model = model_copy(&dir.path().join("f"))?;
    std::fs::remove_file(model.join("model_index.json"))?;
    expect_input_error(fixture_args(&model, &out), &out, "model_index.json");
    Ok(())
}

/// `vidit generate --video` with the arguments of the diffusers WanVideoToVideoPipeline record.
fn v2v_args(scheduler: &str, noise: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["generate", "--prompt", "a cat dancing in a red field"]
        .into_iter()
        .chain(["--negative-prompt", "blurry low quality", "--height", "48", "--width", "64"])
        .chain(["--steps", "5", "--strength", "0.6", "--guidance", "5", "--max-sequence-length", "32"])
        .chain(["--scheduler", scheduler, "--quiet"])
        .map(String::from)
        .collect();
    let model = fixtures().join("tiny-wan");
    let video = fixtures().join("v2v_input");
    for (flag, path) in
        [("--model", model.as_path()), ("--video", &video), ("--noise", noise), ("--output", output)]
    {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    with(args, extra)
}

#[test]
fn video_to_video_matches_diffusers_given_the_same_noise() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for scheduler in ["unipc", "euler"] {
        let record = fixtures().join(format!("v2v_{scheduler}.safetensors"));
        let out = dir.path().join(format!("{scheduler}.safetensors"));
        let latents = dir.path().join(format!("{scheduler}-latents.safetensors"));
        let args = v2v_args(scheduler, &record, &out, &["--save-latents", latents.to_str().unwrap()]);
        assert_run_matches(&args, &record, &out, &latents, &format!("{scheduler} v2v"))?;
    }
    Ok(())
}

/// The tiny I2V folders the diffusers records used: tiny-wan's VAE, text encoder, tokenizer and
/// scheduler with `i2v/`'s image encoder and transformer (`kind` "i2v" or "flf2v"), or tiny-wan
/// as Wan 2.2 TI2V (`expand_timesteps`, "ti2v").
fn i2v_model(dir: &Path, kind: &str) -> Result<PathBuf> {
    let model = model_copy(dir)?;
    let parts = fixtures().join("i2v");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("model_index.json"))?)?;
    index["_class_name"] = "WanImageToVideoPipeline".into();
    if kind == "ti2v" {
        index["expand_timesteps"] = true.into();
    } else {
        let transformer = if kind == "flf2v" { "transformer_flf2v" } else { "transformer" };
        for (from, to) in [
            (transformer, "transformer"),
            ("image_encoder", "image_encoder"),
            ("image_processor", "image_processor"),
        ] {
            std::fs::remove_dir_all(model.join(to)).ok();
            std::fs::create_dir_all(model.join(to))?;
            for entry in std::fs::read_dir(parts.join(from))? {
                let path = entry?.path();
                std::fs::copy(&path, model.join(to).join(path.file_name().unwrap()))?;
            }
        }
        index["image_encoder"] = serde_json::json!(["transformers", "CLIPVisionModel"]);
        index["image_processor"] = serde_json::json!(["transformers", "CLIPImageProcessor"]);
    }
    std::fs::write(model.join("model_index.json"), serde_json::to_string_pretty(&index)?)?;
    Ok(model)
}

/// `vidit generate --image` with the arguments of the diffusers WanImageToVideoPipeline records.
fn i2v_args(model: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    let first = fixtures().join("i2v/first.png");
    let init = fixtures().join("init_latents.safetensors");
    let args = set(fixture_args(model, output), "--max-sequence-length", "512");
    let args = with(args, &["--image", first.to_str().unwrap(), "--init-latents", init.to_str().unwrap()]);
    with(args, extra)
}

#[test]
fn image_to_video_matches_diffusers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let last = fixtures().join("i2v/last.png");
    let flf2v_extra = ["--last-image", last.to_str().unwrap()];
    for (kind, extra) in [("i2v", &[][..]), ("flf2v", &flf2v_extra[..]), ("ti2v", &[][..])] {
        let model = i2v_model(&dir.path().join(kind), kind)?;
        let out = dir.path().join(format!("{kind}.safetensors"));
        let latents = dir.path().join(format!("{kind}-latents.safetensors"));
        let args = with(i2v_args(&model, &out, extra), &["--save-latents", latents.to_str().unwrap()]);
        let record = fixtures().join(format!("{kind}_unipc.safetensors"));
        assert_run_matches(&args, &record, &out, &latents, kind)?;
    }
    Ok(())
}

#[test]
fn image_to_video_refuses_what_the_checkpoint_cannot_take() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("clip.safetensors");
    let last = fixtures().join("i2v/last.png");
    let last = last.to_str().unwrap();
    let i2v = i2v_model(&dir.path().join("i2v"), "i2v")?;
    let flf2v = i2v_model(&dir.path().join("flf2v"), "flf2v")?;
    let ti2v = i2v_model(&dir.path().join("ti2v"), "ti2v")?;
    let video = fixtures().join("v2v_input");
    expect_input_error(fixture_args(&i2v, &out), &out, "--image: ");
    expect_input_error(i2v_args(&i2v, &out, &["--last-image", last]), &out, "takes no last frame");
    expect_input_error(i2v_args(&flf2v, &out, &[]), &out, "give the last frame too");
    expect_input_error(i2v_args(&ti2v, &out, &["--last-image", last]), &out, "first frame only");
    let v2v = with(fixture_args(&i2v, &out), &["--video", video.to_str().unwrap()]);
    expect_input_error(v2v, &out, "--video: ");
    Ok(())
}

/// `args` with the value of `flag` replaced.
fn set(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let at = args.iter().position(|a| a == flag).expect("flag present") + 1;
    args[at] = value.to_string();
    args
}

#[test]
fn video_to_video_bad_input_is_refused_up_front() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let record = fixtures().join("v2v_unipc.safetensors");
    let out = dir.path().join("out.mp4");
    let wrong_noise = dir.path().join("noise.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([(
            "noise".to_string(),
            Tensor::zeros((1, 16, 3, 6, 8), candle_core::DType::F32, &Device::Cpu)?,
        )]),
        &wrong_noise,
    )?;
    let not_png = dir.path().join("frames");
    std::fs::create_dir(&not_png)?;
    std::fs::write(not_png.join("0.png"), b"not a png")?;
    let mut cases: Vec<(Vec<String>, &str)> = vec![
        (set(v2v_args("unipc", &record, &out, &[]), "--strength", "0"), "--strength"),
        (set(v2v_args("unipc", &record, &out, &[]), "--strength", "1.5"), "--strength"),
        (v2v_args("unipc", &wrong_noise, &out, &[]), "noise"),
        (v2v_args("unipc", &record, &out, &["--start", "9"]), "no frames left"),
    ];
    cases.push((set(v2v_args("unipc", &record, &out, &[]), "--video", not_png.to_str().unwrap()), "0.png"));
    for (args, needle) in cases {
        let run = vidit(&args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{needle}: {stderr}");
        assert!(stderr.contains(needle), "{needle}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(!out.exists());
    }
    Ok(())
}

#[test]
fn keyframe_extension_interpolation_and_restoration_modes_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = fixtures().join("tiny-wan");
    let clip = fixtures().join("v2v_input");
    let frame = |i: usize| clip.join(format!("frame_{i:03}.png")).display().to_string();
    let base = |out: &Path| -> Vec<String> {
        ["generate", "a cat", "--height", "48", "--width", "64", "--steps", "2", "--seed", "1", "--quiet"]
            .map(String::from)
            .into_iter()
            .chain([
                "--model".into(),
                model.display().to_string(),
                "--output".into(),
                out.display().to_string(),
            ])
            .collect()
    };
    let frames_of = |out: &Path| -> Result<usize> { Ok(load(out)?["frames"].dim(0)?) };
    let clip_arg = clip.display().to_string();
    let cases: Vec<(&str, Vec<String>, usize)> = vec![
        (
            "first-last",
            vec!["--frames".into(), "9".into(), "--image".into(), frame(0), "--last-image".into(), frame(4)],
            9,
        ),
        (
            "extend",
            vec![
                "--frames".into(),
                "9".into(),
                "--video".into(),
                clip_arg.clone(),
                "--extend".into(),
                "6".into(),
            ],
            11,
        ),
        (
            "interpolate",
            vec![
                "--frames".into(),
                "9".into(),
                "--video".into(),
                clip_arg.clone(),
                "--max-frames".into(),
                "3".into(),
                "--interpolate".into(),
                "2".into(),
            ],
            5,
        ),
        ("restore", vec!["--video".into(), clip_arg.clone(), "--restore".into()], 5),
    ];
    for (name, extra, expected) in cases {
        let out = dir.path().join(format!("{name}.safetensors"));
        let mut args = base(&out);
        args.extend(extra);
        if name == "restore" {
            args = set(args, "--steps", "4"); // 0.3 of 4 steps: one
        }
        if name == "extend" {
            args = set(args, "--steps", "1"); // extension has no strength to run out of steps
        }
        let run = vidit(&args);
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        assert_eq!(frames_of(&out)?, expected, "{name}");
    }
    // Given frames come back through the VAE: the interpolated clip keeps its input frames.
    let interpolated = load(&dir.path().join("interpolate.safetensors"))?.remove("frames").expect("frames");
    let input = vidit::io::media::to_tensor(&vidit::io::media::read_media(&clip)?.frames, &Device::Cpu)?;
    assert_eq!(
        max_abs_diff(&interpolated.get(2)?, &input.get(1)?)?,
        0.0,
        "frame 1 of the input is kept as is"
    );

    let out = dir.path().join("bad.mp4");
    let no_first = vidit(&with(base(&out), &["--last-image", &frame(4)]));
    assert_eq!(no_first.status.code(), Some(2), "--last-image needs --image");
    let few_steps = vidit(&with(base(&out), &["--video", &clip_arg, "--restore"]));
    assert_eq!(few_steps.status.code(), Some(2), "0.3 of 2 steps is none");
    let short = vidit(&with(base(&out), &["--video", &clip_arg, "--max-frames", "3", "--extend", "4"]));
    assert_eq!(short.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&short.stderr).contains("--extend"));
    assert!(!out.exists());
    Ok(())
}
