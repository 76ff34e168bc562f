//! `out = encode(decode(base) + Σ up·down)` over rows of a stored tensor, in one pass.
//!
//! An SD1.5 merge patches 942 M elements with rank-32 products (~60 GFLOP) and decodes and
//! re-encodes every one of them. faer's products cannot read f16/bf16 or round in their
//! epilogue, so the faer route needs three passes over an f32 copy of each block (decode,
//! product, encode), which came to about a quarter of the CPU's FMA peak in a merge. This
//! kernel (AVX2 + FMA + F16C) keeps each 6×16 output tile in registers from the low-rank
//! product through the add of the base to the rounded store, for f32, f16, bf16 and fp8
//! (e4m3fn, e5m2) storage. Where it
//! does not apply (another CPU, f64), callers use decode → [`super::add_matmul`] → encode; the
//! two differ only in f32 summation order. Measured in docs/BENCHMARKS.md (merge section, "The
//! kernel itself").

use crate::tensors::Dtype;
use std::mem::MaybeUninit;

/// Output tile: rows × columns (two 8-wide vectors per row; 12 accumulators of the 16 AVX
/// registers, leaving room for the two `down` vectors and the broadcast `up` value).
const MR: usize = 6;
const NR: usize = 16;

/// `down [rank, cols]` laid out for the kernel: column panels of [`NR`] as `[rank][NR]`
/// contiguous, then the last `cols % NR` columns as `[rank][tail]`.
pub struct PackedDown {
    rank: usize,
    cols: usize,
    data: Vec<f32>,
}

impl PackedDown {
    pub fn new(down: &[f32], rank: usize, cols: usize) -> PackedDown {
        assert_eq!(down.len(), rank * cols, "down size");
        let panels = cols / NR;
        let tail = cols % NR;
        let mut data = Vec::with_capacity(rank * cols);
        for p in 0..panels {
            for k in 0..rank {
                data.extend_from_slice(&down[k * cols + p * NR..][..NR]);
            }
        }
        for k in 0..rank {
            data.extend_from_slice(&down[k * cols + panels * NR..][..tail]);
        }
        PackedDown { rank, cols, data }
    }

    fn tail(&self) -> &[f32] {
        &self.data[(self.cols / NR) * self.rank * NR..]
    }
}

/// One low-rank term on the rows being patched: `up` is `[rows, rank]`, already multiplied by
/// the term's scale, and `down` is the packed `[rank, cols]`.
pub struct Term<'a> {
    pub up: &'a [f32],
    pub down: &'a PackedDown,
}

