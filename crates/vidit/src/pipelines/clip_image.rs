//! transformers' `CLIPImageProcessor` (`image_processor/preprocessor_config.json`): resize the
//! shortest edge (bicubic), centre-crop, rescale to [0, 1], normalise by the CLIP mean and std.
//!
//! The resize is the `image` crate's Catmull-Rom filter, the same cubic as PIL's BICUBIC, but
//! rounded differently: images that need resizing can differ from transformers' by a unit of
//! 8-bit colour here and there. At the encoder's own size there is no resize and no difference.

use crate::models::clip_vision::ClipVisionModel;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Size {
    pub shortest_edge: Option<usize>,
    pub height: Option<usize>,
    pub width: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipImageProcessor {
    pub do_resize: bool,
    pub size: Size,
    pub do_center_crop: bool,
    pub crop_size: Size,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl Default for ClipImageProcessor {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: Size { shortest_edge: Some(224), ..Default::default() },
            do_center_crop: true,
            crop_size: Size { height: Some(224), width: Some(224), ..Default::default() },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
        }
    }
}

impl ClipImageProcessor {
    /// `(width, height)` after the resize step.
    fn resized(&self, w: usize, h: usize) -> (usize, usize) {
        match (&self.size.shortest_edge, self.size.width, self.size.height) {
            // The long side is truncated, as transformers' get_resize_output_image_size does.
            (Some(short), _, _) if w <= h => (*short, short * h / w),
            (Some(short), _, _) => (short * w / h, *short),
            (None, Some(width), Some(height)) => (width, height),
            _ => (w, h),
        }
    }

    /// An image → `(1, 3, H, W)` pixel values for the image encoder.
    pub fn preprocess(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let mut img = img.clone();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (rw, rh) = self.resized(w, h);
        if self.do_resize && (rw, rh) != (w, h) {
            img =
                image::imageops::resize(&img, rw as u32, rh as u32, image::imageops::FilterType::CatmullRom);
        }
        if self.do_center_crop {
            let (cw, ch) = (self.crop_size.width.unwrap_or(rw), self.crop_size.height.unwrap_or(rh));
            let (iw, ih) = (img.width() as usize, img.height() as usize);
            // Pad with black when the crop is larger, as transformers' center_crop does.
            let mut canvas = RgbImage::new(cw as u32, ch as u32);
            let left = (iw as i64 - cw as i64).div_euclid(2);
            let top = (ih as i64 - ch as i64).div_euclid(2);
            image::imageops::replace(&mut canvas, &img, -left, -top);
            img = canvas;
        }
        let (w, h) = (img.width() as usize, img.height() as usize);
        let scale = if self.do_rescale { self.rescale_factor } else { 1.0 };
        let mut data = vec![0f32; 3 * h * w];
        for (i, pixel) in img.pixels().enumerate() {
            for c in 0..3 {
                let mut v = f64::from(pixel[c]) * scale;
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                data[c * h * w + i] = v as f32;
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
    }
}

/// The image encoder of a Wan I2V folder: `image_processor` + `image_encoder`.
pub struct ImageEncoder {
    pub processor: ClipImageProcessor,
    pub model: ClipVisionModel,
}

impl ImageEncoder {
    /// Frames `(3, H, W)` in [0, 1] (8-bit values, as read) → the CLIP penultimate states
    /// `(N, S, d)` of each.
    ///
    /// diffusers hands the processor the image as given; vidit hands it the frame already fitted
    /// to the clip's size, which is the same image when the input has that size.
    pub fn encode(&self, frames: &[&Tensor]) -> Result<Tensor> {
        let pixels = frames
            .iter()
            .map(|frame| {
                let (_, h, w) = frame.dims3()?;
                let bytes: Vec<u8> = (frame.permute((1, 2, 0))? * 255.0)?
                    .round()?
                    .clamp(0f32, 255f32)?
                    .to_dtype(DType::U8)?
                    .flatten_all()?
                    .to_vec1()?;
                let img = RgbImage::from_raw(w as u32, h as u32, bytes)
                    .ok_or_else(|| anyhow::anyhow!("frame of {w}x{h} pixels"))?;
                self.processor.preprocess(&img, frame.device())
            })
            .collect::<Result<Vec<_>>>()?;
        self.model.penultimate_hidden_states(&Tensor::cat(&pixels, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_resize_then_centre_crop() -> Result<()> {
        let p = ClipImageProcessor {
            size: Size { shortest_edge: Some(4), ..Default::default() },
            crop_size: Size { height: Some(4), width: Some(4), ..Default::default() },
            do_normalize: false,
            ..Default::default()
        };
        assert_eq!(p.resized(8, 12), (4, 6));
        assert_eq!(p.resized(13, 4), (13, 4));
        // 4x6 (w x h) at the target short side: no resize; the crop keeps rows 1..5.
        let img = RgbImage::from_fn(4, 6, |x, y| image::Rgb([(10 * y + x) as u8, 0, 255]));
        let t = p.preprocess(&img, &Device::Cpu)?;
        assert_eq!(t.dims(), [1, 3, 4, 4]);
        let red: Vec<Vec<f32>> = t.get(0)?.get(0)?.to_vec2()?;
        assert_eq!(red[0][0] * 255.0, 10.0);
        assert_eq!((red[3][3] * 255.0).round(), 43.0);
        assert_eq!(t.get(0)?.get(2)?.max_all()?.to_scalar::<f32>()?, 1.0);
        Ok(())
    }
}
