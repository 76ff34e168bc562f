//! One output file on its way to its target path.
//!
//! On Linux the data goes to an unnamed file in the target's folder (`O_TMPFILE`): nothing can be
//! left behind by a crash or SIGKILL, since the kernel frees it with the process. Only a complete,
//! fsynced file is linked into place, and `linkat` refuses an existing name, so an output that
//! appeared during the run (another loratool, another program) is never replaced without
//! `--force`; with `--force` the file is linked to a hidden name and renamed over the target
//! (atomic). Where the filesystem has no unnamed files, a hidden temp `.<out>.loratool-<pid>-<n>.tmp`
//! is used instead, registered for signal cleanup (see [`super::unfinished`]) and moved into place
//! by a rename that does not replace (`renameat2(RENAME_NOREPLACE)`, else link + unlink).

use super::unfinished::{self, Unfinished};
use super::writer::{check_output_path, parent_dir, WriteOptions};
use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub struct OutputFile {
    target: PathBuf,
    file: File,
    /// The hidden temp the data goes to, when the filesystem offers no unnamed files.
    temp: Option<PathBuf>,
    force: bool,
    unfinished: Unfinished,
}

impl OutputFile {
    /// Checks that `target` may be written ([`check_output_path`]), removes stale temps of dead
    /// processes from its folder, and opens the file to write.
    pub fn create(target: &Path, opts: &WriteOptions) -> Result<OutputFile> {
        Self::open(target, opts, true)
    }

    fn open(target: &Path, opts: &WriteOptions, may_be_unnamed: bool) -> Result<OutputFile> {
        check_output_path(target, opts)?;
        let dir = parent_dir(target);
        unfinished::remove_stale(&dir);
        let unnamed = match may_be_unnamed {
            true => open_unnamed(&dir).map_err(|e| Error::io(target, e))?,
            false => None,
        };
        let (file, temp, unfinished) = match unnamed {
            Some(file) => (file, None, Unfinished::unnamed(target)),
            None => {
                let (unfinished, temp, file) = Unfinished::create_named(target, |p| {
                    OpenOptions::new().write(true).create_new(true).open(p)
                })
                .map_err(|e| Error::io(target, e))?;
                (file, Some(temp), unfinished)
            }
        };
        Ok(OutputFile {
            target: target.to_path_buf(),
            file,
            temp,
            force: opts.force,
            unfinished,
        })
    }

    /// The open file, for positioned writes and in-kernel copies.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Fsyncs the file, puts it at the target path, and fsyncs the folder. Without `--force`, an
    /// output that appeared at the target since [`OutputFile::create`] is an error and stays as
    /// it was.
    pub fn commit(self) -> Result<()> {
        let target = &self.target;
        self.file.sync_all().map_err(|e| Error::io(target, e))?;
        let placed = match (&self.temp, self.force) {
            (None, false) => self
                .unfinished
                .finish_with(|| link_unnamed(&self.file, target).map(|()| false)),
            (None, true) => self.unfinished.finish_with(|| {
                let named = unfinished::temp_name(target);
                link_unnamed(&self.file, &named)?;
                std::fs::rename(&named, target).inspect_err(|_| {
                    let _ = std::fs::remove_file(&named);
                })?;
                Ok(false)
            }),
            (Some(temp), false) => self
                .unfinished
                .finish_with(|| rename_noreplace(temp, target).map(|()| false)),
            (Some(temp), true) => self
                .unfinished
                .finish_with(|| std::fs::rename(temp, target).map(|()| false)),
        };
        placed.map_err(|e| placed_error(target, e))?;
        // Persist the name itself; failure here does not undo a complete file.
        let _ = sync_dir(&parent_dir(target));
        Ok(())
    }
}

impl Write for OutputFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The error of a final link or rename: a name that appeared meanwhile is the "exists" refusal.
pub(crate) fn placed_error(target: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::AlreadyExists {
        Error::OutputExists {
            path: target.to_path_buf(),
            appeared: true,
        }
    } else {
        Error::io(target, e)
    }
}

