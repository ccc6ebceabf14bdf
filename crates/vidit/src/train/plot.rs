//! The loss curve as a PNG: loss (log scale) against step, raw and smoothed, drawn directly into
//! pixels (no plotting library).

use anyhow::Result;
use std::path::Path;

const W: u32 = 640;
const H: u32 = 360;
const MARGIN: f32 = 30.0;

/// Reads the `step,loss,...` CSV log and draws `png`.
pub fn write_loss_curve(csv: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(csv)?;
    let points: Vec<(f32, f32)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split(',');
            let step = it.next()?.parse::<f32>().ok()?;
            let loss = it.next()?.parse::<f32>().ok()?;
            (loss.is_finite() && loss > 0.0).then_some((step, loss.log10()))
        })
        .collect();
    let mut img = image::RgbImage::from_pixel(W, H, image::Rgb([255, 255, 255]));
    // Axes.
    for x in MARGIN as u32..W - MARGIN as u32 / 2 {
        img.put_pixel(x, H - MARGIN as u32, image::Rgb([0, 0, 0]));
    }
    for y in MARGIN as u32 / 2..H - MARGIN as u32 {
        img.put_pixel(MARGIN as u32, y, image::Rgb([0, 0, 0]));
    }
    if points.len() >= 2 {
        let (x0, x1) = (points[0].0, points[points.len() - 1].0.max(points[0].0 + 1.0));
        let lo = points.iter().map(|p| p.1).fold(f32::MAX, f32::min);
        let hi = points.iter().map(|p| p.1).fold(f32::MIN, f32::max).max(lo + 1e-3);
        let to_px = |(s, l): (f32, f32)| {
            let x = MARGIN + (s - x0) / (x1 - x0) * (W as f32 - 1.5 * MARGIN);
            let y = (H as f32 - MARGIN) - (l - lo) / (hi - lo) * (H as f32 - 1.5 * MARGIN);
            (x, y)
        };
        // Raw loss in light blue, a running mean over ~2% of the steps in dark blue.
        let window = (points.len() / 50).max(1);
        let smooth: Vec<(f32, f32)> = (0..points.len())
            .map(|i| {
                let a = i.saturating_sub(window);
                let mean = points[a..=i].iter().map(|p| p.1).sum::<f32>() / (i - a + 1) as f32;
                (points[i].0, mean)
            })
            .collect();
        for (series, colour) in [(&points, [170, 200, 240]), (&smooth, [20, 60, 160])] {
            for pair in series.windows(2) {
                line(&mut img, to_px(pair[0]), to_px(pair[1]), image::Rgb(colour));
            }
        }
    }
    crate::io::atomic::write_file(png, |tmp| Ok(img.save_with_format(tmp, image::ImageFormat::Png)?))
}

fn line(img: &mut image::RgbImage, a: (f32, f32), b: (f32, f32), colour: image::Rgb<u8>) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f32 / n as f32;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < W && (y as u32) < H {
            img.put_pixel(x as u32, y as u32, colour);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_falling_curve() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let csv = dir.path().join("log.csv");
        let rows: String = (1..=100).map(|s| format!("{s},{},0,0\n", 1.0 / s as f32)).collect();
        std::fs::write(&csv, format!("step,loss,grad_norm,seconds\n{rows}"))?;
        let png = dir.path().join("loss.png");
        write_loss_curve(&csv, &png)?;
        let img = image::open(&png)?.to_rgb8();
        // The smoothed curve starts high on the left and ends low on the right.
        let dark = |x: u32| (0..H).find(|&y| img.get_pixel(x, y).0 == [20, 60, 160]);
        let (left, right) = (dark(MARGIN as u32 + 2).unwrap(), dark(W - MARGIN as u32).unwrap());
        assert!(left < right, "curve should fall: {left} vs {right}");
        Ok(())
    }
}
