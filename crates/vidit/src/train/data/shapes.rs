//! The built-in `shapes` dataset: one filled, antialiased shape on black, moving in a straight
//! line, captioned "a {color} {shape} moving {direction}". Rendered on the fly from a seed, so it
//! needs no files and every clip can be reproduced.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const COLORS: [(&str, [f32; 3]); 7] = [
    ("red", [1.0, 0.0, 0.0]),
    ("green", [0.0, 1.0, 0.0]),
    ("blue", [0.0, 0.0, 1.0]),
    ("yellow", [1.0, 1.0, 0.0]),
    ("magenta", [1.0, 0.0, 1.0]),
    ("cyan", [0.0, 1.0, 1.0]),
    ("white", [1.0, 1.0, 1.0]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// Unit motion per direction in image coordinates (y grows downwards, so up is −y).
pub const DIRECTIONS: [(&str, [f32; 2]); 4] =
    [("left", [-1.0, 0.0]), ("right", [1.0, 0.0]), ("up", [0.0, -1.0]), ("down", [0.0, 1.0])];

/// Combinations never shown in training, to measure composition.
pub const HELD_OUT: [(&str, &str, &str); 8] = [
    ("red", "triangle", "left"),
    ("green", "circle", "up"),
    ("blue", "square", "right"),
    ("yellow", "triangle", "down"),
    ("magenta", "square", "left"),
    ("cyan", "circle", "down"),
    ("white", "triangle", "right"),
    ("red", "square", "up"),
];

/// Which combinations a dataset draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Everything except [`HELD_OUT`].
    Train,
    /// Only [`HELD_OUT`].
    HeldOut,
    All,
}

/// Indices into [`COLORS`], [`SHAPES`], [`DIRECTIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Combination {
    pub color: usize,
    pub shape: usize,
    pub direction: usize,
}

impl Combination {
    pub fn caption(&self) -> String {
        format!("a {} {} moving {}", COLORS[self.color].0, SHAPES[self.shape], DIRECTIONS[self.direction].0)
    }

    pub fn is_held_out(&self) -> bool {
        let names = (COLORS[self.color].0, SHAPES[self.shape], DIRECTIONS[self.direction].0);
        HELD_OUT.contains(&names)
    }

    /// Every combination of the split, in a fixed order.
    pub fn all(split: Split) -> Vec<Combination> {
        let mut out = Vec::new();
        for color in 0..COLORS.len() {
            for shape in 0..SHAPES.len() {
                for direction in 0..DIRECTIONS.len() {
                    let c = Combination { color, shape, direction };
                    let keep = match split {
                        Split::Train => !c.is_held_out(),
                        Split::HeldOut => c.is_held_out(),
                        Split::All => true,
                    };
                    if keep {
                        out.push(c);
                    }
                }
            }
        }
        out
    }

    /// Parses a caption of the grammar; `None` for anything else.
    pub fn parse(caption: &str) -> Option<Combination> {
        let words: Vec<&str> = caption.split_whitespace().collect();
        let ["a", color, shape, "moving", direction] = words.as_slice() else { return None };
        Some(Combination {
            color: COLORS.iter().position(|(n, _)| n == color)?,
            shape: SHAPES.iter().position(|n| n == shape)?,
            direction: DIRECTIONS.iter().position(|(n, _)| n == direction)?,
        })
    }
}

/// Where and how a clip's shape moves.
#[derive(Debug, Clone, Copy)]
pub struct Motion {
    /// Centre at frame 0, in pixels.
    pub start: [f32; 2],
    /// Pixels per frame.
    pub speed: f32,
    /// Half the shape's extent, in pixels.
    pub size: f32,
}

