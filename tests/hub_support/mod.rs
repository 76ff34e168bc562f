//! A local stand-in for civitai.com and huggingface.co, for the `fetch` tests (`mod hub_support;`).
//!
//! Two listeners on 127.0.0.1: the **api** server plays civitai.com (`/api/v1/…`,
//! `/api/download/models/…`) and huggingface.co (`/{owner}/{name}/resolve/…`, `/api/models/…`);
//! the **storage** server is the other origin the api redirects to (Civitai's signed S3/R2 URLs
//! under `/storage/…`, the Hugging Face CDN under `/hf-cdn/…`, preview images under `/images/…`).
//! The shapes, status codes and headers follow shared/reference/fetch_apis.md (§1.3–1.7, §3.1–3.2).
//!
//! HTTP/1.1 is written by hand over `std::net` so a test can break it at the byte level (a
//! connection shut mid-body, a flipped byte): one thread accepts per listener, one thread serves
//! each connection, and every response carries `Connection: close`.
#![allow(dead_code)]

use loratool::tensors::hash::hash_bytes;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The 112-byte safetensors test vector of fetch_apis.md §2.6.
pub const VECTOR_112_HEX: &str = "60000000000000007b225f5f6d657461646174615f5f223a7b2273735f6e6574776f726b5f64696d223a2234227d2c2277223a7b226474797065223a22463332222c227368617065223a5b325d2c22646174615f6f666673657473223a5b302c385d7d7d202020200000803f00000040";
/// Its SHA256, AutoV2 and AutoV3 as Civitai lists them.
pub const VECTOR_112_SHA256: &str =
    "2FD6C9020F4DD3695E0677389619E2456C30219129C1C6A533CBB3F43FD95E05";
pub const VECTOR_112_AUTOV2: &str = "2FD6C9020F";
pub const VECTOR_112_AUTOV3: &str = "B9C80B5ADECA";

/// The bytes of the §2.6 vector.
pub fn vector_112() -> Vec<u8> {
    hex_decode(VECTOR_112_HEX)
}

pub fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Git's blob id of `bytes` (sha1 of `blob {len}\0` + bytes, 40 lowercase hex): the `ETag` of a
/// non-LFS file on `resolve` and the `oid` of tree entries.
pub fn git_blob_oid(bytes: &[u8]) -> String {
    let mut data = format!("blob {}\0", bytes.len()).into_bytes();
    data.extend_from_slice(bytes);
    hex_lower(&sha1(&data))
}

/// The Git LFS pointer file that stands in the repository for an LFS file.
pub fn lfs_pointer(bytes: &[u8]) -> String {
    pointer_text(&hash_bytes(bytes, None).sha256, bytes.len())
}

fn pointer_text(sha256: &str, size: usize) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
}

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Server {
    Api,
    Storage,
}

#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub server: Server,
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    /// Names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl SeenRequest {
    /// The first header of that name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// Where an injected fault applies. Each route has its own FIFO queue; a request on the route
/// consumes the first fault in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// api server, `/api/v1/…`.
    CivitaiApi,
    /// api server, `/api/download/…`.
    CivitaiDownload,
    /// storage server, `/storage/…` (Civitai's signed URLs) and `/hf-cdn/…` (the HF CDN).
    Storage,
    /// api server, `/{owner}/{name}/resolve/…`.
    HfResolve,
    /// api server, `/api/models/…`.
    HfApi,
    /// storage server, `/images/…` (preview images; kept apart so a fault meant for a model
    /// download is not consumed by a preview).
    Images,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this instead (e.g. 429 with `Retry-After: 1`, 500, 503). A `Content-Type` is added
    /// when `headers` has none (JSON when the body starts with `{` or `[`, else text).
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// The normal response's headers (full `Content-Length` / `Content-Range`), then this many
    /// body bytes, then the socket is shut down.
    DropMidBody { after_bytes: usize },
    /// 403 with S3's "Request has expired" XML.
    ExpiredSignature,
    /// 200 `text/html`: a ~2 KB login page.
    HtmlPage,
    /// The normal response with the last body byte flipped (same length, same headers).
    WrongBytes,
}

#[derive(Clone, Debug)]
pub struct CivitaiModel {
    pub id: u64,
    pub name: String,
    /// `LORA`, `LoCon`, `Checkpoint`, …
    pub model_type: String,
    pub creator: Option<String>,
    pub tags: Vec<String>,
    pub archived: bool,
    /// Newest first.
    pub versions: Vec<CivitaiVersion>,
}

impl Default for CivitaiModel {
    fn default() -> Self {
        CivitaiModel {
            id: 100001,
            name: "Watercolor Style".into(),
            model_type: "LORA".into(),
            creator: Some("alice".into()),
            tags: vec![],
            archived: false,
            versions: vec![],
        }
    }
}

#[derive(Clone, Debug)]
pub struct CivitaiVersion {
    pub id: u64,
    pub name: String,
    /// `SDXL 1.0`, `SD 1.5`, `Pony`, `Illustrious`, `Flux.1 D`, …
    pub base_model: String,
    pub trained_words: Vec<String>,
    /// ISO 8601, e.g. `2026-05-01T10:00:00.000Z`.
    pub published_at: String,
    pub require_auth: bool,
    pub early_access_deadline: Option<String>,
    /// The primary file is the first with `primary: true`, or the first file when none is.
    pub files: Vec<CivitaiFile>,
    pub images: Vec<CivitaiImage>,
}

impl Default for CivitaiVersion {
    fn default() -> Self {
        CivitaiVersion {
            id: 200002,
            name: "v1.0".into(),
            base_model: "SDXL 1.0".into(),
            trained_words: vec![],
            published_at: "2026-05-01T10:00:00.000Z".into(),
            require_auth: false,
            early_access_deadline: None,
            files: vec![],
            images: vec![],
        }
    }
}

#[derive(Clone, Debug)]
pub struct CivitaiFile {
    pub id: u64,
    /// The download filename (untrusted: may be `../../evil.safetensors`).
    pub name: String,
    pub bytes: Vec<u8>,
    /// `Model`, `Pruned Model`, `VAE`, `Training Data`, …
    pub file_type: String,
    /// `SafeTensor`, `PickleTensor`, …
    pub format: String,
    /// `full` or `pruned`.
    pub size: Option<String>,
    /// `fp16`, `bf16`, `fp32`, …
    pub fp: Option<String>,
    pub primary: bool,
    /// Listed instead of the real SHA256 (64 hex; to test a mismatch). The by-hash lookups match
    /// the listed value.
    pub listed_sha256: Option<String>,
}

