//! `preview::sampling` against k-diffusion, A1111's DDIM and diffusers' DDIMScheduler
//! (fixtures/generate_sampling.py): schedules, sigma/timestep maps, and whole txt2img runs with
//! the script's stand-in UNet, repeated here operation by operation.

mod common;

use loratool::preview::sampling::{
    sample, BetaSchedule, Latent, ModelOutput, NoisePredictor, NoiseSchedule, Prediction,
    SamplerKind, SamplerSettings, ScheduleKind,
};
use loratool::tensors::TensorFile;

const SIGMA_TOLERANCE: f32 = 1e-6;
const LATENT_TOLERANCE: f32 = 1e-4;

fn fixture() -> TensorFile {
    TensorFile::open(&common::fixtures().join("sampling/reference.safetensors")).unwrap()
}

fn read(file: &TensorFile, name: &str) -> Vec<f32> {
    file.read_f32(name).unwrap().data
}

fn names(file: &TensorFile, prefix: &str) -> Vec<String> {
    file.tensors()
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Largest elementwise relative difference, |a − b| / |b|, over values whose reference is not 0
/// (those must match exactly).
fn max_relative(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .map(|(&a, &b)| {
            if b == 0.0 {
                assert_eq!(a, 0.0);
                0.0
            } else {
                ((a - b) / b).abs()
            }
        })
        .fold(0.0, f32::max)
}

/// Largest difference relative to the reference's largest magnitude: for latents, whose values
/// cross zero, elementwise ratios say nothing.
fn latent_error(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn schedule_from_fixture(file: &TensorFile, betas: &str) -> NoiseSchedule {
    NoiseSchedule::from_alphas_cumprod(read(file, &format!("schedule/{betas}/alphas_cumprod")))
        .unwrap()
}

#[test]
fn default_schedules_equal_ldm_buffers() {
    let file = fixture();
    let cases = [
        ("scaled_linear", BetaSchedule::ScaledLinear, 0.00085, 0.012),
        ("linear", BetaSchedule::Linear, 0.0001, 0.02),
    ];
    for (name, kind, start, end) in cases {
        let ours = NoiseSchedule::from_betas(kind, start, end, 1000).unwrap();
        let reference = read(&file, &format!("schedule/{name}/alphas_cumprod"));
        let error = max_relative(ours.alphas_cumprod(), &reference);
        eprintln!("alphas_cumprod {name}: max relative error {error:e}");
        assert!(error <= SIGMA_TOLERANCE, "{name}: {error:e}");
    }
    assert_eq!(
        NoiseSchedule::stable_diffusion().alphas_cumprod(),
        NoiseSchedule::from_betas(BetaSchedule::ScaledLinear, 0.00085, 0.012, 1000)
            .unwrap()
            .alphas_cumprod()
    );
}

#[test]
fn sigma_lists_match_k_diffusion() {
    let file = fixture();
    let mut checked = 0;
    let mut worst = 0.0f32;
    for name in names(&file, "sigmas/") {
        // sigmas/<betas>/<normal|karras>/<steps>
        let parts: Vec<&str> = name.split('/').collect();
        let schedule = schedule_from_fixture(&file, parts[1]);
        let kind = match parts[2] {
            "normal" => ScheduleKind::Normal,
            "karras" => ScheduleKind::Karras,
            other => panic!("{other}"),
        };
        let steps: usize = parts[3].parse().unwrap();
        let ours = schedule.sigmas(kind, steps).unwrap();
        let error = max_relative(&ours, &read(&file, &name));
        assert!(error <= SIGMA_TOLERANCE, "{name}: {error:e}");
        assert_eq!(ours.len(), steps + 1);
        worst = worst.max(error);
        checked += 1;
    }
    eprintln!("{checked} sigma lists: max relative error {worst:e}");
    assert_eq!(checked, 40);
}

#[test]
fn sigma_to_t_and_t_to_sigma_match_k_diffusion() {
    let file = fixture();
    for betas in ["scaled_linear", "linear"] {
        let schedule = schedule_from_fixture(&file, betas);
        let sigmas = read(&file, &format!("sigma_to_t/{betas}/sigma"));
        let ours: Vec<f32> = sigmas.iter().map(|&s| schedule.sigma_to_t(s)).collect();
        let reference = read(&file, &format!("sigma_to_t/{betas}/t"));
        // Timesteps near 0 are compared in absolute terms (t = 0 for every σ below σ_min).
        let t_error = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0.0f32, f32::max);
        eprintln!("sigma_to_t {betas}: max error {t_error:e}");
        assert!(t_error <= SIGMA_TOLERANCE, "{betas}: {t_error:e}");

        let ts = read(&file, &format!("t_to_sigma/{betas}/t"));
        let ours: Vec<f32> = ts.iter().map(|&t| schedule.t_to_sigma(t)).collect();
        let error = max_relative(&ours, &read(&file, &format!("t_to_sigma/{betas}/sigma")));
        eprintln!("t_to_sigma {betas}: max relative error {error:e}");
        assert!(error <= SIGMA_TOLERANCE, "{betas}: {error:e}");
    }
}

// The stand-in UNet of fixtures/generate_sampling.py, in the same order of operations.
const MIX: [[f32; 4]; 4] = [
    [0.75, -0.25, 0.125, 0.5],
    [0.25, 0.625, -0.375, 0.125],
    [-0.5, 0.25, 0.75, -0.125],
    [0.125, -0.5, 0.25, 0.875],
];
const GAIN: f32 = 0.875;
const T_SCALE: f32 = 1.0 / 1024.0;
const COND_BIAS: [f32; 4] = [0.25, -0.125, 0.0625, -0.3125];
const UNCOND_BIAS: [f32; 4] = [-0.0625, 0.1875, -0.25, 0.125];

struct StandInUnet {
    guided: bool,
    calls: usize,
}

fn stand_in(input: &Latent, timestep: f32, bias: &[f32; 4]) -> Vec<f32> {
    let x = input.values();
    let plane = x.len() / 4;
    let mut out = vec![0.0f32; x.len()];
    for p in 0..plane {
        let (x0, x1, x2, x3) = (x[p], x[plane + p], x[2 * plane + p], x[3 * plane + p]);
        for c in 0..4 {
            let m = MIX[c];
            let mix = x0 * m[0] + x1 * m[1] + x2 * m[2] + x3 * m[3];
            out[c * plane + p] = (mix * GAIN + (timestep * T_SCALE + bias[c])).tanh();
        }
    }
    out
}

impl NoisePredictor for StandInUnet {
    fn predict(&mut self, input: &Latent, timestep: f32) -> loratool::Result<ModelOutput> {
        self.calls += 1;
        Ok(ModelOutput {
            cond: stand_in(input, timestep, &COND_BIAS),
            uncond: self.guided.then(|| stand_in(input, timestep, &UNCOND_BIAS)),
        })
    }
}

/// A run named like the fixture's `<sampler>/<schedule>/<prediction>/<betas>/<shape>/steps<N>/
/// seed<S>/<cfg7.5|unguided>/ensd<D>`.
struct Case {
    settings: SamplerSettings,
    prediction: Prediction,
    betas: String,
    shape: Vec<usize>,
    guided: bool,
}

fn parse_case(key: &str) -> Case {
    let p: Vec<&str> = key.split('/').collect();
    assert_eq!(p.len(), 9, "{key}");
    let sampler = match p[0] {
        "euler" => SamplerKind::Euler,
        "euler_a" => SamplerKind::EulerAncestral,
        "dpmpp_2m" => SamplerKind::DpmPp2m,
        "ddim" => SamplerKind::Ddim,
        other => panic!("{other}"),
    };
    let schedule = match p[1] {
        "karras" => ScheduleKind::Karras,
        _ => ScheduleKind::Normal,
    };
    let prediction = match p[2] {
        "eps" => Prediction::Epsilon,
        "v" => Prediction::V,
        other => panic!("{other}"),
    };
    let guided = p[7] != "unguided";
    Case {
        settings: SamplerSettings {
            sampler,
            schedule,
            steps: p[5].strip_prefix("steps").unwrap().parse().unwrap(),
            cfg_scale: if guided {
                p[7].strip_prefix("cfg").unwrap().parse().unwrap()
            } else {
                1.0
            },
            seed: p[6].strip_prefix("seed").unwrap().parse().unwrap(),
            eta_noise_seed_delta: p[8].strip_prefix("ensd").unwrap().parse().unwrap(),
        },
        prediction,
        betas: p[3].to_string(),
        shape: p[4].split('x').map(|d| d.parse().unwrap()).collect(),
        guided,
    }
}

/// Runs a case; returns the final latent, every step's latent and the number of model calls.
fn run(file: &TensorFile, case: &Case) -> (Vec<f32>, Vec<Vec<f32>>, usize) {
    let schedule = schedule_from_fixture(file, &case.betas);
    let mut model = StandInUnet {
        guided: case.guided,
        calls: 0,
    };
    let mut steps = Vec::new();
    let latent = sample(
        &case.settings,
        &schedule,
        case.prediction,
        &case.shape,
        &mut model,
        &mut |_, x: &Latent| steps.push(x.values().to_vec()),
    )
    .unwrap();
    (latent.into_values(), steps, model.calls)
}

fn check_latents(prefix: &str) -> (usize, Vec<(String, f32)>) {
    let file = fixture();
    let mut errors = Vec::new();
    for name in names(&file, prefix) {
        let case = parse_case(&name[prefix.len()..]);
        let (ours, steps, calls) = run(&file, &case);
        let error = latent_error(&ours, &read(&file, &name));
        // One model call per step; DDIM makes one fewer than its listed timesteps.
        assert_eq!(calls, steps.len(), "{name}");
        errors.push((name, error));
    }
    for (name, error) in &errors {
        eprintln!("{name}: {error:e}");
    }
    let bad: Vec<_> = errors
        .iter()
        .filter(|(_, e)| e.is_nan() || *e > LATENT_TOLERANCE)
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
    (errors.len(), errors)
}

#[test]
fn final_latents_match_k_diffusion_and_a1111_ddim() {
    let (checked, errors) = check_latents("latent/");
    assert_eq!(checked, 29);
    for sampler in ["euler/", "euler_a/", "dpmpp_2m/", "ddim/"] {
        let worst = errors
            .iter()
            .filter(|(n, _)| n["latent/".len()..].starts_with(sampler))
            .map(|(_, e)| *e)
            .fold(0.0f32, f32::max);
        eprintln!("worst {sampler} {worst:e}");
    }
}

#[test]
fn ddim_matches_diffusers_ddim_scheduler() {
    let (checked, _) = check_latents("ddim_diffusers/");
    assert_eq!(checked, 7);
}

#[test]
fn ddim_makes_one_call_fewer_than_listed_timesteps() {
    let file = fixture();
    let key = "ddim/-/eps/scaled_linear/4x8x8/steps20/seed42/cfg7.5/ensd0";
    let (_, steps, calls) = run(&file, &parse_case(key));
    assert_eq!((calls, steps.len()), (19, 19));
    // steps 1 lists the single timestep 1: no step at all, the noise comes back unchanged.
    let key = "ddim/-/eps/scaled_linear/4x8x8/steps1/seed42/cfg7.5/ensd0";
    let (latent, _, calls) = run(&file, &parse_case(key));
    assert_eq!(calls, 0);
    let noise = loratool::preview::noise::TorchCpuGenerator::new(42).randn(&[4, 8, 8]);
    assert_eq!(latent, noise);
}

const TRAJECTORY: &str = "euler_a/normal/eps/scaled_linear/4x8x8/steps10/seed42/cfg7.5/ensd0";

#[test]
fn euler_a_draws_per_step_noise_after_the_initial_noise_in_step_order() {
    let file = fixture();
    let case = parse_case(TRAJECTORY);
    let (_, steps, _) = run(&file, &case);
    assert_eq!(steps.len(), 10);
    for (i, ours) in steps.iter().enumerate() {
        let reference = read(&file, &format!("trajectory/{TRAJECTORY}/{i}"));
        let error = latent_error(ours, &reference);
        eprintln!("Euler a step {i}: {error:e}");
        assert!(error <= LATENT_TOLERANCE, "step {i}: {error:e}");
    }

    // Any other source of per-step noise lands far from A1111: a generator re-seeded after the
    // initial noise (what a non-zero ENSD does) changes every step, each of which ends by adding
    // noise.
    let mut reseeded = parse_case(TRAJECTORY);
    reseeded.settings.eta_noise_seed_delta = 1;
    let (_, other, _) = run(&file, &reseeded);
    assert_eq!(other[0].len(), steps[0].len());
    let first = latent_error(
        &other[0],
        &read(&file, &format!("trajectory/{TRAJECTORY}/0")),
    );
    let last = latent_error(
        &other[9],
        &read(&file, &format!("trajectory/{TRAJECTORY}/9")),
    );
    eprintln!("re-seeded per-step noise: step 0 {first:e}, final {last:e}");
    assert!(first > 1e-2 && last > 1e-2, "{first:e} {last:e}");

    // With ENSD set, A1111 draws the per-step noise from seed + ENSD; only that matches.
    let ensd = "euler_a/normal/eps/scaled_linear/4x8x8/steps20/seed42/cfg7.5/ensd31337";
    let mut without = parse_case(ensd);
    let reference = read(&file, &format!("latent/{ensd}"));
    assert!(latent_error(&run(&file, &without).0, &reference) <= LATENT_TOLERANCE);
    without.settings.eta_noise_seed_delta = 0;
    assert!(latent_error(&run(&file, &without).0, &reference) > 1e-2);
}

#[test]
fn runs_are_bit_identical_across_runs_and_threads() {
    let file = fixture();
    let keys = [
        "euler_a/karras/eps/scaled_linear/4x64x64/steps20/seed1234/cfg7.5/ensd0",
        "dpmpp_2m/karras/eps/scaled_linear/4x64x64/steps20/seed1234/cfg7.5/ensd0",
        "ddim/-/eps/scaled_linear/4x64x64/steps20/seed1234/cfg7.5/ensd0",
    ];
    for key in keys {
        let case = parse_case(key);
        let first = run(&file, &case).0;
        let second = run(&file, &case).0;
        let threaded = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|_| scope.spawn(|| run(&file, &case).0))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&first), bits(&second), "{key}");
        for other in &threaded {
            assert_eq!(bits(&first), bits(other), "{key}");
        }
    }
}

