//! File hashes that A1111, kohya and Civitai use to identify a model (definitions in
//! shared/reference/fetch_apis.md §2): the one place they are computed.

use super::writer::hex;
use crate::{Error, Result};
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileHashes {
    /// sha256 of the whole file, lowercase hex.
    pub sha256: String,
    /// First 10 hex of sha256, uppercase (Civitai AutoV2, A1111 checkpoint short hash).
    pub autov2: String,
    /// sha256 of the bytes after the 8+N safetensors header: kohya `sshs_model_hash`, A1111
    /// addnet hash. `None` for files that are not safetensors.
    pub addnet: Option<String>,
    /// First 12 hex of `addnet`, uppercase (Civitai AutoV3).
    pub autov3: Option<String>,
}

/// Computes every hash in one read of the file. `data_start` is 8+N for safetensors files.
/// A file mostly in the page cache is hashed from its mapping, read sequentially with read-ahead
/// (`MADV_SEQUENTIAL`, `MADV_WILLNEED` on the next chunk), each chunk's pages released once hashed
/// (`MADV_DONTNEED`); a cold one is read with `O_DIRECT` on a reader thread while the previous
/// chunk is hashed. Either way resident memory stays at a few chunks whatever the file size.
pub fn hash_file(path: &Path, data_start: Option<u64>) -> Result<FileHashes> {
    hash_file_reporting(path, data_start, &|_| {})
}

/// [`hash_file`], calling `hashed` with the byte count of each chunk as it is done (for a progress
/// bar that moves inside a multi-gigabyte file).
pub fn hash_file_reporting(
    path: &Path,
    data_start: Option<u64>,
    hashed: &(dyn Fn(u64) + Sync),
) -> Result<FileHashes> {
    let (full, addnet) = digest_file(path, data_start, true, hashed)?;
    let full = full.expect("whole-file digest requested");
    Ok(FileHashes {
        autov2: full[..10].to_uppercase(),
        autov3: addnet.as_ref().map(|h| h[..12].to_uppercase()),
        sha256: full,
        addnet,
    })
}

/// Civitai's AutoV3 of a safetensors file (the first 12 hex of the data-section sha256, upper
/// case) alone: one sequential pass on the calling thread, for commands that record their inputs
/// while other threads compute.
pub fn autov3(path: &Path, data_start: u64) -> Result<String> {
    let (_, data) = digest_file(path, Some(data_start), false, &|_| {})?;
    let data = data.ok_or_else(|| Error::bad_file(path, "shorter than its safetensors header"))?;
    Ok(data[..12].to_uppercase())
}

/// sha256 of the whole file (when `whole`) and of the bytes from `data_start` on, as hex.
fn digest_file(
    path: &Path,
    data_start: Option<u64>,
    whole: bool,
    hashed: &(dyn Fn(u64) + Sync),
) -> Result<(Option<String>, Option<String>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        let h = hash_bytes(&[], data_start);
        return Ok((whole.then_some(h.sha256), h.addnet));
    }
    // SAFETY: read-only map of an input file, never written by loratool.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    // A file that is not in the page cache streams from disk with direct I/O on a reader thread
    // while this thread hashes: the read and the hashing overlap, and no CPU goes into filling
    // and evicting page-cache pages. A cached file is hashed from its mapping (no copy at all).
    #[cfg(target_os = "linux")]
    if resident_fraction(&map) < 0.5 {
        if let Some(digests) = direct::digest(path, len, data_start, whole, hashed)? {
            return Ok(digests);
        }
    }
    #[cfg(unix)]
    let _ = map.advise(memmap2::Advice::Sequential);
    let mut digests = Digests::new(whole, data_start.filter(|s| *s <= len));
    const CHUNK: usize = 64 << 20;
    // Read-ahead: the kernel is asked for the next chunk while this one is hashed, so a cold file
    // streams from disk during the hashing instead of faulting page by page.
    #[cfg(unix)]
    let will_need = |at: usize| {
        if at < map.len() {
            let _ = map.advise_range(memmap2::Advice::WillNeed, at, CHUNK.min(map.len() - at));
        }
    };
    #[cfg(unix)]
    will_need(0);
    let mut at = 0;
    while at < map.len() {
        let end = (at + CHUNK).min(map.len());
        #[cfg(unix)]
        will_need(end);
        digests.update(&map[at..end], at as u64);
        #[cfg(unix)]
        // SAFETY: read-only shared file mapping; dropped pages are re-read from the file if touched.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, end - at) };
        hashed((end - at) as u64);
        at = end;
    }
    Ok(digests.finish())
}

/// The whole-file and the data-section sha256 of one pass over a file's chunks.
struct Digests {
    full: Option<Sha256>,
    data: Option<Sha256>,
    data_start: u64,
}