impl Default for CivitaiFile {
    fn default() -> Self {
        CivitaiFile {
            id: 300003,
            name: "model.safetensors".into(),
            bytes: vec![],
            file_type: "Model".into(),
            format: "SafeTensor".into(),
            size: None,
            fp: None,
            primary: false,
            listed_sha256: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CivitaiImage {
    /// e.g. `1.png`; served at `{storage_base}/images/{version id}/{file_name}`.
    pub file_name: String,
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

impl Default for CivitaiImage {
    fn default() -> Self {
        CivitaiImage {
            file_name: "1.png".into(),
            bytes: vec![],
            width: 1024,
            height: 1024,
        }
    }
}

#[derive(Clone, Debug)]
pub struct HfRepo {
    /// `owner/name`.
    pub id: String,
    /// 40 hex commit; `main` and this resolve to the files.
    pub sha: String,
    pub gated: bool,
    pub private: bool,
    pub files: Vec<HfFile>,
}

impl Default for HfRepo {
    fn default() -> Self {
        HfRepo {
            id: "owner/name".into(),
            sha: "0123456789abcdef0123456789abcdef01234567".into(),
            gated: false,
            private: false,
            files: vec![],
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct HfFile {
    /// May contain `/`.
    pub path: String,
    pub bytes: Vec<u8>,
    pub lfs: bool,
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

pub struct FakeHub {
    shared: Arc<Shared>,
    accept_threads: Vec<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    api_addr: SocketAddr,
    storage_addr: SocketAddr,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    civitai: Vec<StoredModel>,
    civitai_token: Option<String>,
    hf: Vec<HfRepo>,
    /// sha256 (lowercase) of each HF file, by (repo id, path): computed once, on registration.
    hf_sha256: HashMap<(String, String), String>,
    hf_token: Option<String>,
    requests: Vec<SeenRequest>,
    faults: HashMap<Route, VecDeque<Fault>>,
    /// Makes each signed URL unique.
    signatures: u64,
}

struct StoredModel {
    model: CivitaiModel,
    /// `[version][file]`.
    hashes: Vec<Vec<Hashes>>,
}

#[derive(Clone)]
struct Hashes {
    /// Uppercase, as listed (`listed_sha256` when set).
    sha256: String,
    autov2: String,
    autov3: Option<String>,
    /// The storage ETag: S3-like, 32 hex of the real content's sha256.
    etag: String,
}

const LAST_MODIFIED: &str = "Fri, 01 May 2026 10:00:00 GMT";
const PUBLIC_CACHE: &str = "public, s-maxage=300, stale-while-revalidate=150";

impl FakeHub {
    pub fn start() -> FakeHub {
        let api = TcpListener::bind("127.0.0.1:0").expect("bind api");
        let storage = TcpListener::bind("127.0.0.1:0").expect("bind storage");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            api_addr: api.local_addr().unwrap(),
            storage_addr: storage.local_addr().unwrap(),
            state: Mutex::new(State::default()),
        });
        let accept_threads = [(api, Server::Api), (storage, Server::Storage)]
            .into_iter()
            .map(|(listener, server)| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || accept_loop(shared, listener, server))
            })
            .collect();
        FakeHub {
            shared,
            accept_threads,
        }
    }

    /// `http://127.0.0.1:P`: civitai.com and huggingface.co.
    pub fn api_base(&self) -> String {
        format!("http://{}", self.shared.api_addr)
    }

    /// `http://127.0.0.1:Q`: the storage host and HF CDN (another origin).
    pub fn storage_base(&self) -> String {
        format!("http://{}", self.shared.storage_addr)
    }

    pub fn add_civitai_model(&self, model: CivitaiModel) {
        let hashes = model
            .versions
            .iter()
            .map(|v| v.files.iter().map(file_hashes).collect())
            .collect();
        self.state().civitai.push(StoredModel { model, hashes });
    }

    /// The one API key Civitai accepts (`Authorization: Bearer` or `?token=`); `None`: none is.
    pub fn set_civitai_token(&self, token: Option<&str>) {
        self.state().civitai_token = token.map(str::to_string);
    }

    pub fn add_hf_repo(&self, repo: HfRepo) {
        let mut st = self.state();
        for f in &repo.files {
            st.hf_sha256.insert(
                (repo.id.clone(), f.path.clone()),
                hash_bytes(&f.bytes, None).sha256,
            );
        }
        st.hf.push(repo);
    }

    /// The one token the Hub accepts (`Authorization: Bearer`); `None`: none is.
    pub fn set_hf_token(&self, token: Option<&str>) {
        self.state().hf_token = token.map(str::to_string);
    }

    /// Queues `fault` for the next request on `route`.
    pub fn inject(&self, route: Route, fault: Fault) {
        self.state()
            .faults
            .entry(route)
            .or_default()
            .push_back(fault);
    }

    /// Faults still queued on `route`.
    pub fn pending_faults(&self, route: Route) -> usize {
        self.state().faults.get(&route).map_or(0, VecDeque::len)
    }

    /// Every request received so far, on both servers, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for addr in [self.shared.api_addr, self.shared.storage_addr] {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        for t in self.accept_threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn file_hashes(f: &CivitaiFile) -> Hashes {
    let h = hash_bytes(&f.bytes, safetensors_data_start(&f.bytes));
    let sha256 = f
        .listed_sha256
        .as_deref()
        .unwrap_or(&h.sha256)
        .to_ascii_uppercase();
    Hashes {
        autov2: sha256[..10.min(sha256.len())].to_string(),
        sha256,
        autov3: h.autov3,
        etag: format!("\"{}\"", &h.sha256[..32]),
    }
}

/// `8 + N` when `bytes` is a safetensors file: a u64 LE header length N that fits, and a header
/// that is a JSON object.
fn safetensors_data_start(bytes: &[u8]) -> Option<u64> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    let header = bytes.get(8..end)?;
    match serde_json::from_slice::<Value>(header) {
        Ok(Value::Object(_)) => Some(end as u64),
        _ => None,
    }
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener, server: Server) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || serve_connection(&shared, server, stream));
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 plumbing
// ---------------------------------------------------------------------------------------------

struct Request {
    method: String,
    target: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?;
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn new(status: u16) -> Response {
        Response {
            status,
            headers: vec![],
            body: vec![],
        }
    }

    fn json(status: u16, value: &Value) -> Response {
        Response::new(status)
            .header("Content-Type", "application/json; charset=utf-8")
            .body(serde_json::to_vec(value).unwrap())
    }

    fn error(status: u16, message: &str) -> Response {
        Response::json(status, &json!({ "error": message }))
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Response {
        self.body = body.into();
        self
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
    }
}

fn read_line(reader: &mut impl BufRead) -> Option<String> {
    let mut line = Vec::new();
    let n = reader.take(64 * 1024).read_until(b'\n', &mut line).ok()?;
    if n == 0 || !line.ends_with(b"\n") {
        return None;
    }
    Some(String::from_utf8_lossy(&line).trim_end().to_string())
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let request_line = read_line(&mut reader)?;
    let mut parts = request_line.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let line = read_line(&mut reader)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        if headers.len() > 200 {
            return None;
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if find("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        (&*stream)
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .ok()?;
    }
    let mut body = Vec::new();
    if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let size_line = read_line(&mut reader)?;
            let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(&mut reader)?.is_empty() {}
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).ok()?;
            read_line(&mut reader)?;
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().ok()?;
        body.resize(len, 0);
        reader.read_exact(&mut body).ok()?;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_query(q)),
        None => (target.clone(), vec![]),
    };
    Some(Request {
        method,
        target,
        path,
        query,
        headers,
        body,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Writes `resp`; `head`: headers only. `cut`: send only that many body bytes (the headers
/// still announce the whole body), then shut the socket down.
fn write_response(stream: &mut TcpStream, resp: &Response, head: bool, cut: Option<usize>) {
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !resp.has_header("content-length") {
        out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    if !head {
        let n = cut.unwrap_or(resp.body.len()).min(resp.body.len());
        bytes.extend_from_slice(&resp.body[..n]);
    }
    let _ = stream.write_all(&bytes);
    let _ = stream.flush();
    let _ = stream.shutdown(if cut.is_some() {
        Shutdown::Both
    } else {
        Shutdown::Write
    });
}

fn serve_connection(shared: &Shared, server: Server, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_nodelay(true);
    let Some(req) = read_request(&stream) else {
        return;
    };
    let route = route_of(server, &req.path);
    let fault = {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.requests.push(SeenRequest {
            server,
            method: req.method.clone(),
            target: req.target.clone(),
            headers: req.headers.clone(),
            body: req.body.clone(),
        });
        route.and_then(|r| st.faults.get_mut(&r).and_then(VecDeque::pop_front))
    };
    let head = req.method == "HEAD";
    let mut cut = None;
    let resp = match fault {
        Some(Fault::Status {
            status,
            headers,
            body,
        }) => {
            let mut r = Response::new(status).body(body.into_bytes());
            r.headers = headers;
            if !r.has_header("content-type") && !r.body.is_empty() {
                let ct = match r.body.first() {
                    Some(b'{' | b'[') => "application/json; charset=utf-8",
                    _ => "text/plain; charset=utf-8",
                };
                r = r.header("Content-Type", ct);
            }
            r
        }
        Some(Fault::ExpiredSignature) => s3_error(403, "AccessDenied", "Request has expired"),
        Some(Fault::HtmlPage) => Response::new(200)
            .header("Content-Type", "text/html; charset=utf-8")
            .body(login_page()),
        Some(Fault::DropMidBody { after_bytes }) => {
            cut = Some(after_bytes);
            handle(shared, server, &req)
        }
        Some(Fault::WrongBytes) => {
            let mut r = handle(shared, server, &req);
            if let Some(last) = r.body.last_mut() {
                *last ^= 0xFF;
            }
            r
        }
        None => handle(shared, server, &req),
    };
    write_response(&mut stream, &resp, head, cut);
}

fn route_of(server: Server, path: &str) -> Option<Route> {
    match server {
        Server::Storage if path.starts_with("/images/") => Some(Route::Images),
        Server::Storage => Some(Route::Storage),
        Server::Api if path.starts_with("/api/v1/") => Some(Route::CivitaiApi),
        Server::Api if path.starts_with("/api/download/") => Some(Route::CivitaiDownload),
        Server::Api if path.starts_with("/api/models/") => Some(Route::HfApi),
        Server::Api => {
            let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            (segs.len() >= 5 && segs[2] == "resolve").then_some(Route::HfResolve)
        }
    }
}

fn handle(shared: &Shared, server: Server, req: &Request) -> Response {
    let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = Ctx {
        st: &st,
        req,
        origin: format!(
            "http://{}",
            req.header("host")
                .map(str::to_string)
                .unwrap_or_else(|| shared.api_addr.to_string())
        ),
        storage: format!("http://{}", shared.storage_addr),
    };
    match server {
        Server::Storage => storage(&ctx),
        Server::Api => {
            let p = req.path.as_str();
            if p.starts_with("/api/v1/") {
                civitai_api(&ctx)
            } else if p.starts_with("/api/download/models/") {
                drop(st);
                civitai_download(shared, req)
            } else if p.starts_with("/api/models/") {
                hf_api(&ctx)
            } else if route_of(server, p) == Some(Route::HfResolve) {
                drop(st);
                hf_resolve(shared, req)
            } else {
                Response::error(404, "Not found")
            }
        }
    }
}

struct Ctx<'a> {
    st: &'a State,
    req: &'a Request,
    /// `http://{Host}`: absolute URLs in JSON are built from it, as Civitai does.
    origin: String,
    storage: String,
}

// ---------------------------------------------------------------------------------------------
// Civitai
// ---------------------------------------------------------------------------------------------

fn primary_index(v: &CivitaiVersion) -> Option<usize> {
    v.files
        .iter()
        .position(|f| f.primary)
        .or((!v.files.is_empty()).then_some(0))
}

fn air_ecosystem(base_model: &str) -> &'static str {
    let b = base_model.to_ascii_lowercase();
    if b.starts_with("sdxl") {
        "sdxl"
    } else if b.starts_with("sd 1") {
        "sd1"
    } else if b.starts_with("sd 2") {
        "sd2"
    } else if b.starts_with("sd 3") {
        "sd3"
    } else if b.starts_with("flux.1") {
        "flux1"
    } else if b.starts_with("pony") {
        "pony"
    } else if b.starts_with("illustrious") {
        "illustrious"
    } else {
        "other"
    }
}

fn air_type(model_type: &str) -> &'static str {
    match model_type {
        "LORA" => "lora",
        "LoCon" => "lycoris",
        "DoRA" => "dora",
        "Checkpoint" => "checkpoint",
        "TextualInversion" => "embedding",
        "Hypernetwork" => "hypernet",
        "AestheticGradient" => "ag",
        "MotionModule" => "motion",
        "Upscaler" => "upscaler",
        "VAE" => "vae",
        "Controlnet" => "controlnet",
        _ => "unknown",
    }
}

fn file_download_url(origin: &str, version_id: u64, f: &CivitaiFile, primary: bool) -> String {
    let base = format!("{origin}/api/download/models/{version_id}");
    if primary {
        return base;
    }
    let mut params = vec![
        ("type", f.file_type.as_str()),
        ("format", f.format.as_str()),
    ];
    if let Some(s) = &f.size {
        params.push(("size", s));
    }
    if let Some(fp) = &f.fp {
        params.push(("fp", fp));
    }
    let q: Vec<String> = params
        .into_iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect();
    format!("{base}?{}", q.join("&"))
}

/// A `files[]` entry. `full`: the `/model-versions` shape (`primary` true/false, scan messages);
/// otherwise the `/models` shape (`primary: true` or absent).
fn file_json(m: &StoredModel, vi: usize, fi: usize, origin: &str, full: bool) -> Value {
    let v = &m.model.versions[vi];
    let f = &v.files[fi];
    let h = &m.hashes[vi][fi];
    let primary = primary_index(v) == Some(fi);
    let mut metadata = Map::new();
    metadata.insert("format".into(), json!(f.format));
    if let Some(s) = &f.size {
        metadata.insert("size".into(), json!(s));
    }
    if let Some(fp) = &f.fp {
        metadata.insert("fp".into(), json!(fp));
    }
    let mut hashes = Map::new();
    hashes.insert("AutoV2".into(), json!(h.autov2));
    hashes.insert("SHA256".into(), json!(h.sha256));
    if let Some(a) = &h.autov3 {
        hashes.insert("AutoV3".into(), json!(a));
    }
    let mut o = Map::new();
    o.insert("id".into(), json!(f.id));
    o.insert("name".into(), json!(f.name));
    o.insert("type".into(), json!(f.file_type));
    o.insert("sizeKB".into(), json!(f.bytes.len() as f64 / 1024.0));
    o.insert("metadata".into(), Value::Object(metadata));
    o.insert("pickleScanResult".into(), json!("Success"));
    if full {
        o.insert("pickleScanMessage".into(), json!("No Pickle imports"));
    }
    o.insert("virusScanResult".into(), json!("Success"));
    if full {
        o.insert("virusScanMessage".into(), Value::Null);
    }
    o.insert("scannedAt".into(), json!(v.published_at));
    o.insert("hashes".into(), Value::Object(hashes));
    let url = file_download_url(origin, v.id, f, primary);
    if full {
        o.insert("primary".into(), json!(primary));
        o.insert("downloadUrl".into(), json!(url));
    } else {
        o.insert("downloadUrl".into(), json!(url));
        if primary {
            o.insert("primary".into(), json!(true));
        }
    }
    Value::Object(o)
}

fn image_json(v: &CivitaiVersion, img: &CivitaiImage, storage: &str, full: bool) -> Value {
    let mut o = Map::new();
    o.insert(
        "url".into(),
        json!(format!(
            "{storage}/images/{}/{}",
            v.id,
            encode_component(&img.file_name)
        )),
    );
    o.insert("nsfwLevel".into(), json!(1));
    o.insert("width".into(), json!(img.width));
    o.insert("height".into(), json!(img.height));
    o.insert("hash".into(), json!("U5Qm~qof00ay~qj[ofj[00ay?bj["));
    o.insert("type".into(), json!("image"));
    o.insert("hasMeta".into(), json!(false));
    if full {
        o.insert("meta".into(), Value::Null);
    }
    Value::Object(o)
}

fn availability(v: &CivitaiVersion) -> &'static str {
    if v.early_access_deadline.is_some() {
        "EarlyAccess"
    } else {
        "Public"
    }
}

/// A version nested in `/models/{id}` (§1.3).
fn version_nested_json(m: &StoredModel, vi: usize, ctx: &Ctx) -> Value {
    let v = &m.model.versions[vi];
    let archived = m.model.archived;
    let files: Vec<Value> = if archived {
        vec![]
    } else {
        (0..v.files.len())
            .map(|fi| file_json(m, vi, fi, &ctx.origin, false))
            .collect()
    };
    let mut o = Map::new();
    o.insert("id".into(), json!(v.id));
    o.insert("index".into(), json!(vi));
    o.insert("name".into(), json!(v.name));
    o.insert("baseModel".into(), json!(v.base_model));
    o.insert("baseModelType".into(), json!("Standard"));
    o.insert("publishedAt".into(), json!(v.published_at));
    o.insert("availability".into(), json!(availability(v)));
    o.insert("nsfwLevel".into(), json!(1));
    o.insert("trainedWords".into(), json!(v.trained_words));
    if let Some(d) = &v.early_access_deadline {
        o.insert("earlyAccessDeadline".into(), json!(d));
    }
    o.insert(
        "stats".into(),
        json!({"downloadCount": 0, "thumbsUpCount": 0, "thumbsDownCount": 0}),
    );
    o.insert("files".into(), Value::Array(files));
    o.insert(
        "images".into(),
        v.images
            .iter()
            .map(|i| image_json(v, i, &ctx.storage, false))
            .collect(),
    );
    if !archived && !v.files.is_empty() {
        o.insert(
            "downloadUrl".into(),
            json!(format!("{}/api/download/models/{}", ctx.origin, v.id)),
        );
    }
    o.insert("supportsGeneration".into(), json!(false));
    Value::Object(o)
}

/// `/model-versions/{id}` and the by-hash bodies (§1.5).
fn version_full_json(m: &StoredModel, vi: usize, ctx: &Ctx) -> Value {
    let v = &m.model.versions[vi];
    let model = &m.model;
    let files: Vec<Value> = if model.archived {
        vec![]
    } else {
        (0..v.files.len())
            .map(|fi| file_json(m, vi, fi, &ctx.origin, true))
            .collect()
    };
    let mut model_o = Map::new();
    model_o.insert("name".into(), json!(model.name));
    model_o.insert("type".into(), json!(model.model_type));
    model_o.insert("nsfw".into(), json!(false));
    model_o.insert("poi".into(), json!(false));
    if model.archived {
        model_o.insert("mode".into(), json!("Archived"));
    }
    let mut o = Map::new();
    o.insert("id".into(), json!(v.id));
    o.insert("modelId".into(), json!(model.id));
    o.insert("name".into(), json!(v.name));
    o.insert("description".into(), Value::Null);
    o.insert("baseModel".into(), json!(v.base_model));
    o.insert("baseModelType".into(), json!("Standard"));
    o.insert(
        "air".into(),
        json!(format!(
            "urn:air:{}:{}:civitai:{}@{}",
            air_ecosystem(&v.base_model),
            air_type(&model.model_type),
            model.id,
            v.id
        )),
    );
    o.insert("status".into(), json!("Published"));
    o.insert("availability".into(), json!(availability(v)));
    o.insert("nsfwLevel".into(), json!(1));
    o.insert("createdAt".into(), json!(v.published_at));
    o.insert("updatedAt".into(), json!(v.published_at));
    o.insert("publishedAt".into(), json!(v.published_at));
    if let Some(d) = &v.early_access_deadline {
        o.insert("earlyAccessDeadline".into(), json!(d));
    }
    o.insert("uploadType".into(), json!("Created"));
    o.insert("usageControl".into(), json!("Download"));
    o.insert("trainedWords".into(), json!(v.trained_words));
    o.insert("trainingStatus".into(), Value::Null);
    o.insert("trainingDetails".into(), Value::Null);
    o.insert("licensingFee".into(), Value::Null);
    o.insert("paidAccess".into(), Value::Null);
    o.insert(
        "stats".into(),
        json!({"downloadCount": 0, "thumbsUpCount": 0}),
    );
    o.insert("model".into(), Value::Object(model_o));
    o.insert("files".into(), Value::Array(files));
    o.insert(
        "images".into(),
        v.images
            .iter()
            .take(10)
            .map(|i| image_json(v, i, &ctx.storage, true))
            .collect(),
    );
    if !model.archived && !v.files.is_empty() {
        o.insert(
            "downloadUrl".into(),
            json!(format!("{}/api/download/models/{}", ctx.origin, v.id)),
        );
    }
    Value::Object(o)
}

fn model_json(m: &StoredModel, ctx: &Ctx) -> Value {
    let model = &m.model;
    let mut o = Map::new();
    o.insert("id".into(), json!(model.id));
    o.insert("name".into(), json!(model.name));
    o.insert(
        "description".into(),
        json!(format!("<p>{}</p>", model.name)),
    );
    o.insert("type".into(), json!(model.model_type));
    o.insert("nsfw".into(), json!(false));
    o.insert("nsfwLevel".into(), json!(1));
    o.insert("availability".into(), json!("Public"));
    o.insert("allowNoCredit".into(), json!(true));
    o.insert("allowCommercialUse".into(), json!("{Image,RentCivit}"));
    o.insert("allowDerivatives".into(), json!(true));
    o.insert("allowDifferentLicense".into(), json!(true));
    o.insert("minor".into(), json!(false));
    o.insert("poi".into(), json!(false));
    o.insert("sfwOnly".into(), json!(false));
    o.insert("supportsGeneration".into(), json!(false));
    if model.archived {
        o.insert("mode".into(), json!("Archived"));
    }
    o.insert(
        "stats".into(),
        json!({"downloadCount": 0, "thumbsUpCount": 0, "thumbsDownCount": 0,
               "commentCount": 0, "tippedAmountCount": 0}),
    );
    if let Some(c) = &model.creator {
        o.insert("creator".into(), json!({ "username": c }));
    }
    o.insert("tags".into(), json!(model.tags));
    o.insert(
        "modelVersions".into(),
        (0..model.versions.len())
            .map(|vi| version_nested_json(m, vi, ctx))
            .collect(),
    );
    Value::Object(o)
}

/// `/model-versions/mini/{id}` (§1.6): the fields the docs list, for the primary file.
fn version_mini_json(m: &StoredModel, vi: usize, ctx: &Ctx) -> Value {
    let v = &m.model.versions[vi];
    let p = primary_index(v).filter(|_| !m.model.archived);
    let mut o = Map::new();
    o.insert("id".into(), json!(v.id));
    o.insert(
        "air".into(),
        json!(format!(
            "urn:air:{}:{}:civitai:{}@{}",
            air_ecosystem(&v.base_model),
            air_type(&m.model.model_type),
            m.model.id,
            v.id
        )),
    );
    o.insert("versionName".into(), json!(v.name));
    o.insert("modelName".into(), json!(m.model.name));
    o.insert("baseModel".into(), json!(v.base_model));
    o.insert("availability".into(), json!(availability(v)));
    if let Some(fi) = p {
        let f = &v.files[fi];
        let h = &m.hashes[vi][fi];
        o.insert("size".into(), json!(f.bytes.len() as f64 / 1024.0));
        o.insert("fileType".into(), json!(f.file_type));
        o.insert("fileName".into(), json!(f.name));
        let mut hashes = Map::new();
        hashes.insert("AutoV2".into(), json!(h.autov2));
        hashes.insert("SHA256".into(), json!(h.sha256));
        if let Some(a) = &h.autov3 {
            hashes.insert("AutoV3".into(), json!(a));
        }
        o.insert("hashes".into(), Value::Object(hashes));
        o.insert(
            "downloadUrls".into(),
            json!([format!("{}/api/download/models/{}", ctx.origin, v.id)]),
        );
        o.insert("format".into(), json!(f.format));
    }
    o.insert("requireAuth".into(), json!(v.require_auth));
    o.insert(
        "checkPermission".into(),
        json!(v.early_access_deadline.is_some()),
    );
    if let Some(d) = &v.early_access_deadline {
        o.insert("earlyAccessEndsAt".into(), json!(d));
    }
    Value::Object(o)
}

fn find_model(st: &State, id: u64) -> Option<&StoredModel> {
    st.civitai.iter().find(|m| m.model.id == id)
}

fn find_version(st: &State, id: u64) -> Option<(&StoredModel, usize)> {
    st.civitai.iter().find_map(|m| {
        m.model
            .versions
            .iter()
            .position(|v| v.id == id)
            .map(|vi| (m, vi))
    })
}

/// Versions with a file whose SHA256, AutoV2 or AutoV3 equals `hash` (uppercase), oldest
/// published first (then lowest id), as the by-hash query orders them.
fn versions_by_hash<'a>(st: &'a State, hash: &str) -> Vec<(&'a StoredModel, usize)> {
    let mut found: Vec<(&StoredModel, usize)> = st
        .civitai
        .iter()
        .flat_map(|m| {
            m.hashes.iter().enumerate().filter_map(move |(vi, fs)| {
                fs.iter()
                    .any(|h| {
                        h.sha256 == hash || h.autov2 == hash || h.autov3.as_deref() == Some(hash)
                    })
                    .then_some((m, vi))
            })
        })
        .collect();
    found.sort_by(|a, b| {
        let (va, vb) = (&a.0.model.versions[a.1], &b.0.model.versions[b.1]);
        (&va.published_at, va.id).cmp(&(&vb.published_at, vb.id))
    });
    found
}

fn civitai_api(ctx: &Ctx) -> Response {
    let req = ctx.req;
    let rest = &req.path["/api/v1/".len()..];
    let segs: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let get = req.method == "GET" || req.method == "HEAD";
    let resp = match (segs.as_slice(), get) {
        (["models", id], true) => match id.parse::<u64>() {
            Err(_) => Response::error(400, "Invalid model id"),
            Ok(id) => match find_model(ctx.st, id) {
                Some(m) => Response::json(200, &model_json(m, ctx)),
                None => Response::error(404, &format!("No model with id {id}")),
            },
        },
        (["model-versions", "by-hash"], false) if req.method == "POST" => {
            return by_hash_post(ctx, false)
        }
        (["model-versions", "by-hash", "ids"], false) if req.method == "POST" => {
            return by_hash_post(ctx, true)
        }
        (["model-versions", "by-hash"], true) => Response::error(400, "Missing hash"),
        (["model-versions", "by-hash", hash], true) => {
            let hash = pct_decode(hash, false).trim().to_ascii_uppercase();
            if hash.is_empty() {
                Response::error(400, "Missing hash")
            } else {
                match versions_by_hash(ctx.st, &hash).first() {
                    Some((m, vi)) => Response::json(200, &version_full_json(m, *vi, ctx))
                        .header("Cache-Control", "public, s-maxage=3600"),
                    None => Response::error(404, "Model not found"),
                }
            }
        }
        (["model-versions", "mini", id], true) => match id.parse::<u64>() {
            Err(_) => Response::error(400, "Invalid id"),
            Ok(id) => match find_version(ctx.st, id) {
                Some((m, vi)) => Response::json(200, &version_mini_json(m, vi, ctx)),
                None => Response::error(404, "Model not found"),
            },
        },
        (["model-versions", id], true) => match id.parse::<u64>() {
            Err(_) => Response::error(400, "Invalid id"),
            Ok(id) => match find_version(ctx.st, id) {
                Some((m, vi)) => Response::json(200, &version_full_json(m, vi, ctx)),
                None => Response::error(404, "Model not found"),
            },
        },
        (_, false) => return Response::error(405, "Method not allowed"),
        _ => return Response::error(404, "Not found"),
    };
    if resp.status == 200 && !resp.has_header("cache-control") {
        resp.header("Cache-Control", PUBLIC_CACHE)
    } else {
        resp
    }
}

fn by_hash_post(ctx: &Ctx, ids: bool) -> Response {
    let max = if ids { 10_000 } else { 100 };
    let hashes: Vec<String> = match serde_json::from_slice(&ctx.req.body) {
        Ok(h) => h,
        Err(_) => return Response::error(400, "Expected an array of SHA256 hashes"),
    };
    if hashes.is_empty() || hashes.len() > max {
        return Response::error(400, &format!("Expected between 1 and {max} hashes"));
    }
    if hashes.iter().any(|h| h.len() != 64) {
        return Response::error(400, "Hashes must be 64-character SHA256");
    }
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for h in hashes {
        let h = h.to_ascii_uppercase();
        if let Some((m, vi)) = versions_by_hash(ctx.st, &h).into_iter().next() {
            let vid = m.model.versions[vi].id;
            if ids {
                out.push(json!({ "modelVersionId": vid, "hash": h }));
            } else if !seen.contains(&vid) {
                seen.push(vid);
                out.push(version_full_json(m, vi, ctx));
            }
        }
    }
    Response::json(200, &Value::Array(out))
}

const KNOWN_FORMATS: &[&str] = &[
    "SafeTensor",
    "PickleTensor",
    "GGUF",
    "Diffusers",
    "Core ML",
    "ONNX",
    "Other",
];

fn civitai_download(shared: &Shared, req: &Request) -> Response {
    let resp = civitai_download_inner(shared, req);
    if resp.has_header("cache-control") {
        resp
    } else {
        resp.header("Cache-Control", "no-store, max-age=0")
    }
}

fn civitai_download_inner(shared: &Shared, req: &Request) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::error(405, "Method not allowed");
    }
    let id = req.path["/api/download/models/".len()..].trim_end_matches('/');
    let Ok(version_id) = id.parse::<u64>() else {
        return Response::error(400, "Invalid modelVersionId");
    };
    // Parameter checks (zod in the real handler).
    if let Some(s) = req.query("size") {
        if s != "full" && s != "pruned" {
            return Response::error(400, "Invalid size");
        }
    }
    if let Some(f) = req.query("format") {
        if !KNOWN_FORMATS.contains(&f) {
            return Response::error(400, "Invalid format");
        }
    }
    let file_id = match req.query("fileId").map(str::parse::<u64>) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => return Response::error(400, "Invalid fileId"),
    };

    let location = {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let token = st.civitai_token.clone();
        let Some((m, vi)) = find_version(&st, version_id) else {
            return Response::error(404, "File not found");
        };
        let v = &m.model.versions[vi];
        if m.model.archived {
            return Response::error(410, "Model archived, not available for download");
        }
        let Some(fi) = choose_file(v, req, file_id) else {
            return Response::error(404, "File not found");
        };
        let authed = token
            .as_deref()
            .is_some_and(|t| req.bearer() == Some(t) || req.query("token") == Some(t));
        if v.require_auth && !authed {
            return Response::json(
                401,
                &json!({"error": "Unauthorized",
                        "message": "The creator of this asset requires you to be logged in to download it"}),
            );
        }
        if let Some(deadline) = &v.early_access_deadline {
            return Response::json(
                403,
                &json!({"error": "Early Access", "deadline": deadline,
                        "message": "This asset is in Early Access. You can use Buzz access it now!"}),
            );
        }
        let f = v.files[fi].clone();
        st.signatures += 1;
        let n = st.signatures;
        let disposition = format!("attachment; filename=\"{}\"", f.name);
        let location = format!(
            "http://{}/storage/{}?X-Amz-Expires=86400&X-Amz-Signature={n}&response-content-disposition={}",
            shared.storage_addr,
            f.id,
            encode_component(&disposition)
        );
        location
    };
    Response::new(307)
        .header("Location", location.clone())
        .header("Content-Type", "text/plain; charset=utf-8")
        .body(format!("Redirecting to {location}"))
}