impl Motion {
    /// A random motion that keeps the whole shape inside the frame for all `frames`.
    pub fn sample(
        rng: &mut impl Rng,
        combo: Combination,
        width: usize,
        height: usize,
        frames: usize,
    ) -> Motion {
        let scale = width.min(height) as f32 / 64.0;
        let size = rng.random_range(7.0..10.0) * scale;
        let steps = (frames.max(2) - 1) as f32;
        let speed = rng.random_range(0.9..1.6) * scale * 16.0 / steps;
        let [dx, dy] = DIRECTIONS[combo.direction].1;
        let travel = speed * steps;
        let margin = size + 1.0;
        // Along the motion the start leaves room for the whole travel; across it anywhere inside.
        let mut axis = |extent: f32, d: f32| -> f32 {
            if d == 0.0 {
                rng.random_range(margin..extent - margin)
            } else if d > 0.0 {
                rng.random_range(margin..(extent - margin - travel).max(margin + 0.1))
            } else {
                rng.random_range((margin + travel).min(extent - margin - 0.1)..extent - margin)
            }
        };
        let start = [axis(width as f32, dx), axis(height as f32, dy)];
        Motion { start, speed, size }
    }

    /// [`Self::sample`] from a seed of its own (for evaluation clips).
    pub fn from_seed(seed: u64, combo: Combination, width: usize, height: usize, frames: usize) -> Motion {
        Self::sample(&mut ChaCha8Rng::seed_from_u64(seed), combo, width, height, frames)
    }

    pub fn centre(&self, combo: Combination, frame: usize) -> [f32; 2] {
        let [dx, dy] = DIRECTIONS[combo.direction].1;
        [self.start[0] + dx * self.speed * frame as f32, self.start[1] + dy * self.speed * frame as f32]
    }
}

/// Signed distance (pixels, negative inside) from `p` to the shape of half-extent `size` centred at `c`.
fn signed_distance(shape: usize, p: [f32; 2], c: [f32; 2], size: f32) -> f32 {
    let (x, y) = (p[0] - c[0], p[1] - c[1]);
    match SHAPES[shape] {
        "circle" => (x * x + y * y).sqrt() - size,
        "square" => x.abs().max(y.abs()) - size * 0.85,
        _ => {
            // Upward equilateral triangle centred on its centroid: the max over its three edge
            // half-planes (exact along the edges, which is what the antialiasing ramp needs).
            let inradius = size / 2.0;
            let k = 3f32.sqrt() / 2.0;
            let bottom = y - inradius;
            let right = k * x - 0.5 * y - inradius;
            let left = -k * x - 0.5 * y - inradius;
            bottom.max(right).max(left)
        }
    }
}

