//! The sampling loop of `loratool preview`: A1111's samplers and schedules on k-diffusion's sigmas,
//! independent of any model.
//!
//! The model is anything that implements [`NoisePredictor`]: given the (scaled) latent and a
//! timestep it returns the UNet's raw output, ε or v, for the prompt and optionally for the
//! negative prompt. Around it sits k-diffusion's `CompVisDenoiser`/`CompVisVDenoiser`
//! ([`CompVisDenoiser`]), which turns a noise level σ into the model's inputs and its output into
//! the denoised latent; the samplers step on that.
//!
//! Everything is elementwise f32 arithmetic in the order torch evaluates k-diffusion's and A1111's
//! expressions (each product and sum rounded on its own, scalars as 0-dim float32 tensors), so the
//! results stay within float32 rounding of the peers' (tests/sampling.rs measures how close). The
//! work per step is a few passes over a latent of ~16k values, negligible beside a UNet call, so it
//! runs on the calling thread: the same inputs give the same bits whatever the thread count.

use super::noise::TorchCpuGenerator;
use crate::error::{Error, Result};

/// A latent: row-major f32 values with their shape (for SD, `[4, height / 8, width / 8]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Latent {
    shape: Vec<usize>,
    values: Vec<f32>,
}

impl Latent {
    /// Fails if the value count is not the product of the shape, or the shape is empty of values.
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> Result<Self> {
        let count: usize = shape.iter().product();
        if count == 0 {
            return Err(Error::Invalid(format!(
                "a latent of shape {shape:?} holds no values"
            )));
        }
        if values.len() != count {
            return Err(Error::Invalid(format!(
                "a latent of shape {shape:?} needs {count} values, got {}",
                values.len()
            )));
        }
        Ok(Latent { shape, values })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    fn with_values(&self, values: Vec<f32>) -> Latent {
        debug_assert_eq!(values.len(), self.values.len());
        Latent {
            shape: self.shape.clone(),
            values,
        }
    }
}

/// What the checkpoint's UNet predicts: SD1, SDXL and SD2-base predict the noise ε; SD2-768
/// (and other v checkpoints) predict v.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prediction {
    #[default]
    Epsilon,
    V,
}

impl Prediction {
    /// As `--prediction` writes it: `eps` or `v`.
    pub fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "eps",
            Prediction::V => "v",
        }
    }

    /// The inverse of [`Prediction::name`].
    pub fn parse(name: &str) -> Option<Prediction> {
        [Prediction::Epsilon, Prediction::V]
            .into_iter()
            .find(|p| p.name() == name)
    }
}

/// The UNet's raw output for one call: for the prompt, and for the negative prompt when
/// classifier-free guidance is on (A1111 runs both as one batch `[cond, uncond]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelOutput {
    pub cond: Vec<f32>,
    pub uncond: Option<Vec<f32>>,
}

/// The model as the sampler sees it. `input` is what the UNet gets (k-diffusion samplers: x
/// scaled by `1/sqrt(σ² + 1)`; DDIM: x as is); `timestep` is k-diffusion's fractional `t(σ)`, or
/// DDIM's integer timestep. The output is ε or v according to the checkpoint's [`Prediction`].
pub trait NoisePredictor {
    fn predict(&mut self, input: &Latent, timestep: f32) -> Result<ModelOutput>;
}

/// Classifier-free guidance as A1111's `CFGDenoiser.combine_denoised` computes it:
/// `uncond + (cond − uncond) · scale`. A1111 combines the denoised latents of k-diffusion samplers
/// and the ε of DDIM; the samplers here do the same.
pub fn combine_cfg(cond: &[f32], uncond: &[f32], scale: f32) -> Vec<f32> {
    cond.iter()
        .zip(uncond)
        .map(|(&c, &u)| u + (c - u) * scale)
        .collect()
}

/// How the training betas were laid out (diffusers' names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(√start, √end, n)²`: SD1, SD2 and SDXL (LDM calls it "linear").
    ScaledLinear,
    /// `linspace(start, end, n)`.
    Linear,
}

