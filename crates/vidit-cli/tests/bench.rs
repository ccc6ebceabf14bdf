//! `vidit bench`: the report's figures are there and plausible, bad flags are one-line errors.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vidit")).arg("bench").args(args).output().expect("run vidit")
}

fn report(args: &[&str]) -> serde_json::Value {
    let out = bench(args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn positive(v: &serde_json::Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what}: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what}: {x}");
    x
}

#[test]
fn built_in_model_report_has_every_figure() {
    let r = report(&["--iters", "1", "--warmup", "0", "--json"]);
    let step = &r["denoising_step"];
    assert_eq!(step["tokens"], 80); // 64x64x17 → 16x16x5 latents, patch (1, 4, 4)
    for key in ["forward_ms", "forward_cfg_ms", "scheduler_ms", "step_cfg_ms", "forward_gflops"] {
        positive(&step[key], key);
    }
    let step_ms = positive(&step["step_cfg_ms"], "step");
    assert!(step_ms >= positive(&step["forward_cfg_ms"], "forward"));
    positive(&r["text_encoder"]["ms"], "text encoder");
    assert_eq!(r["vae_decode"]["frames"], 17);
    positive(&r["vae_decode"]["ms_per_frame"], "vae");
    positive(&r["matmul_1024"]["gflops"], "matmul");
    positive(&r["peak_rss_mb"], "rss");
}

#[test]
fn training_step_report() {
    let r = report(&["--train", "--batch-size", "2", "--iters", "1", "--warmup", "0", "--json"]);
    assert_eq!(r["train_step"]["batch_size"], 2);
    positive(&r["train_step"]["samples_per_s"], "samples/s");
}

#[test]
fn bad_flags_are_one_line_errors() {
    for (args, needle) in
        [(&["--iters", "0"][..], "--iters"), (&["--train", "--batch-size", "0"][..], "--batch-size")]
    {
        let out = bench(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle) && err.trim().lines().count() == 1, "{args:?}: {err}");
    }
}