/// Renders a clip `(F, 3, H, W)` in [0, 1].
pub fn render(
    combo: Combination,
    motion: &Motion,
    width: usize,
    height: usize,
    frames: usize,
    device: &Device,
) -> Result<Tensor> {
    let color = COLORS[combo.color].1;
    let mut data = vec![0f32; frames * 3 * height * width];
    for f in 0..frames {
        let c = motion.centre(combo, f);
        for y in 0..height {
            for x in 0..width {
                let p = [x as f32 + 0.5, y as f32 + 0.5];
                let d = signed_distance(combo.shape, p, c, motion.size);
                let coverage = (0.5 - d).clamp(0.0, 1.0); // one-pixel antialiasing ramp
                for ch in 0..3 {
                    data[((f * 3 + ch) * height + y) * width + x] = coverage * color[ch];
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (frames, 3, height, width), device)?)
}

/// Random (clip, caption) pairs from a split, drawn from the caller's RNG (so a resumed training
/// run draws the same clips).
pub struct ShapesDataset {
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    combos: Vec<Combination>,
}

impl ShapesDataset {
    pub fn new(split: Split, width: usize, height: usize, frames: usize) -> Result<Self> {
        if width < 32 || height < 32 || frames == 0 {
            bail!("shapes clips need at least 32x32 pixels and one frame");
        }
        Ok(Self { width, height, frames, combos: Combination::all(split) })
    }

    /// A random clip `(F, 3, H, W)` in [0, 1], with its combination.
    pub fn sample(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<(Tensor, Combination)> {
        let combo = self.combos[rng.random_range(0..self.combos.len())];
        let motion = Motion::sample(rng, combo, self.width, self.height, self.frames);
        Ok((render(combo, &motion, self.width, self.height, self.frames, device)?, combo))
    }
}

/// What [`analyze`] reads off a clip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Analysis {
    pub combination: Combination,
    /// Centroid of the shape in each frame, in pixels.
    pub first_centroid: [f32; 2],
    pub last_centroid: [f32; 2],
}

/// The words of the grammar.
pub fn vocabulary() -> Vec<String> {
    let mut words = vec!["a", "moving"];
    words.extend(COLORS.iter().map(|(n, _)| *n));
    words.extend(SHAPES);
    words.extend(DIRECTIONS.iter().map(|(n, _)| *n));
    words.into_iter().map(String::from).collect()
}

/// Reads colour, shape and direction off a clip `(F, 3, H, W)` in [0, 1], deterministically.
/// Colour: the palette entry nearest to the mean colour of the bright pixels. Direction: the larger
/// component of the centroid's travel. Shape: in every frame, the shape's mass (brightness above a
/// noise floor) is compared with each of the three shapes drawn with the same mass and centroid,
/// sharp or blurred, a little smaller or larger (a generated clip is soft-edged and its brightness
/// saturates); the shape whose best variant leaves the least squared error, summed over frames,
/// wins. `None` when a frame shows no shape.
pub fn analyze(frames: &Tensor) -> Result<Option<Analysis>> {
    let (f, c, h, w) = frames.dims4()?;
    if c != 3 || f == 0 {
        bail!("analyze expects (F, 3, H, W) frames, got {:?}", frames.dims());
    }
    let data = frames.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let px = |fr: usize, ch: usize, y: usize, x: usize| data[((fr * 3 + ch) * h + y) * w + x];
    let mut centroids = Vec::with_capacity(f);
    let mut shape_error = [0f64; 3];
    let mut colour = [0f64; 3];
    let mut bright = 0usize;
    for fr in 0..f {
        for y in 0..h {
            for x in 0..w {
                if (0..3).map(|ch| px(fr, ch, y, x)).fold(0f32, f32::max) > 0.5 {
                    for (ch, acc) in colour.iter_mut().enumerate() {
                        *acc += px(fr, ch, y, x) as f64;
                    }
                    bright += 1;
                }
            }
        }
        let frame = &data[fr * 3 * h * w..(fr + 1) * 3 * h * w];
        let Some((mass, area, centre)) = frame_mass(frame, h, w) else { return Ok(None) };
        centroids.push(centre);
        // Fit inside a window that holds the largest variant (the triangle's apex reaches 0.88·√A
        // from its centroid) with its blur; outside it every template is zero alike.
        let reach = (1.15 * 0.88 * area.sqrt() + 8.0).ceil() as usize;
        let (x0, y0) =
            ((centre[0] as usize).saturating_sub(reach), (centre[1] as usize).saturating_sub(reach));
        let (x1, y1) = ((centre[0] as usize + reach).min(w), (centre[1] as usize + reach).min(h));
        let window: Vec<f32> = (y0..y1.max(y0))
            .flat_map(|y| (x0..x1.max(x0)).map(move |x| (y, x)))
            .map(|(y, x)| mass[y * w + x])
            .collect();
        let local = [centre[0] - x0 as f32, centre[1] - y0 as f32];
        for (shape, err) in shape_error.iter_mut().enumerate() {
            *err +=
                best_fit(&window, x1.saturating_sub(x0), y1.saturating_sub(y0), shape, local, area) as f64;
        }
    }
    let mean = colour.map(|v| (v / bright as f64) as f32);
    let peak = mean.iter().copied().fold(f32::MIN, f32::max).max(1e-6);
    let normalised = mean.map(|v| v / peak);
    let color = (0..COLORS.len())
        .min_by(|&a, &b| {
            let d = |i: usize| COLORS[i].1.iter().zip(&normalised).map(|(p, q)| (p - q).powi(2)).sum::<f32>();
            d(a).total_cmp(&d(b))
        })
        .expect("palette is not empty");
    let shape = (0..SHAPES.len()).min_by(|&a, &b| shape_error[a].total_cmp(&shape_error[b])).expect("shapes");
    let (first, last) = (centroids[0], centroids[f - 1]);
    let (dx, dy) = (last[0] - first[0], last[1] - first[1]);
    let direction = if dx.abs() >= dy.abs() {
        if dx < 0.0 {
            0
        } else {
            1
        }
    } else if dy < 0.0 {
        2
    } else {
        3
    };
    Ok(Some(Analysis {
        combination: Combination { color, shape, direction },
        first_centroid: first,
        last_centroid: last,
    }))
}

/// A frame's shape mass (brightest channel above a noise floor), its total and its centroid in
/// pixels, from `(3, H, W)` values; `None` when fewer than 4 pixels are bright.
fn frame_mass(frame: &[f32], h: usize, w: usize) -> Option<(Vec<f32>, f32, [f32; 2])> {
    let brightest = |i: usize| frame[i].max(frame[h * w + i]).max(frame[2 * h * w + i]);
    let mass: Vec<f32> = (0..h * w).map(&brightest).map(|m| if m > 0.15 { m } else { 0.0 }).collect();
    let area: f32 = mass.iter().sum();
    if (0..h * w).filter(|&i| brightest(i) > 0.5).count() < 4 || area == 0.0 {
        return None;
    }
    let (mut cx, mut cy) = (0f32, 0f32);
    for (i, &m) in mass.iter().enumerate() {
        cx += m * ((i % w) as f32 + 0.5);
        cy += m * ((i / w) as f32 + 0.5);
    }
    Some((mass, area, [cx / area, cy / area]))
}

/// The shape's centroid in each frame of `(F, 3, H, W)` in [0, 1], as [`analyze`] measures it
/// (`None` for a frame without a shape).
pub fn centroids(frames: &Tensor) -> Result<Vec<Option<[f32; 2]>>> {
    let (f, _, h, w) = frames.dims4()?;
    let data = frames.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..f).map(|fr| frame_mass(&data[fr * 3 * h * w..(fr + 1) * 3 * h * w], h, w).map(|m| m.2)).collect())
}

