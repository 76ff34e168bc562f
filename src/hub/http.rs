//! The one HTTP client of `fetch`: reqwest (rustls), redirects followed by hand so that a token
//! never leaves the host it belongs to and the download engine sees each hop, and the retry policy
//! (backoff with jitter, `Retry-After`) shared by API calls and downloads.

use super::Problem;
use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, LOCATION, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use std::time::{Duration, SystemTime};

/// A bearer token and the origin (`scheme://host:port`) it may be sent to.
#[derive(Clone)]
pub struct Auth {
    origin: String,
    header: HeaderValue,
}

impl Auth {
    pub fn new(base: &Url, token: &str) -> Option<Auth> {
        let mut header = HeaderValue::from_str(&format!("Bearer {}", token.trim())).ok()?;
        header.set_sensitive(true);
        Some(Auth {
            origin: origin(base),
            header,
        })
    }
}

// A token must not be printed by accident through a debug dump.
impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Auth({}, <redacted>)", self.origin)
    }
}

/// `host:port` as written in the URL (no port when it has none): how endpoints are recognised.
pub fn host_port(url: &Url) -> String {
    match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    }
}

pub fn origin(url: &Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// How often and how long to retry 408, 429, 5xx and dropped connections.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    /// First backoff; doubled each attempt, with full jitter, up to `cap`.
    pub base: Duration,
    pub cap: Duration,
    /// A `Retry-After` longer than this is not waited for: the error is reported instead (a
    /// Civitai download limit can ask for hours).
    pub max_wait: Duration,
}