/// How the sampling steps' noise levels are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScheduleKind {
    /// k-diffusion's `get_sigmas(n)`: n timesteps evenly spaced from the last training timestep
    /// to 0, turned into sigmas by log-linear interpolation. A1111's "Automatic" for Euler and
    /// Euler a, its "Uniform", and (equal to the last bit) its "Normal".
    #[default]
    Normal,
    /// `get_sigmas_karras(n, σ_min, σ_max, ρ = 7)` with the training schedule's extreme sigmas.
    Karras,
}

/// The training noise schedule: `alphas_cumprod` and k-diffusion's view of it as sigmas.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f32>,
    /// `sqrt((1 − ᾱ) / ᾱ)`, ascending.
    sigmas: Vec<f32>,
    log_sigmas: Vec<f32>,
}

impl NoiseSchedule {
    /// SD1/SD2/SDXL's schedule when a checkpoint carries no `alphas_cumprod` of its own:
    /// scaled-linear betas 0.00085–0.012 over 1000 timesteps.
    pub fn stable_diffusion() -> Self {
        Self::from_betas(BetaSchedule::ScaledLinear, 0.00085, 0.012, 1000)
            .expect("the built-in schedule is valid")
    }

    /// The schedule LDM's `register_schedule` builds: betas and their cumulative product in f64,
    /// kept as f32 (the buffer a checkpoint stores).
    pub fn from_betas(kind: BetaSchedule, start: f64, end: f64, timesteps: usize) -> Result<Self> {
        if timesteps < 2 {
            return Err(Error::Invalid(format!(
                "a noise schedule needs at least 2 training timesteps, got {timesteps}"
            )));
        }
        if !(start > 0.0 && end < 1.0 && start <= end) {
            return Err(Error::Invalid(format!(
                "betas must satisfy 0 < start <= end < 1, got {start}..{end}"
            )));
        }
        let betas: Vec<f64> = match kind {
            BetaSchedule::ScaledLinear => torch_linspace(start.sqrt(), end.sqrt(), timesteps)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::Linear => torch_linspace(start, end, timesteps),
        };
        let mut product = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|beta| {
                product *= 1.0 - beta;
                product as f32
            })
            .collect();
        Self::from_alphas_cumprod(alphas_cumprod)
    }

    /// A checkpoint's own `alphas_cumprod` buffer. Its values must lie in (0, 1) and fall
    /// strictly, which is what makes every σ map to one timestep.
    pub fn from_alphas_cumprod(alphas_cumprod: Vec<f32>) -> Result<Self> {
        if alphas_cumprod.len() < 2 {
            return Err(Error::Invalid(format!(
                "alphas_cumprod needs at least 2 values, got {}",
                alphas_cumprod.len()
            )));
        }
        if let Some((i, a)) = alphas_cumprod
            .iter()
            .enumerate()
            .find(|(_, &a)| !(a > 0.0 && a < 1.0))
        {
            return Err(Error::Invalid(format!(
                "alphas_cumprod[{i}] = {a} is outside (0, 1)"
            )));
        }
        if let Some(i) =
            (1..alphas_cumprod.len()).find(|&i| alphas_cumprod[i] >= alphas_cumprod[i - 1])
        {
            return Err(Error::Invalid(format!(
                "alphas_cumprod must fall strictly, but [{i}] = {} follows {}",
                alphas_cumprod[i],
                alphas_cumprod[i - 1]
            )));
        }
        // k-diffusion: ((1 - ac) / ac) ** 0.5 and its log, in float32.
        let sigmas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        let log_sigmas = sigmas.iter().map(|&s| ln(s)).collect();
        Ok(NoiseSchedule {
            alphas_cumprod,
            sigmas,
            log_sigmas,
        })
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The training sigmas, one per timestep, ascending.
    pub fn sigmas_train(&self) -> &[f32] {
        &self.sigmas
    }

    pub fn sigma_min(&self) -> f32 {
        self.sigmas[0]
    }

    pub fn sigma_max(&self) -> f32 {
        self.sigmas[self.sigmas.len() - 1]
    }

    /// k-diffusion's `DiscreteSchedule.sigma_to_t` (not quantized, A1111's default): the
    /// fractional timestep whose log σ interpolates linearly between its neighbours'. Outside
    /// the training range it clamps to 0 or the last timestep.
    pub fn sigma_to_t(&self, sigma: f32) -> f32 {
        let log_sigma = ln(sigma);
        let last_pair = self.log_sigmas.len() - 2;
        // The last training log σ at or below this one (0 when there is none).
        let low = self
            .log_sigmas
            .iter()
            .rposition(|&l| log_sigma - l >= 0.0)
            .unwrap_or(0)
            .min(last_pair);
        let (low_log, high_log) = (self.log_sigmas[low], self.log_sigmas[low + 1]);
        let w = ((low_log - log_sigma) / (low_log - high_log)).clamp(0.0, 1.0);
        (1.0 - w) * low as f32 + w * (low + 1) as f32
    }

    /// k-diffusion's `t_to_sigma`: log-linear interpolation between the training sigmas of the
    /// neighbouring timesteps. `t` is clamped into the training range.
    pub fn t_to_sigma(&self, t: f32) -> f32 {
        let last = (self.log_sigmas.len() - 1) as f32;
        let t = t.clamp(0.0, last);
        let (low, high) = (t.floor() as usize, t.ceil() as usize);
        let w = t - t.trunc();
        exp((1.0 - w) * self.log_sigmas[low] + w * self.log_sigmas[high])
    }

    /// The `steps + 1` noise levels a k-diffusion sampler walks, ending in 0.
    pub fn sigmas(&self, kind: ScheduleKind, steps: usize) -> Result<Vec<f32>> {
        self.check_steps(steps)?;
        let mut sigmas: Vec<f32> = match kind {
            ScheduleKind::Normal => {
                let t_max = (self.sigmas.len() - 1) as f32;
                torch_linspace(t_max, 0.0, steps)
                    .into_iter()
                    .map(|t| self.t_to_sigma(t))
                    .collect()
            }
            ScheduleKind::Karras => {
                // A1111 passes sigma_min/max as Python floats, k-diffusion raises them to 1/ρ in
                // double; the tensor arithmetic then runs in float32.
                let rho = 7.0f64;
                let min_inv_rho = (self.sigma_min() as f64).powf(1.0 / rho);
                let max_inv_rho = (self.sigma_max() as f64).powf(1.0 / rho);
                let span = (min_inv_rho - max_inv_rho) as f32;
                torch_linspace(0.0, 1.0, steps)
                    .into_iter()
                    .map(|ramp| pow(max_inv_rho as f32 + ramp * span, rho as f32))
                    .collect()
            }
        };
        sigmas.push(0.0);
        Ok(sigmas)
    }

    /// The timesteps A1111 (≥ 1.6) lists for DDIM, ascending:
    /// `clip(range(0, T, T // steps) + 1, 0, T − 1)` for T training timesteps. The sampler visits
    /// all but the first, from the top.
    pub fn ddim_timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        self.check_steps(steps)?;
        let train = self.alphas_cumprod.len();
        Ok((0..train)
            .step_by(train / steps)
            .map(|t| (t + 1).min(train - 1))
            .collect())
    }

    fn check_steps(&self, steps: usize) -> Result<()> {
        let train = self.alphas_cumprod.len();
        if steps == 0 {
            return Err(Error::Invalid("sampling needs at least 1 step".into()));
        }
        if steps > train {
            return Err(Error::Invalid(format!(
                "{steps} sampling steps is more than the model's {train} training timesteps"
            )));
        }
        Ok(())
    }
}

