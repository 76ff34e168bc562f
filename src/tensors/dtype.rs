//! Element types of stored tensors and the one place where they are converted to and from f32.
//!
//! All math is done in f32; a value is rounded once, when it is encoded back to its storage type
//! (round-to-nearest-even, as torch does).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    /// fp8 with 4 exponent and 3 mantissa bits, no infinities (torch `float8_e4m3fn`): the format
    /// of most fp8 Flux checkpoints.
    #[serde(rename = "F8_E4M3")]
    F8E4M3,
    /// fp8 with 5 exponent and 2 mantissa bits (torch `float8_e5m2`).
    #[serde(rename = "F8_E5M2")]
    F8E5M2,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    /// Types a file may contain that loratool carries but cannot do math on (fp8, fp4, u16, ...).
    #[serde(untagged)]
    Other(&'static str, usize),
}

/// The safetensors names of types we pass through without converting, with their byte width
/// (0 for sub-byte types).
const OTHER_TYPES: &[(&str, usize)] = &[
    ("F8_E8M0", 1),
    ("F8_E4M3FNUZ", 1),
    ("F8_E5M2FNUZ", 1),
    ("U16", 2),
    ("U32", 4),
    ("U64", 8),
    ("C64", 8),
    ("F4", 0),
    ("F6_E2M3", 0),
    ("F6_E3M2", 0),
];

impl Dtype {
    /// Parses a safetensors dtype name ("F16", "BF16", ...).
    pub fn from_safetensors_name(name: &str) -> Option<Dtype> {
        Some(match name {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            other => {
                let (n, w) = OTHER_TYPES.iter().find(|(n, _)| *n == other)?;
                Dtype::Other(n, *w)
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
            Dtype::Other(n, _) => n,
        }
    }

    /// Bytes per element; `None` for sub-byte types.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::Other(_, 0) => return None,
            Dtype::Other(_, w) => w,
        })
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F8E4M3 | Dtype::F8E5M2
        )
    }

    /// Types that can be converted to f32 (floats, and the integer scalars some files use for alpha).
    pub fn is_numeric(self) -> bool {
        !matches!(self, Dtype::Other(..))
    }

    /// Decodes little-endian bytes of this type into f32 values. `None` if the type has no f32 view.
    pub fn decode_f32(self, bytes: &[u8]) -> Option<Vec<f32>> {
        let mut out = vec![0f32; bytes.len() / self.size()?];
        self.decode_into(bytes, &mut out)?;
        Some(out)
    }

    /// Decodes little-endian bytes of this type into `out` (exactly `bytes.len() / size` values),
    /// so streaming code can reuse one buffer. `None` if the type has no f32 view.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) -> Option<()> {
        fn each<const N: usize>(bytes: &[u8], out: &mut [f32], f: impl Fn([u8; N]) -> f32) {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
                *o = f(c.try_into().expect("chunk of N bytes"));
            }
        }
        let size = self.size()?;
        assert_eq!(
            bytes.len(),
            out.len() * size,
            "decode_into: length mismatch"
        );
        match self {
            Dtype::F32 => each(bytes, out, f32::from_le_bytes),
            Dtype::F16 => {
                // half's slice conversion uses F16C when the CPU has it (runtime detection).
                if let Some(src) = as_halves::<f16>(bytes) {
                    src.convert_to_f32_slice(out);
                } else {
                    each(bytes, out, |b| f16::from_le_bytes(b).to_f32());
                }
            }
            Dtype::BF16 => {
                if let Some(src) = as_halves::<bf16>(bytes) {
                    src.convert_to_f32_slice(out);
                } else {
                    each(bytes, out, |b| bf16::from_le_bytes(b).to_f32());
                }
            }
            Dtype::F8E4M3 => {
                let table = fp8::E4M3.table();
                each(bytes, out, |b: [u8; 1]| table[b[0] as usize])
            }
            Dtype::F8E5M2 => {
                let table = fp8::E5M2.table();
                each(bytes, out, |b: [u8; 1]| table[b[0] as usize])
            }
            Dtype::F64 => each(bytes, out, |b| f64::from_le_bytes(b) as f32),
            Dtype::I64 => each(bytes, out, |b| i64::from_le_bytes(b) as f32),
            Dtype::I32 => each(bytes, out, |b| i32::from_le_bytes(b) as f32),
            Dtype::I16 => each(bytes, out, |b| i16::from_le_bytes(b) as f32),
            Dtype::I8 => each(bytes, out, |b: [u8; 1]| b[0] as i8 as f32),
            Dtype::U8 | Dtype::Bool => each(bytes, out, |b: [u8; 1]| b[0] as f32),
            Dtype::Other(..) => return None,
        }
        Some(())
    }

    /// Encodes f32 values as little-endian bytes of this float type, rounding to nearest even.
    /// `None` for non-float targets: loratool only writes float tensors from math.
    pub fn encode_f32(self, values: &[f32]) -> Option<Vec<u8>> {
        let mut out = vec![0u8; values.len() * self.size()?];
        self.encode_into(values, &mut out)?;
        Some(out)
    }

    /// Encodes `values` into `out` (exactly `values.len() × size` bytes) as [`Self::encode_f32`].
    pub fn encode_into(self, values: &[f32], out: &mut [u8]) -> Option<()> {
        if !self.is_float() {
            return None;
        }
        assert_eq!(
            out.len(),
            values.len() * self.size()?,
            "encode_into: length mismatch"
        );
        match self {
            Dtype::F32 => {
                for (o, v) in out.chunks_exact_mut(4).zip(values) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::F16 => match as_halves_mut::<f16>(out) {
                Some(dst) => dst.convert_from_f32_slice(values),
                None => {
                    for (o, v) in out.chunks_exact_mut(2).zip(values) {
                        o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                    }
                }
            },
            // Not half's conversion: it rounds bf16 ties away from zero, torch to even.
            Dtype::BF16 => {
                for (o, v) in out.chunks_exact_mut(2).zip(values) {
                    o.copy_from_slice(&bf16_bits(*v).to_le_bytes());
                }
            }
            Dtype::F8E4M3 => fp8::E4M3.encode_into(values, out),
            Dtype::F8E5M2 => fp8::E5M2.encode_into(values, out),
            Dtype::F64 => {
                for (o, v) in out.chunks_exact_mut(8).zip(values) {
                    o.copy_from_slice(&(*v as f64).to_le_bytes());
                }
            }
            _ => unreachable!("float types only"),
        }
        Some(())
    }
}