/// Whether [`add_low_rank`] runs for this pair of stored types on this CPU.
pub fn supported(input: Dtype, output: Dtype) -> bool {
    let io = |d| {
        matches!(
            d,
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F8E4M3 | Dtype::F8E5M2
        )
    };
    io(input) && io(output) && cpu_has_kernel()
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_kernel() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_kernel() -> bool {
    false
}

/// Writes `decode(input) + Σ term.up · term.down` for `rows = input elements / cols` rows into
/// `output` (every byte of it, so it need not be initialised), rounding once to `out_dtype`.
/// Per element the sum is `base + Σ_terms Σ_k up·down`, accumulated with FMAs from zero in term
/// and `k` order.
///
/// Panics if [`supported`] is false or a size does not match (both caller bugs).
pub fn add_low_rank(
    input: &[u8],
    in_dtype: Dtype,
    output: &mut [MaybeUninit<u8>],
    out_dtype: Dtype,
    cols: usize,
    terms: &[Term],
) {
    assert!(supported(in_dtype, out_dtype), "add_low_rank: unsupported");
    let (in_size, out_size) = (in_dtype.size().unwrap(), out_dtype.size().unwrap());
    let rows = input.len() / (in_size * cols.max(1));
    assert_eq!(input.len(), rows * cols * in_size, "input size");
    assert_eq!(output.len(), rows * cols * out_size, "output size");
    for t in terms {
        assert_eq!(t.down.cols, cols, "down columns");
        assert_eq!(t.up.len(), rows * t.down.rank, "up rows");
    }
    if rows == 0 || cols == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let job = avx2::Job {
            input: input.as_ptr(),
            in_io: avx2::Io::of(in_dtype),
            output: output.as_mut_ptr().cast(),
            out_io: avx2::Io::of(out_dtype),
            cols,
            terms,
        };
        // SAFETY: `supported` checked the CPU features; the sizes asserted above bound every
        // access the kernel makes (rows × cols elements of each buffer, rows × rank of each up).
        unsafe { avx2::run(&job, rows) };
    }
    // The last `cols % NR` columns of every row: few, so plain code through the dtype module.
    let body = cols / NR * NR;
    let tail = cols - body;
    if tail == 0 {
        return;
    }
    let mut values = [0f32; NR];
    let mut encoded = [0u8; NR * 4];
    for r in 0..rows {
        let vals = &mut values[..tail];
        let at = r * cols + body;
        in_dtype
            .decode_into(&input[at * in_size..(at + tail) * in_size], vals)
            .expect("float dtype");
        for (j, v) in vals.iter_mut().enumerate() {
            let mut s = 0f32;
            for t in terms {
                let rank = t.down.rank;
                let down = t.down.tail();
                for k in 0..rank {
                    s = t.up[r * rank + k].mul_add(down[k * tail + j], s);
                }
            }
            *v += s;
        }
        let encoded = &mut encoded[..tail * out_size];
        out_dtype.encode_into(vals, encoded).expect("float dtype");
        output[at * out_size..(at + tail) * out_size].write_copy_of_slice(encoded);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Term, MR, NR};
    use crate::tensors::{fp8_params, Dtype, Fp8Params};
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(super) enum Io {
        F32,
        F16,
        BF16,
        /// fp8: decoded through the code table, encoded with the dtype module's constants.
        Fp8(Fp8Params),
    }

    impl Io {
        pub(super) fn of(d: Dtype) -> Io {
            match d {
                Dtype::F32 => Io::F32,
                Dtype::F16 => Io::F16,
                Dtype::BF16 => Io::BF16,
                Dtype::F8E4M3 | Dtype::F8E5M2 => Io::Fp8(fp8_params(d).expect("fp8")),
                _ => unreachable!("checked by supported()"),
            }
        }
        fn size(self) -> usize {
            match self {
                Io::F32 => 4,
                Io::F16 | Io::BF16 => 2,
                Io::Fp8(..) => 1,
            }
        }
    }

    pub(super) struct Job<'a> {
        pub input: *const u8,
        pub in_io: Io,
        pub output: *mut u8,
        pub out_io: Io,
        pub cols: usize,
        pub terms: &'a [Term<'a>],
    }

    /// 8 stored values at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(io: Io, p: *const u8) -> __m256 {
        match io {
            Io::F32 => _mm256_loadu_ps(p.cast()),
            Io::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            Io::BF16 => {
                let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
            }
            Io::Fp8(f) => {
                let codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()));
                _mm256_i32gather_ps::<4>(f.table.as_ptr(), codes)
            }
        }
    }

    /// 8 f32 values rounded to nearest even and stored at `p` (bf16 as [`Dtype::encode_into`]
    /// does it, NaNs kept quiet with their sign).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store8(io: Io, p: *mut u8, v: __m256) {
        match io {
            Io::F32 => _mm256_storeu_ps(p.cast(), v),
            Io::F16 => _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)),
            Io::BF16 => {
                let bits = _mm256_castps_si256(v);
                let high = _mm256_srli_epi32::<16>(bits);
                let lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
                let biased = _mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF));
                let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(biased, lsb));
                let quiet = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                let halves = _mm256_blendv_epi8(rounded, quiet, nan);
                // Pack each 128-bit lane's four values, then bring the two lanes' halves together.
                let packed = _mm256_packus_epi32(halves, halves);
                let ordered = _mm256_permute4x64_epi64::<0b1000>(packed);
                _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(ordered));
            }
            Io::Fp8(f) => {
                let bits = _mm256_castps_si256(v);
                let sign = _mm256_and_si256(_mm256_srli_epi32::<24>(bits), _mm256_set1_epi32(0x80));
                let abs = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFF_FFFF));
                let a = _mm256_castsi256_ps(abs);
                // As the scalar encoder: the step of a's binade (clamped), rounded, continued
                // into the exponent field, saturated.
                let e = _mm256_sub_epi32(_mm256_srli_epi32::<23>(abs), _mm256_set1_epi32(127));
                let e = _mm256_max_epi32(e, _mm256_set1_epi32(1 - f.bias));
                let e = _mm256_min_epi32(e, _mm256_set1_epi32(f.bias + 1));
                let scale_exp = _mm256_sub_epi32(_mm256_set1_epi32(f.mantissa_bits + 127), e);
                let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(scale_exp));
                // min_ps returns its second operand for a NaN first one, as f32::min does.
                let q = _mm256_min_ps(_mm256_mul_ps(a, scale), _mm256_set1_ps(64.0));
                let q = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q);
                let field = _mm256_sll_epi32(
                    _mm256_add_epi32(e, _mm256_set1_epi32(f.bias - 1)),
                    _mm_cvtsi32_si128(f.mantissa_bits),
                );
                let code = _mm256_add_ps(_mm256_cvtepi32_ps(field), q);
                let code =
                    _mm256_cvttps_epi32(_mm256_min_ps(code, _mm256_set1_ps(f.max_code as f32)));
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(a, a));
                let inf = _mm256_cmpeq_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
                let code = _mm256_blendv_epi8(code, _mm256_set1_epi32(f.inf_code as i32), inf);
                let code = _mm256_blendv_epi8(code, _mm256_set1_epi32(f.nan_code as i32), nan);
                let code = _mm256_or_si256(code, sign);
                // 32 → 16 → 8 bits within each 128-bit lane, then the two lanes' first dwords.
                let words = _mm256_packus_epi32(code, code);
                let bytes = _mm256_packus_epi16(words, words);
                let ordered =
                    _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
                _mm_storel_epi64(p.cast(), _mm256_castsi256_si128(ordered));
            }
        }
    }

    /// Packed `down` floats (all terms) per column chunk: 64 KB, which stays in L1/L2 while the
    /// chunk's rows pass through it (4 Ki–64 Ki measured alike, docs/BENCHMARKS.md).
    const CHUNK_FLOATS: usize = 1 << 14;
    /// How far ahead, in panels, the base rows are prefetched.
    const PREFETCH_PANELS: usize = 8;

    /// All full column panels of all rows, column chunk by column chunk.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run(job: &Job, rows: usize) {
        let panels = job.cols / NR;
        let total_rank: usize = job.terms.iter().map(|t| t.down.rank).sum();
        let chunk = (CHUNK_FLOATS / (total_rank.max(1) * NR)).max(1);
        let mut p0 = 0;
        while p0 < panels {
            let p1 = (p0 + chunk).min(panels);
            let mut r = 0;
            while r < rows {
                let m = (rows - r).min(MR);
                match m {
                    6 => tile::<6>(job, r, p0, p1),
                    5 => tile::<5>(job, r, p0, p1),
                    4 => tile::<4>(job, r, p0, p1),
                    3 => tile::<3>(job, r, p0, p1),
                    2 => tile::<2>(job, r, p0, p1),
                    _ => tile::<1>(job, r, p0, p1),
                }
                r += m;
            }
            p0 = p1;
        }
    }

    /// Rows `r..r + M`, panels `p0..p1`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const M: usize>(job: &Job, r: usize, p0: usize, p1: usize) {
        let (in_size, out_size) = (job.in_io.size(), job.out_io.size());
        for p in p0..p1 {
            // The base rows are read with a stride of a whole row, which the hardware
            // prefetchers follow poorly: ask for the stored values a few panels ahead.
            let ahead = (p + PREFETCH_PANELS).min(p1 - 1) * NR;
            for i in 0..M {
                let e = (r + i) * job.cols + ahead;
                _mm_prefetch::<_MM_HINT_T0>(job.input.add(e * in_size).cast());
            }
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for t in job.terms {
                let rank = t.down.rank;
                let down = t.down.data.as_ptr().add(p * rank * NR);
                let up = t.up.as_ptr().add(r * rank);
                for k in 0..rank {
                    let b0 = _mm256_loadu_ps(down.add(k * NR));
                    let b1 = _mm256_loadu_ps(down.add(k * NR + 8));
                    for (i, row) in acc.iter_mut().enumerate() {
                        let a = _mm256_broadcast_ss(&*up.add(i * rank + k));
                        row[0] = _mm256_fmadd_ps(a, b0, row[0]);
                        row[1] = _mm256_fmadd_ps(a, b1, row[1]);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                let e = (r + i) * job.cols + p * NR;
                let x0 = load8(job.in_io, job.input.add(e * in_size));
                let x1 = load8(job.in_io, job.input.add((e + 8) * in_size));
                store8(
                    job.out_io,
                    job.output.add(e * out_size),
                    _mm256_add_ps(x0, row[0]),
                );
                store8(
                    job.out_io,
                    job.output.add((e + 8) * out_size),
                    _mm256_add_ps(x1, row[1]),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's output as a new buffer (left uninitialised before the call, as merge does).
    fn run(
        input: &[u8],
        in_dtype: Dtype,
        out_dtype: Dtype,
        cols: usize,
        terms: &[Term],
    ) -> Vec<u8> {
        let n = input.len() / in_dtype.size().unwrap() * out_dtype.size().unwrap();
        let mut out = Vec::with_capacity(n);
        add_low_rank(
            input,
            in_dtype,
            &mut out.spare_capacity_mut()[..n],
            out_dtype,
            cols,
            terms,
        );
        // SAFETY: add_low_rank wrote all n bytes.
        unsafe { out.set_len(n) };
        out
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Every dtype pair, tile-row remainders (rows not a multiple of 6), a column tail, two terms
    /// of different ranks, and a chunk boundary: equal to an f64 reference rounded once, within
    /// one unit of the output type (f32 sums in another order), and exactly the f32 result of the
    /// same kernel rounded by the dtype module (one rounding, the dtype module's).
    #[test]
    fn matches_a_reference_for_every_dtype_pair() {
        if !cpu_has_kernel() {
            eprintln!("skipped: this CPU lacks AVX2/FMA/F16C");
            return;
        }
        let (rows, cols) = (23, 16 * 21 + 5);
        let ranks = [32, 3];
        let base = pseudo_random(rows * cols, 1);
        let ups: Vec<Vec<f32>> = ranks
            .iter()
            .enumerate()
            .map(|(i, &k)| pseudo_random(rows * k, 2 + i as u64))
            .collect();
        let downs: Vec<Vec<f32>> = ranks
            .iter()
            .enumerate()
            .map(|(i, &k)| pseudo_random(k * cols, 7 + i as u64))
            .collect();
        let packed: Vec<PackedDown> = downs
            .iter()
            .zip(ranks)
            .map(|(d, k)| PackedDown::new(d, k, cols))
            .collect();
        let terms: Vec<Term> = ups
            .iter()
            .zip(&packed)
            .map(|(u, d)| Term { up: u, down: d })
            .collect();
        let exact: Vec<f64> = (0..rows * cols)
            .map(|e| {
                let (r, c) = (e / cols, e % cols);
                let mut s = 0f64;
                for ((u, d), &k) in ups.iter().zip(&downs).zip(&ranks) {
                    for j in 0..k {
                        s += u[r * k + j] as f64 * d[j * cols + c] as f64;
                    }
                }
                s
            })
            .collect();
        for input in [
            Dtype::F32,
            Dtype::F16,
            Dtype::BF16,
            Dtype::F8E4M3,
            Dtype::F8E5M2,
        ] {
            let stored = input.encode_f32(&base).unwrap();
            let base_vals = input.decode_f32(&stored).unwrap();
            let as_f32 = run(&stored, input, Dtype::F32, cols, &terms);
            let as_f32 = Dtype::F32.decode_f32(&as_f32).unwrap();
            for (e, v) in as_f32.iter().enumerate() {
                let want = base_vals[e] as f64 + exact[e];
                assert!(
                    (*v as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{input}->F32 at {e}: {v} vs {want}"
                );
            }
            for output in [Dtype::F16, Dtype::BF16, Dtype::F8E4M3, Dtype::F8E5M2] {
                let out = run(&stored, input, output, cols, &terms);
                let n = output.size().unwrap();
                let want = output.encode_f32(&as_f32).unwrap();
                assert_eq!(out.len(), want.len());
                for (e, (got, want)) in out.chunks(n).zip(want.chunks(n)).enumerate() {
                    assert_eq!(got, want, "{input}->{output} at {e}: {}", as_f32[e]);
                }
            }
        }
    }

    #[test]
    fn bf16_and_fp8_stores_round_like_the_dtype_module() {
        if !cpu_has_kernel() {
            return;
        }
        // Ties both ways, values just off a tie, NaN, infinities, the largest finite value.
        let specials = [
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0xBF80_8000),
            f32::from_bits(0x3F80_8001),
            f32::from_bits(0x3F80_7FFF),
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            0.0,
            1e-40,
            -3.0,
            65504.0,
            1.0,
            -1.5,
        ];
        let stored = Dtype::F32.encode_f32(&specials).unwrap();
        let out = run(&stored, Dtype::F32, Dtype::BF16, NR, &[]);
        assert_eq!(out, Dtype::BF16.encode_f32(&specials).unwrap());
        // The fp8 stores on the same specials (NaN, infinities and out-of-range values saturate or
        // stay special as the scalar encoder decides) and on fp8 ties and range ends.
        let fp8_specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e6,
            -1e6,
            448.0,
            464.0,
            465.0,
            57344.0,
            1.0 + 1.0 / 16.0,
            1.0 + 3.0 / 16.0,
            1.5 * 2f32.powi(-10),
            3e-3,
            -2f32.powi(-17),
            0.0,
        ];
        for values in [&specials, &fp8_specials] {
            let stored = Dtype::F32.encode_f32(values).unwrap();
            for output in [Dtype::F8E4M3, Dtype::F8E5M2] {
                let out = run(&stored, Dtype::F32, output, NR, &[]);
                assert_eq!(out, output.encode_f32(values).unwrap(), "{output}");
            }
        }
        let first = u16::from_le_bytes([out[0], out[1]]);
        let second = u16::from_le_bytes([out[2], out[3]]);
        assert_eq!((first, second), (0x3F80, 0x3F82), "ties go to even");
    }
}
