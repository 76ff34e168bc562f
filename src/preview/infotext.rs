//! A1111's generation parameters ("infotext"): the text of a PNG's `parameters` chunk, written as
//! `modules/processing.py::create_infotext` writes it and read back as
//! `modules/infotext_utils.py::parse_generation_parameters` reads it (A1111 v1.10).
//!
//! Layout: the prompt (with its `<lora:…>` tags; it may span lines), a `Negative prompt: …` line
//! when there is a negative prompt, then one line of `Key: value` pairs joined with `", "`. Keys
//! whose value is None are left out; a value holding `,`, `:` or a newline is written as a JSON
//! string. A1111's reader fills defaults for some missing keys (`Clip skip` 1, `Schedule type`
//! `Automatic`, `RNG` `GPU`), so leaving a key out is not the same as not knowing it.

use crate::tensors::hash::FileHashes;
use std::borrow::Cow;

/// What loratool records of one render, in the fields A1111 writes.
///
/// A round trip through [`GenerationParameters::to_infotext`] and
/// [`GenerationParameters::from_infotext`] gives the same value back, with A1111's own limits:
/// each prompt line loses its leading and trailing whitespace, `:` and `,` are dropped from hash
/// names, and an `extra` key that names a field above, or whose value equals its key, does not
/// come back as it was.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParameters {
    /// The prompt as the user wrote it, `<lora:…>` tags included.
    pub prompt: String,
    /// Empty when there is none (the line is then left out).
    pub negative_prompt: String,
    pub steps: u32,
    /// A1111's display name of the sampler (`Euler a`, `DPM++ 2M`, …): see [`SamplerName`].
    pub sampler: String,
    /// `Schedule type` (A1111 ≥ 1.9): see [`schedule_type`]. `None` leaves it out, which A1111
    /// reads as `Automatic`.
    pub schedule_type: Option<String>,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// First 10 hex of the checkpoint's sha256, lower case: [`model_short_hash`].
    pub model_hash: Option<String>,
    /// The checkpoint's file stem.
    pub model: Option<String>,
    /// First 10 hex of the external VAE's sha256, lower case: [`model_short_hash`].
    pub vae_hash: Option<String>,
    /// The external VAE's file stem.
    pub vae: Option<String>,
    /// Written only above 1; A1111 reads a missing `Clip skip` as 1.
    pub clip_skip: u32,
    /// `RNG` (`CPU`, `NV`); A1111 reads a missing one as `GPU`, whose noise differs from CPU's.
    pub rng: Option<String>,
    /// `Lora hashes`: the name the prompt used and [`lora_short_hash`], in prompt order.
    pub lora_hashes: Vec<NamedHash>,
    /// `TI hashes`: embedding names and [`embedding_short_hash`], in the order A1111 lists them.
    pub ti_hashes: Vec<NamedHash>,
    /// Further keys, in order, written after the hashes (where A1111 writes its
    /// `extra_generation_params`).
    pub extra: Vec<(String, String)>,
    /// `Version`: [`loratool_version`] for our renders.
    pub version: Option<String>,
}

/// A1111's txt2img defaults: 20 steps of Euler a at CFG 7, 512×512, seed 0, nothing optional.
impl Default for GenerationParameters {
    fn default() -> Self {
        GenerationParameters {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            sampler: SamplerName::EulerAncestral.a1111_name().to_string(),
            schedule_type: None,
            cfg_scale: 7.0,
            seed: 0,
            width: 512,
            height: 512,
            model_hash: None,
            model: None,
            vae_hash: None,
            vae: None,
            clip_skip: 1,
            rng: None,
            lora_hashes: Vec::new(),
            ti_hashes: Vec::new(),
            extra: Vec::new(),
            version: None,
        }
    }
}

/// One `name: hash` entry of `Lora hashes` or `TI hashes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedHash {
    pub name: String,
    pub hash: String,
}

impl NamedHash {
    pub fn new(name: impl Into<String>, hash: impl Into<String>) -> Self {
        NamedHash {
            name: name.into(),
            hash: hash.into(),
        }
    }
}

/// The samplers `loratool preview` runs, by the names A1111 writes for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerName {
    EulerAncestral,
    Euler,
    DpmPp2M,
    Ddim,
}

