//! The one download engine behind Civitai and Hugging Face: bytes go to `<name>.part` beside the
//! destination, resume with `Range` + `If-Range` after a dropped connection, and reach the final
//! name (never replacing a file) only once the complete part's sha256 (read back once when the
//! transfer ends) matches what the service lists. Nothing incomplete ever sits at the final name.

use super::filename::{content_disposition_name, sanitize};
use super::http::{is_transient, retry_after, Http, Reply};
use super::{error_detail, Problem};
use crate::ops::progress::ProgressSink;
use crate::tensors::hash::FileHashes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_DISPOSITION, CONTENT_RANGE, CONTENT_TYPE};
use reqwest::StatusCode;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where a file comes from: asked again for every attempt, so that a Civitai download gets a
/// fresh signed URL when the old one expired.
pub trait FileOrigin: Sync {
    /// The service URL of the file (its redirect leads to storage or a CDN).
    fn url(&self) -> &reqwest::Url;
    /// The service's token; it never follows the redirect to another origin.
    fn auth(&self) -> Option<&super::http::Auth>;
    /// Sends the request for the file with `headers` (a `Range` when resuming).
    fn request(&self, http: &Http, headers: &HeaderMap) -> Result<Reply, Problem> {
        http.send(
            reqwest::Method::GET,
            self.url().clone(),
            headers,
            self.auth(),
            None,
            true,
        )
    }
    /// The problem a final, non-transient error status means for this service.
    fn problem(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Problem;
}

/// The file to produce.
#[derive(Debug, Clone)]
pub struct Target {
    pub dir: PathBuf,
    /// The planned (sanitized) name; a `Content-Disposition` name replaces it.
    pub name: String,
    /// Lowercase hex; without one only the size is checked.
    pub sha256: Option<String>,
    pub size: Option<u64>,
    /// A size known only roughly (Civitai's `sizeKB`): for the disk-space check, never verified.
    pub approx_size: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Downloaded {
    pub path: PathBuf,
    pub sha256: String,
    /// Every hash the library index keeps, from the one read that verified the file: the
    /// index records them instead of reading a multi-gigabyte file again.
    pub hashes: FileHashes,
    pub size: u64,
    /// Bytes that were already in a `.part` from an earlier, interrupted run or attempt.
    pub resumed_from: u64,
    /// The file was already there with the expected hash: nothing was downloaded.
    pub already_present: bool,
}

/// Smallest plausible model file: error pages are smaller (shared/reference/fetch_apis.md §4.4).
const MIN_MODEL_BYTES: u64 = 1024;
/// Free space kept beyond the file itself.
const DISK_MARGIN: u64 = 16 << 20;

fn part_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.part"))
}

/// What a `.part` was downloading, so that a resume continues the same bytes.
fn part_state_path(part: &Path) -> PathBuf {
    let mut s = part.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct PartState {
    /// The validator for `If-Range`.
    etag: String,
    sha256: Option<String>,
    size: Option<u64>,
}

pub fn download(
    http: &Http,
    origin: &dyn FileOrigin,
    target: &Target,
    progress: &ProgressSink,
) -> Result<Downloaded, Problem> {
    let io = |what: &Path, e: std::io::Error| Problem::Io(format!("{}: {e}", what.display()));
    if let Some(done) = already_present(&target.dir.join(&target.name), target)? {
        return Ok(done);
    }
    let part = part_path(&target.dir, &target.name);
    let state_path = part_state_path(&part);
    let mut state: Option<PartState> = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|s: &PartState| s.sha256 == target.sha256 && s.size == target.size);
    let mut have = match (&state, std::fs::metadata(&part)) {
        (Some(_), Ok(m)) => m.len(),
        _ => 0,
    };
    if let Some(size) = target.size.or(target.approx_size) {
        check_space(&target.dir, size.saturating_sub(have))?;
    }
    let resumed_from = have;
    progress.start(target.size.unwrap_or(0));
    progress.advance(have);

    let mut attempt = 0u32;
    let mut mismatches = 0;
    let mut final_name = target.name.clone();
    loop {
        attempt += 1;
        let mut headers = HeaderMap::new();
        if let (Some(s), true) = (&state, have > 0) {
            if let (Ok(range), Ok(validator)) = (
                HeaderValue::from_str(&format!("bytes={have}-")),
                HeaderValue::from_str(&s.etag),
            ) {
                headers.insert(reqwest::header::RANGE, range);
                headers.insert(reqwest::header::IF_RANGE, validator);
            }
        }
        let retry_or = |problem: Problem, wait: Option<std::time::Duration>| {
            if attempt >= http.retry.attempts || wait.is_some_and(|w| w > http.retry.max_wait) {
                return Err(problem);
            }
            std::thread::sleep(http.retry.wait(attempt, wait));
            Ok(())
        };
        let reply = match origin.request(http, &headers) {
            Ok(r) => r,
            Err(p @ Problem::Network(_)) => {
                retry_or(p, None)?;
                continue;
            }
            Err(p) => return Err(p),
        };
        let mut response = reply.response;
        let status = response.status();
        let total = match status {
            StatusCode::OK => {
                have = 0;
                response.content_length().or(target.size)
            }
            StatusCode::PARTIAL_CONTENT => match content_range(response.headers()) {
                Some((start, Some(total))) if start == have => Some(total),
                _ => {
                    // A range that is not the one asked for: start over.
                    discard(&part, &state_path);
                    (have, state) = (0, None);
                    continue;
                }
            },
            StatusCode::RANGE_NOT_SATISFIABLE => {
                match content_range_total(response.headers()) {
                    Some(total) if total == have => {
                        // The `.part` already holds every byte: verify it.
                        let (name, resumed) = (final_name.clone(), resumed_from);
                        match finish(&part, &state_path, target, &name, None)? {
                            Finish::Done(d) => {
                                return Ok(Downloaded {
                                    resumed_from: resumed,
                                    ..d
                                })
                            }
                            Finish::Mismatch(p) => {
                                mismatches += 1;
                                if mismatches > 1 {
                                    return Err(p);
                                }
                                (have, state) = (0, None);
                                continue;
                            }
                        }
                    }
                    _ => {
                        discard(&part, &state_path);
                        (have, state) = (0, None);
                        continue;
                    }
                }
            }
            s if is_transient(s) => {
                let wait = retry_after(response.headers());
                let body = read_small(&mut response);
                let problem = match s.as_u16() {
                    429 => Problem::RateLimited {
                        retry_after_s: wait.map(|w| w.as_secs()),
                    },
                    _ => Problem::Status {
                        status: s.as_u16(),
                        detail: error_detail(&body),
                    },
                };
                retry_or(problem, wait)?;
                continue;
            }
            // Signed storage URLs expire: the next attempt asks the service for a fresh one.
            StatusCode::FORBIDDEN if reply.crossed_origin => {
                let body = read_small(&mut response);
                if attempt >= http.retry.attempts {
                    return Err(Problem::Forbidden {
                        detail: format!(
                            "the storage host refused the signed URL: {}",
                            error_detail(&body)
                        ),
                    });
                }
                continue;
            }
            s => {
                let body = read_small(&mut response);
                return Err(origin.problem(s, response.headers(), &body));
            }
        };
        refuse_error_pages(response.headers())?;
        if let Some(name) = response
            .headers()
            .get(CONTENT_DISPOSITION)
            .and_then(|v| v.to_str().ok())
            .and_then(content_disposition_name)
        {
            final_name = sanitize(&name).map_err(|why| Problem::NotAModel {
                detail: format!("the server named the file {name:?}: {why}"),
            })?;
            if final_name != target.name {
                if let Some(done) = already_present(&target.dir.join(&final_name), target)? {
                    discard(&part, &state_path);
                    return Ok(done);
                }
            }
        }
        if let (Some(expected), Some(total)) = (target.size, total) {
            if expected != total {
                return Err(Problem::SizeMismatch {
                    expected,
                    got: total,
                });
            }
        }
        if have == 0 {
            if let Some(total) = total {
                check_space(&target.dir, total)?;
            }
        }
        // Keep what resuming needs before the first byte lands.
        let etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .or_else(|| response.headers().get(reqwest::header::LAST_MODIFIED))
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.starts_with("W/"))
            .map(str::to_string);
        state = etag.map(|etag| PartState {
            etag,
            sha256: target.sha256.clone(),
            size: target.size,
        });
        match &state {
            Some(s) => {
                let bytes = serde_json::to_vec(s).unwrap_or_default();
                std::fs::write(&state_path, bytes).map_err(|e| io(&state_path, e))?;
            }
            None => {
                let _ = std::fs::remove_file(&state_path);
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(have == 0)
            .open(&part)
            .map_err(|e| io(&part, e))?;
        if have > 0 {
            file.set_len(have).map_err(|e| io(&part, e))?;
        } else {
            progress.start(total.unwrap_or(0));
        }
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(have))
            .map_err(|e| io(&part, e))?;
        let check_header = have == 0 && final_name.to_ascii_lowercase().ends_with(".safetensors");
        let outcome = stream(
            &mut response,
            &mut file,
            have,
            total,
            check_header,
            progress,
        );
        file.sync_all().map_err(|e| io(&part, e))?;
        drop(file);
        have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        match outcome {
            Ok(()) => {}
            Err(Stream::Refused(p)) => {
                discard(&part, &state_path);
                return Err(p);
            }
            Err(Stream::Write(e)) => {
                // Disk full mid-file: keep the `.part` for a resume once there is room.
                return Err(match e.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => Problem::DiskFull {
                        needed: total.unwrap_or(have).saturating_sub(have),
                        available: free_space(&target.dir).unwrap_or(0),
                    },
                    _ => io(&part, e),
                });
            }
            Err(Stream::Dropped(why)) => {
                if state.is_none() {
                    have = 0;
                }
                retry_or(Problem::Network(why), None)?;
                continue;
            }
        }
        if let Some(total) = total {
            if have != total {
                retry_or(
                    Problem::SizeMismatch {
                        expected: total,
                        got: have,
                    },
                    None,
                )?;
                continue;
            }
        }
        match finish(&part, &state_path, target, &final_name, total)? {
            Finish::Done(d) => return Ok(Downloaded { resumed_from, ..d }),
            Finish::Mismatch(p) => {
                mismatches += 1;
                if mismatches > 1 {
                    return Err(p);
                }
                (have, state) = (0, None);
            }
        }
    }
}

