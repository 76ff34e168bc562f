//! Outputs still being written, and what removes them when the run cannot finish.
//!
//! Every named temp (a hidden `.<out>.loratool-<pid>-<n>.tmp` file or staging folder) is
//! registered here for as long as it exists. SIGINT, SIGTERM and SIGHUP remove all of them before
//! the process exits ([`clean_up_on_signals`]). The final link or rename of an output runs under
//! the same lock as that cleanup ([`Unfinished::finish_with`]), so a signal is handled entirely
//! before it (the temp is removed, the target untouched) or entirely after it (the output is
//! complete). What SIGKILL leaves behind is removed by the next run that writes into the same
//! folder ([`remove_stale`]); on Linux a file output leaves nothing, being unnamed until complete.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// What the registry knows of one output in progress.
enum Entry {
    /// A named temp file or staging folder: removed on a signal.
    Named(PathBuf),
    /// An unnamed output (Linux `O_TMPFILE`) for this target: the kernel frees it when the
    /// process exits, so a signal only reports it.
    Unnamed(PathBuf),
}

static REGISTRY: Mutex<BTreeMap<u64, Entry>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn registry() -> MutexGuard<'static, BTreeMap<u64, Entry>> {
    // A panic while the lock was held cannot leave the map half-updated: keep using it.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// One registered output in progress. Dropping it while still registered removes its named temp.
pub(crate) struct Unfinished {
    id: u64,
}