/// What a vectorized fp8 codec needs to agree with this module bit for bit: every code's value,
/// and the constants of the encoder (see `fp8::Format::encode_into`).
#[derive(Clone, Copy)]
pub struct Fp8Params {
    pub table: &'static [f32; 256],
    pub mantissa_bits: i32,
    pub bias: i32,
    /// Largest finite code without sign; encoding saturates to it.
    pub max_code: u8,
    /// Code (without sign) of NaN, and of an infinite input.
    pub nan_code: u8,
    pub inf_code: u8,
}

/// [`Fp8Params`] for the fp8 types, `None` for the others.
pub fn fp8_params(dtype: Dtype) -> Option<Fp8Params> {
    match dtype {
        Dtype::F8E4M3 => Some(fp8::E4M3.params()),
        Dtype::F8E5M2 => Some(fp8::E5M2.params()),
        _ => None,
    }
}

/// The two fp8 formats: both are sign + exponent + mantissa with subnormals, so one description
/// decodes and encodes either.
mod fp8 {
    use std::sync::OnceLock;

    pub struct Format {
        /// Every code's value, filled on first use.
        table: OnceLock<[f32; 256]>,
        mantissa_bits: i32,
        bias: i32,
        /// Largest finite value's bit pattern (without sign); encoding saturates to it.
        max_finite: u8,
        /// e5m2 has IEEE infinities and NaNs in its top exponent; e4m3fn only NaN at 0x7F.
        ieee_special: bool,
    }

    pub static E4M3: Format = Format {
        table: OnceLock::new(),
        mantissa_bits: 3,
        bias: 7,
        max_finite: 0x7E,
        ieee_special: false,
    };
    pub static E5M2: Format = Format {
        table: OnceLock::new(),
        mantissa_bits: 2,
        bias: 15,
        max_finite: 0x7B,
        ieee_special: true,
    };

    /// 2^k for the exponents fp8 needs (exact, no `powi` call per element).
    fn pow2(k: i32) -> f32 {
        f32::from_bits(((k + 127) as u32) << 23)
    }

    impl Format {
        pub fn table(&self) -> &[f32; 256] {
            self.table
                .get_or_init(|| std::array::from_fn(|b| self.decode(b as u8)))
        }