/// `torch.linspace(start, end, n)` as torch's x86 CPU kernel computes it: one step, the first half
/// counted up from `start`, the second half down from `end`, each value one fused multiply-add
/// (torch's AVX2/AVX512 builds contract `start + step * i`; its portable build does not, which
/// moves some values by one unit in the last place). In float32 for the sampler's timesteps and in
/// float64 for LDM's betas (`torch.linspace(..., dtype=torch.float64)`).
fn torch_linspace<T: LinspaceFloat>(start: T, end: T, n: usize) -> Vec<T> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / T::count(n - 1);
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step.fma(T::count(i), start)
            } else {
                (-step).fma(T::count(n - 1 - i), end)
            }
        })
        .collect()
}

/// What [`torch_linspace`] needs of a float type.
trait LinspaceFloat:
    Copy + std::ops::Sub<Output = Self> + std::ops::Div<Output = Self> + std::ops::Neg<Output = Self>
{
    fn count(n: usize) -> Self;
    /// `self * a + b`, rounded once.
    fn fma(self, a: Self, b: Self) -> Self;
}

impl LinspaceFloat for f32 {
    fn count(n: usize) -> f32 {
        n as f32
    }
    fn fma(self, a: f32, b: f32) -> f32 {
        self.mul_add(a, b)
    }
}