impl Digests {
    fn new(whole: bool, data_start: Option<u64>) -> Digests {
        Digests {
            full: whole.then(Sha256::new),
            data: data_start.map(|_| Sha256::new()),
            data_start: data_start.unwrap_or(0),
        }
    }

    /// Feeds `chunk`, which starts at file offset `at`. The two digests run as a `rayon::join`:
    /// on an idle pool they take two cores; when the scan already hashes one file per core, the
    /// worker runs both itself and an idle worker steals the second half.
    fn update(&mut self, chunk: &[u8], at: u64) {
        let end = at + chunk.len() as u64;
        let part = &chunk[(self.data_start.clamp(at, end) - at) as usize..];
        let data = &mut self.data;
        let mut hash_data = move || {
            if let Some(h) = data.as_mut() {
                h.update(part);
            }
        };
        match self.full.as_mut() {
            Some(f) => {
                rayon::join(|| f.update(chunk), hash_data);
            }
            None => hash_data(),
        }
    }

    fn finish(self) -> (Option<String>, Option<String>) {
        (
            self.full.map(|h| hex(&h.finalize())),
            self.data.map(|h| hex(&h.finalize())),
        )
    }
}

/// The share of a mapping's pages that are in the page cache (`mincore`).
#[cfg(target_os = "linux")]
fn resident_fraction(map: &Mmap) -> f64 {
    let page = 4096usize;
    let pages = map.len().div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: the mapping's start is page-aligned and `vec` has one byte per page of its length.
    let r = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            vec.as_mut_ptr(),
        )
    };
    if r != 0 || pages == 0 {
        return 1.0;
    }
    vec.iter().filter(|b| *b & 1 == 1).count() as f64 / pages as f64
}

#[cfg(target_os = "linux")]
mod direct {
    //! Reading a cold file with `O_DIRECT` into aligned buffers on a thread of its own, while the
    //! caller hashes the previous buffer.

    use super::Digests;
    use crate::{Error, Result};
    use std::alloc::{alloc, dealloc, Layout};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::path::Path;
    use std::sync::mpsc;

    /// Large reads keep the disk's queue busy; three buffers let one be read while one is hashed.
    const CHUNK: usize = 16 << 20;
    const BUFFERS: usize = 3;
    const ALIGN: usize = 4096;

    struct AlignedBuf {
        ptr: *mut u8,
    }

    // SAFETY: the buffer is owned by one thread at a time (moved through channels).
    unsafe impl Send for AlignedBuf {}

    impl AlignedBuf {
        fn new() -> Option<AlignedBuf> {
            // SAFETY: non-zero size, power-of-two alignment.
            let ptr = unsafe { alloc(Layout::from_size_align(CHUNK, ALIGN).ok()?) };
            (!ptr.is_null()).then_some(AlignedBuf { ptr })
        }
        fn slice(&self) -> &[u8] {
            // SAFETY: CHUNK bytes allocated; reads fill the prefix that is used.
            unsafe { std::slice::from_raw_parts(self.ptr, CHUNK) }
        }
        fn slice_mut(&mut self) -> &mut [u8] {
            // SAFETY: as above, exclusively owned.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, CHUNK) }
        }
    }

    impl Drop for AlignedBuf {
        fn drop(&mut self) {
            if let Ok(layout) = Layout::from_size_align(CHUNK, ALIGN) {
                // SAFETY: allocated with this layout in `new`.
                unsafe { dealloc(self.ptr, layout) }
            }
        }
    }