enum Finish {
    Done(Downloaded),
    Mismatch(Problem),
}

/// Hashes the complete `.part`, and publishes it under `name` when the hash matches.
fn finish(
    part: &Path,
    state_path: &Path,
    target: &Target,
    name: &str,
    total: Option<u64>,
) -> Result<Finish, Problem> {
    let io = |what: &Path, e: std::io::Error| Problem::Io(format!("{}: {e}", what.display()));
    let size = std::fs::metadata(part).map_err(|e| io(part, e))?.len();
    if let Some(expected) = target.size.or(total) {
        if size != expected {
            discard(part, state_path);
            return Err(Problem::SizeMismatch {
                expected,
                got: size,
            });
        }
    }
    if size < MIN_MODEL_BYTES && target.sha256.is_none() {
        discard(part, state_path);
        return Err(Problem::NotAModel {
            detail: format!("only {size} bytes"),
        });
    }
    let hashes = hashes_of(part)?;
    let sha256 = hashes.sha256.clone();
    if let Some(expected) = &target.sha256 {
        if !expected.eq_ignore_ascii_case(&sha256) {
            discard(part, state_path);
            return Ok(Finish::Mismatch(Problem::HashMismatch {
                expected: expected.to_ascii_lowercase(),
                got: sha256,
            }));
        }
    }
    let path = target.dir.join(name);
    if let Err(e) = crate::library::organize::rename_noreplace(part, &path) {
        return Err(match e.kind() {
            std::io::ErrorKind::AlreadyExists => Problem::Request(format!(
                "{}: already exists with other content; nothing was overwritten (the download stays in {})",
                path.display(),
                part.display()
            )),
            _ => io(&path, e),
        });
    }
    if let Ok(dir) = File::open(&target.dir) {
        let _ = dir.sync_all();
    }
    let _ = std::fs::remove_file(state_path);
    Ok(Finish::Done(Downloaded {
        path,
        sha256,
        hashes,
        size,
        resumed_from: 0,
        already_present: false,
    }))
}

