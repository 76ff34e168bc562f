//! `fetch --identify`, `library identify` and `library outdated`: local files looked up on
//! Civitai; sidecars written where missing; newer versions reported.

use loratool::hub::fetch::Services;
use loratool::hub::identify::{identify, newest_version, Identified};
use loratool::library::{db, Library};
use loratool::tensors::hash::{hash_file, FileHashes};
use loratool::tensors::SafetensorsFile;
use loratool::{Error, Result};
use std::path::{Path, PathBuf};

fn fetch_error(item: &str, problem: loratool::hub::Problem) -> Error {
    Error::Fetch {
        item: item.into(),
        problem,
    }
}

/// `fetch --identify PATH...`: hashes the files (their indexed hashes when the index has them
/// unchanged is the library's job: here they are read), looks them up, writes sidecars, records
/// the ids in the index.
pub fn run_paths(
    services: &Services,
    paths: &[String],
    db_flag: Option<&Path>,
    json: bool,
    no_index: bool,
) -> Result<i32> {
    let mut files = Vec::new();
    let mut unreadable = false;
    for p in paths {
        let path = PathBuf::from(p);
        let start = SafetensorsFile::data_start_of(&path).ok().flatten();
        // An unreadable file is reported; the others are still looked up.
        match hash_file(&path, start) {
            Ok(h) => files.push((path, h)),
            Err(e) => {
                eprintln!("loratool: {e}");
                unreadable = true;
            }
        }
    }
    let lib = match no_index {
        true => None,
        false => Some(Library::open(&db::default_path(db_flag)?)?),
    };
    let code = match files.is_empty() {
        true => 0,
        false => report(services, &files, lib, json)?,
    };
    Ok(code.max(i32::from(unreadable)))
}

/// `library identify [--all]`.
pub fn run_library(services: &Services, mut lib: Library, all: bool, json: bool) -> Result<i32> {
    let files = lib.files_to_identify(all)?;
    if files.is_empty() && !json {
        println!("nothing to identify (every indexed file has Civitai information; --all looks them all up again)");
        return Ok(0);
    }
    // Identify is read-mostly: the sidecars it writes are picked up by recording each file.
    let _ = &mut lib;
    report(services, &files, Some(lib), json)
}

fn report(
    services: &Services,
    files: &[(PathBuf, FileHashes)],
    mut lib: Option<Library>,
    json: bool,
) -> Result<i32> {
    let found = identify(services, files).map_err(|p| fetch_error("identify", p))?;
    let mut failed = false;
    for item in &found {
        if let (Some(origin), Some(lib)) = (&item.origin, lib.as_mut()) {
            if let Err(e) = lib.record_source(&item.path, origin, None) {
                failed = true;
                eprintln!(
                    "loratool: {}: identified but not indexed: {e}",
                    item.path.display()
                );
            }
        }
        if let Some(p) = &item.problem {
            eprintln!("loratool: {}: {p}", item.path.display());
        }
        if !json {
            print_identified(item);
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&found).unwrap_or_default()
        );
    }
    Ok(i32::from(failed))
}

fn print_identified(item: &Identified) {
    match (&item.name, item.matched_by) {
        (Some(name), Some(by)) => {
            println!("{}: {name} (matched by {by})", item.path.display());
            for w in &item.written {
                println!("  wrote {}", w.display());
            }
        }
        _ => println!(
            "{}: not found on Civitai (sha256 {})",
            item.path.display(),
            item.sha256
        ),
    }
}

#[derive(serde::Serialize)]
struct Outdated {
    path: PathBuf,
    model_id: u64,
    version_id: u64,
    newest_version_id: u64,
    newest_version_name: String,
    command: String,
}

/// How long a model's newest version is trusted before asking Civitai again.
const OUTDATED_CACHE_S: i64 = 24 * 3600;

/// `library outdated`: one request per model (remembered for a day in the index).
pub fn run_outdated(services: &Services, lib: Library, json: bool, refresh: bool) -> Result<i32> {
    let links = lib.civitai_links()?;
    let mut outdated = Vec::new();
    let mut newest: std::collections::HashMap<u64, Option<(u64, String)>> = Default::default();
    let mut failed = false;
    for link in &links {
        if let std::collections::hash_map::Entry::Vacant(slot) = newest.entry(link.model_id) {
            let cached = (!refresh)
                .then(|| lib.cached_civitai_model(link.model_id, OUTDATED_CACHE_S))
                .flatten();
            let answer = match cached {
                Some(c) => Some(c),
                None => match newest_version(services, link.model_id) {
                    Ok(n) => {
                        if let Some((id, name)) = &n {
                            lib.cache_civitai_model(link.model_id, *id, name)?;
                        }
                        n
                    }
                    Err(p) => {
                        failed = true;
                        eprintln!(
                            "loratool: {}: {}",
                            link.path.display(),
                            fetch_error(&format!("Civitai model {}", link.model_id), p)
                        );
                        None
                    }
                },
            };
            slot.insert(answer);
        }
        if let Some(Some((id, name))) = newest.get(&link.model_id) {
            if *id != link.version_id {
                outdated.push(Outdated {
                    path: link.path.clone(),
                    model_id: link.model_id,
                    version_id: link.version_id,
                    newest_version_id: *id,
                    newest_version_name: name.clone(),
                    command: format!("loratool fetch civitai:{}@{id}", link.model_id),
                });
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outdated).unwrap_or_default()
        );
    } else if outdated.is_empty() {
        println!(
            "{} file(s) with Civitai ids checked: all at their model's newest version",
            links.len()
        );
    } else {
        for o in &outdated {
            println!(
                "{}: version {} → newer {} \"{}\": {}",
                o.path.display(),
                o.version_id,
                o.newest_version_id,
                o.newest_version_name,
                o.command
            );
        }
    }
    Ok(i32::from(failed))
}