#[test]
fn bad_requests_are_one_line_errors() {
    let schedule = NoiseSchedule::stable_diffusion();
    let mut model = StandInUnet {
        guided: true,
        calls: 0,
    };
    for sampler in [
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmPp2m,
        SamplerKind::Ddim,
    ] {
        for steps in [0, 5000] {
            let settings = SamplerSettings {
                sampler,
                schedule: ScheduleKind::Karras,
                steps,
                cfg_scale: 7.0,
                seed: 1,
                eta_noise_seed_delta: 0,
            };
            let err = sample(
                &settings,
                &schedule,
                Prediction::Epsilon,
                &[4, 8, 8],
                &mut model,
                &mut |_, _| {},
            )
            .unwrap_err()
            .to_string();
            assert!(!err.contains('\n') && err.contains("step"), "{err}");
        }
    }
    assert_eq!(model.calls, 0);

    struct WrongSize;
    impl NoisePredictor for WrongSize {
        fn predict(&mut self, _: &Latent, _: f32) -> loratool::Result<ModelOutput> {
            Ok(ModelOutput {
                cond: vec![0.0; 3],
                uncond: None,
            })
        }
    }
    let settings = SamplerSettings {
        sampler: SamplerKind::Euler,
        schedule: ScheduleKind::Normal,
        steps: 4,
        cfg_scale: 7.0,
        seed: 1,
        eta_noise_seed_delta: 0,
    };
    let err = sample(
        &settings,
        &schedule,
        Prediction::Epsilon,
        &[4, 8, 8],
        &mut WrongSize,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the model returned 3 values for a latent of 256"
    );
}