    /// The digests, or `None` when the file system does not take `O_DIRECT` (tmpfs, some FUSE):
    /// the caller then reads the mapping.
    pub(super) fn digest(
        path: &Path,
        len: u64,
        data_start: Option<u64>,
        whole: bool,
        hashed: &(dyn Fn(u64) + Sync),
    ) -> Result<Option<(Option<String>, Option<String>)>> {
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        else {
            return Ok(None);
        };
        let buffers: Vec<AlignedBuf> = (0..BUFFERS).filter_map(|_| AlignedBuf::new()).collect();
        if buffers.len() < 2 {
            return Ok(None);
        }
        let mut digests = Digests::new(whole, data_start.filter(|s| *s <= len));
        let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
        let (full_tx, full_rx) =
            mpsc::sync_channel::<std::io::Result<(AlignedBuf, u64, usize)>>(BUFFERS);
        for b in buffers {
            let _ = free_tx.send(b);
        }
        let mut first_error = None;
        std::thread::scope(|scope| {
            let free_tx = free_tx;
            let file = &file;
            scope.spawn(move || {
                let mut at = 0u64;
                while at < len {
                    let Ok(mut buf) = free_rx.recv() else { return };
                    let want = CHUNK.min((len - at) as usize).next_multiple_of(ALIGN);
                    let mut got = 0usize;
                    let outcome = loop {
                        match file.read_at(&mut buf.slice_mut()[got..want], at + got as u64) {
                            Ok(0) => break Ok(()),
                            Ok(n) => {
                                got += n;
                                if got == want || at + got as u64 >= len {
                                    break Ok(());
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => break Err(e),
                        }
                    };
                    let used = got.min((len - at) as usize);
                    let stop = outcome.is_err() || used == 0;
                    if full_tx.send(outcome.map(|_| (buf, at, used))).is_err() || stop {
                        return;
                    }
                    at += used as u64;
                }
            });
            let mut expected = 0u64;
            while expected < len {
                match full_rx.recv() {
                    Ok(Ok((buf, at, used))) if used > 0 && at == expected => {
                        digests.update(&buf.slice()[..used], at);
                        expected = at + used as u64;
                        let _ = free_tx.send(buf);
                        hashed(used as u64);
                    }
                    Ok(Ok(_)) => {
                        first_error = Some(Error::bad_file(
                            path,
                            "the file got shorter while it was read",
                        ));
                        break;
                    }
                    Ok(Err(e)) => {
                        first_error = Some(Error::io(path, e));
                        break;
                    }
                    Err(_) => {
                        first_error = Some(Error::bad_file(path, "reading stopped early"));
                        break;
                    }
                }
            }
            // Unblock the reader on an early stop, wherever it waits.
            drop(full_rx);
            drop(free_tx);
        });
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(Some(digests.finish()))
    }
}

/// The same hashes of bytes in memory.
pub fn hash_bytes(bytes: &[u8], data_start: Option<u64>) -> FileHashes {
    let data = data_start
        .map(|s| s as usize)
        .filter(|s| *s <= bytes.len())
        .map(|s| &bytes[s..]);
    let (full, addnet) = rayon::join(|| sha256_hex(bytes), || data.map(sha256_hex));
    FileHashes {
        autov2: full[..10].to_uppercase(),
        autov3: addnet.as_ref().map(|h| h[..12].to_uppercase()),
        sha256: full,
        addnet,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct-I/O path (taken for files not in the page cache) against the in-memory hashes,
    /// over several chunks with the data section starting mid-chunk and a tail that is not a
    /// multiple of the alignment.
    #[cfg(target_os = "linux")]
    #[test]
    fn direct_reads_hash_like_memory() {
        let len = 2 * (16 << 20) + 12345;
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("big.bin");
        std::fs::write(&path, &bytes).unwrap();
        let want = hash_bytes(&bytes, Some(1_000_003));
        match direct::digest(&path, len as u64, Some(1_000_003), true, &|_| {}).unwrap() {
            Some((full, data)) => {
                assert_eq!(full.as_deref(), Some(want.sha256.as_str()));
                assert_eq!(data, want.addnet);
            }
            None => eprintln!("SKIPPED: this file system refuses O_DIRECT"),
        }
        let (_, data) = direct::digest(&path, len as u64, Some(len as u64), false, &|_| {})
            .unwrap()
            .unwrap_or((None, hash_bytes(&[], Some(0)).addnet));
        assert_eq!(data, hash_bytes(&[], Some(0)).addnet);
    }

    #[test]
    fn hello_world_vector() {
        let h = hash_bytes(b"hello world", None);
        assert_eq!(
            h.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(h.autov2, "B94D27B993");
        assert_eq!(h.addnet, None);
    }

    #[test]
    fn minimal_safetensors_vector() {
        let hexstr = "60000000000000007b225f5f6d657461646174615f5f223a7b2273735f6e6574776f726b5f64696d223a2234227d2c2277223a7b226474797065223a22463332222c227368617065223a5b325d2c22646174615f6f666673657473223a5b302c385d7d7d202020200000803f00000040";
        let bytes: Vec<u8> = (0..hexstr.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hexstr[i..i + 2], 16).unwrap())
            .collect();
        let h = hash_bytes(&bytes, Some(8 + 0x60));
        assert_eq!(h.autov2, "2FD6C9020F");
        assert_eq!(
            h.addnet.as_deref(),
            Some("b9c80b5adeca450753a16950c3cc655d271f7bef7a485bc83f112b72fef21d37")
        );
        assert_eq!(h.autov3.as_deref(), Some("B9C80B5ADECA"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(hash_file(&path, Some(8 + 0x60)).unwrap(), h);
        assert_eq!(autov3(&path, 8 + 0x60).unwrap(), "B9C80B5ADECA");
    }
}
