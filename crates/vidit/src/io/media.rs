//! Reading input media with no system libraries: MP4 (H.264, through `mp4` + openh264), GIF,
//! PNG/JPEG stills and folders of PNG/JPEG frames (a video, in file-name order, as diffusers
//! reads one), and fitting them to a model's size and frame rate.
//!
//! Every failure is an input error that names the file.

use crate::error::input_error;
use anyhow::Result;
use candle_core::{Device, Tensor};
use image::RgbImage;
use std::path::Path;

/// Decoded frames and, where the container says, their rate.
pub struct Clip {
    pub frames: Vec<RgbImage>,
    pub fps: Option<f64>,
}

/// How a frame of another aspect ratio is fitted to the target size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resize {
    /// Scale to cover the target, cut the overflow around the centre.
    #[default]
    Crop,
    /// Scale to fit inside the target, black bars around it.
    Pad,
    /// Scale each axis on its own.
    Stretch,
}

fn unreadable(path: &Path, what: impl std::fmt::Display) -> anyhow::Error {
    input_error(format!("{}: {what}", path.display()))
}

/// Reads a video or still: a folder of frames, `.mp4`/`.m4v`/`.mov`, `.gif`, `.png`/`.jpg`/`.jpeg`.
pub fn read_media(path: &Path) -> Result<Clip> {
    if path.is_dir() {
        return read_frame_folder(path);
    }
    if !path.exists() {
        return Err(unreadable(path, "no such file"));
    }
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("mp4" | "m4v" | "mov") => read_mp4(path),
        Some("gif") => read_gif(path),
        Some("png" | "jpg" | "jpeg") => Ok(Clip { frames: vec![read_still(path)?], fps: None }),
        _ => Err(unreadable(
            path,
            "unknown media type (expected .mp4, .gif, .png, .jpg or a folder of frames)",
        )),
    }
}

/// Reads one PNG or JPEG.
pub fn read_still(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| unreadable(path, format!("cannot read: {e}")))?
        .with_guessed_format()
        .map_err(|e| unreadable(path, format!("cannot read: {e}")))?;
    Ok(reader.decode().map_err(|e| unreadable(path, format!("not a readable image: {e}")))?.to_rgb8())
}

/// Reads a PNG or JPEG as `(3, height, width)` in [0, 1], fitted by `resize` (with a warning)
/// when its size differs.
pub fn read_image(
    path: &Path,
    width: usize,
    height: usize,
    resize: Resize,
    device: &Device,
) -> Result<Tensor> {
    let img = read_still(path)?;
    if img.dimensions() != (width as u32, height as u32) {
        let (w, h) = img.dimensions();
        eprintln!("warning: {}: {w}x{h} fitted to {width}x{height} ({resize:?})", path.display());
    }
    Ok(to_tensor(&[fit(&img, width, height, resize)], device)?.squeeze(0)?)
}

fn read_frame_folder(dir: &Path) -> Result<Clip> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| unreadable(dir, format!("cannot list: {e}")))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(unreadable(dir, "folder holds no .png or .jpg frames"));
    }
    let frames = files.iter().map(|f| read_still(f)).collect::<Result<Vec<_>>>()?;
    let size = frames[0].dimensions();
    if let Some((i, f)) = frames.iter().enumerate().find(|(_, f)| f.dimensions() != size) {
        let (w, h) = f.dimensions();
        return Err(unreadable(
            &files[i],
            format!("{w}x{h} differs from the first frame's {}x{}", size.0, size.1),
        ));
    }
    Ok(Clip { frames, fps: None })
}

fn read_gif(path: &Path) -> Result<Clip> {
    use image::AnimationDecoder;
    let file = std::fs::File::open(path).map_err(|e| unreadable(path, format!("cannot read: {e}")))?;
    let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(file))
        .map_err(|e| unreadable(path, format!("not a readable GIF: {e}")))?;
    let mut frames = Vec::new();
    let mut total_ms = 0f64;
    for frame in decoder.into_frames() {
        let frame = frame.map_err(|e| unreadable(path, format!("GIF frame {}: {e}", frames.len())))?;
        let (num, den) = frame.delay().numer_denom_ms();
        total_ms += num as f64 / den.max(1) as f64;
        frames.push(image::DynamicImage::ImageRgba8(frame.into_buffer()).to_rgb8());
    }
    if frames.is_empty() {
        return Err(unreadable(path, "GIF has no frames"));
    }
    let fps = (total_ms > 0.0).then(|| frames.len() as f64 * 1000.0 / total_ms);
    Ok(Clip { frames, fps })
}