impl SamplerName {
    pub fn a1111_name(self) -> &'static str {
        match self {
            SamplerName::EulerAncestral => "Euler a",
            SamplerName::Euler => "Euler",
            SamplerName::DpmPp2M => "DPM++ 2M",
            SamplerName::Ddim => "DDIM",
        }
    }

    pub fn from_a1111_name(name: &str) -> Option<Self> {
        [
            SamplerName::EulerAncestral,
            SamplerName::Euler,
            SamplerName::DpmPp2M,
            SamplerName::Ddim,
        ]
        .into_iter()
        .find(|s| s.a1111_name() == name)
    }
}

/// The sigma schedules `loratool preview` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleName {
    /// k-diffusion's `get_sigmas`: t evenly spaced from 999 to 0 (A1111's `Uniform`).
    Normal,
    Karras,
}

/// The `Schedule type` A1111 ≥ 1.9 writes for the same choice, so that pasting the infotext into
/// A1111 reproduces the schedule. A1111's default is `Automatic`, which means the sampler's own
/// default: uniform sigmas for Euler, Euler a and DDIM (DDIM ignores the schedule anyway), but
/// Karras for DPM++ 2M, whose uniform schedule must be named (`Uniform`, the same sigmas as
/// k-diffusion's `get_sigmas`; A1111's `Normal` is ComfyUI's variant).
pub fn schedule_type(sampler: SamplerName, schedule: ScheduleName) -> &'static str {
    match (sampler, schedule) {
        (_, ScheduleName::Karras) => "Karras",
        (SamplerName::DpmPp2M, ScheduleName::Normal) => "Uniform",
        (_, ScheduleName::Normal) => "Automatic",
    }
}

/// `Version` for infotexts loratool writes. Not a bare `X.Y.Z`: A1111 parses a version it can
/// read as its own, and one below 1.6 turns on backward-compatibility options when the infotext
/// is pasted (`infotext_versions.backcompat`); with the prefix it reads none.
pub fn loratool_version() -> String {
    format!("loratool {}", env!("CARGO_PKG_VERSION"))
}

/// `Model hash` and `VAE hash`: A1111's short hash of a checkpoint or VAE file, the first 10 hex
/// of its sha256 in lower case (Civitai's AutoV2 is the same in upper case).
pub fn model_short_hash(hashes: &FileHashes) -> String {
    hashes.autov2.to_ascii_lowercase()
}

/// A LoRA's hash in `Lora hashes`, as A1111's Lora extension takes it (`network.py`): the first 12
/// characters of the file's `sshs_model_hash` metadata when it has one (kohya writes it), else of
/// the addnet hash (sha256 after the safetensors header: Civitai's AutoV3, lower case), and for a
/// file that is not safetensors, of the whole file's sha256.
pub fn lora_short_hash(hashes: &FileHashes, sshs_model_hash: Option<&str>) -> String {
    match sshs_model_hash.filter(|h| !h.is_empty()) {
        Some(h) => h.chars().take(12).collect(),
        None => match &hashes.autov3 {
            Some(autov3) => autov3.to_ascii_lowercase(),
            None => hashes.sha256[..12].to_string(),
        },
    }
}

/// An embedding's hash in `TI hashes`: the first 12 hex of the whole file's sha256
/// (`textual_inversion.py` hashes embeddings without the addnet rule).
pub fn embedding_short_hash(hashes: &FileHashes) -> String {
    hashes.sha256[..12].to_string()
}

impl GenerationParameters {
    /// The infotext, as A1111's `create_infotext` writes it (keys in its order).
    pub fn to_infotext(&self) -> String {
        let mut params = InfotextParams::default();
        params.set("Steps", Some(self.steps.to_string()));
        params.set("Sampler", Some(self.sampler.clone()));
        params.set("Schedule type", self.schedule_type.clone());
        params.set("CFG scale", Some(format_float(self.cfg_scale)));
        params.set("Seed", Some(self.seed.to_string()));
        params.set("Size", Some(format!("{}x{}", self.width, self.height)));
        params.set("Model hash", self.model_hash.clone());
        params.set("Model", self.model.clone());
        params.set("VAE hash", self.vae_hash.clone());
        params.set("VAE", self.vae.clone());
        params.set(
            "Clip skip",
            (self.clip_skip > 1).then(|| self.clip_skip.to_string()),
        );
        params.set("RNG", self.rng.clone());
        // A1111's extra_generation_params: the LoRA hashes are set when the networks load, the
        // TI hashes after the prompts are encoded.
        params.set("Lora hashes", lora_hashes_value(&self.lora_hashes));
        params.set("TI hashes", ti_hashes_value(&self.ti_hashes));
        for (key, value) in &self.extra {
            params.set(key, Some(value.clone()));
        }
        params.set("Version", self.version.clone());
        format_infotext(&self.prompt, &self.negative_prompt, &params.entries)
    }