/// An unnamed file in `dir`, or `None` where the filesystem (or the system) offers none.
#[cfg(target_os = "linux")]
fn open_unnamed(dir: &Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o666)
        .open(dir)
    {
        Ok(file) => Ok(Some(file)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOSYS)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn open_unnamed(_: &Path) -> io::Result<Option<File>> {
    Ok(None)
}

/// Gives the unnamed `file` the name `to`; fails with `AlreadyExists` if `to` exists.
#[cfg(target_os = "linux")]
fn link_unnamed(file: &File, to: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let to = c_path(to)?;
    let proc = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
    // SAFETY: both paths are NUL-terminated and live across the call; `fd` is open.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) && !Path::new("/proc/self/fd").exists() {
        // No /proc: AT_EMPTY_PATH links the descriptor itself (needs CAP_DAC_READ_SEARCH).
        // SAFETY: as above; the empty path is NUL-terminated.
        let r = unsafe {
            libc::linkat(
                fd,
                c"".as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        };
        if r == 0 {
            return Ok(());
        }
        return Err(io::Error::last_os_error());
    }
    Err(err)
}

#[cfg(not(target_os = "linux"))]
fn link_unnamed(_: &File, _: &Path) -> io::Result<()> {
    unreachable!("unnamed files are only opened on Linux")
}

#[cfg(target_os = "linux")]
fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// `renameat2` with `flags`; `Ok(false)` where the system or the filesystem does not offer it.
#[cfg(target_os = "linux")]
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<bool> {
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both paths are NUL-terminated and live across the call. The raw syscall, because
    // glibc before 2.28 has no wrapper.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
        _ => Err(err),
    }
}

/// Renames `from` (a file or a folder) to `to` unless `to` exists (`AlreadyExists`).
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if renameat2(from, to, libc::RENAME_NOREPLACE)? {
        return Ok(());
    }
    // A hard link refuses an existing name too; folders and some filesystems have none.
    match std::fs::hard_link(from, to) {
        Ok(()) => {
            let _ = std::fs::remove_file(from);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => {
            // Last resort, not atomic: check, then rename.
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(from, to)
        }
    }
}

/// Swaps `a` and `b` atomically; `Ok(false)` where the system or the filesystem cannot.
pub(crate) fn rename_exchange(a: &Path, b: &Path) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    return renameat2(a, b, libc::RENAME_EXCHANGE);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

/// Fsyncs a folder, so that the names just made in it survive a power cut.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn force() -> WriteOptions {
        WriteOptions {
            force: true,
            ..Default::default()
        }
    }

    /// Both mechanisms: an output that appeared during the run is refused and left alone without
    /// `--force`, replaced with it; no temp is left either way.
    #[test]
    fn the_final_step_never_replaces_what_it_did_not_check() {
        type Create = fn(&Path, &WriteOptions) -> Result<OutputFile>;
        for (how, create) in [
            ("unnamed", OutputFile::create as Create),
            ("named", |t, o| OutputFile::open(t, o, false)),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("o.bin");
            let mut f = create(&out, &WriteOptions::default()).unwrap();
            let visible = if how == "named" || !cfg!(target_os = "linux") {
                1
            } else {
                0
            };
            assert_eq!(names(dir.path()).len(), visible, "{how}: the temp");
            f.write_all(b"new").unwrap();
            fs::write(&out, b"theirs").unwrap();
            let e = f.commit().unwrap_err();
            assert!(
                matches!(e, Error::OutputExists { appeared: true, .. }),
                "{how}: {e}"
            );
            assert_eq!(fs::read(&out).unwrap(), b"theirs");
            assert_eq!(names(dir.path()), ["o.bin"], "{how}");

            let mut f = create(&out, &force()).unwrap();
            f.write_all(b"new").unwrap();
            f.commit().unwrap();
            assert_eq!(fs::read(&out).unwrap(), b"new");
            assert_eq!(names(dir.path()), ["o.bin"], "{how}");

            let fresh = dir.path().join("fresh.bin");
            let mut f = create(&fresh, &WriteOptions::default()).unwrap();
            f.write_all(b"x").unwrap();
            drop(f);
            assert_eq!(names(dir.path()), ["o.bin"], "{how}: dropped unfinished");
        }
    }

    #[test]
    fn noreplace_and_exchange_renames() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::write(a.join("f"), b"a").unwrap();
        fs::create_dir(&b).unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::AlreadyExists,
            "an empty folder too"
        );
        if rename_exchange(&a, &b).unwrap() {
            assert!(b.join("f").exists() && !a.join("f").exists());
        }
        fs::remove_dir_all(&a).unwrap();
        rename_noreplace(&b, &a).unwrap();
        assert!(a.join("f").exists() && !b.exists());
    }
}