impl LinspaceFloat for f64 {
    fn count(n: usize) -> f64 {
        n as f64
    }
    fn fma(self, a: f64, b: f64) -> f64 {
        self.mul_add(a, b)
    }
}

// float32 transcendentals as the correctly rounded double result: torch's (SLEEF's vector code)
// are within one unit in the last place of that, and unlike the C library's float functions the
// result does not depend on the platform.
fn ln(x: f32) -> f32 {
    (x as f64).ln() as f32
}

fn exp(x: f32) -> f32 {
    (x as f64).exp() as f32
}

fn exp_m1(x: f32) -> f32 {
    (x as f64).exp_m1() as f32
}

fn pow(base: f32, exponent: f32) -> f32 {
    (base as f64).powf(exponent as f64) as f32
}

/// k-diffusion's `CompVisDenoiser` (ε models) and `CompVisVDenoiser` (v models) with A1111's
/// guidance: `denoise(x, σ)` calls the model on `x · c_in` at `t(σ)` and returns the denoised
/// latent, guided when the model answers for the negative prompt too.
#[derive(Clone, Copy, Debug)]
pub struct CompVisDenoiser<'a> {
    schedule: &'a NoiseSchedule,
    prediction: Prediction,
    cfg_scale: f32,
}

impl<'a> CompVisDenoiser<'a> {
    pub fn new(schedule: &'a NoiseSchedule, prediction: Prediction, cfg_scale: f32) -> Self {
        CompVisDenoiser {
            schedule,
            prediction,
            cfg_scale,
        }
    }

    pub fn denoise(
        &self,
        model: &mut dyn NoisePredictor,
        x: &Latent,
        sigma: f32,
    ) -> Result<Vec<f32>> {
        // sigma_data = 1: c_in = 1 / sqrt(σ² + 1).
        let root = (sigma * sigma + 1.0).sqrt();
        let c_in = 1.0 / root;
        let input = x.with_values(x.values.iter().map(|v| v * c_in).collect());
        let output = model.predict(&input, self.schedule.sigma_to_t(sigma))?;
        let to_denoised = |raw: &[f32]| -> Vec<f32> {
            match self.prediction {
                // x + eps * c_out with c_out = −σ.
                Prediction::Epsilon => x
                    .values
                    .iter()
                    .zip(raw)
                    .map(|(&xv, &eps)| xv + eps * -sigma)
                    .collect(),
                // v * c_out + x * c_skip, c_out = −σ / sqrt(σ² + 1), c_skip = 1 / (σ² + 1).
                Prediction::V => {
                    let c_skip = 1.0 / (sigma * sigma + 1.0);
                    let c_out = -sigma / root;
                    x.values
                        .iter()
                        .zip(raw)
                        .map(|(&xv, &v)| v * c_out + xv * c_skip)
                        .collect()
                }
            }
        };
        guided(output, x.values.len(), self.cfg_scale, to_denoised)
    }
}

