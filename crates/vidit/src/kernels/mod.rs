//! Fused CPU kernels for the transformer's hot ops (attention, linear, norms and adaLN, GELU, RoPE), each with its own backward pass.
//!
//! candle composes attention, the norms, GELU and RoPE from many small tensor ops, each a pass
//! over memory with an allocation, and their backward passes from many more (a broadcast's
//! gradient is a reduction, a narrow's a zero-padded concatenation). Here each is one pass,
//! threaded with rayon over rows, forward and backward. The layers call these on the CPU with f32
//! tensors and keep the composed version for other devices, which is also what the tests compare
//! against.

pub mod adaln;
pub mod attention;
pub mod conv3d;
pub mod gelu;
pub mod linear;
pub mod norm;
pub mod rope;

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// The threads the kernels split work over, read once. candle's `get_num_threads` parses
/// `/proc/cpuinfo` on every call (several hundred times a second in training) unless
/// `RAYON_NUM_THREADS` is set; see [`configure_threads`].
pub fn num_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Sets up the threads before any is spawned (it changes the process environment: call it at the
/// start of `main`), leaving alone what the user has set:
/// - `RAYON_NUM_THREADS` to candle's default thread count, so that candle's own matmuls and
///   convolutions read the count from the environment instead of `/proc/cpuinfo` at each call;
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT` to 1: the worker of candle's element-wise pool parks as
///   soon as an op is done instead of spinning for 25 000 pauses (about half a millisecond),
///   which took a core from the rayon threads of the kernels and gemm that run next (15% of a
///   training profile's samples on the 2-core EPYC). There a training step of the built-in model
///   went from a median 339 to 314 ms; the inference step did not change (docs/performance.md).
pub fn configure_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", num_threads().to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1");
    }
}

/// Whether `x` can take a fused CPU kernel.
pub fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// The f32 elements of a contiguous CPU storage.
pub(crate) fn as_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("fused kernel: input is not contiguous"),
        _ => candle_core::bail!("fused kernel: input is not f32"),
    }
}

/// Runs `f` on the f32 elements of a CPU tensor (made contiguous first if it is not).
pub fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(as_slice(cpu, layout)?)),
        _ => candle_core::bail!("fused kernel: tensor is not on the CPU"),
    }
}

/// Defines a function over slices whose body is compiled three times: for AVX-512, for AVX2 + FMA
/// and for the baseline target, the widest the CPU has picked at run time. The loops in the body
/// (and the `#[inline(always)]` helpers they call, such as [`exp`]) vectorise for that width.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { generic($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `dst (m × n) = beta·lhs (m × k)·rhs (k × n) [+ dst]` by gemm; strides are (row, column) in
/// elements, so transposed and token-major views need no copies.
///
/// # Safety
/// The pointers with their strides must address m·n, m·k and k·n valid elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (isize, isize),
    accumulate: bool,
    lhs: *const f32,
    lhs_strides: (isize, isize),
    rhs: *const f32,
    rhs_strides: (isize, isize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_strides.1,
        dst_strides.0,
        accumulate,
        lhs,
        lhs_strides.1,
        lhs_strides.0,
        rhs,
        rhs_strides.1,
        rhs_strides.0,
        1.0,
        beta,
        false,
        false,
        false,
        parallelism,
    )
}

/// An op over an input, a weight and an optional bias (linear layers, affine norms): one forward
/// and one backward serve candle's two arities through [`WithParams`].
pub(crate) trait ParamOp {
    /// The op's names without and with a bias.
    const NAMES: [&'static str; 2];
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        weight: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)>;
    /// (dx, dweight, dbias); dbias is unused without a bias.
    fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)>;
}

/// A [`ParamOp`] as `x.apply_op2(w, …)` (no bias) or `x.apply_op3(w, b, …)`.
pub(crate) struct WithParams<T>(pub T);

impl<T: ParamOp> candle_core::CustomOp2 for WithParams<T> {
    fn name(&self) -> &'static str {
        T::NAMES[0]
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        self.0.forward((xs, xl), (ws, wl), None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.0.backward(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl<T: ParamOp> candle_core::CustomOp3 for WithParams<T> {
    fn name(&self) -> &'static str {
        T::NAMES[1]
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        self.0.forward((xs, xl), (ws, wl), Some((bs, bl)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.0.backward(x, w, grad)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// A raw pointer that rayon tasks writing disjoint regions may share.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// e^x in f32 to about 1 ulp, branch-free so that loops over it vectorise: x = n·ln2 + r with
/// |r| ≤ ln2/2, e^r by its degree-7 Taylor polynomial, 2^n built in the exponent bits. n comes
/// from adding 1.5·2²³ (which rounds to an integer in the low mantissa bits), not from `floor`,
/// which is a library call on the baseline x86-64 target.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
                                     // max/min (not clamp) so that NaN maps into range: the bit arithmetic below needs a number.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.3).min(88.3);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // The integer n sits in the low bits of `shifted`: its bit pattern is ROUND's plus n.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// Σ x over 16 interleaved partial sums, so that the loop vectorises (a single running sum
/// would be a sequential dependency the compiler may not reorder).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Σ a·b, vectorised as [`sum`].
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// max x (−∞ for an empty slice), vectorised as [`sum`].
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(rest, |m, &v| m.max(v))
}

/// tanh(x) = 1 − 2 / (e^{2x} + 1), exact at the saturated ends.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// Rows per rayon task so that each task has at least ~`work` elements of work.
pub(crate) fn rows_per_task(rows: usize, row_len: usize, work: usize) -> usize {
    (work / row_len.max(1)).clamp(1, rows.max(1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_and_tanh_match_libm() {
        let mut worst_exp = 0f32;
        let mut worst_tanh = 0f32;
        for i in -20000..=20000 {
            let x = i as f32 * 0.004; // −80 … 80
            let e = (super::exp(x) - x.exp()).abs() / x.exp();
            worst_exp = worst_exp.max(e);
            worst_tanh = worst_tanh.max((super::tanh(x) - x.tanh()).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_tanh < 3e-7, "tanh error {worst_tanh}");
        assert_eq!(super::tanh(40.0), 1.0);
        assert_eq!(super::tanh(-40.0), -1.0);
    }
}
