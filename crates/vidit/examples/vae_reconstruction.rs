//! Reconstruction quality of a trained VAE on the shapes dataset: mean PSNR over clips, how often
//! the eval analyzer still reads all three attributes off the reconstruction (an upper bound for
//! `vidit eval`), and a PNG strip (input | reconstruction, first and last frame) to look at.
//! With NOISE, Gaussian noise of that many latent standard deviations (the config's
//! `latents_std`, per channel) is added to the encoded latents before decoding: how robust the
//! decoder is to the small errors a DiT's latents carry (OUT_DIR "" writes no strip).
//!
//!     cargo run --release -p vidit --example vae_reconstruction -- RUN/vae [CLIPS] [OUT_DIR/] [NOISE]

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use vidit::model_folder::{load_config, MappedWeights};
use vidit::models::wan_vae::AutoencoderKLWan;
use vidit::train::builtin;
use vidit::train::data::shapes::{analyze, ShapesDataset, Split};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next().expect("usage: vae_reconstruction VAE_DIR [CLIPS] [OUT_DIR/ or \"\"] [NOISE]"),
    );
    let clips: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(16);
    let out = args.next().filter(|o| !o.is_empty());
    let noise: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0.0);
    let device = Device::Cpu;
    let vae = AutoencoderKLWan::new(
        load_config(&dir.join("config.json"))?,
        MappedWeights::var_builder(&dir, &device)?,
    )?;
    let data = ShapesDataset::new(Split::All, builtin::WIDTH, builtin::HEIGHT, builtin::FRAMES)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12345);
    let (mut total, mut first, mut readable, mut rows) = (0f64, 0f64, [0usize; 4], Vec::new());
    let psnr = |a: &Tensor, b: &Tensor| -> Result<f64> {
        let mse = (a - b)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        Ok(-10.0 * mse.max(1e-10).log10())
    };
    for i in 0..clips {
        let (clip, combo) = data.sample(&mut rng, &device)?; // (F, 3, H, W)
        let x = clip.permute((1, 0, 2, 3))?.affine(2.0, -1.0)?.unsqueeze(0)?;
        let mut z = vae.encode(&x)?.mean; // (1, C, T, h, w)
        if noise > 0.0 {
            // In the normalised units the DiT works in: z + noise · std · ε.
            let eps = (vidit::noise::randn(i as u64, z.dims(), &device)? * noise)?;
            z = vae.denormalize(&(vae.normalize(&z)? + eps)?)?;
        }
        let recon = vae.decode(&z)?.squeeze(0)?.permute((1, 0, 2, 3))?.affine(0.5, 0.5)?;
        total += psnr(&recon, &clip)?;
        // Frame 0 is encoded alone (the causal VAE's first latent frame): image-to-video's frame.
        first += psnr(&recon.get(0)?, &clip.get(0)?)?;
        if let Some(got) = analyze(&recon)?.map(|a| a.combination) {
            let hits = [got.color == combo.color, got.shape == combo.shape, got.direction == combo.direction];
            for (r, hit) in readable.iter_mut().zip(hits.iter().chain([&hits.iter().all(|&h| h)])) {
                *r += usize::from(*hit);
            }
        }
        if i < 6 {
            let last = builtin::FRAMES - 1;
            rows.push(Tensor::cat(&[clip.get(0)?, clip.get(last)?, recon.get(0)?, recon.get(last)?], 2)?);
        }
    }
    println!(
        "mean PSNR over {clips} clips of {}x{}x{}: {:.2} dB (frame 0 alone: {:.2} dB)",
        builtin::WIDTH,
        builtin::HEIGHT,
        builtin::FRAMES,
        total / clips as f64,
        first / clips as f64
    );
    let [color, shape, direction, all] = readable;
    println!(
        "analyzer on the reconstructions, right of {clips}: colour {color}, shape {shape}, direction {direction}, all {all}"
    );
    if let Some(out) = out {
        let strip = Tensor::cat(&rows, 1)?.unsqueeze(0)?;
        vidit::io::video::write_video(Path::new(&out), &strip, 1.0)?;
    }
    Ok(())
}