/// The file a download serves: `fileId` exactly; otherwise, among the files of the `type` asked
/// (all when none), the one matching most of `format`/`size`/`fp`/`quantType` (the primary on a
/// tie), which must then match every one of them (404 "File not found" otherwise).
fn choose_file(v: &CivitaiVersion, req: &Request, file_id: Option<u64>) -> Option<usize> {
    if let Some(id) = file_id {
        return v.files.iter().position(|f| f.id == id);
    }
    let primary = primary_index(v)?;
    let wanted: Vec<(&str, &str)> = ["format", "size", "fp", "quantType"]
        .into_iter()
        .filter_map(|k| req.query(k).map(|v| (k, v)))
        .collect();
    let matches = |f: &CivitaiFile, key: &str, want: &str| match key {
        "format" => f.format == want,
        "size" => f.size.as_deref() == Some(want),
        "fp" => f.fp.as_deref() == Some(want),
        _ => false,
    };
    let fi = v
        .files
        .iter()
        .enumerate()
        .filter(|(_, f)| req.query("type").is_none_or(|t| f.file_type == t))
        .max_by_key(|(i, f)| {
            let score = wanted.iter().filter(|(k, w)| matches(f, k, w)).count();
            (score, *i == primary, std::cmp::Reverse(*i))
        })
        .map(|(i, _)| i)?;
    wanted
        .iter()
        .all(|(k, w)| matches(&v.files[fi], k, w))
        .then_some(fi)
}