/// The least squared error between `mass` and `shape` drawn at `centre` with area `area` (scaled
/// by 0.85…1.15) and Gaussian-blurred (σ 0…2.25 px).
fn best_fit(mass: &[f32], w: usize, h: usize, shape: usize, centre: [f32; 2], area: f32) -> f32 {
    // Half-extent for a given area: circle πs², square (1.7s)², triangle 3√3(s/2)².
    let size = match SHAPES[shape] {
        "circle" => (area / std::f32::consts::PI).sqrt(),
        "square" => area.sqrt() / 1.7,
        _ => 2.0 * (area / (3.0 * 3f32.sqrt())).sqrt(),
    };
    let mut best = f32::MAX;
    for scale in [0.85f32, 1.0, 1.15] {
        let sharp: Vec<f32> = (0..w * h)
            .map(|i| {
                let p = [(i % w) as f32 + 0.5, (i / w) as f32 + 0.5];
                (0.5 - signed_distance(shape, p, centre, size * scale)).clamp(0.0, 1.0)
            })
            .collect();
        for sigma in [0.0f32, 0.75, 1.5, 2.25] {
            let template = gaussian_blur(&sharp, w, h, sigma);
            let err = mass.iter().zip(&template).map(|(m, t)| (m - t.min(1.0)).powi(2)).sum::<f32>();
            best = best.min(err);
        }
    }
    best
}

