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