fn read_mp4(path: &Path) -> Result<Clip> {
    use openh264::decoder::{Decoder, DecoderConfig, Flush};
    use openh264::formats::YUVSource;
    use openh264::OpenH264API;

    let bad = |what: String| unreadable(path, what);
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let size = file.metadata().map_err(|e| bad(format!("cannot read: {e}")))?.len();
    let mut mp4 = mp4::Mp4Reader::read_header(std::io::BufReader::new(file), size)
        .map_err(|e| bad(format!("not a readable MP4: {e}")))?;
    let track = mp4
        .tracks()
        .values()
        .find(|t| matches!(t.media_type(), Ok(mp4::MediaType::H264)))
        .ok_or_else(|| bad("MP4 has no H.264 video track".into()))?;
    let (id, count) = (track.track_id(), track.sample_count());
    let seconds = track.duration().as_secs_f64();
    let length_size = track
        .trak
        .mdia
        .minf
        .stbl
        .stsd
        .avc1
        .as_ref()
        .map_or(4, |avc1| (avc1.avcc.length_size_minus_one & 3) as usize + 1);
    let start_code = [0u8, 0, 0, 1];
    let mut headers = Vec::new();
    for nal in [track.sequence_parameter_set(), track.picture_parameter_set()] {
        headers.extend(start_code);
        headers.extend(nal.map_err(|e| bad(format!("H.264 track without SPS/PPS: {e}")))?);
    }

    // NoFlush: the default flushing loses frames (and then everything) on streams with B-frames.
    let config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
    let mut decoder = Decoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| bad(format!("cannot start the H.264 decoder: {e}")))?;
    let mut frames = Vec::with_capacity(count as usize);
    let to_rgb = |yuv: &openh264::decoder::DecodedYUV| -> RgbImage {
        let (w, h) = yuv.dimensions();
        let mut rgb = vec![0u8; w * h * 3];
        yuv.write_rgb8(&mut rgb);
        RgbImage::from_raw(w as u32, h as u32, rgb).expect("buffer sized to the frame")
    };
    let undecodable = |sample: u32, e: openh264::Error| {
        bad(format!("H.264 sample {sample} does not decode ({e}); openh264 reads 8-bit 4:2:0 streams only"))
    };
    for sample_id in 1..=count {
        let sample = mp4
            .read_sample(id, sample_id)
            .map_err(|e| bad(format!("MP4 sample {sample_id}: {e} (truncated file?)")))?
            .ok_or_else(|| bad(format!("MP4 sample {sample_id} is missing (truncated file?)")))?;
        let mut annexb = if sample_id == 1 { headers.clone() } else { Vec::new() };
        let mut rest = &sample.bytes[..];
        while rest.len() >= length_size {
            let len = rest[..length_size].iter().fold(0usize, |acc, &b| acc << 8 | b as usize);
            let nal = rest
                .get(length_size..length_size + len)
                .ok_or_else(|| bad(format!("MP4 sample {sample_id}: NAL unit runs past the sample")))?;
            annexb.extend(start_code);
            annexb.extend(nal);
            rest = &rest[length_size + len..];
        }
        if let Some(yuv) = decoder.decode(&annexb).map_err(|e| undecodable(sample_id, e))? {
            frames.push(to_rgb(&yuv));
        }
    }
    for yuv in decoder.flush_remaining().map_err(|e| undecodable(count, e))? {
        frames.push(to_rgb(&yuv));
    }
    if frames.is_empty() {
        return Err(bad("MP4 video track decoded to no frames".into()));
    }
    let fps = (seconds > 0.0).then(|| count as f64 / seconds);
    Ok(Clip { frames, fps })
}