    /// Reads an infotext as A1111 does ([`parse_generation_parameters`]), then the fields above;
    /// keys without a field go to `extra`, in order.
    pub fn from_infotext(text: &str) -> Result<Self, InfotextError> {
        let parsed = parse_generation_parameters(text);
        let required = |key: &'static str| parsed.get(key).ok_or(InfotextError::Missing(key));
        let whole_u64 = |key: &'static str, value: &str| {
            value
                .parse::<u64>()
                .map_err(|_| bad(key, value, "a whole number"))
        };
        let whole_u32 = |key: &'static str, value: &str| {
            value
                .parse::<u32>()
                .map_err(|_| bad(key, value, "a whole number"))
        };
        let steps = whole_u32("Steps", required("Steps")?)?;
        let cfg = required("CFG scale")?;
        let cfg_scale = cfg
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| bad("CFG scale", cfg, "a number"))?;
        let seed = whole_u64("Seed", required("Seed")?)?;
        let size = required("Size")?;
        let (width, height) = parse_size(size).ok_or_else(|| bad("Size", size, "WxH"))?;
        let clip_skip = match parsed.get("Clip skip") {
            Some(v) => whole_u32("Clip skip", v)?,
            None => 1,
        };
        let lora_hashes = match parsed.get("Lora hashes") {
            Some(v) => parse_named_hashes("Lora hashes", v)?,
            None => Vec::new(),
        };
        let ti_hashes = match parsed.get("TI hashes") {
            Some(v) => parse_named_hashes("TI hashes", v)?,
            None => Vec::new(),
        };
        let owned = |key: &str| parsed.get(key).map(str::to_string);
        let extra = parsed
            .params
            .iter()
            .filter(|(k, _)| !FIELD_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();
        Ok(GenerationParameters {
            steps,
            sampler: required("Sampler")?.to_string(),
            schedule_type: owned("Schedule type"),
            cfg_scale,
            seed,
            width,
            height,
            model_hash: owned("Model hash"),
            model: owned("Model"),
            vae_hash: owned("VAE hash"),
            vae: owned("VAE"),
            clip_skip,
            rng: owned("RNG"),
            lora_hashes,
            ti_hashes,
            extra,
            version: owned("Version"),
            prompt: parsed.prompt,
            negative_prompt: parsed.negative_prompt,
        })
    }
}

/// The keys [`GenerationParameters`] has fields for.
const FIELD_KEYS: [&str; 15] = [
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "VAE hash",
    "VAE",
    "Clip skip",
    "RNG",
    "Lora hashes",
    "TI hashes",
    "Version",
];

/// What [`GenerationParameters::from_infotext`] cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfotextError {
    #[error("the infotext has no '{0}'")]
    Missing(&'static str),
    #[error("the infotext's '{key}' is '{value}', not {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
}

impl From<InfotextError> for crate::Error {
    fn from(e: InfotextError) -> Self {
        crate::Error::Invalid(e.to_string())
    }
}

fn bad(key: &'static str, value: &str, expected: &'static str) -> InfotextError {
    InfotextError::BadValue {
        key,
        value: value.to_string(),
        expected,
    }
}

/// A1111's `^(\d+)x(\d+)$` for sizes (ASCII digits: the only ones a size is written with).
fn parse_size(value: &str) -> Option<(u32, u32)> {
    let (w, h) = value.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(w) || !digits(h) {
        return None;
    }
    Some((w.parse().ok()?, h.parse().ok()?))
}

/// `name: hash, name: hash`, split as A1111's Lora extension splits it when an infotext is
/// pasted: on `,`, then on the first `:`, each part stripped.
fn parse_named_hashes(key: &'static str, value: &str) -> Result<Vec<NamedHash>, InfotextError> {
    value
        .split(',')
        .map(|entry| {
            let (name, hash) = python_strip(entry)
                .split_once(':')
                .ok_or_else(|| bad(key, value, "a list of 'name: hash'"))?;
            Ok(NamedHash::new(python_strip(name), python_strip(hash)))
        })
        .collect()
}

