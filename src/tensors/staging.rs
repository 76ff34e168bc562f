//! Folder outputs (diffusers pipelines): assembled in a hidden staging folder beside the target
//! and moved into place only when complete, with the same guarantees as a file output: every file
//! and folder fsynced first, a new target made by a rename that does not replace, an existing one
//! (`--force`) swapped atomically with `renameat2(RENAME_EXCHANGE)` so that there is never a
//! moment with neither, and the staging folder removed on errors and signals.

use super::output_file::{placed_error, rename_exchange, rename_noreplace, sync_dir};
use super::unfinished::{self, Unfinished};
use super::writer::{check_output_folder, parent_dir, WriteOptions};
use crate::{Error, Result};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

pub(crate) struct StagingDir {
    target: PathBuf,
    temp: PathBuf,
    force: bool,
    /// Registered while the staging path holds something to remove: the new folder until it is
    /// moved into place, then (after an exchange) the old one.
    unfinished: Unfinished,
}

impl StagingDir {
    /// Checks that `target` may be written as a folder and creates the empty staging folder.
    pub(crate) fn create(target: &Path, opts: &WriteOptions) -> Result<StagingDir> {
        check_output_folder(target, opts)?;
        unfinished::remove_stale(&parent_dir(target));
        let (unfinished, temp, ()) = Unfinished::create_named(target, |p| fs::create_dir(p))
            .map_err(|e| Error::io(target, e))?;
        Ok(StagingDir {
            target: target.to_path_buf(),
            temp,
            force: opts.force,
            unfinished,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.temp
    }

    /// Fsyncs everything in the staging folder and moves it into place (see the module doc); the
    /// replaced folder's contents are removed afterwards.
    pub(crate) fn commit(self) -> Result<()> {
        let target = &self.target;
        sync_tree(&self.temp).map_err(|e| Error::io(&self.temp, e))?;
        self.unfinished
            .finish_with(|| {
                if self.force {
                    match rename_exchange(&self.temp, target) {
                        Ok(true) => return Ok(true), // the old folder is now at the staging path
                        Ok(false) if fs::symlink_metadata(target).is_ok() => {
                            return replace_without_exchange(&self.temp, target)
                        }
                        Ok(false) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {} // nothing to replace
                        Err(e) => return Err(e),
                    }
                }
                rename_noreplace(&self.temp, target).map(|()| false)
            })
            .map_err(|e| placed_error(target, e))?;
        drop(self.unfinished); // removes the old folder, when one was replaced
        let _ = sync_dir(&parent_dir(target));
        Ok(())
    }
}

/// Where folders cannot be swapped: the old one aside, the new one in, the old one to the staging
/// path (where it is removed). Runs under the cleanup lock, so a signal finds a complete folder
/// at the target; only SIGKILL or a power cut between the first two renames leaves none there.
fn replace_without_exchange(temp: &Path, target: &Path) -> io::Result<bool> {
    let aside = unfinished::temp_name(target);
    fs::rename(target, &aside)?;
    if let Err(e) = fs::rename(temp, target) {
        let _ = fs::rename(&aside, target);
        return Err(e);
    }
    fs::rename(&aside, temp)?;
    Ok(true)
}

/// Fsyncs every file and folder under `dir`, and `dir` itself.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Copies every file of the folder `from` into `to` (in the kernel where it can), except the
/// files in `skip`, which the caller writes itself.
pub(crate) fn copy_tree(from: &Path, to: &Path, skip: &[&Path]) -> Result<()> {
    let entries = fs::read_dir(from).map_err(|e| Error::io(from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        if src.is_dir() {
            // Not create_dir_all: after a signal removed the staging folder, nothing may make
            // it again.
            fs::create_dir(&dst).map_err(|e| Error::io(&dst, e))?;
            copy_tree(&src, &dst, skip)?;
        } else if !skip.contains(&src.as_path()) {
            fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(target: &Path, force: bool, content: &[u8]) -> Result<StagingDir> {
        let s = StagingDir::create(
            target,
            &WriteOptions {
                force,
                ..Default::default()
            },
        )?;
        fs::create_dir(s.path().join("unet")).unwrap();
        fs::write(s.path().join("unet/w.safetensors"), content).unwrap();
        Ok(s)
    }

    fn entries(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn new_replaced_and_raced_folders() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pipe");
        staged(&out, false, b"one").unwrap().commit().unwrap();
        assert_eq!(fs::read(out.join("unet/w.safetensors")).unwrap(), b"one");

        let e = staged(&out, false, b"x").err().unwrap();
        assert!(
            matches!(
                e,
                Error::OutputExists {
                    appeared: false,
                    ..
                }
            ),
            "{e}"
        );

        fs::write(out.join("stale-extra"), b"old").unwrap();
        staged(&out, true, b"two").unwrap().commit().unwrap();
        assert_eq!(fs::read(out.join("unet/w.safetensors")).unwrap(), b"two");
        assert!(
            !out.join("stale-extra").exists(),
            "the old folder is gone whole"
        );
        assert_eq!(entries(dir.path()), 1, "no staging or old folder left");

        // A folder made at the target during the run is not replaced without --force.
        let late = dir.path().join("late");
        let s = staged(&late, false, b"three").unwrap();
        fs::create_dir(&late).unwrap();
        let e = s.commit().unwrap_err();
        assert!(
            matches!(e, Error::OutputExists { appeared: true, .. }),
            "{e}"
        );
        assert_eq!(entries(&late), 0);
        assert_eq!(entries(dir.path()), 2);

        // Dropped unfinished: nothing left.
        let s = staged(&dir.path().join("never"), false, b"x").unwrap();
        drop(s);
        assert_eq!(entries(dir.path()), 2);
    }

    /// The path taken where folders cannot be swapped: the new folder at the target, the old one
    /// at the staging path (removed by the caller), nothing else left.
    #[test]
    fn replacing_without_exchange() {
        let dir = tempfile::tempdir().unwrap();
        let (temp, target) = (dir.path().join(".t.loratool-1-0.tmp"), dir.path().join("t"));
        fs::create_dir(&temp).unwrap();
        fs::write(temp.join("new"), b"").unwrap();
        fs::create_dir(&target).unwrap();
        fs::write(target.join("old"), b"").unwrap();
        assert!(replace_without_exchange(&temp, &target).unwrap());
        assert!(target.join("new").exists() && temp.join("old").exists());
        assert_eq!(entries(dir.path()), 2);
    }

    #[test]
    fn a_file_is_not_a_folder_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("file");
        fs::write(&out, b"x").unwrap();
        let e = staged(&out, true, b"x").err().unwrap().to_string();
        assert!(e.contains("is a file, not a folder"), "{e}");
    }
}