impl Unfinished {
    /// Creates a named temp beside `target` with `create` (a file or a folder, which must fail
    /// with `AlreadyExists` when the name is taken) and registers it, both under the cleanup lock:
    /// a signal never finds a temp that exists but is not registered.
    pub(crate) fn create_named<T>(
        target: &Path,
        mut create: impl FnMut(&Path) -> io::Result<T>,
    ) -> io::Result<(Unfinished, PathBuf, T)> {
        let mut registry = registry();
        let mut tries = 0;
        loop {
            let temp = temp_name(target);
            match create(&temp) {
                Ok(made) => {
                    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                    registry.insert(id, Entry::Named(temp.clone()));
                    return Ok((Unfinished { id }, temp, made));
                }
                // Left by an earlier process that had our pid: take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 100 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Registers an unnamed output for `target`, so that a signal can say what it discarded.
    pub(crate) fn unnamed(target: &Path) -> Unfinished {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        registry().insert(id, Entry::Unnamed(target.to_path_buf()));
        Unfinished { id }
    }

    /// Runs `step`, the final link or rename, under the cleanup lock. `step` returns whether the
    /// registered path still holds something to remove (a replaced folder's old contents, swapped
    /// in); when it does not, the output is forgotten here and dropping `self` removes nothing.
    pub(crate) fn finish_with(&self, step: impl FnOnce() -> io::Result<bool>) -> io::Result<()> {
        let mut registry = registry();
        if !step()? {
            registry.remove(&self.id);
        }
        Ok(())
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let mut registry = registry();
        if let Some(Entry::Named(path)) = registry.remove(&self.id) {
            remove_path(&path);
        }
    }
}

/// A fresh hidden name beside `target`: `.<name>.loratool-<pid>-<n>.tmp`. Only names of this
/// pattern are ever removed by [`remove_stale`]. A name used outside [`Unfinished::create_named`]
/// must be created and consumed within one [`Unfinished::finish_with`] step; if SIGKILL comes in
/// between, [`remove_stale`] removes it.
pub(crate) fn temp_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    super::writer::parent_dir(target).join(format!(
        ".{name}.loratool-{}-{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Removes a file, or a folder with everything in it. A folder that other threads are still
/// filling may refuse once or twice (a file appeared after it was listed): try again.
fn remove_path(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            for _ in 0..5 {
                match std::fs::remove_dir_all(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => continue,
                    _ => return,
                }
            }
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// The pid in a temp name of ours (`.<name>.loratool-<pid>-<n>.tmp`, or the `.<name>.loratool-<pid>.tmp`
/// of staging folders made by earlier versions); `None` for every other name.
fn temp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let at = rest.rfind(".loratool-")?;
    if at == 0 {
        return None;
    }
    let numbers = &rest[at + ".loratool-".len()..];
    let (pid, counter) = numbers.split_once('-').unwrap_or((numbers, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(counter) {
        return None;
    }
    pid.parse().ok()
}

/// True unless the process is known not to exist. A pid we may not signal (another user's
/// process) is alive; so is any pid on a system where this cannot be asked.
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = i32::try_from(pid) else {
            return true;
        };
        if pid <= 0 {
            return true;
        }
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        if unsafe { libc::kill(pid, 0) } == 0 {
            return true;
        }
        io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the temps that loratool processes which no longer exist left in `dir` (killed with
/// SIGKILL, or by a power cut): only names of loratool's own pattern, never anything else.
/// Errors are ignored: another run may be removing the same ones.
pub(crate) fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_pid) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            remove_path(&entry.path());
        }
    }
}

/// Has SIGINT, SIGTERM and SIGHUP remove every registered temp, print one line and exit with
/// 128 + the signal's number, instead of killing the process with its temps left behind.
/// (Elsewhere than on Unix, signals are left as they are.)
pub fn clean_up_on_signals() -> io::Result<()> {
    #[cfg(unix)]
    {
        let mut signals =
            signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    // Held until exit: no output is linked or renamed into place after this.
                    let mut registry = registry();
                    let line = interrupted_line(signal, &mut registry);
                    use std::io::IsTerminal;
                    if io::stderr().is_terminal() {
                        eprint!("\r\x1b[2K"); // over a progress bar
                    }
                    eprintln!("{line}");
                    std::process::exit(128 + signal);
                }
            })?;
    }
    Ok(())
}

/// Removes every registered temp and says so in one line.
#[cfg(unix)]
fn interrupted_line(signal: i32, registry: &mut BTreeMap<u64, Entry>) -> String {
    let name = match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    };
    let entries: Vec<Entry> = std::mem::take(registry).into_values().collect();
    let named: Vec<&PathBuf> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Named(p) => Some(p),
            Entry::Unnamed(_) => None,
        })
        .collect();
    let mut removed = Vec::new();
    let mut discarded = Vec::new();
    for entry in &entries {
        match entry {
            Entry::Named(path) => {
                remove_path(path);
                removed.push(path.file_name().map_or_else(
                    || path.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                ));
            }
            // Files of a staging folder go with it.
            Entry::Unnamed(target) if named.iter().any(|n| target.starts_with(n)) => {}
            Entry::Unnamed(target) => discarded.push(target.display().to_string()),
        }
    }
    let mut line = format!("loratool: interrupted ({name})");
    if !removed.is_empty() {
        line += &format!("; removed the unfinished output {}", removed.join(", "));
    }
    if !discarded.is_empty() {
        line += &format!("; {} was not written", discarded.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// No process has this pid: it is above every pid_max Linux allows.
    const DEAD_PID: u32 = i32::MAX as u32;

    #[test]
    fn temp_names_are_recognised_and_nothing_else() {
        assert_eq!(temp_pid(".out.safetensors.loratool-123-0.tmp"), Some(123));
        assert_eq!(temp_pid(".my-model.loratool-7-12.tmp"), Some(7));
        assert_eq!(temp_pid(".pipe.loratool-99.tmp"), Some(99));
        for other in [
            "out.safetensors.loratool-123-0.tmp",
            ".out.safetensors.loratool-123-0.tmp.bak",
            ".out.loratool-12a-0.tmp",
            ".out.loratool--0.tmp",
            ".loratool-5-0.tmp",
            ".out.tmp",
            "model.safetensors",
        ] {
            assert_eq!(temp_pid(other), None, "{other}");
        }
        let t = temp_name(Path::new("dir/out.safetensors"));
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(t.parent().unwrap(), Path::new("dir"));
        assert_eq!(temp_pid(name), Some(std::process::id()));
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let dead_file = format!(".o.safetensors.loratool-{DEAD_PID}-0.tmp");
        let dead_dir = format!(".pipe.loratool-{DEAD_PID}-3.tmp");
        let live = format!(".o.safetensors.loratool-{}-0.tmp", std::process::id());
        let kept = [
            live.as_str(),
            ".o.safetensors.loratool-1-0.tmp", // pid 1 always exists
            "o.safetensors",
            ".o.safetensors.tmp",
            &format!("o.loratool-{DEAD_PID}-0.tmp"),
        ];
        for name in kept.iter().chain([&dead_file.as_str()]) {
            fs::write(p(name), b"x").unwrap();
        }
        fs::create_dir(p(&dead_dir)).unwrap();
        fs::write(p(&dead_dir).join("model.safetensors"), b"x").unwrap();
        remove_stale(dir.path());
        assert!(!p(&dead_file).exists() && !p(&dead_dir).exists());
        for name in kept {
            assert!(p(name).exists(), "{name} must stay");
        }
    }

    #[cfg(unix)]
    #[test]
    fn registered_temps_are_removed_on_drop_and_by_a_signal_and_kept_once_finished() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("o.safetensors");
        let (dropped, temp, _) = Unfinished::create_named(&target, |p| fs::write(p, b"x")).unwrap();
        assert!(temp.exists());
        drop(dropped);
        assert!(!temp.exists());

        let (finished, temp, _) =
            Unfinished::create_named(&target, |p| fs::write(p, b"x")).unwrap();
        finished
            .finish_with(|| fs::rename(&temp, &target).map(|()| false))
            .unwrap();
        drop(finished);
        assert!(target.exists());

        // What the signal thread does, without exiting: only this test's entries are touched.
        let (signalled, temp, _) =
            Unfinished::create_named(&target, |p| fs::create_dir(p)).unwrap();
        fs::write(temp.join("part"), b"x").unwrap();
        let unnamed = Unfinished::unnamed(&dir.path().join("u.safetensors"));
        let inside = Unfinished::unnamed(&temp.join("part"));
        let mut mine = BTreeMap::new();
        {
            let mut registry = registry();
            for id in [signalled.id, unnamed.id, inside.id] {
                mine.insert(id, registry.remove(&id).unwrap());
            }
        }
        let line = interrupted_line(libc::SIGTERM, &mut mine);
        assert!(!temp.exists());
        let temp_name = temp.file_name().unwrap().to_string_lossy();
        assert_eq!(
            line,
            format!(
                "loratool: interrupted (SIGTERM); removed the unfinished output {temp_name}; {} was not written",
                dir.path().join("u.safetensors").display()
            )
        );
    }
}