/// `Lora hashes`: A1111 keys them by name (one entry per name, the last hash, the first place),
/// with `:` and `,` taken out of the name; none without a name or a hash.
fn lora_hashes_value(hashes: &[NamedHash]) -> Option<String> {
    let mut entries: Vec<(String, &str)> = Vec::new();
    for h in hashes
        .iter()
        .filter(|h| !h.name.is_empty() && !h.hash.is_empty())
    {
        let name = hash_entry_name(&h.name);
        match entries.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = &h.hash,
            None => entries.push((name, &h.hash)),
        }
    }
    join_hash_entries(entries)
}

/// `TI hashes`: A1111 lists each encoded prompt's embeddings, names without `:` and `,`, none
/// without a hash.
fn ti_hashes_value(hashes: &[NamedHash]) -> Option<String> {
    let entries = hashes
        .iter()
        .filter(|h| !h.hash.is_empty())
        .map(|h| (hash_entry_name(&h.name), h.hash.as_str()))
        .collect();
    join_hash_entries(entries)
}

fn hash_entry_name(name: &str) -> String {
    name.chars().filter(|c| !matches!(c, ':' | ',')).collect()
}

fn join_hash_entries(entries: Vec<(String, &str)>) -> Option<String> {
    if entries.is_empty() {
        return None;
    }
    let joined: Vec<String> = entries
        .into_iter()
        .map(|(name, hash)| format!("{name}: {hash}"))
        .collect();
    Some(joined.join(", "))
}

/// A float as A1111's UI writes it: gradio hands whole slider values over as ints (`CFG scale:
/// 7`), others as Python floats (`7.5`, shortest round-trip digits, as Rust prints them).
fn format_float(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value}")
    }
}

/// Ordered keys with Python dict semantics: setting a key again replaces its value in place, and
/// a key set to None keeps its place (it is dropped when written).
#[derive(Default)]
struct InfotextParams {
    entries: Vec<(String, Option<String>)>,
}

impl InfotextParams {
    fn set(&mut self, key: &str, value: Option<String>) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((key.to_string(), value)),
        }
    }
}

/// `create_infotext`'s text from a prompt, a negative prompt and the ordered parameters: None
/// values left out, a value equal to its key written alone (as A1111 does), values quoted with
/// [`quote`], the whole text stripped of surrounding whitespace.
pub fn format_infotext(
    prompt: &str,
    negative_prompt: &str,
    params: &[(String, Option<String>)],
) -> String {
    let pairs: Vec<String> = params
        .iter()
        .filter_map(|(key, value)| {
            let value = value.as_deref()?;
            Some(if key == value {
                key.clone()
            } else {
                format!("{key}: {}", quote(value))
            })
        })
        .collect();
    let negative = if negative_prompt.is_empty() {
        String::new()
    } else {
        format!("\nNegative prompt: {negative_prompt}")
    };
    let text = format!("{prompt}{negative}\n{}", pairs.join(", "));
    python_strip(&text).to_string()
}

/// `infotext_utils.quote`: a value holding `,`, `:` or a newline becomes a JSON string
/// (`json.dumps(…, ensure_ascii=False)`), anything else is written as it is.
pub fn quote(value: &str) -> Cow<'_, str> {
    if !value.contains([',', '\n', ':']) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    Cow::Owned(out)
}

/// `infotext_utils.unquote`: a value in double quotes is read as a JSON string; one that is not
/// valid JSON stays as it was. (A lone surrogate escape, which Python keeps, cannot be a Rust
/// string and keeps the text as it was too.)
pub fn unquote(value: &str) -> Cow<'_, str> {
    if value.len() < 2 || !value.starts_with('"') || !value.ends_with('"') {
        return Cow::Borrowed(value);
    }
    match serde_json::from_str::<String>(value) {
        Ok(s) => Cow::Owned(s),
        Err(_) => Cow::Borrowed(value),
    }
}

/// An infotext split as A1111's `parse_generation_parameters` splits it, before it adds defaults
/// for missing keys and splits `WxH` values into `Key-1`/`Key-2`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedInfotext {
    pub prompt: String,
    pub negative_prompt: String,
    /// The `Key: value` pairs of the last line, values unquoted, in order; a key given twice
    /// keeps its first place and its last value (a Python dict).
    pub params: Vec<(String, String)>,
}