// ---------------------------------------------------------------------------------------------
// Storage (signed URLs, HF CDN, images)
// ---------------------------------------------------------------------------------------------

fn s3_error(status: u16, code: &str, message: &str) -> Response {
    Response::new(status)
        .header("Content-Type", "application/xml")
        .body(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
        ))
}

fn storage(ctx: &Ctx) -> Response {
    let req = ctx.req;
    if req.method != "GET" && req.method != "HEAD" {
        return s3_error(
            405,
            "MethodNotAllowed",
            "The specified method is not allowed against this resource.",
        );
    }
    let disposition = req.query("response-content-disposition");
    if let Some(id) = req.path.strip_prefix("/storage/") {
        if req.query("X-Amz-Signature").is_none() {
            return s3_error(403, "AccessDenied", "Access Denied");
        }
        let found = id.parse::<u64>().ok().and_then(|id| {
            ctx.st.civitai.iter().find_map(|m| {
                m.model.versions.iter().enumerate().find_map(|(vi, v)| {
                    v.files
                        .iter()
                        .position(|f| f.id == id)
                        .map(|fi| (&v.files[fi], &m.hashes[vi][fi]))
                })
            })
        });
        return match found {
            Some((f, h)) => serve_bytes(
                req,
                &f.bytes,
                &h.etag,
                "application/octet-stream",
                disposition,
            ),
            None => s3_error(404, "NoSuchKey", "The specified key does not exist."),
        };
    }
    if let Some(sha) = req.path.strip_prefix("/hf-cdn/") {
        if req.query("Signature").is_none() {
            return s3_error(403, "AccessDenied", "Access Denied");
        }
        let sha = sha.to_ascii_lowercase();
        let found = ctx.st.hf.iter().find_map(|r| {
            r.files
                .iter()
                .find(|f| f.lfs && ctx.st.hf_sha256[&(r.id.clone(), f.path.clone())] == sha)
        });
        return match found {
            Some(f) => serve_bytes(
                req,
                &f.bytes,
                &format!("\"{sha}\""),
                "application/octet-stream",
                disposition,
            ),
            None => s3_error(404, "NoSuchKey", "The specified key does not exist."),
        };
    }
    if let Some(rest) = req.path.strip_prefix("/images/") {
        let found = rest.split_once('/').and_then(|(vid, name)| {
            let vid: u64 = vid.parse().ok()?;
            let name = pct_decode(name, false);
            let (m, vi) = find_version(ctx.st, vid)?;
            m.model.versions[vi]
                .images
                .iter()
                .find(|i| i.file_name == name)
        });
        return match found {
            Some(img) => serve_bytes(
                req,
                &img.bytes,
                &format!("\"{}\"", &hash_bytes(&img.bytes, None).sha256[..32]),
                content_type_of(&img.file_name),
                None,
            ),
            None => s3_error(404, "NoSuchKey", "The specified key does not exist."),
        };
    }
    s3_error(404, "NoSuchKey", "The specified key does not exist.")
}