/// Fits a frame to `width`×`height` (Lanczos), by `mode`.
pub fn fit(img: &RgbImage, width: usize, height: usize, mode: Resize) -> RgbImage {
    use image::imageops::{self, FilterType};
    let (w, h) = (width as u32, height as u32);
    if img.dimensions() == (w, h) {
        return img.clone();
    }
    let (iw, ih) = (img.width() as f64, img.height() as f64);
    let scaled = |s: f64| ((iw * s).round().max(1.0) as u32, (ih * s).round().max(1.0) as u32);
    match mode {
        Resize::Stretch => imageops::resize(img, w, h, FilterType::Lanczos3),
        Resize::Crop => {
            let (sw, sh) = scaled((w as f64 / iw).max(h as f64 / ih));
            let (sw, sh) = (sw.max(w), sh.max(h));
            let big = imageops::resize(img, sw, sh, FilterType::Lanczos3);
            imageops::crop_imm(&big, (sw - w) / 2, (sh - h) / 2, w, h).to_image()
        }
        Resize::Pad => {
            let (sw, sh) = scaled((w as f64 / iw).min(h as f64 / ih));
            let (sw, sh) = (sw.min(w), sh.min(h));
            let small = imageops::resize(img, sw, sh, FilterType::Lanczos3);
            let mut canvas = RgbImage::new(w, h);
            imageops::replace(&mut canvas, &small, ((w - sw) / 2) as i64, ((h - sh) / 2) as i64);
            canvas
        }
    }
}

/// Picks the frame nearest in time for each tick of `to` fps (a clip without a rate is taken as
/// already at `to`).
pub fn resample_fps(frames: Vec<RgbImage>, from: Option<f64>, to: f64) -> Vec<RgbImage> {
    let Some(from) = from.filter(|f| (f - to).abs() > 1e-6 * to) else {
        return frames;
    };
    let duration = frames.len() as f64 / from;
    let n = ((duration * to).floor() as usize).max(1);
    (0..n).map(|i| frames[((i as f64 * from / to).round() as usize).min(frames.len() - 1)].clone()).collect()
}