/// A file already at `path`: fine when it has the expected hash, an error otherwise (never
/// overwritten).
fn already_present(path: &Path, target: &Target) -> Result<Option<Downloaded>, Problem> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(None);
    };
    let hashes = match meta.is_file() {
        true => hashes_of(path).ok(),
        false => None,
    };
    match (&target.sha256, hashes) {
        (Some(expected), Some(got)) if expected.eq_ignore_ascii_case(&got.sha256) => {
            Ok(Some(Downloaded {
                path: path.to_path_buf(),
                sha256: got.sha256.clone(),
                hashes: got,
                size: meta.len(),
                resumed_from: 0,
                already_present: true,
            }))
        }
        _ => Err(Problem::Request(format!(
            "{}: already exists{}; nothing was overwritten",
            path.display(),
            match target.sha256 {
                Some(_) => " with other content",
                None => "",
            }
        ))),
    }
}

enum Stream {
    /// Not a model: the `.part` is removed.
    Refused(Problem),
    /// Writing failed (the `.part` is kept).
    Write(std::io::Error),
    /// The connection ended early; the bytes so far are kept for a resume.
    Dropped(String),
}

fn stream(
    response: &mut reqwest::blocking::Response,
    file: &mut File,
    offset: u64,
    total: Option<u64>,
    check_header: bool,
    progress: &ProgressSink,
) -> Result<(), Stream> {
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut written = offset;
    loop {
        let n = match response.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Err(Stream::Dropped(format!(
                    "connection lost after {written} bytes: {e}"
                )))
            }
        };
        if check_header && head.len() < 9 {
            head.extend_from_slice(&buf[..n.min(9 - head.len())]);
            if head.len() >= 9 {
                safetensors_start(&head, total).map_err(Stream::Refused)?;
            }
        }
        file.write_all(&buf[..n]).map_err(Stream::Write)?;
        written += n as u64;
        progress.advance(n as u64);
    }
    if check_header && head.len() < 9 {
        return Err(Stream::Refused(Problem::NotAModel {
            detail: format!("only {written} bytes"),
        }));
    }
    Ok(())
}

