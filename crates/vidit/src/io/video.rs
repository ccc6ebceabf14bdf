//! Writing generated clips: MP4 (H.264 yuv420p, index before data), GIF, a folder of PNG frames,
//! or a safetensors file with the raw frames. The format follows the output path.

use super::atomic;
use super::frames::to_rgb8;
use crate::error::input_error;
use anyhow::{anyhow, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Mp4,
    Gif,
    /// A folder of `frame_0000.png`, … (the path ends in `/`).
    PngFolder,
    /// Tensor `frames`, f32 in [0, 1], shape `[F, 3, H, W]`.
    Safetensors,
}

impl OutputFormat {
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = path.to_string_lossy();
        if text.ends_with('/') {
            return Ok(Self::PngFolder);
        }
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("mp4") => Ok(Self::Mp4),
            Some("gif") => Ok(Self::Gif),
            Some("safetensors") => Ok(Self::Safetensors),
            _ => Err(input_error(format!(
                "{}: unknown output format (use .mp4, .gif, .safetensors, or a folder path ending in /)",
                path.display()
            ))),
        }
    }

    /// Checks that a clip of this size can be written in this format.
    pub fn check_size(self, path: &Path, width: usize, height: usize) -> Result<()> {
        if self == Self::Mp4 && (width % 2 != 0 || height % 2 != 0) {
            return Err(input_error(format!(
                "{}: H.264 needs an even width and height, got {width}x{height}",
                path.display()
            )));
        }
        Ok(())
    }
}

/// Checks before any heavy work that `path` can be written: its folder exists and is writable.
pub fn check_writable(path: &Path) -> Result<()> {
    let format = OutputFormat::from_path(path)?;
    let target = path.components().as_path();
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(input_error(format!("{}: folder {} does not exist", path.display(), parent.display())));
    }
    if format == OutputFormat::PngFolder && target.is_dir() && std::fs::read_dir(target)?.next().is_some() {
        return Err(input_error(format!("{}: folder exists and is not empty", path.display())));
    }
    if target.is_dir() && format != OutputFormat::PngFolder {
        return Err(input_error(format!("{}: is a folder", path.display())));
    }
    // Probe with a real file: permissions, read-only mounts.
    let probe = parent.join(format!(".vidit-write-test-{}", std::process::id()));
    File::create(&probe)
        .map_err(|e| input_error(format!("{}: cannot write to {}: {e}", path.display(), parent.display())))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Writes frames `(F, 3, H, W)` in [0, 1] to `path` in the format its name asks for.
pub fn write_video(path: &Path, frames: &Tensor, fps: f64) -> Result<()> {
    let format = OutputFormat::from_path(path)?;
    let (_, _, h, w) = frames.dims4()?;
    format.check_size(path, w, h)?;
    match format {
        OutputFormat::Safetensors => {
            let frames = frames.to_dtype(candle_core::DType::F32)?.contiguous()?;
            super::tensors::write_tensors(path, &HashMap::from([("frames".to_string(), frames)]))
        }
        OutputFormat::PngFolder => {
            let rgb = to_rgb8(frames)?;
            atomic::write_dir(path, |dir| {
                for (i, frame) in rgb.iter().enumerate() {
                    let file = dir.join(format!("frame_{i:04}.png"));
                    image::save_buffer(&file, frame, w as u32, h as u32, image::ExtendedColorType::Rgb8)
                        .with_context(|| format!("{}: cannot write", file.display()))?;
                }
                Ok(())
            })
        }
        OutputFormat::Gif => {
            let rgb = to_rgb8(frames)?;
            atomic::write_file(path, |tmp| write_gif(tmp, &rgb, w, h, fps))
        }
        OutputFormat::Mp4 => {
            let rgb = to_rgb8(frames)?;
            let packets = encode_h264(&rgb, w, h, fps)?;
            atomic::write_file(path, |tmp| mux_mp4(tmp, &packets, w, h, fps))
        }
    }
}