        fn decode(&self, b: u8) -> f32 {
            let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
            let m_bits = self.mantissa_bits;
            let mag = (b & 0x7F) as i32;
            let (e, m) = (mag >> m_bits, mag & ((1 << m_bits) - 1));
            let top = (1 << (7 - m_bits)) - 1;
            if self.ieee_special && e == top {
                return if m == 0 {
                    sign * f32::INFINITY
                } else {
                    f32::NAN
                };
            }
            if !self.ieee_special && mag == 0x7F {
                return f32::NAN;
            }
            let value = if e == 0 {
                m as f32 * pow2(1 - self.bias - m_bits)
            } else {
                (1.0 + m as f32 / (1 << m_bits) as f32) * pow2(e - self.bias)
            };
            sign * value
        }

        /// Each value's nearest code, ties to even (as torch rounds), saturating at the largest
        /// finite value instead of overflowing to NaN/Inf; NaN stays NaN and e5m2 keeps its
        /// infinities. Written without branches so that the loop vectorizes.
        pub fn encode_into(&'static self, values: &[f32], out: &mut [u8]) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2; the function is the same loop compiled for it.
                return unsafe { self.encode_into_avx2(values, out) };
            }
            self.encode_loop(values, out)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn encode_into_avx2(&'static self, values: &[f32], out: &mut [u8]) {
            self.encode_loop(values, out)
        }

        pub fn params(&'static self) -> super::Fp8Params {
            super::Fp8Params {
                table: self.table(),
                mantissa_bits: self.mantissa_bits,
                bias: self.bias,
                max_code: self.max_finite,
                nan_code: if self.ieee_special { 0x7E } else { 0x7F },
                inf_code: if self.ieee_special {
                    0x7C
                } else {
                    self.max_finite
                },
            }
        }

        #[inline(always)]
        fn encode_loop(&'static self, values: &[f32], out: &mut [u8]) {
            let super::Fp8Params {
                mantissa_bits: m_bits,
                bias,
                max_code,
                nan_code,
                inf_code,
                ..
            } = self.params();
            let max_code = max_code as f32;
            for (o, &v) in out.iter_mut().zip(values) {
                let bits = v.to_bits();
                let sign = ((bits >> 24) & 0x80) as u8;
                let a = f32::from_bits(bits & 0x7FFF_FFFF);
                // Scaled so that one unit is one step of the fp8 grid at a's binade (the
                // subnormal range shares the smallest normal binade's step); the integer
                // continues into the exponent field, so a carry to the next binade is the next
                // code. The exponent is clamped so that huge values only saturate.
                let e = ((a.to_bits() >> 23) as i32 - 127).clamp(1 - bias, bias + 1);
                let q = round_small((a * pow2(m_bits - e)).min(64.0));
                let code = (((e + bias - 1) * (1 << m_bits)) as f32 + q).min(max_code);
                // SAFETY: `code` is finite and in 0..=max_code (a NaN `a` made `q` 64, then the
                // min), so the unchecked conversion is exact; the checked one does not vectorize.
                let code = unsafe { code.to_int_unchecked::<i32>() } as u8;
                let code = if a.is_nan() {
                    nan_code
                } else if a == f32::INFINITY {
                    inf_code
                } else {
                    code
                };
                *o = sign | code;
            }
        }
    }

    /// `x` rounded to an integer, ties to even, for 0 ≤ x < 2²²: adding and removing 1.5·2²³
    /// leaves the rounding to the FPU's default mode (nearest even). `f32::round_ties_even`
    /// is a libm call on baseline x86-64 and made fp8 encoding ~10× slower.
    fn round_small(x: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
        (x + MAGIC) - MAGIC
    }
}

/// The bf16 nearest to `v`, ties to even (as torch rounds); NaNs stay NaN (quiet, sign kept).
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    if x & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((x >> 16) | 0x40) as u16;
    }
    (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16
}

/// Little-endian 16-bit floats viewed in place, when the host is little-endian and the bytes are
/// aligned (then half's vectorised slice conversions apply).
trait Half16: Sized {}
impl Half16 for f16 {}
impl Half16 for bf16 {}

fn as_halves<T: Half16>(bytes: &[u8]) -> Option<&[T]> {
    if cfg!(target_endian = "little") && (bytes.as_ptr() as usize).is_multiple_of(2) {
        // SAFETY: T is a plain 2-byte value with alignment 2, the pointer is aligned, len/2
        // values are in bounds, and the host is little-endian like the file.
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / 2) })
    } else {
        None
    }
}