fn content_type_of(name: &str) -> &'static str {
    let ext = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "json" => "application/json",
        "txt" | "md" | "yaml" | "yml" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

enum RangeAsk {
    Satisfiable(usize, usize),
    Unsatisfiable,
}

/// One `bytes=` range; `None` for anything else (ignored, as RFC 9110 allows).
fn parse_range(value: &str, total: usize) -> Option<RangeAsk> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: usize = b.parse().ok()?;
        if n == 0 || total == 0 {
            return Some(RangeAsk::Unsatisfiable);
        }
        return Some(RangeAsk::Satisfiable(total.saturating_sub(n), total - 1));
    }
    let start: usize = a.parse().ok()?;
    let end = if b.is_empty() {
        None
    } else {
        Some(b.parse::<usize>().ok()?)
    };
    if end.is_some_and(|e| e < start) {
        return None;
    }
    if start >= total {
        return Some(RangeAsk::Unsatisfiable);
    }
    Some(RangeAsk::Satisfiable(
        start,
        end.unwrap_or(total - 1).min(total - 1),
    ))
}

/// 200 / 206 / 416 for a stored object, honouring `Range` and `If-Range` (a validator that is
/// neither the ETag nor the Last-Modified date gets the whole object).
fn serve_bytes(
    req: &Request,
    bytes: &[u8],
    etag: &str,
    content_type: &str,
    disposition: Option<&str>,
) -> Response {
    let total = bytes.len();
    let mut range = req.header("range").and_then(|r| parse_range(r, total));
    if let Some(validator) = req.header("if-range") {
        if validator != etag && validator != LAST_MODIFIED {
            range = None;
        }
    }
    let base = |status: u16| {
        let mut r = Response::new(status)
            .header("Content-Type", content_type)
            .header("ETag", etag)
            .header("Last-Modified", LAST_MODIFIED)
            .header("Accept-Ranges", "bytes");
        if let Some(d) = disposition {
            r = r.header("Content-Disposition", d);
        }
        r
    };
    match range {
        None => base(200).body(bytes.to_vec()),
        Some(RangeAsk::Satisfiable(start, end)) => base(206)
            .header("Content-Range", format!("bytes {start}-{end}/{total}"))
            .body(bytes[start..=end].to_vec()),
        Some(RangeAsk::Unsatisfiable) => {
            let mut r = s3_error(
                416,
                "InvalidRange",
                "The requested range is not satisfiable",
            );
            r = r.header("Content-Range", format!("bytes */{total}"));
            r
        }
    }
}