/// Checks the model's output sizes, converts each output, and combines them with CFG.
fn guided(
    output: ModelOutput,
    len: usize,
    cfg_scale: f32,
    convert: impl Fn(&[f32]) -> Vec<f32>,
) -> Result<Vec<f32>> {
    let check = |values: &[f32]| {
        if values.len() == len {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "the model returned {} values for a latent of {len}",
                values.len()
            )))
        }
    };
    check(&output.cond)?;
    let cond = convert(&output.cond);
    match output.uncond {
        None => Ok(cond),
        Some(uncond) => {
            check(&uncond)?;
            Ok(combine_cfg(&cond, &convert(&uncond), cfg_scale))
        }
    }
}

/// A1111's `ImageRNG` for one image with "Random number generator source: CPU": the first draw is
/// the initial noise from `torch.Generator("cpu").manual_seed(seed)`; every later draw (an
/// ancestral sampler's per-step noise, in step order) continues that generator, or, when "Eta
/// noise seed delta" (ENSD) is not 0, a generator seeded anew with `seed + ENSD` after the first.
#[derive(Clone, Debug)]
pub struct ImageRng {
    generator: TorchCpuGenerator,
    shape: Vec<usize>,
    reseed_after_first: Option<u64>,
}

impl ImageRng {
    pub fn new(seed: u64, eta_noise_seed_delta: u64, shape: &[usize]) -> Self {
        ImageRng {
            generator: TorchCpuGenerator::new(seed),
            shape: shape.to_vec(),
            reseed_after_first: (eta_noise_seed_delta != 0)
                .then(|| seed.wrapping_add(eta_noise_seed_delta)),
        }
    }

    /// `randn(shape)` from the image's generator: the initial noise first, then per-step noise.
    pub fn draw(&mut self) -> Vec<f32> {
        let noise = self.generator.randn(&self.shape);
        if let Some(seed) = self.reseed_after_first.take() {
            self.generator = TorchCpuGenerator::new(seed);
        }
        noise
    }
}

/// Called after each step with its index (from 0) and the latent it produced.
pub type StepObserver<'o> = dyn FnMut(usize, &Latent) + 'o;

/// k-diffusion's `sample_euler` with `s_churn = 0` (A1111's default): deterministic Euler steps
/// on the probability-flow ODE. `x` starts as the initial noise times `sigmas[0]`.
pub fn sample_euler(
    denoiser: &CompVisDenoiser,
    model: &mut dyn NoisePredictor,
    mut x: Latent,
    sigmas: &[f32],
    on_step: &mut StepObserver,
) -> Result<Latent> {
    for (i, pair) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (pair[0], pair[1]);
        let denoised = denoiser.denoise(model, &x, sigma)?;
        let dt = sigma_next - sigma;
        for (xv, dv) in x.values.iter_mut().zip(&denoised) {
            let d = (*xv - dv) / sigma;
            *xv += d * dt;
        }
        on_step(i, &x);
    }
    Ok(x)
}

/// k-diffusion's `get_ancestral_step` with η = 1: the σ to step down to with Euler, and the noise
/// to add back, so that the step lands on `sigma_to`.
fn ancestral_step(sigma_from: f32, sigma_to: f32) -> (f32, f32) {
    let to_sq = sigma_to * sigma_to;
    let from_sq = sigma_from * sigma_from;
    let up_full = ((to_sq * (from_sq - to_sq)) / from_sq).sqrt();
    // Python's min(sigma_to, up) keeps sigma_to unless up is smaller.
    let sigma_up = if up_full < sigma_to {
        up_full
    } else {
        sigma_to
    };
    let sigma_down = (to_sq - sigma_up * sigma_up).sqrt();
    (sigma_down, sigma_up)
}