/// The first 9 bytes of a safetensors file: a header length that fits the file, then `{`.
fn safetensors_start(head: &[u8], total: Option<u64>) -> Result<(), Problem> {
    let n = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
    let fits = total.is_none_or(|t| n.saturating_add(8) <= t) && n < (100 << 20);
    if fits && head[8] == b'{' {
        return Ok(());
    }
    let text: String = String::from_utf8_lossy(head)
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    Err(Problem::NotAModel {
        detail: format!("not a safetensors file (it starts with {text:?})"),
    })
}

/// HTML and JSON bodies are error or login pages, whatever their status.
fn refuse_error_pages(headers: &HeaderMap) -> Result<(), Problem> {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if ct.starts_with("text/html")
        || ct.starts_with("application/json")
        || ct.starts_with("text/plain")
    {
        return Err(Problem::NotAModel {
            detail: format!(
                "an {} page ({ct}), probably a login or error page",
                if ct.contains("html") { "HTML" } else { "error" }
            ),
        });
    }
    Ok(())
}

fn read_small(response: &mut reqwest::blocking::Response) -> Vec<u8> {
    let mut body = Vec::new();
    let _ = response.by_ref().take(64 << 10).read_to_end(&mut body);
    body
}

/// `Content-Range: bytes START-END/TOTAL` → (START, TOTAL).
fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = headers.get(CONTENT_RANGE)?.to_str().ok()?.trim();
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// `Content-Range: bytes */TOTAL` (a 416) → TOTAL.
fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    v.rsplit('/').next()?.trim().parse().ok()
}

fn discard(part: &Path, state_path: &Path) {
    let _ = std::fs::remove_file(part);
    let _ = std::fs::remove_file(state_path);
}

/// The whole-file sha256 (what Civitai and the Hub list) and, in the same read, the hashes of
/// the tensor data the library index keeps, by the project's one hashing code.
fn hashes_of(path: &Path) -> Result<FileHashes, Problem> {
    let data_start = crate::tensors::SafetensorsFile::data_start_of(path)
        .ok()
        .flatten();
    crate::tensors::hash::hash_file(path, data_start).map_err(|e| Problem::Io(e.to_string()))
}

fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a zeroed out-struct.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (r == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

fn check_space(dir: &Path, needed: u64) -> Result<(), Problem> {
    match free_space(dir) {
        Some(available) if available < needed.saturating_add(DISK_MARGIN) => {
            Err(Problem::DiskFull { needed, available })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes 100-199/200"));
        assert_eq!(content_range(&h), Some((100, Some(200))));
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes */200"));
        assert_eq!(content_range_total(&h), Some(200));
    }

    #[test]
    fn too_little_space_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_space(dir.path(), 1024).is_ok());
        let e = check_space(dir.path(), u64::MAX / 4).unwrap_err();
        assert!(matches!(e, Problem::DiskFull { .. }));
        assert!(e.to_string().starts_with("not enough disk space: "), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn safetensors_starts_are_checked() {
        let mut ok = 96u64.to_le_bytes().to_vec();
        ok.push(b'{');
        assert!(safetensors_start(&ok, Some(112)).is_ok());
        assert!(safetensors_start(&ok, Some(50)).is_err());
        let html = b"<!DOCTYPE html>";
        let e = safetensors_start(&html[..9], None).unwrap_err().to_string();
        assert!(
            e.contains("not a safetensors file") && e.contains("<!DOCTYPE"),
            "{e}"
        );
    }
}