impl RetryPolicy {
    /// The policy of shared/reference/fetch_apis.md §4.6: 6 attempts, 1 s doubling to 30 s.
    /// `LORATOOL_RETRY_BASE_MS` shortens the base (tests use a few milliseconds).
    pub fn from_env() -> RetryPolicy {
        let base_ms = std::env::var("LORATOOL_RETRY_BASE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000u64);
        RetryPolicy {
            attempts: 6,
            base: Duration::from_millis(base_ms),
            cap: Duration::from_millis(base_ms.saturating_mul(30)),
            max_wait: Duration::from_secs(120),
        }
    }

    /// The wait before attempt `n` (1-based retry count): `Retry-After` when the server gave one,
    /// else a random time up to base·2ⁿ⁻¹ (full jitter), capped.
    pub fn wait(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            return d;
        }
        let ceiling = self
            .base
            .saturating_mul(1u32 << (retry.saturating_sub(1)).min(16))
            .min(self.cap);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Half fixed, half jitter: never a zero wait, still spread between clients.
        ceiling / 2 + ceiling.mul_f64((nanos % 1000) as f64 / 2000.0)
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// Statuses worth another try.
pub fn is_transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

pub struct Http {
    client: Client,
    pub retry: RetryPolicy,
}

/// A response and the URL it finally came from.
pub struct Reply {
    pub response: Response,
    pub url: Url,
    /// A redirect led to another origin (signed storage, a CDN).
    pub crossed_origin: bool,
}

impl Http {
    pub fn new() -> Result<Http, Problem> {
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("loratool/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // The blocking client applies this to each connect, read and write, not to the
            // whole body: a stalled transfer fails (and resumes), a long one does not.
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Problem::Network(format!("cannot start the HTTP client: {e}")))?;
        Ok(Http {
            client,
            retry: RetryPolicy::from_env(),
        })
    }

    /// One request, following up to 10 redirects by hand (to other origins only when
    /// `cross_origin`; otherwise such a redirect is returned as the reply, as a Hub HEAD wants).
    /// `auth` is attached only while the URL's origin is the token's (a Civitai 307 or a Hub 302
    /// to storage loses it). Transport errors come back as [`Problem::Network`]; any status is
    /// returned as it is.
    pub fn send(
        &self,
        method: Method,
        url: Url,
        headers: &HeaderMap,
        auth: Option<&Auth>,
        body: Option<Vec<u8>>,
        cross_origin: bool,
    ) -> Result<Reply, Problem> {
        let first = origin(&url);
        let mut url = url;
        let mut method = method;
        let mut body = body;
        for _ in 0..=10 {
            let mut req = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(a) = auth.filter(|a| a.origin == origin(&url)) {
                req = req.header(AUTHORIZATION, a.header.clone());
            }
            if let Some(b) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            let response = req.send().map_err(|e| network(&url, e))?;
            let status = response.status();
            let crossed_origin = origin(&url) != first;
            if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
                return Ok(Reply {
                    response,
                    url,
                    crossed_origin,
                });
            }
            let Some(next) = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
            else {
                return Ok(Reply {
                    response,
                    url,
                    crossed_origin,
                });
            };
            if !cross_origin && origin(&next) != origin(&url) {
                return Ok(Reply {
                    response,
                    url,
                    crossed_origin,
                });
            }
            if matches!(status.as_u16(), 301..=303) && method == Method::POST {
                method = Method::GET;
                body = None;
            }
            url = next;
        }
        Err(Problem::Network(format!(
            "{}: more than 10 redirects",
            redact(&url)
        )))
    }

    /// [`Http::send`] with retries on transient statuses and transport errors; other statuses are
    /// returned for the caller to turn into a problem.
    pub fn send_retrying(
        &self,
        method: Method,
        url: Url,
        headers: &HeaderMap,
        auth: Option<&Auth>,
        body: Option<Vec<u8>>,
        cross_origin: bool,
    ) -> Result<Reply, Problem> {
        let mut retry = 0;
        loop {
            let outcome = self.send(
                method.clone(),
                url.clone(),
                headers,
                auth,
                body.clone(),
                cross_origin,
            );
            let wait = match &outcome {
                Ok(r) if is_transient(r.response.status()) => retry_after(r.response.headers()),
                Ok(_) => return outcome,
                Err(Problem::Network(_)) => None,
                Err(_) => return outcome,
            };
            retry += 1;
            if retry >= self.retry.attempts || wait.is_some_and(|w| w > self.retry.max_wait) {
                return outcome;
            }
            std::thread::sleep(self.retry.wait(retry, wait));
        }
    }
}

fn network(url: &Url, e: reqwest::Error) -> Problem {
    let mut what = e.to_string();
    // reqwest puts the URL (with a signed query) in its message; ours is printed without it.
    if let Some(u) = e.url() {
        what = what.replace(u.as_str(), "");
    }
    let cause = std::error::Error::source(&e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    Problem::Network(format!("{}: {}{cause}", redact(url), what.trim()))
}

/// A URL for messages: the query (signatures, `token=`) left out.
pub fn redact(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_password(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(90);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(85) && d <= Duration::from_secs(90),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn backoff_grows_and_stays_under_the_cap() {
        let p = RetryPolicy {
            attempts: 6,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
            max_wait: Duration::from_secs(60),
        };
        for n in 1..8 {
            let w = p.wait(n, None);
            let ceiling = Duration::from_millis(100 * (1 << (n - 1))).min(p.cap);
            assert!(w >= ceiling / 2 && w <= ceiling, "retry {n}: {w:?}");
        }
        assert_eq!(
            p.wait(3, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn tokens_go_only_to_their_origin_and_urls_lose_their_query_in_messages() {
        let base = Url::parse("https://civitai.com").unwrap();
        let auth = Auth::new(&base, "secret").unwrap();
        assert_eq!(auth.origin, "https://civitai.com:443");
        assert!(!format!("{auth:?}").contains("secret"));
        let storage =
            Url::parse("https://r2.example/storage/1?X-Amz-Signature=abc&token=secret").unwrap();
        assert_ne!(origin(&storage), auth.origin);
        assert_eq!(redact(&storage), "https://r2.example/storage/1");
    }
}