fn write_gif(path: &Path, frames: &[Vec<u8>], w: usize, h: usize, fps: f64) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let mut encoder = GifEncoder::new_with_speed(BufWriter::new(File::create(path)?), 10);
    encoder.set_repeat(Repeat::Infinite)?;
    // GIF delays are whole centiseconds: the nearest to 1/fps.
    let delay = image::Delay::from_numer_denom_ms(1000, fps.round().max(1.0) as u32);
    for rgb in frames {
        let rgba: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
        let buffer = image::RgbaImage::from_raw(w as u32, h as u32, rgba)
            .ok_or_else(|| anyhow!("frame size mismatch"))?;
        encoder.encode_frame(image::Frame::from_parts(buffer, 0, 0, delay))?;
    }
    Ok(())
}

/// One encoded access unit in Annex B form, and whether it is a key frame.
pub struct H264Packet {
    pub annex_b: Vec<u8>,
    pub keyframe: bool,
}

/// Encodes RGB8 frames to H.264 (Constrained Baseline, yuv420p, BT.601 limited range).
pub fn encode_h264(frames: &[Vec<u8>], w: usize, h: usize, fps: f64) -> Result<Vec<H264Packet>> {
    use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, FrameType};
    use openh264::formats::{RgbSliceU8, YUVBuffer};
    use openh264::OpenH264API;
    // About 0.25 bit per pixel per frame: clean at the small sizes vidit generates on CPU.
    let bps = ((w * h) as f64 * fps * 0.25).max(100_000.0) as u32;
    let config =
        EncoderConfig::new().bitrate(BitRate::from_bps(bps)).max_frame_rate(FrameRate::from_hz(fps as f32));
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| anyhow!("H.264 encoder: {e}"))?;
    let mut packets = Vec::with_capacity(frames.len());
    for rgb in frames {
        let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(rgb, (w, h)));
        let stream = encoder.encode(&yuv).map_err(|e| anyhow!("H.264 encode: {e}"))?;
        let keyframe = matches!(stream.frame_type(), FrameType::IDR | FrameType::I);
        packets.push(H264Packet { annex_b: stream.to_vec(), keyframe });
    }
    Ok(packets)
}