impl ParsedInfotext {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A1111's `parse_generation_parameters`: the text is stripped and split into lines; the last
/// line holds the parameters when A1111's parameter pattern matches it at least 3 times, else it
/// belongs to the prompt. Lines before it are stripped; from a line starting `Negative prompt:`
/// on they form the negative prompt, before it the prompt (lines joined with `\n`). A parameter
/// with an empty value is dropped (A1111 fails on it and goes on).
pub fn parse_generation_parameters(text: &str) -> ParsedInfotext {
    let stripped = python_strip(text);
    let mut lines: Vec<&str> = stripped.split('\n').collect();
    let last_line = lines.pop().unwrap_or("");
    let mut matches = find_params(last_line);
    if matches.len() < 3 {
        lines.push(last_line);
        matches.clear();
    }

    let mut prompt = String::new();
    let mut negative_prompt = String::new();
    let mut in_negative = false;
    for line in lines {
        let mut line = python_strip(line);
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = python_strip(rest);
        }
        let target = if in_negative {
            &mut negative_prompt
        } else {
            &mut prompt
        };
        // A1111 joins with "\n" only once the text is non-empty, so empty leading lines vanish.
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }

    let mut params: Vec<(String, String)> = Vec::new();
    for (key, value) in matches {
        if value.is_empty() {
            continue;
        }
        let value = unquote(&value).into_owned();
        match params.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => params.push((key, value)),
        }
    }
    ParsedInfotext {
        prompt,
        negative_prompt,
        params,
    }
}

/// Every match of A1111's parameter pattern
/// `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)` in `line`, as Python's `re.findall`
/// finds them: tried at each position from the left, the search going on after each match.
///
/// The pattern backtracks in one place only: a quoted value must be followed by `,` or the end,
/// else the value is everything up to the next `,`. The key is a word character and at least one
/// more of word characters, spaces, `-` and `/`, directly followed by `:`.
fn find_params(line: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = line.chars().collect();
    let mut found = Vec::new();
    let mut at = 0;
    while at <= chars.len() {
        match match_param(&chars, at) {
            Some((key, value, end)) => {
                found.push((key, value));
                at = end.max(at + 1);
            }
            None => at += 1,
        }
    }
    found
}

fn match_param(c: &[char], start: usize) -> Option<(String, String, usize)> {
    let n = c.len();
    let mut i = start;
    while i < n && is_python_space(c[i]) {
        i += 1;
    }
    if i >= n || !is_word(c[i]) {
        return None;
    }
    let mut j = i + 1;
    while j < n && (is_word(c[j]) || matches!(c[j], ' ' | '-' | '/')) {
        j += 1;
    }
    // `[\w \-/]+` needs one character; none of those is `:`, so a shorter key cannot help.
    if j == i + 1 || j >= n || c[j] != ':' {
        return None;
    }
    let key: String = c[i..j].iter().collect();
    let mut v = j + 1;
    while v < n && is_python_space(c[v]) {
        v += 1;
    }
    if let Some(close) = quoted_value_end(c, v) {
        match c.get(close + 1) {
            None => return Some((key, c[v..=close].iter().collect(), close + 1)),
            Some(',') => return Some((key, c[v..=close].iter().collect(), close + 2)),
            Some(_) => {}
        }
    }
    let mut e = v;
    while e < n && c[e] != ',' {
        e += 1;
    }
    let value = c[v..e].iter().collect();
    Some((key, value, if e < n { e + 1 } else { e }))
}

/// `"(?:\\.|[^\\"])+"` at `start`: the index of the closing quote. A backslash always takes the
/// next character with it, so the first unescaped quote is the only place the match can end.
fn quoted_value_end(c: &[char], start: usize) -> Option<usize> {
    if c.get(start) != Some(&'"') {
        return None;
    }
    let mut q = start + 1;
    let mut units = 0;
    loop {
        match c.get(q)? {
            '\\' => {
                // `.` matches anything but a newline.
                if matches!(c.get(q + 1), None | Some('\n')) {
                    return None;
                }
                q += 2;
            }
            '"' => return (units > 0).then_some(q),
            _ => q += 1,
        }
        units += 1;
    }
}

