//! The fake Civitai / Hugging Face server of tests/hub_support, driven with a raw TCP client.

mod hub_support;

use hub_support::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// One request on a fresh connection; the whole answer, read to EOF (or until the server cut it).
fn send(url: &str, method: &str, headers: &[(&str, &str)], body: &[u8]) -> Raw {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, target) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Raw {
        status,
        headers,
        body: buf[end + 4..].to_vec(),
    }
}

fn get(url: &str, headers: &[(&str, &str)]) -> Raw {
    send(url, "GET", headers, b"")
}

fn watercolor(bytes: Vec<u8>) -> CivitaiModel {
    CivitaiModel {
        id: 100001,
        name: "Watercolor Style".into(),
        versions: vec![CivitaiVersion {
            id: 200002,
            name: "v2.0".into(),
            trained_words: vec!["wtrclr style".into()],
            files: vec![
                CivitaiFile {
                    id: 300003,
                    name: "watercolor_v2.safetensors".into(),
                    bytes,
                    size: Some("pruned".into()),
                    fp: Some("fp16".into()),
                    primary: true,
                    ..Default::default()
                },
                CivitaiFile {
                    id: 300004,
                    name: "watercolor_v2.ckpt".into(),
                    bytes: b"not a pickle".to_vec(),
                    format: "PickleTensor".into(),
                    ..Default::default()
                },
            ],
            images: vec![CivitaiImage {
                file_name: "1.png".into(),
                bytes: b"\x89PNG fake".to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn hub_with_vector() -> FakeHub {
    let hub = FakeHub::start();
    hub.add_civitai_model(watercolor(vector_112()));
    hub
}

#[test]
fn download_redirects_to_storage_which_serves_the_exact_bytes() {
    let hub = hub_with_vector();
    let api = hub.api_base();
    let r = get(&format!("{api}/api/download/models/200002"), &[]);
    assert_eq!(r.status, 307);
    assert_eq!(r.header("cache-control"), Some("no-store, max-age=0"));
    let loc = r.header("location").unwrap().to_string();
    let prefix = format!("{}/storage/300003?", hub.storage_base());
    assert!(loc.starts_with(&prefix), "{loc}");
    assert!(loc.contains("X-Amz-Expires=86400"));
    assert!(loc.ends_with(
        "response-content-disposition=attachment%3B%20filename%3D%22watercolor_v2.safetensors%22"
    ));
    let again = get(&format!("{api}/api/download/models/200002"), &[]);
    assert_ne!(again.header("location"), Some(loc.as_str()), "fresh URL");

    let s = get(&loc, &[]);
    assert_eq!(s.status, 200);
    assert_eq!(s.body, vector_112());
    assert_eq!(s.header("content-length"), Some("112"));
    assert_eq!(s.header("content-type"), Some("application/octet-stream"));
    assert_eq!(
        s.header("content-disposition"),
        Some("attachment; filename=\"watercolor_v2.safetensors\"")
    );
    assert_eq!(s.header("accept-ranges"), Some("bytes"));
    assert!(s.header("etag").is_some_and(|e| e.starts_with('"')));

    // The non-primary file through its listed downloadUrl; a mismatch is 404.
    let v = get(&format!("{api}/api/v1/model-versions/200002"), &[]).json();
    let url = v["files"][1]["downloadUrl"].as_str().unwrap();
    assert!(url.ends_with("?type=Model&format=PickleTensor"), "{url}");
    let r = get(url, &[]);
    assert_eq!(r.status, 307);
    assert!(r.header("location").unwrap().contains("/storage/300004?"));
    let r = get(&format!("{api}/api/download/models/200002?fp=bf16"), &[]);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (404, Some("File not found"))
    );
}

#[test]
fn storage_honours_range_and_if_range() {
    let hub = hub_with_vector();
    let loc = get(
        &format!("{}/api/download/models/200002", hub.api_base()),
        &[],
    )
    .header("location")
    .unwrap()
    .to_string();
    let etag = get(&loc, &[]).header("etag").unwrap().to_string();
    let bytes = vector_112();

    let r = get(&loc, &[("Range", "bytes=100-")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 100-111/112"));
    assert_eq!(r.body, bytes[100..]);

    let r = get(&loc, &[("Range", "bytes=100-"), ("If-Range", &etag)]);
    assert_eq!(r.status, 206);

    let r = get(&loc, &[("Range", "bytes=100-"), ("If-Range", "\"stale\"")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bytes);

    let r = get(&loc, &[("Range", "bytes=112-")]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */112"));

    let r = send(&loc, "HEAD", &[], b"");
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(r.header("content-length"), Some("112"));
}

#[test]
fn faults_are_consumed_in_order() {
    let hub = hub_with_vector();
    let api = hub.api_base();
    let loc = get(&format!("{api}/api/download/models/200002"), &[])
        .header("location")
        .unwrap()
        .to_string();

    hub.inject(Route::Storage, Fault::DropMidBody { after_bytes: 50 });
    hub.inject(Route::Storage, Fault::WrongBytes);
    hub.inject(Route::Storage, Fault::ExpiredSignature);
    let r = get(&loc, &[]);
    assert_eq!((r.status, r.header("content-length")), (200, Some("112")));
    assert_eq!(r.body, vector_112()[..50]);
    let r = get(&loc, &[]);
    assert_eq!(r.body.len(), 112);
    assert_ne!(r.body, vector_112());
    let r = get(&loc, &[]);
    assert_eq!(r.status, 403);
    assert_eq!(r.header("content-type"), Some("application/xml"));
    assert!(String::from_utf8_lossy(&r.body).contains("<Message>Request has expired</Message>"));
    assert_eq!(hub.pending_faults(Route::Storage), 0);
    assert_eq!(get(&loc, &[]).body, vector_112());

    hub.inject(
        Route::CivitaiDownload,
        Fault::Status {
            status: 429,
            headers: vec![("Retry-After".into(), "1".into())],
            body: r#"{"error":"slow down"}"#.into(),
        },
    );
    hub.inject(Route::CivitaiDownload, Fault::HtmlPage);
    let r = get(&format!("{api}/api/download/models/200002"), &[]);
    assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));
    let r = get(&format!("{api}/api/download/models/200002"), &[]);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.body.len() > 1500);
    assert_eq!(
        get(&format!("{api}/api/download/models/200002"), &[]).status,
        307
    );
}

#[test]
fn by_hash_finds_the_test_vector_by_sha256_and_autov3() {
    let hub = hub_with_vector();
    let api = hub.api_base();
    let r = get(
        &format!(
            "{api}/api/v1/model-versions/by-hash/{}",
            VECTOR_112_SHA256.to_lowercase()
        ),
        &[],
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(
        (v["id"].as_u64(), v["modelId"].as_u64()),
        (Some(200002), Some(100001))
    );
    assert_eq!(v["air"], "urn:air:sdxl:lora:civitai:100001@200002");
    let f = &v["files"][0];
    assert_eq!(f["hashes"]["SHA256"], VECTOR_112_SHA256);
    assert_eq!(f["hashes"]["AutoV2"], VECTOR_112_AUTOV2);
    assert_eq!(f["hashes"]["AutoV3"], VECTOR_112_AUTOV3);
    assert_eq!(f["sizeKB"].as_f64(), Some(0.109375));
    assert_eq!(f["primary"], true);
    assert_eq!(v["files"][1]["primary"], false);
    assert!(
        v["files"][1]["hashes"].get("AutoV3").is_none(),
        "not safetensors"
    );
    assert_eq!(
        v["downloadUrl"].as_str().unwrap(),
        format!("{api}/api/download/models/200002")
    );
    assert_eq!(
        v["images"][0]["url"].as_str().unwrap(),
        format!("{}/images/200002/1.png", hub.storage_base())
    );

    let by_v3 = get(
        &format!("{api}/api/v1/model-versions/by-hash/b9c80b5adeca"),
        &[],
    );
    assert_eq!(by_v3.json()["id"].as_u64(), Some(200002));
    // A 12-hex SHA256 prefix is not a stored hash.
    let prefix = get(
        &format!("{api}/api/v1/model-versions/by-hash/2FD6C9020F4D"),
        &[],
    );
    assert_eq!(prefix.status, 404);
    assert_eq!(prefix.json()["error"], "Model not found");

    let body = format!(r#"["{VECTOR_112_SHA256}","{}"]"#, "0".repeat(64));
    let r = send(
        &format!("{api}/api/v1/model-versions/by-hash"),
        "POST",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    let r = send(
        &format!("{api}/api/v1/model-versions/by-hash/ids"),
        "POST",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(
        r.json(),
        serde_json::json!([{"modelVersionId": 200002, "hash": VECTOR_112_SHA256}])
    );
    let r = send(
        &format!("{api}/api/v1/model-versions/by-hash"),
        "POST",
        &[],
        br#"["2FD6C9020F"]"#,
    );
    assert_eq!(r.status, 400);

    // /models/{id}: primary true or absent.
    let m = get(&format!("{api}/api/v1/models/100001"), &[]).json();
    let files = &m["modelVersions"][0]["files"];
    assert_eq!(files[0]["primary"], true);
    assert!(files[1].get("primary").is_none());
    assert!(m.get("mode").is_none());
    let r = get(&format!("{api}/api/v1/models/7"), &[]);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (404, Some("No model with id 7"))
    );
}

#[test]
fn download_status_matrix() {
    let hub = FakeHub::start();
    let api = hub.api_base();
    let mut auth = watercolor(vector_112());
    auth.versions[0].require_auth = true;
    hub.add_civitai_model(auth);
    let mut early = watercolor(b"early".to_vec());
    early.id = 2;
    early.versions[0].id = 21;
    early.versions[0].files.truncate(1);
    early.versions[0].files[0].id = 22;
    early.versions[0].early_access_deadline = Some("2026-12-01T00:00:00.000Z".into());
    hub.add_civitai_model(early);
    let mut archived = watercolor(b"gone".to_vec());
    archived.id = 3;
    archived.archived = true;
    archived.versions[0].id = 31;
    hub.add_civitai_model(archived);
    hub.set_civitai_token(Some("tok"));

    let url = format!("{api}/api/download/models/200002");
    let r = get(&url, &[]);
    assert_eq!(r.status, 401);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("requires you to be logged in"));
    assert_eq!(get(&url, &[("Authorization", "Bearer nope")]).status, 401);
    assert_eq!(get(&url, &[("Authorization", "Bearer tok")]).status, 307);
    assert_eq!(get(&format!("{url}?token=tok"), &[]).status, 307);

    let r = get(
        &format!("{api}/api/download/models/21"),
        &[("Authorization", "Bearer tok")],
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["deadline"], "2026-12-01T00:00:00.000Z");

    let r = get(&format!("{api}/api/download/models/31"), &[]);
    assert_eq!(r.status, 410);
    let m = get(&format!("{api}/api/v1/models/3"), &[]).json();
    assert_eq!(m["mode"], "Archived");
    assert_eq!(m["modelVersions"][0]["files"], serde_json::json!([]));
    assert!(m["modelVersions"][0].get("downloadUrl").is_none());

    assert_eq!(
        get(&format!("{api}/api/download/models/999"), &[]).status,
        404
    );
}

#[test]
fn hugging_face_resolve_redirects_lfs_files_and_gates() {
    let hub = FakeHub::start();
    let api = hub.api_base();
    let sha = "a".repeat(40);
    hub.add_hf_repo(HfRepo {
        id: "alice/loras".into(),
        sha: sha.clone(),
        files: vec![
            HfFile {
                path: "styles/watercolor.safetensors".into(),
                bytes: vector_112(),
                lfs: true,
            },
            HfFile {
                path: "README.md".into(),
                bytes: b"hello world".to_vec(),
                lfs: false,
            },
        ],
        ..Default::default()
    });
    hub.add_hf_repo(HfRepo {
        id: "bob/gated".into(),
        gated: true,
        files: vec![HfFile {
            path: "g.safetensors".into(),
            bytes: b"gated bytes".to_vec(),
            lfs: true,
        }],
        ..Default::default()
    });
    hub.set_hf_token(Some("hf_tok"));
    let sha256 = VECTOR_112_SHA256.to_lowercase();

    let url = format!("{api}/alice/loras/resolve/main/styles/watercolor.safetensors");
    let r = send(&url, "HEAD", &[], b"");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("x-repo-commit"), Some(sha.as_str()));
    assert_eq!(
        r.header("x-linked-etag"),
        Some(format!("\"{sha256}\"").as_str())
    );
    assert_eq!(r.header("x-linked-size"), Some("112"));
    assert_ne!(r.header("content-length"), Some("112"));
    let loc = r.header("location").unwrap();
    assert!(loc.starts_with(&format!("{}/hf-cdn/{sha256}?", hub.storage_base())));
    let cdn = get(loc, &[]);
    assert_eq!((cdn.status, &cdn.body), (200, &vector_112()));
    assert_eq!(cdn.header("etag"), Some(format!("\"{sha256}\"").as_str()));
    let part = get(loc, &[("Range", "bytes=8-")]);
    assert_eq!(part.header("content-range"), Some("bytes 8-111/112"));
    // By commit too; other revisions are not found.
    let by_sha = format!("{api}/alice/loras/resolve/{sha}/styles/watercolor.safetensors");
    assert_eq!(get(&by_sha, &[]).status, 302);
    let r = get(&format!("{api}/alice/loras/resolve/v9/README.md"), &[]);
    assert_eq!(
        (r.status, r.header("x-error-code")),
        (404, Some("RevisionNotFound"))
    );
    let r = get(&format!("{api}/alice/loras/resolve/main/nope.bin"), &[]);
    assert_eq!(
        (r.status, r.header("x-error-code")),
        (404, Some("EntryNotFound"))
    );
    let r = get(&format!("{api}/carol/none/resolve/main/x.bin"), &[]);
    assert_eq!(
        (r.status, r.header("x-error-code")),
        (404, Some("RepoNotFound"))
    );

    // A small file is served in place, with its git blob id as ETag.
    let r = get(&format!("{api}/alice/loras/resolve/main/README.md"), &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello world"[..]));
    assert_eq!(
        r.header("etag"),
        Some("\"95d09f2b10159347eece71399a7e2e907ea3df4f\"")
    );

    let gated = format!("{api}/bob/gated/resolve/main/g.safetensors");
    let r = get(&gated, &[]);
    assert_eq!(
        (r.status, r.header("x-error-code")),
        (401, Some("GatedRepo"))
    );
    assert!(r.header("x-error-message").is_some());
    assert_eq!(
        get(&gated, &[("Authorization", "Bearer hf_tok")]).status,
        302
    );
    let info = get(&format!("{api}/api/models/bob/gated"), &[]);
    assert_eq!(
        (info.status, info.json()["gated"].as_str()),
        (200, Some("manual"))
    );

    let tree = get(
        &format!("{api}/api/models/alice/loras/tree/main?recursive=true"),
        &[],
    )
    .json();
    let entries = tree.as_array().unwrap();
    assert_eq!(entries.len(), 3, "{tree}");
    let lfs = entries
        .iter()
        .find(|e| e["path"] == "styles/watercolor.safetensors")
        .unwrap();
    assert_eq!(lfs["lfs"]["oid"], sha256.as_str());
    assert_eq!(lfs["size"], 112);
    assert!(entries
        .iter()
        .any(|e| e["type"] == "directory" && e["path"] == "styles"));
    let top = get(&format!("{api}/api/models/alice/loras/tree/main"), &[]).json();
    assert_eq!(top.as_array().unwrap().len(), 2);
}

#[test]
fn requests_are_recorded_with_their_headers() {
    let hub = hub_with_vector();
    let r = send(
        &format!("{}/api/download/models/200002?token=abc", hub.api_base()),
        "GET",
        &[
            ("Authorization", "Bearer tok"),
            ("User-Agent", "loratool-test"),
        ],
        b"",
    );
    get(r.header("location").unwrap(), &[("Range", "bytes=0-")]);
    let seen = hub.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].server, Server::Api);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, "/api/download/models/200002?token=abc");
    assert_eq!(seen[0].header("AUTHORIZATION"), Some("Bearer tok"));
    assert_eq!(seen[0].header("user-agent"), Some("loratool-test"));
    assert!(seen[0].headers.iter().all(|(k, _)| *k == k.to_lowercase()));
    assert_eq!(seen[1].server, Server::Storage);
    assert_eq!(seen[1].header("range"), Some("bytes=0-"));
    assert_eq!(seen[1].header("authorization"), None);
    hub.clear_requests();
    assert!(hub.requests().is_empty());
}