fn as_halves_mut<T: Half16>(bytes: &mut [u8]) -> Option<&mut [T]> {
    if cfg!(target_endian = "little") && (bytes.as_ptr() as usize).is_multiple_of(2) {
        // SAFETY: as in `as_halves`; every bit pattern is a valid T.
        Some(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len() / 2) })
    } else {
        None
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_rounds_to_nearest_even() {
        // 1 + 2^-11 lies exactly between two f16 values; ties go to the even mantissa (1.0).
        let v = [1.0 + 2f32.powi(-11), 65504.0, -2.5];
        let bytes = Dtype::F16.encode_f32(&v).unwrap();
        assert_eq!(
            Dtype::F16.decode_f32(&bytes).unwrap(),
            vec![1.0, 65504.0, -2.5]
        );
    }

    #[test]
    fn bf16_decodes_top_half_of_f32() {
        let bytes = Dtype::BF16.encode_f32(&[3.140625]).unwrap();
        assert_eq!(bytes, vec![0x49, 0x40]);
        assert_eq!(Dtype::BF16.decode_f32(&bytes).unwrap(), vec![3.140625]);
    }

    #[test]
    fn bf16_ties_round_to_even() {
        // 1 + 2^-8 and 1 + 3·2^-8 lie halfway between bf16 values: ties go to the even mantissa
        // (torch's rounding), also for negatives; one bit past a tie rounds up.
        let v = [
            0x3F80_8000u32,
            0x3F81_8000,
            0xBF80_8000,
            0x3F80_8001,
            0x7F7F_FFFF,
        ]
        .map(f32::from_bits);
        let bytes = Dtype::BF16.encode_f32(&v).unwrap();
        let bits: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(bits, [0x3F80, 0x3F82, 0xBF80, 0x3F81, 0x7F80]);
        let nan = Dtype::BF16.encode_f32(&[f32::NAN]).unwrap();
        assert!(Dtype::BF16.decode_f32(&nan).unwrap()[0].is_nan());
    }

    /// Every fp8 code decodes to a value that encodes back to it; values halfway between two codes
    /// go to the even one; out-of-range values saturate. (fixtures/dtypes holds torch's own
    /// conversions, checked in tests/fp8.rs.)
    #[test]
    fn fp8_codes_round_trip_and_ties_go_to_even() {
        for (d, nan_codes) in [(Dtype::F8E4M3, vec![0x7F, 0xFF]), (Dtype::F8E5M2, vec![])] {
            for b in 0..=255u8 {
                let v = d.decode_f32(&[b]).unwrap()[0];
                if v.is_nan() {
                    if !nan_codes.is_empty() {
                        assert!(nan_codes.contains(&b), "{d} {b:#x}");
                    }
                    continue;
                }
                assert_eq!(d.encode_f32(&[v]).unwrap(), [b], "{d} {b:#x} = {v}");
            }
        }
        let e4 = |v: f32| Dtype::F8E4M3.encode_f32(&[v]).unwrap()[0];
        assert_eq!(Dtype::F8E4M3.decode_f32(&[0x7E]).unwrap()[0], 448.0);
        assert_eq!(Dtype::F8E4M3.decode_f32(&[0x01]).unwrap()[0], 2f32.powi(-9));
        assert_eq!(
            e4(1.0 + 1.0 / 16.0),
            0x38,
            "tie between 1 and 1.125 goes to 1 (even)"
        );
        assert_eq!(
            e4(1.0 + 3.0 / 16.0),
            0x3A,
            "tie between 1.125 and 1.25 goes to 1.25"
        );
        assert_eq!(e4(1e6), 0x7E, "saturates");
        assert_eq!(e4(-1e6), 0xFE);
        assert_eq!(e4(f32::INFINITY), 0x7E);
        assert_eq!(
            e4(1.5 * 2f32.powi(-10)),
            0x01,
            "a subnormal tie goes to even"
        );
        let e5 = |v: f32| Dtype::F8E5M2.encode_f32(&[v]).unwrap()[0];
        assert_eq!(e5(f32::INFINITY), 0x7C);
        assert_eq!(e5(1e6), 0x7B, "saturates at 57344");
        assert_eq!(Dtype::F8E5M2.decode_f32(&[0x7B]).unwrap()[0], 57344.0);
    }

    #[test]
    fn names_round_trip_and_unknown_is_none() {
        for n in ["F64", "F32", "F16", "BF16", "I64", "I8", "BOOL", "F8_E4M3"] {
            assert_eq!(Dtype::from_safetensors_name(n).unwrap().name(), n);
        }
        assert!(Dtype::from_safetensors_name("Q4_K").is_none());
    }
}