fn login_page() -> Vec<u8> {
    let mut page = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>Sign in | Civitai</title>\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         </head>\n<body>\n<main>\n<h1>Sign in to Civitai</h1>\n\
         <p>You need to be logged in to download this file.</p>\n\
         <form method=\"post\" action=\"/api/auth/signin/email\">\n\
         <label for=\"email\">Email</label>\n<input id=\"email\" name=\"email\" type=\"email\">\n\
         <button type=\"submit\">Continue</button>\n</form>\n",
    );
    while page.len() < 2000 {
        page.push_str("<!-- padding so the page weighs about two kilobytes -->\n");
    }
    page.push_str("</main>\n</body>\n</html>\n");
    page.into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Hugging Face
// ---------------------------------------------------------------------------------------------

fn hf_error(status: u16, code: &str, message: &str) -> Response {
    Response::json(status, &json!({ "error": message }))
        .header("X-Error-Code", code)
        .header("X-Error-Message", message)
}

/// The repo (or the error answering for it) once access is checked.
fn hf_repo<'a>(st: &'a State, req: &Request, id: &str) -> Result<&'a HfRepo, Response> {
    let repo = st
        .hf
        .iter()
        .find(|r| r.id == id)
        .ok_or_else(|| hf_error(404, "RepoNotFound", "Repository not found"))?;
    let authed = st
        .hf_token
        .as_deref()
        .is_some_and(|t| req.bearer() == Some(t));
    if repo.private && !authed {
        return Err(hf_error(401, "RepoNotFound", "Repository not found"));
    }
    if repo.gated && !authed {
        return Err(hf_error(
            401,
            "GatedRepo",
            &format!(
                "Access to model {} is restricted. You must have access to it and be authenticated to access it. Please log in.",
                repo.id
            ),
        ));
    }
    Ok(repo)
}