/// Separable Gaussian blur of a `w`×`h` image (zero outside).
fn gaussian_blur(img: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    if sigma == 0.0 {
        return img.to_vec();
    }
    let r = (3.0 * sigma).ceil() as isize;
    let k: Vec<f32> = (-r..=r).map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let norm: f32 = k.iter().sum();
    let pass = |src: &[f32], horizontal: bool| -> Vec<f32> {
        let mut out = vec![0f32; w * h];
        for y in 0..h as isize {
            for x in 0..w as isize {
                let mut acc = 0f32;
                for (j, kv) in k.iter().enumerate() {
                    let d = j as isize - r;
                    let (sx, sy) = if horizontal { (x + d, y) } else { (x, y + d) };
                    if sx >= 0 && sy >= 0 && sx < w as isize && sy < h as isize {
                        acc += kv * src[sy as usize * w + sx as usize];
                    }
                }
                out[y as usize * w + x as usize] = acc / norm;
            }
        }
        out
    };
    pass(&pass(img, true), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_and_held_out_split() {
        assert_eq!(Combination::all(Split::All).len(), 84);
        assert_eq!(Combination::all(Split::HeldOut).len(), 8);
        assert_eq!(Combination::all(Split::Train).len(), 76);
        for c in Combination::all(Split::All) {
            assert_eq!(Combination::parse(&c.caption()), Some(c));
        }
        assert_eq!(Combination::parse("a red circle moving sideways"), None);
        let held = Combination::parse("a green circle moving up").unwrap();
        assert!(held.is_held_out());
    }

    #[test]
    fn same_seed_same_clips() -> Result<()> {
        let data = ShapesDataset::new(Split::Train, 64, 64, 17)?;
        let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(3), ChaCha8Rng::seed_from_u64(3));
        for _ in 0..3 {
            let (x, cx) = data.sample(&mut a, &Device::Cpu)?;
            let (y, cy) = data.sample(&mut b, &Device::Cpu)?;
            assert_eq!(cx, cy);
            assert!(!cx.is_held_out());
            assert_eq!((x - y)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        }
        Ok(())
    }

    /// A 3×3 box blur, `passes` times, per frame and channel.
    fn blur(clip: &Tensor, passes: usize) -> Result<Tensor> {
        let (f, c, h, w) = clip.dims4()?;
        let kernel = Tensor::full(1f32 / 9.0, (1, 1, 3, 3), clip.device())?;
        let mut x = clip.reshape((f * c, 1, h, w))?;
        for _ in 0..passes {
            x = x.conv2d(&kernel, 1, 1, 1, 1)?;
        }
        Ok(x.reshape((f, c, h, w))?)
    }

    #[test]
    fn analyzer_reads_blurred_clips_too() -> Result<()> {
        // A VAE's soft edges must not turn squares and triangles into circles.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for combo in Combination::all(Split::All).into_iter().step_by(5) {
            let motion = Motion::sample(&mut rng, combo, 64, 64, 17);
            let clip = blur(&render(combo, &motion, 64, 64, 17, &Device::Cpu)?, 3)?;
            let analysis = analyze(&clip)?.expect("a shape is visible");
            assert_eq!(analysis.combination, combo, "{} with {motion:?}", combo.caption());
        }
        Ok(())
    }

    #[test]
    fn analyzer_reads_back_every_combination() -> Result<()> {
        // Every combination, several random motions each: the analyzer must recover all attributes
        // and the shape must stay whole inside the frame (constant mass).
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for combo in Combination::all(Split::All) {
            for _ in 0..2 {
                let motion = Motion::sample(&mut rng, combo, 64, 64, 17);
                let clip = render(combo, &motion, 64, 64, 17, &Device::Cpu)?;
                let analysis = analyze(&clip)?.expect("a shape is visible");
                assert_eq!(analysis.combination, combo, "{} with {motion:?}", combo.caption());
                let mass: Vec<f32> = clip.sum((1, 2, 3))?.to_vec1()?;
                let (lo, hi) = mass.iter().fold((f32::MAX, f32::MIN), |(a, b), &m| (a.min(m), b.max(m)));
                assert!(hi - lo < 0.05 * hi, "{}: the shape leaves the frame", combo.caption());
            }
        }
        Ok(())
    }
}