/// k-diffusion's `sample_euler_ancestral` (η = 1, s_noise = 1) as A1111 drives it: after each
/// step but the last, noise from the image's generator (`rng`, whose first draw was the initial
/// noise) is added back.
pub fn sample_euler_ancestral(
    denoiser: &CompVisDenoiser,
    model: &mut dyn NoisePredictor,
    mut x: Latent,
    sigmas: &[f32],
    rng: &mut ImageRng,
    on_step: &mut StepObserver,
) -> Result<Latent> {
    for (i, pair) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (pair[0], pair[1]);
        let denoised = denoiser.denoise(model, &x, sigma)?;
        let (sigma_down, sigma_up) = ancestral_step(sigma, sigma_next);
        let dt = sigma_down - sigma;
        for (xv, dv) in x.values.iter_mut().zip(&denoised) {
            let d = (*xv - dv) / sigma;
            *xv += d * dt;
        }
        if sigma_next > 0.0 {
            let noise = rng.draw();
            if noise.len() != x.values.len() {
                return Err(Error::Invalid(format!(
                    "the noise source draws {} values for a latent of {}",
                    noise.len(),
                    x.values.len()
                )));
            }
            for (xv, n) in x.values.iter_mut().zip(noise) {
                *xv += n * sigma_up;
            }
        }
        on_step(i, &x);
    }
    Ok(x)
}

/// k-diffusion's `sample_dpmpp_2m` (DPM-Solver++(2M)): second order from the previous step's
/// denoised latent, first order on the first step and on the step to σ = 0.
pub fn sample_dpmpp_2m(
    denoiser: &CompVisDenoiser,
    model: &mut dyn NoisePredictor,
    mut x: Latent,
    sigmas: &[f32],
    on_step: &mut StepObserver,
) -> Result<Latent> {
    // k-diffusion's t = −ln σ and back; σ = 0 gives t = ∞ and back 0.
    let t_of = |sigma: f32| -ln(sigma);
    let sigma_of = |t: f32| exp(-t);
    let mut previous: Option<Vec<f32>> = None;
    for (i, pair) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (pair[0], pair[1]);
        let denoised = denoiser.denoise(model, &x, sigma)?;
        let (t, t_next) = (t_of(sigma), t_of(sigma_next));
        let h = t_next - t;
        let ratio = sigma_of(t_next) / sigma_of(t);
        let decay = exp_m1(-h);
        match previous.as_deref() {
            Some(old) if sigma_next != 0.0 => {
                let h_last = t - t_of(sigmas[i - 1]);
                let r = h_last / h;
                let new_weight = 1.0 + 1.0 / (2.0 * r);
                let old_weight = 1.0 / (2.0 * r);
                for ((xv, dv), ov) in x.values.iter_mut().zip(&denoised).zip(old) {
                    let blended = new_weight * dv - old_weight * ov;
                    *xv = ratio * *xv - decay * blended;
                }
            }
            _ => {
                for (xv, dv) in x.values.iter_mut().zip(&denoised) {
                    *xv = ratio * *xv - decay * dv;
                }
            }
        }
        previous = Some(denoised);
        on_step(i, &x);
    }
    Ok(x)
}

/// DDIM with η = 0 as A1111 ≥ 1.6 runs it (`sd_samplers_timesteps_impl.ddim`): `x` is the
/// unscaled initial noise; the steps visit `timesteps` (from [`NoiseSchedule::ddim_timesteps`])
/// from the top down to the second, each moving to the next lower listed timestep's ᾱ, so the
/// run makes `timesteps.len() − 1` model calls and ends at the lowest listed timestep. The model
/// gets x unscaled and the integer timestep; a v model's output becomes ε with the checkpoint's
/// `sqrt(ᾱ)` and `sqrt(1 − ᾱ)`, and guidance combines the ε.
pub fn sample_ddim(
    schedule: &NoiseSchedule,
    prediction: Prediction,
    cfg_scale: f32,
    model: &mut dyn NoisePredictor,
    mut x: Latent,
    timesteps: &[usize],
    on_step: &mut StepObserver,
) -> Result<Latent> {
    let alphas = schedule.alphas_cumprod();
    if let Some(&t) = timesteps.iter().find(|&&t| t >= alphas.len()) {
        return Err(Error::Invalid(format!(
            "DDIM timestep {t} is beyond the model's {} training timesteps",
            alphas.len()
        )));
    }
    for (i, index) in (1..timesteps.len()).rev().enumerate() {
        let timestep = timesteps[index];
        let a_t = alphas[timestep];
        let a_prev = alphas[timesteps[index - 1]];
        let output = model.predict(&x, timestep as f32)?;
        let eps = guided(output, x.values.len(), cfg_scale, |raw| match prediction {
            Prediction::Epsilon => raw.to_vec(),
            // LDM's sqrt_alphas_cumprod buffers, computed in double and stored as float.
            Prediction::V => {
                let sqrt_a = (a_t as f64).sqrt() as f32;
                let sqrt_one_minus = (1.0 - a_t as f64).sqrt() as f32;
                raw.iter()
                    .zip(&x.values)
                    .map(|(&v, &xv)| sqrt_a * v + sqrt_one_minus * xv)
                    .collect()
            }
        })?;
        let sqrt_one_minus_at = (1.0 - a_t).sqrt();
        let sqrt_at = a_t.sqrt();
        let sqrt_prev = a_prev.sqrt();
        let direction = (1.0 - a_prev).sqrt();
        for (xv, e) in x.values.iter_mut().zip(&eps) {
            let pred_x0 = (*xv - sqrt_one_minus_at * e) / sqrt_at;
            *xv = sqrt_prev * pred_x0 + direction * e;
        }
        on_step(i, &x);
    }
    Ok(x)
}