fn hf_revision(repo: &HfRepo, rev: &str) -> Result<(), Response> {
    if rev == "main" || rev == repo.sha {
        Ok(())
    } else {
        Err(hf_error(
            404,
            "RevisionNotFound",
            &format!("Invalid rev id: {rev}"),
        ))
    }
}

fn hf_resolve(shared: &Shared, req: &Request) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return hf_error(405, "MethodNotAllowed", "Method not allowed");
    }
    let segs: Vec<String> = req
        .path
        .trim_start_matches('/')
        .split('/')
        .map(|s| pct_decode(s, false))
        .collect();
    let repo_id = format!("{}/{}", segs[0], segs[1]);
    let rev = &segs[3];
    let path = segs[4..].join("/");
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let (file, sha, sha256) = {
        let repo = match hf_repo(&st, req, &repo_id) {
            Ok(r) => r,
            Err(e) => return e,
        };
        if let Err(e) = hf_revision(repo, rev) {
            return e;
        }
        match repo.files.iter().find(|f| f.path == path) {
            Some(f) => (
                f.clone(),
                repo.sha.clone(),
                st.hf_sha256[&(repo.id.clone(), f.path.clone())].clone(),
            ),
            None => return hf_error(404, "EntryNotFound", "Entry not found"),
        }
    };
    let name = file
        .path
        .rsplit('/')
        .next()
        .unwrap_or(&file.path)
        .to_string();
    let disposition = format!(
        "inline; filename*=UTF-8''{}; filename=\"{}\";",
        encode_component(&name),
        name
    );
    if file.lfs {
        st.signatures += 1;
        let location = format!(
            "http://{}/hf-cdn/{sha256}?response-content-disposition={}&Expires=4102444800&Signature={}&Key-Pair-Id=KFAKEHUBPAIR",
            shared.storage_addr,
            encode_component(&disposition),
            st.signatures
        );
        return Response::new(302)
            .header("Content-Type", "text/plain; charset=utf-8")
            .header("Location", location.clone())
            .header("X-Repo-Commit", sha)
            .header("X-Linked-Etag", format!("\"{sha256}\""))
            .header("X-Linked-Size", file.bytes.len().to_string())
            .header(
                "ETag",
                format!(
                    "\"{}\"",
                    git_blob_oid(pointer_text(&sha256, file.bytes.len()).as_bytes())
                ),
            )
            .body(format!("Found. Redirecting to {location}"));
    }
    drop(st);
    let etag = format!("\"{}\"", git_blob_oid(&file.bytes));
    let mut r = serve_bytes(
        req,
        &file.bytes,
        &etag,
        content_type_of(&name),
        Some(&disposition),
    );
    r = r.header("X-Repo-Commit", sha);
    r
}

