//! Frame tensors to 8-bit RGB images.

use anyhow::Result;
use candle_core::Tensor;

/// `(F, 3, H, W)` in [0, 1] → one packed RGB8 buffer per frame, rounding to the nearest level.
pub fn to_rgb8(frames: &Tensor) -> Result<Vec<Vec<u8>>> {
    let (f, c, _, _) = frames.dims4()?;
    anyhow::ensure!(c == 3, "frames must have 3 channels, got {c}");
    let hwc = frames.permute((0, 2, 3, 1))?.contiguous()?; // (F, H, W, 3)
    let values = (hwc.clamp(0f32, 1f32)? * 255.0)?.round()?.to_dtype(candle_core::DType::U8)?;
    let flat = values.flatten_all()?.to_vec1::<u8>()?;
    let per = flat.len() / f.max(1);
    Ok(flat.chunks(per).map(<[u8]>::to_vec).collect())
}

/// Reads a PNG or JPEG as `(3, height, width)` in [0, 1], resizing (Lanczos) with a warning when
/// its size differs.
pub fn read_image(
    path: &std::path::Path,
    width: usize,
    height: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let img = image::ImageReader::open(path)
        .map_err(|e| crate::error::input_error(format!("{}: cannot read: {e}", path.display())))?
        .with_guessed_format()
        .map_err(|e| crate::error::input_error(format!("{}: cannot read: {e}", path.display())))?
        .decode()
        .map_err(|e| crate::error::input_error(format!("{}: not a readable image: {e}", path.display())))?
        .to_rgb8();
    let img = if img.dimensions() != (width as u32, height as u32) {
        eprintln!(
            "warning: {}: {}x{} resized to {width}x{height}",
            path.display(),
            img.width(),
            img.height()
        );
        image::imageops::resize(&img, width as u32, height as u32, image::imageops::FilterType::Lanczos3)
    } else {
        img
    };
    let data: Vec<f32> = img.into_raw().into_iter().map(|v| v as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (height, width, 3), device)?.permute((2, 0, 1))?.contiguous()?)
}
