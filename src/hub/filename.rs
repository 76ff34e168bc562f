//! File names that come from a server (Content-Disposition, Civitai's `files[].name`, a Hugging Face
//! path) are untrusted: they become one plain name inside the destination folder or are refused
//! (shared/reference/fetch_apis.md §4.5).

use unicode_normalization::UnicodeNormalization;

/// The extensions a fetched model may have; anything else is refused rather than renamed.
pub const MODEL_EXTENSIONS: &[&str] = &["safetensors", "ckpt", "pt", "pth", "bin", "gguf", "zip"];

/// Longest name in bytes (ext4, btrfs, xfs all stop at 255); room is kept for `.part`.
const MAX_NAME_BYTES: usize = 240;

const WINDOWS_RESERVED: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// The file name of `Content-Disposition`: RFC 6266 `filename*=UTF-8''…` (percent-encoded) wins
/// over `filename="…"`.
pub fn content_disposition_name(header: &str) -> Option<String> {
    let mut plain = None;
    let mut extended = None;
    for part in split_params(header) {
        let Some((key, value)) = part.split_once('=') else {
            continue;
        };
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim();
        if key == "filename*" {
            // charset'language'percent-encoded
            let mut pieces = value.splitn(3, '\'');
            let charset = pieces.next().unwrap_or_default();
            let _language = pieces.next();
            if let Some(encoded) = pieces.next() {
                let bytes = percent_decode(encoded);
                extended = match charset.to_ascii_lowercase().as_str() {
                    "utf-8" => String::from_utf8(bytes).ok(),
                    // ISO-8859-1: each byte is its code point.
                    _ => Some(bytes.iter().map(|b| *b as char).collect()),
                };
            }
        } else if key == "filename" {
            plain = Some(unquote(value));
        }
    }
    extended.or(plain).filter(|n| !n.is_empty())
}

/// Splits header parameters on `;` outside quotes.
fn split_params(header: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in header.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                parts.push(&header[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&header[start..]);
    parts
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.extend(chars.next()),
                    c => out.push(c),
                }
            }
            out
        }
        None => v.to_string(),
    }
}

/// `%XX` decoding; malformed escapes are kept as they are.
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Makes a server-given name safe to create inside a folder: only its last path segment, NFC,
/// no control characters or `<>:"/\|?*`, no trailing dots or spaces, not `.`/`..`/hidden, not a
/// Windows device name, at most 240 bytes with its extension kept, and a model extension.
/// `Err` says why the name cannot be used.
pub fn sanitize(name: &str) -> Result<String, String> {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let nfc: String = last.nfc().collect();
    let mut clean: String = nfc
        .chars()
        .map(|c| match c {
            '<' | '>' | ':' | '"' | '|' | '?' | '*' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    // Leading dots would hide the file (and `..` is a parent); trailing dots and spaces are
    // dropped by Windows, which would change the name on a shared drive.
    clean = clean
        .trim_start_matches(['.', ' '])
        .trim_end_matches(['.', ' '])
        .to_string();
    if clean.is_empty() {
        return Err(format!("file name {name:?} has no usable name in it"));
    }
    let (stem, ext) = match clean.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), e.to_string()),
        _ => (clean.clone(), String::new()),
    };
    if !MODEL_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "file name {name:?} does not end in a model extension ({})",
            MODEL_EXTENSIONS.join(", ")
        ));
    }
    let base = stem.split('.').next().unwrap_or_default();
    let stem = match WINDOWS_RESERVED
        .iter()
        .any(|r| r.eq_ignore_ascii_case(base.trim()))
    {
        true => format!("_{stem}"),
        false => stem,
    };
    let mut stem_bytes = MAX_NAME_BYTES.saturating_sub(ext.len() + 1);
    while stem_bytes > 0 && !stem.is_char_boundary(stem_bytes.min(stem.len())) {
        stem_bytes -= 1;
    }
    let stem = stem[..stem_bytes.min(stem.len())].trim_end_matches(['.', ' ']);
    Ok(format!("{stem}.{ext}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_name_wins_and_quotes_unescape() {
        let h = r#"attachment; filename="plain \"q\".safetensors"; filename*=UTF-8''caf%C3%A9%20x.safetensors"#;
        assert_eq!(
            content_disposition_name(h).as_deref(),
            Some("café x.safetensors")
        );
        let h = r#"attachment; filename="a;b.safetensors""#;
        assert_eq!(
            content_disposition_name(h).as_deref(),
            Some("a;b.safetensors")
        );
        assert_eq!(content_disposition_name("attachment"), None);
    }

    #[test]
    fn hostile_names_become_plain_names_or_are_refused() {
        assert_eq!(
            sanitize("../../evil.safetensors").unwrap(),
            "evil.safetensors"
        );
        assert_eq!(
            sanitize("..\\..\\win.safetensors").unwrap(),
            "win.safetensors"
        );
        assert_eq!(sanitize("CON.safetensors").unwrap(), "_CON.safetensors");
        assert_eq!(sanitize("a\u{7}b?.ckpt").unwrap(), "a_b_.ckpt");
        assert_eq!(sanitize(".hidden.pt").unwrap(), "hidden.pt");
        assert_eq!(
            sanitize("cafe\u{301}.safetensors").unwrap(),
            "caf\u{e9}.safetensors"
        );
        assert!(sanitize("..").is_err());
        assert!(sanitize("page.html")
            .unwrap_err()
            .contains("model extension"));
        assert!(sanitize("noext").is_err());
        let long = format!("{}.safetensors", "é".repeat(300));
        let s = sanitize(&long).unwrap();
        assert!(s.len() <= 240 && s.ends_with(".safetensors"), "{s}");
    }
}