/// Every directory above the repo's files, sorted.
fn hf_dirs(repo: &HfRepo) -> Vec<String> {
    let mut dirs: Vec<String> = repo
        .files
        .iter()
        .flat_map(|f| {
            let parts: Vec<&str> = f.path.split('/').collect();
            (1..parts.len())
                .map(|n| parts[..n].join("/"))
                .collect::<Vec<_>>()
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

fn hf_api(ctx: &Ctx) -> Response {
    let req = ctx.req;
    if req.method != "GET" && req.method != "HEAD" {
        return hf_error(405, "MethodNotAllowed", "Method not allowed");
    }
    let segs: Vec<String> = req.path["/api/models/".len()..]
        .trim_end_matches('/')
        .split('/')
        .map(|s| pct_decode(s, false))
        .collect();
    if segs.len() < 2 {
        return hf_error(404, "RepoNotFound", "Repository not found");
    }
    let repo_id = format!("{}/{}", segs[0], segs[1]);
    let tail: Vec<&str> = segs[2..].iter().map(String::as_str).collect();
    match tail.as_slice() {
        [] => hf_info(ctx, &repo_id, "main"),
        ["revision", rev] => hf_info(ctx, &repo_id, rev),
        ["tree", rev, path @ ..] => hf_tree(ctx, &repo_id, rev, &path.join("/")),
        _ => hf_error(404, "EntryNotFound", "Not found"),
    }
}

fn hf_info(ctx: &Ctx, repo_id: &str, rev: &str) -> Response {
    let repo = match ctx.st.hf.iter().find(|r| r.id == repo_id) {
        // Gated repos answer the info route without a token, as the Hub does.
        Some(r) if r.gated && !r.private => r,
        _ => match hf_repo(ctx.st, ctx.req, repo_id) {
            Ok(r) => r,
            Err(e) => return e,
        },
    };
    if let Err(e) = hf_revision(repo, rev) {
        return e;
    }
    let owner = repo.id.split_once('/').map_or("", |(o, _)| o);
    Response::json(
        200,
        &json!({
            "_id": &repo.sha[..24.min(repo.sha.len())],
            "id": repo.id,
            "modelId": repo.id,
            "author": owner,
            "sha": repo.sha,
            "lastModified": "2026-05-01T10:00:00.000Z",
            "private": repo.private,
            "gated": if repo.gated { json!("manual") } else { json!(false) },
            "disabled": false,
            "downloads": 0,
            "likes": 0,
            "tags": ["safetensors", "lora"],
            "library_name": "diffusers",
            "siblings": repo.files.iter().map(|f| json!({"rfilename": f.path})).collect::<Vec<_>>(),
        }),
    )
}

fn hf_tree(ctx: &Ctx, repo_id: &str, rev: &str, under: &str) -> Response {
    let repo = match hf_repo(ctx.st, ctx.req, repo_id) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if let Err(e) = hf_revision(repo, rev) {
        return e;
    }
    let recursive = matches!(ctx.req.query("recursive"), Some("true" | "1"));
    let dirs = hf_dirs(repo);
    if !under.is_empty() && !dirs.iter().any(|d| d == under) {
        return hf_error(
            404,
            "EntryNotFound",
            &format!("{under} does not exist on \"{rev}\""),
        );
    }
    let prefix = if under.is_empty() {
        String::new()
    } else {
        format!("{under}/")
    };
    let listed = |path: &str| {
        path.strip_prefix(&prefix)
            .is_some_and(|rest| recursive || !rest.contains('/'))
    };
    let mut entries: Vec<(String, Value)> = Vec::new();
    for d in dirs.iter().filter(|d| listed(d)) {
        entries.push((
            d.clone(),
            json!({"type": "directory", "oid": hex_lower(&sha1(format!("tree {}", d).as_bytes())),
                   "size": 0, "path": d}),
        ));
    }
    for f in repo.files.iter().filter(|f| listed(&f.path)) {
        let v = if f.lfs {
            let sha256 = &ctx.st.hf_sha256[&(repo.id.clone(), f.path.clone())];
            let pointer = pointer_text(sha256, f.bytes.len());
            json!({"type": "file", "oid": git_blob_oid(pointer.as_bytes()), "size": f.bytes.len(),
                   "path": f.path,
                   "lfs": {"oid": sha256, "size": f.bytes.len(),
                           "pointerSize": pointer.len()}})
        } else {
            json!({"type": "file", "oid": git_blob_oid(&f.bytes), "size": f.bytes.len(),
                   "path": f.path})
        };
        entries.push((f.path.clone(), v));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Response::json(
        200,
        &Value::Array(entries.into_iter().map(|(_, v)| v).collect()),
    )
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (pct_decode(k, true), pct_decode(v, true)),
            None => (pct_decode(p, true), String::new()),
        })
        .collect()
}

/// Percent-decoding (lossy UTF-8); `plus`: `+` is a space (query strings).
fn pct_decode(s: &str, plus: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// JavaScript's `encodeURIComponent`.
fn encode_component(s: &str) -> String {
    let mut out = String::new();
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// `application/x-www-form-urlencoded`, as `URLSearchParams` writes it (space as `+`).
fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"*-._".contains(&c) {
            out.push(c as char);
        } else if c == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-1 (FIPS 180-4), for Git object ids only.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes(word.try_into().unwrap());
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}
