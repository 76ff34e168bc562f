//! Seeded Gaussian noise equal to torch's CPU `randn` for float32, so that a seed gives A1111's
//! latent ("Random number generator source: CPU", ComfyUI's only source) and the same per-step
//! noise in ancestral samplers.
//!
//! torch's CPU generator is an `mt19937` seeded with the low 32 bits of the seed. `randn` of a
//! float32 tensor then takes one of two paths:
//! - fewer than 16 values: per value, Box–Muller in double precision from two 53-bit uniforms; the
//!   second value of each pair (the sine) is cached in the generator and returned by the next draw,
//!   also across calls, until the generator is re-seeded;
//! - 16 or more: every value first becomes a 24-bit uniform, then each block of 16 is transformed in
//!   float precision (`u1 = 1 − d[j]`, `u2 = d[j+8]`, `d[j] = r·cos θ`, `d[j+8] = r·sin θ`); when the
//!   count is not a multiple of 16 the last 16 values are drawn again and transformed once more.
//!   This path neither reads nor clears the cached double.
//!
//! The float transform differs between torch builds: x86 builds (AVX2 and AVX512 kernels, which
//! agree) evaluate log, sin and cos with the Cephes polynomials of torch's `avx_mathfun.h`, compiled
//! with the multiply-adds fused; builds without AVX2 call the C library's `logf`/`cosf`/`sinf`.
//! [`NormalKernel`] picks one; both are reproduced here operation by operation.

/// Which of torch's float32 normal kernels to reproduce for tensors of 16 or more values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NormalKernel {
    /// torch on x86-64 with AVX2 or AVX512 (every PyPI/conda x86 wheel on a CPU from the last
    /// decade): Cephes `log`/`sincos` in float with fused multiply-adds.
    #[default]
    X86Vectorized,
    /// torch's portable kernel (`ATEN_CPU_CAPABILITY=default`, CPUs without AVX2): the C library's
    /// float `logf`/`cosf`/`sinf`. Exact only where our C library is the one torch called.
    Portable,
}

/// torch's `CPUGeneratorImpl`: an mt19937 engine plus the cached second normal of the double path.
#[derive(Clone, Debug)]
pub struct TorchCpuGenerator {
    engine: Mt19937,
    next_double_normal: Option<f64>,
    kernel: NormalKernel,
}

impl TorchCpuGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`. torch keeps the full 64-bit seed as its
    /// `initial_seed` but seeds the engine with its low 32 bits (2³² + 5 draws what 5 does).
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, NormalKernel::default())
    }

    pub fn with_kernel(seed: u64, kernel: NormalKernel) -> Self {
        TorchCpuGenerator {
            engine: Mt19937::new(seed as u32),
            next_double_normal: None,
            kernel,
        }
    }

    /// `manual_seed` on an existing generator: restarts the engine and drops the cached normal.
    pub fn manual_seed(&mut self, seed: u64) {
        self.engine = Mt19937::new(seed as u32);
        self.next_double_normal = None;
    }

    /// One 32-bit draw (torch's `random()`).
    pub fn next_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// torch's `random64()`: two draws, the first one the high half.
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// torch's `uniform_real_distribution<float>(0, 1)`: 24 random bits, in [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0xFF_FFFF) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// torch's `uniform_real_distribution<double>(0, 1)`: 53 random bits of a 64-bit draw.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// torch's `normal_distribution<double>(0, 1)`, with its one-value cache.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(shape, generator=self)` in float32, row-major. The shape only matters through
    /// its element count; an empty shape is a scalar (one value).
    pub fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        self.randn_n(shape.iter().product())
    }

    /// `torch.randn(n, generator=self)`; successive calls continue the stream as torch's do.
    pub fn randn_n(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let transform = match self.kernel {
            NormalKernel::X86Vectorized => box_muller_16_x86,
            NormalKernel::Portable => box_muller_16_portable,
        };
        for block in data.chunks_exact_mut(16) {
            transform(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            transform(tail);
        }
        data
    }
}

/// `normal_fill_16` of torch's portable kernel, in float with the C library's functions. θ is
/// formed in double (`2.0f * pi<double> * u2`) and rounded to float, as torch's expression does.
fn box_muller_16_portable(block: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
        block[j] = radius * theta.cos();
        block[j + 8] = radius * theta.sin();
    }
}

/// `normal_fill_16_AVX2` of torch's x86 kernels, one lane at a time.
fn box_muller_16_x86(block: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * cephes_ln(u1)).sqrt();
        let (sin, cos) = cephes_sincos(two_pi * u2);
        block[j] = radius * cos;
        block[j + 8] = radius * sin;
    }
}