/// Frames → `(F, 3, H, W)` in [0, 1].
pub fn to_tensor(frames: &[RgbImage], device: &Device) -> Result<Tensor> {
    let (w, h) = frames.first().map(|f| f.dimensions()).ok_or_else(|| anyhow::anyhow!("no frames"))?;
    let data: Vec<f32> = frames.iter().flat_map(|f| f.as_raw().iter().map(|&v| v as f32 / 255.0)).collect();
    let hwc = Tensor::from_vec(data, (frames.len(), h as usize, w as usize, 3), device)?;
    Ok(hwc.permute((0, 3, 1, 2))?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32, seed: u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8 ^ seed, (y * 5) as u8, seed.wrapping_mul(40)])
        })
    }

    #[test]
    fn fit_modes_give_the_target_size_and_keep_the_centre() {
        let wide =
            RgbImage::from_fn(80, 40, |x, _| image::Rgb([if (30..50).contains(&x) { 255 } else { 0 }; 3]));
        for mode in [Resize::Crop, Resize::Pad, Resize::Stretch] {
            let out = fit(&wide, 32, 32, mode);
            assert_eq!(out.dimensions(), (32, 32), "{mode:?}");
            assert!(out.get_pixel(16, 16)[0] > 200, "{mode:?}: the bright middle stays in the middle");
        }
        // Pad leaves black bars above and below a wide frame; crop fills the frame.
        assert_eq!(fit(&wide, 32, 32, Resize::Pad).get_pixel(16, 0)[0], 0);
        assert_eq!(fit(&wide, 32, 32, Resize::Crop).get_pixel(16, 0)[0], 255);
    }

    #[test]
    fn resampling_keeps_the_duration() {
        let frames: Vec<_> = (0..24).map(|i| gradient(4, 4, i)).collect();
        let down = resample_fps(frames.clone(), Some(24.0), 8.0);
        assert_eq!(down.len(), 8);
        assert_eq!(down[1], frames[3]);
        assert_eq!(resample_fps(frames.clone(), None, 8.0).len(), 24);
        assert_eq!(resample_fps(frames, Some(4.0), 8.0).len(), 48);
    }

    #[test]
    fn reads_back_what_vidit_writes() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let frames: Vec<_> = (0..9u8).map(|i| gradient(32, 16, i * 20)).collect();
        let tensor = to_tensor(&frames, &Device::Cpu)?;
        for name in ["clip.mp4", "clip.gif", "frames/"] {
            let path = dir.path().join(name);
            crate::io::video::write_video(&path, &tensor, 8.0)?;
            let clip = read_media(&path)?;
            assert_eq!(clip.frames.len(), 9, "{name}");
            assert_eq!(clip.frames[0].dimensions(), (32, 16), "{name}");
            if name != "frames/" {
                let fps = clip.fps.expect("containers carry a rate");
                assert!((fps - 8.0).abs() < 0.7, "{name}: {fps} fps"); // GIF delays are whole centiseconds
            }
            let back = to_tensor(&clip.frames, &Device::Cpu)?;
            let mse = (back - &tensor)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
            let psnr = -10.0 * (mse as f64).log10();
            assert!(psnr > 25.0, "{name}: PSNR {psnr:.1} dB");
        }
        Ok(())
    }

    #[test]
    fn bad_media_are_input_errors_naming_the_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let tensor = to_tensor(&(0..5u8).map(|i| gradient(32, 32, i)).collect::<Vec<_>>(), &Device::Cpu)?;
        let mp4 = dir.path().join("full.mp4");
        crate::io::video::write_video(&mp4, &tensor, 8.0)?;
        let bytes = std::fs::read(&mp4)?;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated.mp4", bytes[..bytes.len() * 2 / 3].to_vec()),
            ("fake.png", b"not a png at all".to_vec()),
            ("empty.gif", b"GIF89a".to_vec()),
            ("noise.mp4", vec![7u8; 500]),
            ("clip.webm", vec![0u8; 10]),
        ];
        for (name, data) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, data)?;
            let err = read_media(&path).err().unwrap_or_else(|| panic!("{name} was read"));
            assert!(crate::error::is_input_error(&err), "{name}: {err:#}");
            assert!(format!("{err}").contains(name), "{name}: {err}");
        }
        let empty = dir.path().join("no-frames");
        std::fs::create_dir(&empty)?;
        assert!(read_media(&empty).is_err());
        Ok(())
    }

    fn media_fixture(name: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/media").join(name)
    }

    fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
        let mse =
            a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>()
                / a.as_raw().len() as f64;
        10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10()
    }

    /// ffmpeg/x264 High profile with B-frames (I P B order differs from display order), encoded
    /// from a square moving 3 px a frame: every frame decodes, in display order.
    #[test]
    fn x264_b_frame_streams_decode_every_frame_in_order() -> Result<()> {
        let clip = read_media(&media_fixture("bframes_x264.mp4"))?;
        let source = read_media(&media_fixture("bframes_source"))?;
        assert_eq!(clip.frames.len(), 16);
        assert_eq!(source.frames.len(), 16);
        assert!((clip.fps.expect("an MP4 carries its rate") - 8.0).abs() < 1e-6);
        for (i, frame) in clip.frames.iter().enumerate() {
            let own = psnr(frame, &source.frames[i]);
            assert!(own > 35.0, "frame {i}: {own:.1} dB against its source");
            // Out of order would match a neighbour better.
            for j in [i.wrapping_sub(1), i + 1].into_iter().filter(|&j| j < 16) {
                assert!(own > psnr(frame, &source.frames[j]) + 3.0, "frame {i} looks like source frame {j}");
            }
        }
        Ok(())
    }

    /// 4:4:4 and 10-bit H.264 (which openh264 cannot decode) are one-line input errors.
    #[test]
    fn high444_and_high10_streams_are_refused_by_name() {
        for name in ["yuv444_x264.mp4", "yuv420p10_x264.mp4"] {
            let err = read_media(&media_fixture(name)).err().unwrap_or_else(|| panic!("{name} was read"));
            assert!(crate::error::is_input_error(&err), "{name}: {err:#}");
            let message = format!("{err}");
            assert!(message.contains(name) && message.contains("8-bit 4:2:0"), "{name}: {message}");
        }
    }
}