fn mux_mp4(path: &Path, packets: &[H264Packet], w: usize, h: usize, fps: f64) -> Result<()> {
    use muxide::api::{MuxerBuilder, VideoCodec};
    let file = BufWriter::new(File::create(path)?);
    let mut muxer = MuxerBuilder::new(file)
        .video(VideoCodec::H264, w as u32, h as u32, fps)
        .with_fast_start(true)
        .build()
        .map_err(|e| anyhow!("MP4 muxer: {e}"))?;
    for (i, packet) in packets.iter().enumerate() {
        muxer
            .write_video(i as f64 / fps, &packet.annex_b, packet.keyframe)
            .map_err(|e| anyhow!("MP4 frame {i}: {e}"))?;
    }
    muxer.finish().map_err(|e| anyhow!("MP4 finish: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A moving bright square on a dark background, (F, 3, H, W) in [0, 1].
    fn clip(frames: usize, h: usize, w: usize) -> Result<Tensor> {
        let mut data = vec![0.1f32; frames * 3 * h * w];
        for f in 0..frames {
            for c in 0..3 {
                for y in 8..24 {
                    for x in (4 + 2 * f)..(20 + 2 * f) {
                        data[((f * 3 + c) * h + y) * w + x] = [0.9, 0.5, 0.2][c];
                    }
                }
            }
        }
        Ok(Tensor::from_vec(data, (frames, 3, h, w), &Device::Cpu)?)
    }

    #[test]
    fn format_follows_the_path() {
        assert_eq!(OutputFormat::from_path(Path::new("a.mp4")).unwrap(), OutputFormat::Mp4);
        assert_eq!(OutputFormat::from_path(Path::new("a.GIF")).unwrap(), OutputFormat::Gif);
        assert_eq!(OutputFormat::from_path(Path::new("out/")).unwrap(), OutputFormat::PngFolder);
        assert_eq!(OutputFormat::from_path(Path::new("x.safetensors")).unwrap(), OutputFormat::Safetensors);
        let err = OutputFormat::from_path(Path::new("a.avi")).unwrap_err();
        assert!(crate::error::is_input_error(&err) && err.to_string().contains("a.avi"));
    }

    #[test]
    fn h264_round_trip_keeps_the_picture() -> Result<()> {
        use openh264::decoder::{Decoder, DecoderConfig, Flush};
        use openh264::formats::YUVSource;
        let frames = clip(9, 32, 48)?;
        let rgb = to_rgb8(&frames)?;
        let packets = encode_h264(&rgb, 48, 32, 8.0)?;
        assert!(packets[0].keyframe, "the first frame must be a key frame");
        let config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
        let mut decoder = Decoder::with_api_config(openh264::OpenH264API::from_source(), config)?;
        let mut decoded = Vec::new();
        for p in &packets {
            if let Some(yuv) = decoder.decode(&p.annex_b)? {
                assert_eq!(yuv.dimensions(), (48, 32));
                let mut out = vec![0u8; 48 * 32 * 3];
                yuv.write_rgb8(&mut out);
                decoded.push(out);
            }
        }
        for yuv in decoder.flush_remaining()? {
            let mut out = vec![0u8; 48 * 32 * 3];
            yuv.write_rgb8(&mut out);
            decoded.push(out);
        }
        assert_eq!(decoded.len(), 9);
        for (a, b) in rgb.iter().zip(&decoded) {
            let mse: f64 =
                a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len() as f64;
            let psnr = 10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10();
            assert!(psnr > 30.0, "PSNR {psnr:.1} dB");
        }
        Ok(())
    }

    /// Top-level MP4 boxes in file order.
    fn boxes(bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos + 8 <= bytes.len() {
            let size = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            out.push(String::from_utf8_lossy(&bytes[pos + 4..pos + 8]).into_owned());
            if size < 8 {
                break;
            }
            pos += size;
        }
        out
    }

    #[test]
    fn writes_every_format() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let frames = clip(5, 32, 48)?;
        let mp4 = dir.path().join("clip.mp4");
        write_video(&mp4, &frames, 8.0)?;
        let order = boxes(&std::fs::read(&mp4)?);
        let (moov, mdat) = (order.iter().position(|b| b == "moov"), order.iter().position(|b| b == "mdat"));
        assert_eq!(order.first().map(String::as_str), Some("ftyp"));
        assert!(moov.is_some() && moov < mdat, "moov must come before mdat (fast start): {order:?}");

        let gif = dir.path().join("clip.gif");
        write_video(&gif, &frames, 8.0)?;
        let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(File::open(&gif)?))?;
        use image::AnimationDecoder;
        assert_eq!(decoder.into_frames().count(), 5);

        let pngs = dir.path().join("frames/");
        write_video(&pngs, &frames, 8.0)?;
        let first = image::open(dir.path().join("frames/frame_0000.png"))?.to_rgb8();
        assert_eq!(first.dimensions(), (48, 32));
        assert_eq!(first.get_pixel(10, 10).0, [230, 128, 51]);
        assert_eq!(std::fs::read_dir(dir.path().join("frames"))?.count(), 5);

        let st = dir.path().join("clip.safetensors");
        write_video(&st, &frames, 8.0)?;
        let back = super::super::tensors::read_tensor(&st, "frames", Some(&[5, 3, 32, 48]), &Device::Cpu)?;
        assert_eq!((back - &frames)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        // Nothing but the outputs: no temporary files left behind.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())?.map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["clip.gif", "clip.mp4", "clip.safetensors", "frames"]);
        Ok(())
    }
}
