//! A folder of the user's own clips: `.mp4`/`.gif` files and/or folders of PNG frames, captioned
//! by `captions.jsonl` lines `{"file": ..., "caption": ...}`. Every clip is decoded once, fitted
//! (aspect-preserving, centre crop) to the training size, resampled to the training frame rate
//! and kept in memory; training draws random windows of the training length from them.

use super::ClipSource;
use crate::error::input_error;
use crate::io::media::{fit, read_media, resample_fps, to_tensor, Resize};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::path::Path;

pub const CAPTIONS: &str = "captions.jsonl";

#[derive(serde::Deserialize)]
struct CaptionLine {
    file: String,
    caption: String,
}

pub struct FolderDataset {
    /// `(F_i, 3, H, W)` in [0, 1] with F_i ≥ `frames`, and the caption.
    clips: Vec<(Tensor, String)>,
    frames: usize,
    /// One line per file left out, saying why (each also printed as a warning).
    pub skipped: Vec<String>,
}

impl FolderDataset {
    pub fn load(dir: &Path, width: usize, height: usize, frames: usize, fps: f64) -> Result<Self> {
        let index = dir.join(CAPTIONS);
        let text = std::fs::read_to_string(&index)
            .map_err(|e| input_error(format!("{}: cannot read the captions: {e}", index.display())))?;
        let (mut clips, mut skipped) = (Vec::new(), Vec::new());
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let entry: CaptionLine = serde_json::from_str(line).map_err(|e| {
                input_error(format!(
                    "{}:{}: expected {{\"file\": ..., \"caption\": ...}}: {e}",
                    index.display(),
                    n + 1
                ))
            })?;
            if entry.caption.trim().is_empty() {
                return Err(input_error(format!("{}:{}: empty caption", index.display(), n + 1)));
            }
            let path = dir.join(&entry.file);
            match load_clip(&path, width, height, frames, fps) {
                Ok(clip) => clips.push((clip, entry.caption)),
                Err(e) => {
                    let why = format!("{e:#}");
                    eprintln!("warning: skipped {why}");
                    skipped.push(why);
                }
            }
        }
        if clips.is_empty() {
            return Err(input_error(format!(
                "{}: no usable clip (all {} listed in {CAPTIONS} were skipped)",
                dir.display(),
                skipped.len()
            )));
        }
        Ok(Self { clips, frames, skipped })
    }

    pub fn len(&self) -> usize {
        self.clips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clips.is_empty()
    }
}

fn load_clip(path: &Path, width: usize, height: usize, frames: usize, fps: f64) -> Result<Tensor> {
    let clip = read_media(path)?;
    let resampled = resample_fps(clip.frames, clip.fps, fps);
    if resampled.len() < frames {
        return Err(input_error(format!(
            "{}: {} frames at {fps} fps, fewer than the {frames} a training clip needs",
            path.display(),
            resampled.len()
        )));
    }
    let fitted: Vec<_> = resampled.iter().map(|f| fit(f, width, height, Resize::Crop)).collect();
    to_tensor(&fitted, &Device::Cpu)
}

impl ClipSource for FolderDataset {
    fn sample(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<(Tensor, String)> {
        let (clip, caption) = &self.clips[rng.random_range(0..self.clips.len())];
        let start = rng.random_range(0..=clip.dim(0)? - self.frames);
        Ok((clip.narrow(0, start, self.frames)?.to_device(device)?, caption.clone()))
    }

    fn vocabulary(&self) -> Vec<String> {
        let words: BTreeSet<String> = self
            .clips
            .iter()
            .flat_map(|(_, c)| c.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>())
            .collect();
        words.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn write_clip(path: &Path, frames: usize, w: usize, h: usize) -> Result<()> {
        let clip =
            crate::noise::randn(9, &[frames, 3, h, w], &Device::Cpu)?.affine(0.2, 0.5)?.clamp(0f32, 1f32)?;
        crate::io::video::write_video(path, &clip, 8.0)
    }

    #[test]
    fn loads_good_clips_and_skips_bad_ones_by_name() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        write_clip(&d.join("wide.mp4"), 12, 48, 32)?; // fitted by a centre crop
        write_clip(&d.join("small.gif"), 10, 16, 16)?;
        write_clip(&d.join("frames/"), 9, 32, 32)?;
        write_clip(&d.join("short.gif"), 3, 32, 32)?;
        std::fs::write(d.join("broken.mp4"), b"\0\0\0\x18ftypisom garbage")?;
        let lines = [
            ("wide.mp4", "A wide clip"),
            ("small.gif", "a small clip"),
            ("frames", "a folder of frames"),
            ("short.gif", "too short"),
            ("broken.mp4", "corrupt"),
            ("missing.mp4", "not there"),
        ];
        let jsonl: String = lines
            .iter()
            .map(|(f, c)| format!("{}\n", serde_json::json!({"file": f, "caption": c})))
            .collect();
        std::fs::write(d.join(CAPTIONS), jsonl)?;

        let data = FolderDataset::load(d, 24, 24, 8, 8.0)?;
        assert_eq!(data.len(), 3);
        assert_eq!(data.skipped.len(), 3);
        for name in ["short.gif", "broken.mp4", "missing.mp4"] {
            assert!(data.skipped.iter().any(|s| s.contains(name)), "{name} not named in {:?}", data.skipped);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (clip, caption) = data.sample(&mut rng, &Device::Cpu)?;
        assert_eq!(clip.dims(), &[8, 3, 24, 24]);
        assert!(lines.iter().any(|(_, c)| *c == caption));
        let words = data.vocabulary();
        assert!(words.contains(&"wide".to_string()) && words.contains(&"a".to_string()));
        assert!(!words.contains(&"A".to_string()), "lower-cased as the tokenizer does");
        Ok(())
    }

    #[test]
    fn missing_captions_bad_lines_and_nothing_usable_are_input_errors() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let load = || FolderDataset::load(d, 16, 16, 4, 8.0).map(|_| ()).expect_err("must fail");
        let err = load();
        assert!(crate::error::is_input_error(&err) && format!("{err}").contains(CAPTIONS), "{err}");
        std::fs::write(d.join(CAPTIONS), "{\"file\": \"a.gif\"}\n")?;
        let err = load();
        assert!(format!("{err}").contains("captions.jsonl:1"), "{err}");
        std::fs::write(d.join(CAPTIONS), "{\"file\": \"a.gif\", \"caption\": \"x\"}\n")?;
        let err = load();
        assert!(crate::error::is_input_error(&err) && format!("{err}").contains("no usable clip"), "{err}");
        Ok(())
    }
}
