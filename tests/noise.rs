//! torch's CPU `randn` (fixtures/generate_noise.py) against `preview::noise`, value by value.

mod common;

use loratool::preview::noise::{NormalKernel, TorchCpuGenerator};
use loratool::tensors::TensorFile;

fn fixture() -> TensorFile {
    TensorFile::open(&common::fixtures().join("noise/torch_randn.safetensors")).unwrap()
}

/// `seed42` → 42; `4x64x64` → [4, 64, 64].
fn parse(seed: &str, shape: &str) -> (u64, Vec<usize>) {
    let seed = seed.strip_prefix("seed").unwrap().parse().unwrap();
    let shape = shape.split('x').map(|d| d.parse().unwrap()).collect();
    (seed, shape)
}

/// Number of values whose bits differ, and the largest absolute difference.
fn compare(ours: &[f32], torch: &[f32]) -> (usize, f32) {
    assert_eq!(ours.len(), torch.len());
    let differ = ours
        .iter()
        .zip(torch)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let max = ours
        .iter()
        .zip(torch)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    (differ, max)
}

/// Compares every `<prefix>/seed<S>/<shape>` tensor; returns how many were checked and, for each
/// inexact one, its name, the count of differing values and the largest difference.
fn check_single_draws(prefix: &str, kernel: NormalKernel) -> (usize, Vec<(String, usize, f32)>) {
    let file = fixture();
    let mut checked = 0;
    let mut report = Vec::new();
    for info in file.tensors() {
        let parts: Vec<&str> = info.name.split('/').collect();
        if parts[0] != prefix {
            continue;
        }
        let (seed, shape) = parse(parts[1], parts[2]);
        assert_eq!(shape, info.shape, "{}", info.name);
        let ours = TorchCpuGenerator::with_kernel(seed, kernel).randn(&shape);
        let torch = file.read_f32(&info.name).unwrap().data;
        let (differ, max) = compare(&ours, &torch);
        if differ != 0 {
            report.push((info.name.clone(), differ, max));
        }
        checked += 1;
    }
    (checked, report)
}

#[test]
fn x86_kernel_equals_torch_but_for_8_values_one_ulp_off() {
    // Known gap (docs/DECISIONS.md, "Preview noise"): 8 of the 77,316 values differ by one unit in
    // the last place, from a multiply-add the compiler fused differently in torch's build.
    let (checked, report) = check_single_draws("vec", NormalKernel::X86Vectorized);
    assert_eq!(checked, 52);
    let counts: Vec<(&str, usize)> = report.iter().map(|(n, c, _)| (n.as_str(), *c)).collect();
    assert_eq!(
        counts,
        [("vec/seed1/4x96x64", 6), ("vec/seed4294967295/4x64x64", 2)],
        "{report:?}"
    );
    assert!(report.iter().all(|(_, _, max)| *max <= 6e-8), "{report:?}");
}

#[test]
fn portable_kernel_equals_torch_default_capability_bit_for_bit() {
    let (checked, report) = check_single_draws("default", NormalKernel::Portable);
    assert_eq!(checked, 52);
    assert!(report.is_empty(), "{report:?}");
}

#[test]
fn successive_draws_continue_torch_stream() {
    let file = fixture();
    let mut names: Vec<&str> = file
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| n.starts_with("seq/"))
        .collect();
    // `seq/seed<S>/<i>_<shape>`: group by seed, in draw order.
    names.sort_by_key(|n| {
        let parts: Vec<&str> = n.split('/').collect();
        let i: usize = parts[2].split('_').next().unwrap().parse().unwrap();
        (parts[1].to_string(), i)
    });
    let mut generator: Option<(String, TorchCpuGenerator)> = None;
    for name in &names {
        let parts: Vec<&str> = name.split('/').collect();
        let (seed, shape) = parse(parts[1], parts[2].split('_').nth(1).unwrap());
        if generator.as_ref().map(|(s, _)| s.as_str()) != Some(parts[1]) {
            generator = Some((parts[1].to_string(), TorchCpuGenerator::new(seed)));
        }
        let ours = generator.as_mut().unwrap().1.randn(&shape);
        let (differ, max) = compare(&ours, &file.read_f32(name).unwrap().data);
        assert_eq!(differ, 0, "{name}: max difference {max:e}");
    }
    assert_eq!(names.len(), 11);
}
