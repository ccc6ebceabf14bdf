//! The fused linear kernel with the weight as PyTorch stores it, `(out, in)`, against its
//! transposed copy `(in, out)` (what frozen layers use), on the moderate benchmark config's
//! shapes: median milliseconds and GFLOP/s of each.
//!
//!     cargo run --release -p vidit --example linear_layouts

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;
use vidit::kernels::linear::{linear, WeightLayout};

/// Median milliseconds of 200 runs of `f`, after 5 untimed ones.
fn median_ms(f: impl Fn() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..5 {
        f()?;
    }
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    vidit::kernels::configure_threads();
    println!("threads: {}", vidit::kernels::num_threads());
    // (rows, out, in): attention projections, feed-forward in and out; one sample and a CFG pair.
    for (rows, out_dim, in_dim) in
        [(320, 256, 256), (320, 1024, 256), (320, 256, 1024), (640, 256, 256), (640, 1024, 256)]
    {
        let x = vidit::noise::randn(1, &[rows, in_dim], &Device::Cpu)?;
        let w = vidit::noise::randn(2, &[out_dim, in_dim], &Device::Cpu)?;
        let b = vidit::noise::randn(3, &[out_dim], &Device::Cpu)?;
        let w_in_out = w.t()?.contiguous()?;
        let out_in = median_ms(|| linear(&x, &w, Some(&b), WeightLayout::OutIn))?;
        let in_out = median_ms(|| linear(&x, &w_in_out, Some(&b), WeightLayout::InOut))?;
        let gflop = 2.0 * (rows * out_dim * in_dim) as f64 / 1e6;
        println!(
            "{rows} x {out_dim} x {in_dim}: (out, in) {out_in:.3} ms {:.0} GFLOP/s | (in, out) {in_out:.3} ms {:.0} GFLOP/s",
            gflop / out_in,
            gflop / in_out
        );
    }
    Ok(())
}