/// Python's `\w` for text: letters, digits and numerals, and `_` (Rust's alphanumeric classes
/// also take a few combining marks that Python's do not; infotext keys are ASCII).
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Python's `str.isspace` and `\s`: Unicode whitespace plus the ASCII separators 0x1C–0x1F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
fn python_strip(s: &str) -> &str {
    s.trim_matches(is_python_space)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, String)> {
        find_params(text)
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn the_parameter_pattern_matches_as_python_finds_it() {
        assert_eq!(
            pairs("Steps: 20, Sampler: Euler a, Size: 512x512"),
            [
                pair("Steps", "20"),
                pair("Sampler", "Euler a"),
                pair("Size", "512x512")
            ]
        );
        // A quoted value may hold commas and escaped quotes.
        assert_eq!(
            pairs(r#"Lora hashes: "a: 1, b: 2", Xy: "say \"hi\"""#),
            [
                pair("Lora hashes", "\"a: 1, b: 2\""),
                pair("Xy", r#""say \"hi\"""#)
            ]
        );
        // A quoted value followed by more text falls back to "up to the next comma".
        assert_eq!(
            pairs(r#"Kk: "a" b, Ll: c"#),
            [pair("Kk", "\"a\" b"), pair("Ll", "c")]
        );
        // Single-character keys never match; the search goes on inside the text.
        assert_eq!(pairs("a: 1, bb: 2"), [pair("bb", "2")]);
        assert_eq!(pairs("-x-yy: 3"), [pair("x-yy", "3")]);
        assert_eq!(
            pairs("Kk: 1, L: 2, Mm: 3"),
            [pair("Kk", "1"), pair("Mm", "3")]
        );
        // `""` is not a quoted value (one character at least), so it is read up to the comma.
        assert_eq!(
            pairs(r#"Kk: "", Ll: 1"#),
            [pair("Kk", "\"\""), pair("Ll", "1")]
        );
        assert_eq!(pairs("Kk: , Ll: 2"), [pair("Kk", ""), pair("Ll", "2")]);
        assert_eq!(pairs("no parameters here"), Vec::<(String, String)>::new());
    }

    #[test]
    fn quoting_is_json_for_values_with_separators() {
        assert_eq!(quote("Euler a"), "Euler a");
        assert_eq!(quote("a: b"), "\"a: b\"");
        assert_eq!(
            quote("x,\"y\"\\\n\t\u{1}é"),
            "\"x,\\\"y\\\"\\\\\\n\\t\\u0001é\""
        );
        assert_eq!(unquote("\"a: b\""), "a: b");
        assert_eq!(unquote("\"a\" b\""), "\"a\" b\"");
        assert_eq!(unquote("\""), "\"");
    }

    #[test]
    fn schedule_type_names_what_a1111_would_run() {
        assert_eq!(
            schedule_type(SamplerName::EulerAncestral, ScheduleName::Normal),
            "Automatic"
        );
        assert_eq!(
            schedule_type(SamplerName::DpmPp2M, ScheduleName::Normal),
            "Uniform"
        );
        assert_eq!(
            schedule_type(SamplerName::DpmPp2M, ScheduleName::Karras),
            "Karras"
        );
        for s in [
            SamplerName::EulerAncestral,
            SamplerName::Euler,
            SamplerName::DpmPp2M,
            SamplerName::Ddim,
        ] {
            assert_eq!(SamplerName::from_a1111_name(s.a1111_name()), Some(s));
        }
    }

    #[test]
    fn floats_are_written_as_the_ui_writes_them() {
        assert_eq!(format_float(7.0), "7");
        assert_eq!(format_float(7.5), "7.5");
        assert_eq!(format_float(0.1), "0.1");
    }

    #[test]
    fn hashes_come_from_the_file_hashes() {
        let h = crate::tensors::hash::hash_bytes(b"hello world", None);
        assert_eq!(model_short_hash(&h), "b94d27b993");
        assert_eq!(lora_short_hash(&h, None), "b94d27b9934d");
        assert_eq!(embedding_short_hash(&h), "b94d27b9934d");
        assert_eq!(
            lora_short_hash(&h, Some("0123456789abcdef")),
            "0123456789ab"
        );
        let st = crate::tensors::hash::hash_bytes(b"12345678{}abc", Some(10));
        assert_eq!(
            lora_short_hash(&st, None),
            st.addnet.as_deref().unwrap()[..12]
        );
    }
}