/// The samplers A1111 offers that are implemented here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    /// "Euler"
    Euler,
    /// "Euler a"
    EulerAncestral,
    /// "DPM++ 2M"
    DpmPp2m,
    /// "DDIM" (A1111 ≥ 1.6); ignores the schedule kind, as A1111 does.
    Ddim,
}

/// One txt2img sampling run, as A1111's generation parameters describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerSettings {
    pub sampler: SamplerKind,
    pub schedule: ScheduleKind,
    pub steps: usize,
    /// Used when the model answers for the negative prompt too.
    pub cfg_scale: f32,
    pub seed: u64,
    /// A1111's "Eta noise seed delta" (0 unless set; NovelAI-style setups use 31337).
    pub eta_noise_seed_delta: u64,
}

/// A txt2img run from the seed to the final latent: the initial noise from the image's CPU
/// generator, scaled by the first σ (DDIM: unscaled), then the chosen sampler. `shape` is the
/// latent's, e.g. `[4, height / 8, width / 8]`.
pub fn sample(
    settings: &SamplerSettings,
    schedule: &NoiseSchedule,
    prediction: Prediction,
    shape: &[usize],
    model: &mut dyn NoisePredictor,
    on_step: &mut StepObserver,
) -> Result<Latent> {
    let mut rng = ImageRng::new(settings.seed, settings.eta_noise_seed_delta, shape);
    if settings.sampler == SamplerKind::Ddim {
        let timesteps = schedule.ddim_timesteps(settings.steps)?;
        let noise = Latent::new(shape.to_vec(), rng.draw())?;
        return sample_ddim(
            schedule,
            prediction,
            settings.cfg_scale,
            model,
            noise,
            &timesteps,
            on_step,
        );
    }
    let sigmas = schedule.sigmas(settings.schedule, settings.steps)?;
    let first = sigmas[0];
    let noise = rng.draw().into_iter().map(|n| n * first).collect();
    let x = Latent::new(shape.to_vec(), noise)?;
    let denoiser = CompVisDenoiser::new(schedule, prediction, settings.cfg_scale);
    match settings.sampler {
        SamplerKind::Euler => sample_euler(&denoiser, model, x, &sigmas, on_step),
        SamplerKind::EulerAncestral => {
            sample_euler_ancestral(&denoiser, model, x, &sigmas, &mut rng, on_step)
        }
        SamplerKind::DpmPp2m => sample_dpmpp_2m(&denoiser, model, x, &sigmas, on_step),
        SamplerKind::Ddim => unreachable!("DDIM returned above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_step_counts_are_errors() {
        let schedule = NoiseSchedule::stable_diffusion();
        for kind in [ScheduleKind::Normal, ScheduleKind::Karras] {
            let zero = schedule.sigmas(kind, 0).unwrap_err().to_string();
            assert_eq!(zero, "sampling needs at least 1 step");
            let many = schedule.sigmas(kind, 1001).unwrap_err().to_string();
            assert!(many.contains("1001 sampling steps"), "{many}");
        }
        assert!(schedule.ddim_timesteps(0).is_err());
        assert!(schedule.ddim_timesteps(1001).is_err());
        assert_eq!(schedule.ddim_timesteps(1000).unwrap().len(), 1000);
    }

    #[test]
    fn bad_schedules_are_errors() {
        assert!(NoiseSchedule::from_alphas_cumprod(vec![0.9]).is_err());
        assert!(NoiseSchedule::from_alphas_cumprod(vec![0.9, 0.9]).is_err());
        assert!(NoiseSchedule::from_alphas_cumprod(vec![1.0, 0.5]).is_err());
        assert!(NoiseSchedule::from_alphas_cumprod(vec![0.9, f32::NAN]).is_err());
        assert!(NoiseSchedule::from_betas(BetaSchedule::Linear, 0.02, 0.01, 1000).is_err());
        assert!(NoiseSchedule::from_betas(BetaSchedule::Linear, 0.0001, 0.02, 1).is_err());
    }

    #[test]
    fn ddim_timesteps_follow_a1111() {
        let schedule = NoiseSchedule::stable_diffusion();
        let ts = schedule.ddim_timesteps(20).unwrap();
        assert_eq!(ts.len(), 20);
        assert_eq!((ts[0], ts[1], ts[19]), (1, 51, 951));
        // 1000 // 3 = 333: 0, 333, 666, 999, each + 1, the last clipped to 999.
        assert_eq!(schedule.ddim_timesteps(3).unwrap(), [1, 334, 667, 999]);
        // 1000 // 30 = 33 lists 31 timesteps: 30 steps from 991 down.
        let ts = schedule.ddim_timesteps(30).unwrap();
        assert_eq!((ts.len(), ts[30]), (31, 991));
    }

    #[test]
    fn sigma_to_t_inverts_t_to_sigma() {
        let schedule = NoiseSchedule::stable_diffusion();
        for t in [0.0f32, 0.5, 1.0, 123.25, 500.0, 998.75, 999.0] {
            let back = schedule.sigma_to_t(schedule.t_to_sigma(t));
            assert!((back - t).abs() < 2e-3, "{t} -> {back}");
        }
        assert_eq!(schedule.sigma_to_t(schedule.sigma_min() / 2.0), 0.0);
        assert_eq!(schedule.sigma_to_t(schedule.sigma_max() * 2.0), 999.0);
    }

    #[test]
    fn sigma_lists_end_in_zero_and_fall() {
        let schedule = NoiseSchedule::stable_diffusion();
        for kind in [ScheduleKind::Normal, ScheduleKind::Karras] {
            let sigmas = schedule.sigmas(kind, 20).unwrap();
            assert_eq!(sigmas.len(), 21);
            assert_eq!(sigmas[20], 0.0);
            assert!(
                sigmas.windows(2).all(|p| p[0] > p[1]),
                "{kind:?} {sigmas:?}"
            );
        }
    }

    #[test]
    fn cfg_is_uncond_plus_scaled_difference() {
        assert_eq!(combine_cfg(&[1.0, 3.0], &[0.5, 1.0], 2.0), [1.5, 5.0]);
    }

    #[test]
    fn ensd_reseeds_after_the_initial_noise() {
        let mut plain = ImageRng::new(5, 0, &[4, 4, 4]);
        let mut delta = ImageRng::new(5, 31337, &[4, 4, 4]);
        assert_eq!(plain.draw(), delta.draw());
        assert_eq!(
            delta.draw(),
            TorchCpuGenerator::new(5 + 31337).randn(&[4, 4, 4])
        );
        assert_ne!(
            plain.draw(),
            TorchCpuGenerator::new(5 + 31337).randn(&[4, 4, 4])
        );
    }

    #[test]
    fn latent_shape_must_match_its_values() {
        assert!(Latent::new(vec![4, 2, 2], vec![0.0; 15]).is_err());
        assert!(Latent::new(vec![4, 0, 2], vec![]).is_err());
        assert!(Latent::new(vec![4, 2, 2], vec![0.0; 16]).is_ok());
    }
}
