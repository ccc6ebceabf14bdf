//! Embeds the built-in model (`models/shapes/`, the diffusers layout) when it is present, so that
//! `vidit generate` works without `--model` from a self-contained binary.

use std::path::Path;

const FILES: [&str; 10] = [
    "model_index.json",
    "generation_config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(vidit_builtin)");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shapes");
    for file in FILES {
        println!("cargo::rerun-if-changed={}", root.join(file).display());
    }
    if FILES.iter().all(|f| root.join(f).is_file()) {
        println!("cargo::rustc-cfg=vidit_builtin");
        let list: Vec<String> = FILES
            .iter()
            .map(|f| format!("({f:?}, include_bytes!({:?}) as &[u8])", root.join(f).display().to_string()))
            .collect();
        let code = format!("pub const FILES: &[(&str, &[u8])] = &[{}];\n", list.join(",\n"));
        let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("builtin_files.rs");
        std::fs::write(out, code).expect("write builtin_files.rs");
    }
}
