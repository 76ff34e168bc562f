//! Downloads from Civitai and the Hugging Face Hub, and identifying local files on Civitai.
//!
//! - [`source`]: what a `fetch` argument names.
//! - [`http`]: the one reqwest client: hand-followed redirects (tokens stay on their host), retries.
//! - [`download`]: the one download engine: `.part` files, resume, verification, atomic publish.
//! - [`civitai`] / [`huggingface`]: the two services' APIs, on top of `http` and `download`.
//! - [`sidecars`]: what `fetch` and `identify` write beside a model (`.civitai.info`, the preview,
//!   A1111's `<stem>.json`).
//! - [`filename`]: server-given names made safe.

pub mod civitai;
pub mod download;
pub mod fetch;
pub mod filename;
pub mod http;
pub mod huggingface;
pub mod identify;
pub mod sidecars;
pub mod source;

use std::fmt;

/// Why a download or lookup failed; each kind has its own message (issue 13 §6), and none of them
/// contains a token or a signed URL.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// 401 without a token (or with a rejected one).
    NeedsToken {
        service: &'static str,
        detail: String,
        had_token: bool,
    },
    /// 403: early access, no access, blocked.
    Forbidden { detail: String },
    /// 404.
    NotFound { what: String },
    /// 410: Civitai archives models; their files cannot be downloaded any more.
    Archived,
    /// 429 after the retries (or with a `Retry-After` too long to wait for).
    RateLimited { retry_after_s: Option<u64> },
    /// Any other status after the retries.
    Status { status: u16, detail: String },
    /// The bytes do not have the sha256 the service lists.
    HashMismatch { expected: String, got: String },
    /// Too little free space for the file.
    DiskFull { needed: u64, available: u64 },
    /// An HTML or JSON page, or bytes that are not the model file, where a model was expected.
    NotAModel { detail: String },
    /// The server sent fewer or more bytes than it announced.
    SizeMismatch { expected: u64, got: u64 },
    /// Connection, TLS or timeout failures after the retries.
    Network(String),
    /// Local file-system errors.
    Io(String),
    /// Anything the user asked for that the service cannot give (no such file in a version, a
    /// repo with several LoRAs, an unusable file name).
    Request(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NeedsToken {
                service,
                detail,
                had_token: false,
            } => {
                let how = match *service {
                    "Civitai" => "set CIVITAI_API_TOKEN or pass --token (Civitai → Account settings → API keys)",
                    _ => "set HF_TOKEN, run `huggingface-cli login`, or pass --token, and accept the repo's terms on its page",
                };
                write!(f, "{service} needs a login for this download ({detail}): {how}")
            }
            Problem::NeedsToken {
                service, detail, ..
            } => write!(
                f,
                "{service} refused the token ({detail}): check that it is valid and has access"
            ),
            Problem::Forbidden { detail } => write!(f, "access denied: {detail}"),
            Problem::NotFound { what } => write!(f, "not found: {what}"),
            Problem::Archived => write!(
                f,
                "the model is archived on Civitai and can no longer be downloaded (410)"
            ),
            Problem::RateLimited {
                retry_after_s: Some(s),
            } => write!(
                f,
                "rate limited (429): the server asks to wait {s} s before trying again"
            ),
            Problem::RateLimited { retry_after_s: None } => write!(
                f,
                "rate limited (429) after several retries: try again later"
            ),
            Problem::Status { status, detail } => write!(f, "server error {status}: {detail}"),
            Problem::HashMismatch { expected, got } => write!(
                f,
                "hash mismatch: the service lists sha256 {expected} but the downloaded bytes hash to {got}; nothing was kept"
            ),
            Problem::DiskFull { needed, available } => write!(
                f,
                "not enough disk space: {} needed, {} free",
                human_bytes(*needed),
                human_bytes(*available)
            ),
            Problem::NotAModel { detail } => {
                write!(f, "the server sent something that is not a model file: {detail}")
            }
            Problem::SizeMismatch { expected, got } => write!(
                f,
                "the server sent {got} bytes where {expected} were announced"
            ),
            Problem::Network(m) => write!(f, "network error: {m}"),
            Problem::Io(m) => write!(f, "{m}"),
            Problem::Request(m) => write!(f, "{m}"),
        }
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", UNITS[u]),
    }
}

/// The first message of a JSON error body (`{"error": …, "message": …}`), else the text itself,
/// one line, bounded.
pub fn error_detail(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let detail = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(m)) => {
            let field = |k: &str| m.get(k).and_then(|v| v.as_str()).map(str::to_string);
            match (field("error"), field("message")) {
                (Some(e), Some(msg)) if e != msg => format!("{e}: {msg}"),
                (Some(e), _) => e,
                (None, Some(msg)) => msg,
                _ => text.to_string(),
            }
        }
        _ => text.to_string(),
    };
    let line: String = detail.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}
