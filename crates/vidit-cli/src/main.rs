//! `vidit`: generate video from the command line.

mod bench;
mod builtin;
mod eval;
mod generate;
mod train;

use clap::{Parser, Subcommand};

/// Tensors are large, short-lived and of recurring sizes: an allocator that reuses freed blocks
/// (mimalloc) instead of unmapping them (glibc, above its mmap threshold) saves a page fault and a
/// zeroed page per 4 KiB of every new tensor.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "vidit", version, about = "Video generation with latent diffusion transformers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a clip from a text prompt.
    Generate(Box<generate::GenerateArgs>),
    /// Train the causal 3-D VAE on the built-in shapes dataset.
    TrainVae(Box<train::TrainVaeArgs>),
    /// Train the DiT and text encoder on a trained VAE's latents; writes a model folder.
    Train(Box<train::TrainArgs>),
    /// Time a denoising step, the text encoder and the VAE decoder on this machine.
    Bench(Box<bench::BenchArgs>),
    /// Score a shapes model's prompt adherence (colour, shape, direction) from generated pixels.
    Eval(Box<eval::EvalArgs>),
}

fn main() -> ExitCode {
    vidit::kernels::configure_threads();
    let cli = Cli::parse();
    // Ctrl-C during training: finish the step, write a checkpoint, exit (status 130).
    let _ = ctrlc::set_handler(|| {
        if vidit::train::trainer::STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130); // a second Ctrl-C does not wait
        }
    });
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::TrainVae(args) => train::run_vae(*args),
        Command::Train(args) => train::run_dit(*args),
        Command::Eval(args) => eval::run(*args),
        Command::Bench(args) => bench::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<vidit::train::trainer::Interrupted>().is_some() => {
            eprintln!("{err}");
            ExitCode::from(130)
        }
        Err(err) => {
            // The user's mistakes get one line and status 2; internal failures the whole chain and 1.
            if vidit::error::is_input_error(&err) {
                let input =
                    err.chain().find_map(|e| e.downcast_ref::<vidit::InputError>()).map(ToString::to_string);
                eprintln!("error: {}", input.unwrap_or_else(|| err.to_string()));
                ExitCode::from(2)
            } else {
                eprintln!("error: {err:#}");
                ExitCode::from(1)
            }
        }
    }
}