/// Fused multiply-add `a·b + c` with one rounding: where torch's compiler contracted a multiply
/// and an add of `avx_mathfun.h` into one FMA instruction, so must we.
#[inline]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// Cephes `logf` as `avx_mathfun.h`'s `log256_ps` evaluates it, for u in (0, 1] (no NaN or
/// denormal handling needed: u ≥ 2⁻²⁴ here).
fn cephes_ln(x: f32) -> f32 {
    const SQRT_HALF: f32 = 0.707_106_77;
    const P: [f32; 9] = [
        7.037_683_6E-2,
        -1.151_461E-1,
        1.167_699_9E-1,
        -1.242_014_1E-1,
        1.424_932_3E-1,
        -1.666_805_8E-1,
        2.000_071_5E-1,
        -2.499_999_4E-1,
        3.333_333E-1,
    ];
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LN2_HI: f32 = 0.693_359_4;

    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    // Mantissa scaled into [0.5, 1), exponent to match.
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    if m < SQRT_HALF {
        e -= 1.0;
        m = (m - 1.0) + m;
    } else {
        m -= 1.0;
    }
    let z = m * m;
    let mut y = P[0];
    for &p in &P[1..] {
        y = fma(y, m, p);
    }
    // The compiler fused the last multiply of each product into the add that consumes it.
    y = fma(y * m, z, e * LN2_LO);
    y = fma(-z, 0.5, y);
    fma(e, LN2_HI, m + y)
}

/// Cephes `sinf`/`cosf` as `avx_mathfun.h`'s `sincos256_ps` evaluates them (|x| < 8192).
fn cephes_sincos(x: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.273_239_5;
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.418_756_5e-4;
    const DP3: f32 = -3.774_895e-8;
    const SIN_P: [f32; 3] = [-1.951_529_6E-4, 8.332_161E-3, -1.666_665_5E-1];
    const COS_P: [f32; 3] = [2.443_315_7E-5, -1.388_731_6E-3, 4.166_664_6E-2];

    let sign_sin = x.to_bits() & 0x8000_0000;
    let ax = x.abs();
    // Octant, rounded up to even (Cephes' j = (j + 1) & ~1).
    let j = (((ax * FOUR_OVER_PI) as i32) + 1) & !1;
    let y = j as f32;
    let swap_sin = ((j & 4) as u32) << 29;
    let use_sin_poly = j & 2 == 0;
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_sin ^ swap_sin;

    // Extended-precision reduction x − y·π/4 in three parts.
    let r = fma(y, DP3, fma(y, DP2, fma(y, DP1, ax)));
    let z = r * r;

    let mut c = fma(COS_P[0], z, COS_P[1]);
    c = fma(c, z, COS_P[2]);
    c = fma(c * z, z, -(z * 0.5)) + 1.0;

    let mut s = fma(SIN_P[0], z, SIN_P[1]);
    s = fma(s, z, SIN_P[2]);
    s = fma(s * z, r, r);

    let (sin, cos) = if use_sin_poly { (s, c) } else { (c, s) };
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

/// The 32-bit Mersenne Twister (MT19937) with the reference initialisation, which is torch's
/// `at::mt19937` for a 32-bit seed.
#[derive(Clone)]
struct Mt19937 {
    state: Box<[u32; 624]>,
    index: usize,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937")
            .field("index", &self.index)
            .finish()
    }
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; 624]);
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The 10000th output of the default-seeded (5489) engine, fixed by the C++ standard.
        let mut mt = Mt19937::new(5489);
        let last = (0..10_000).map(|_| mt.next_u32()).last().unwrap();
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_zero_starts_like_torch() {
        // torch.randn(4, generator=torch.Generator().manual_seed(0)) (the double path).
        let v = TorchCpuGenerator::new(0).randn(&[4]);
        let expected = [1.5410, -0.2934, -2.1788, 0.5684];
        for (a, b) in v.iter().zip(expected) {
            assert!((a - b).abs() < 1e-4, "{v:?}");
        }
    }

    #[test]
    fn seeds_use_their_low_32_bits_and_reseeding_drops_the_cache() {
        let mut a = TorchCpuGenerator::new(5);
        let mut b = TorchCpuGenerator::new((1 << 32) + 5);
        assert_eq!(a.randn(&[3]), b.randn(&[3]));
        let first = TorchCpuGenerator::new(9).randn(&[1]);
        a.manual_seed(9);
        assert_eq!(a.randn(&[1]), first);
    }

    #[test]
    fn tail_of_a_non_multiple_of_16_is_redrawn() {
        // The first 16 values of randn(17) equal randn(16)'s first value only where the tail
        // block does not overlap: here index 0 keeps its value, 1..17 are recomputed.
        let full = TorchCpuGenerator::new(3).randn_n(16);
        let odd = TorchCpuGenerator::new(3).randn_n(17);
        assert_eq!(full[0], odd[0]);
        assert_ne!(full[1..], odd[1..17]);
    }
}
