//! Safetensors output written by position: the header fixes each tensor's byte range, so tensors
//! (and parts of tensors) can be written in any order, from several threads at once, each piece
//! with its own positioned write (`pwrite`) or in-kernel copy.
//!
//! Why (docs/BENCHMARKS.md, "Fast disk"): a merge used to compute a window of whole tensors into
//! buffers and hand them to a writer thread. By the time `write()` copied a window into the page
//! cache it had left the CPU caches, and on this machine that cold copy was most of a merge's
//! system time (`dd` of a cached 2.1 GB file: 5.4 s of system time in 32 MiB writes, 0.7 s in
//! 1 MiB ones). Writing each row block right after computing it, while it is still in the core's
//! cache, cut an SD1.5-size merge's system time from 3.5–3.9 s to 0.9–1.1 s (`cp`'s: 0.65 s).

use super::writer::{build_header, kernel_copy, read_exact_at, Writeback};
use super::{OutputFile, TensorSpec, WriteOptions};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct PlacedWriter {
    target: PathBuf,
    /// Taken by `finish`.
    out: Option<OutputFile>,
    specs: Vec<TensorSpec>,
    /// Byte range of each tensor in the file.
    ranges: Vec<Range<u64>>,
    len: u64,
    /// Data bytes written so far, from all threads: `finish` refuses a file with a piece missing.
    written: AtomicU64,
    /// Ends of the completed prefix, for the writeback thread (see [`PlacedWriter::written_up_to`]).
    writeback: Option<std::sync::mpsc::SyncSender<u64>>,
    writeback_thread: Option<std::thread::JoinHandle<()>>,
}

impl PlacedWriter {
    /// The output `target` with `specs` in this order; the header is written at once.
    pub fn create(
        target: &Path,
        metadata: &BTreeMap<String, String>,
        specs: Vec<TensorSpec>,
        opts: &WriteOptions,
    ) -> Result<PlacedWriter> {
        let header = build_header(metadata, &specs);
        let mut ranges = Vec::with_capacity(specs.len());
        let mut at = 8 + header.len() as u64;
        for s in &specs {
            let end = at + s.byte_len() as u64;
            ranges.push(at..end);
            at = end;
        }
        let out = OutputFile::create(target, opts)?;
        let mut head = (header.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&header);
        write_all_at(out.file(), &head, 0).map_err(|e| Error::io(target, e))?;
        // Early writeback runs on its own thread: waiting for the disk there keeps the computing
        // threads busy (on the calling thread it stalled a merge by 0.5 s of 1.3). One pending
        // step in the channel bounds how far the dirty data can run ahead of the disk.
        let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(1);
        let file = out.file().try_clone().map_err(|e| Error::io(target, e))?;
        let thread = std::thread::spawn(move || {
            let mut writeback = Writeback::default();
            for end in rx {
                writeback.advance(&file, end);
            }
        });
        Ok(PlacedWriter {
            target: target.to_path_buf(),
            out: Some(out),
            specs,
            ranges,
            len: at,
            written: AtomicU64::new(0),
            writeback: Some(tx),
            writeback_thread: Some(thread),
        })
    }

    fn file(&self) -> &File {
        self.out.as_ref().expect("writer is open").file()
    }

    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Tensor `i` copied from `len` bytes at `offset` of `src`, inside the kernel where it can.
    pub fn copy_tensor(&self, i: usize, src: &File, offset: u64, len: usize) -> Result<()> {
        let range = self.part(i, 0, len)?;
        let file = self.file();
        let io = |e| Error::io(&self.target, e);
        let copied = kernel_copy(src, offset, file, range.start, len).map_err(io)?;
        let mut buf = vec![0u8; (len - copied).min(8 << 20)];
        let mut done = copied;
        while done < len {
            let n = (len - done).min(buf.len());
            read_exact_at(src, &mut buf[..n], offset + done as u64).map_err(io)?;
            write_all_at(file, &buf[..n], range.start + done as u64).map_err(io)?;
            done += n;
        }
        self.written.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// `bytes` at byte `at` of tensor `i` (the whole tensor or a part of it).
    pub fn write_at(&self, i: usize, at: usize, bytes: &[u8]) -> Result<()> {
        let range = self.part(i, at, bytes.len())?;
        write_all_at(self.file(), bytes, range.start).map_err(|e| Error::io(&self.target, e))?;
        self.written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The file range of bytes `at..at + len` of tensor `i`, which must lie inside it.
    fn part(&self, i: usize, at: usize, len: usize) -> Result<Range<u64>> {
        let range = &self.ranges[i];
        let size = range.end - range.start;
        if (at + len) as u64 > size {
            return Err(Error::Invalid(format!(
                "{}: bytes {at}..{} written to tensor '{}' of {size} bytes",
                self.target.display(),
                at + len,
                self.specs[i].name,
            )));
        }
        Ok(range.start + at as u64..range.start + (at + len) as u64)
    }

    /// Every tensor before `tensors_end` is complete: their disk writes start (see
    /// [`Writeback`]). Blocks while the disk is more than a step behind.
    pub fn written_up_to(&mut self, tensors_end: usize) {
        if let (Some(last), Some(tx)) = (tensors_end.checked_sub(1), &self.writeback) {
            let _ = tx.send(self.ranges[last].end);
        }
    }

    fn stop_writeback(&mut self) {
        self.writeback.take();
        if let Some(t) = self.writeback_thread.take() {
            let _ = t.join();
        }
    }

    /// Puts the file in place ([`OutputFile::commit`]: fsynced first, never over an output that
    /// appeared meanwhile unless forced); returns the bytes written.
    pub fn finish(mut self) -> Result<u64> {
        self.stop_writeback();
        let data = self.len - self.ranges.first().map_or(self.len, |r| r.start);
        let written = self.written.load(Ordering::Relaxed);
        if written != data {
            return Err(Error::Invalid(format!(
                "{}: {written} of {data} data bytes were written",
                self.target.display()
            )));
        }
        self.out.take().expect("writer is open").commit()?;
        Ok(self.len)
    }
}

impl Drop for PlacedWriter {
    fn drop(&mut self) {
        self.stop_writeback();
    }
}

/// Consecutive tensors whose working memory (`costs`, in bytes) fits `budget`, at least one each,
/// as `(start, end)` index ranges: the windows a streaming writer works through, releasing the
/// input pages of each before the next.
pub struct Windows {
    budget: usize,
    next: usize,
    costs: Vec<usize>,
}

impl Windows {
    pub fn new(costs: Vec<usize>, budget: usize) -> Windows {
        Windows {
            budget: budget.max(1),
            next: 0,
            costs,
        }
    }
}

impl Iterator for Windows {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        let start = self.next;
        let mut end = start;
        let mut bytes = 0usize;
        while end < self.costs.len() {
            if end > start && bytes + self.costs[end] > self.budget {
                break;
            }
            bytes += self.costs[end];
            end += 1;
        }
        self.next = end;
        (end > start).then_some((start, end))
    }
}

#[cfg(unix)]
fn write_all_at(file: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, at)
}

#[cfg(windows)]
fn write_all_at(file: &File, mut bytes: &[u8], mut at: u64) -> std::io::Result<()> {
    // Positioned writes: several threads write pieces of the same file at once.
    while !bytes.is_empty() {
        match std::os::windows::fs::FileExt::seek_write(file, bytes, at)? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => {
                bytes = &bytes[n..];
                at += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::writer::write_all;
    use crate::tensors::Dtype;
    use rayon::prelude::*;

    fn specs() -> Vec<TensorSpec> {
        [("a", 1000usize), ("b", 3), ("c", 70_001)]
            .iter()
            .map(|(n, len)| TensorSpec {
                name: n.to_string(),
                dtype: Dtype::U8,
                shape: vec![*len],
            })
            .collect()
    }

    fn payload(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (k * 31 + i * 7) as u8).collect()
    }

    /// Pieces written in any order, from several threads, in-kernel copies included, give the
    /// very file the streaming writer writes; nothing is visible before `finish`.
    #[test]
    fn pieces_in_any_order_give_the_streamed_file() {
        let dir = tempfile::tempdir().unwrap();
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let tensors: Vec<(TensorSpec, Vec<u8>)> = specs()
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let b = payload(i, s.byte_len());
                (s, b)
            })
            .collect();
        let streamed = dir.path().join("streamed.safetensors");
        write_all(&streamed, &meta, &tensors, &WriteOptions::default()).unwrap();

        let src_path = dir.path().join("src.bin");
        std::fs::write(&src_path, [b"xyz".as_slice(), &tensors[0].1].concat()).unwrap();
        let src = File::open(&src_path).unwrap();
        let placed = dir.path().join("placed.safetensors");
        let mut w =
            PlacedWriter::create(&placed, &meta, specs(), &WriteOptions::default()).unwrap();
        // "c" in 4 KiB pieces, back to front, in parallel; then "b"; "a" copied from a file.
        let c = &tensors[2].1;
        let pieces: Vec<usize> = (0..c.len()).step_by(4096).rev().collect();
        pieces
            .par_iter()
            .try_for_each(|&at| w.write_at(2, at, &c[at..(at + 4096).min(c.len())]))
            .unwrap();
        w.write_at(1, 0, &tensors[1].1).unwrap();
        w.copy_tensor(0, &src, 3, 1000).unwrap();
        w.written_up_to(3);
        assert!(!placed.exists());
        assert_eq!(
            w.finish().unwrap(),
            std::fs::metadata(&streamed).unwrap().len()
        );
        assert_eq!(
            std::fs::read(&placed).unwrap(),
            std::fs::read(&streamed).unwrap()
        );
    }

    /// A piece past its tensor's end is refused; a file with a piece missing is never put in
    /// place.
    #[test]
    fn refuses_pieces_outside_a_tensor_and_incomplete_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.safetensors");
        let w = PlacedWriter::create(&out, &BTreeMap::new(), specs(), &WriteOptions::default())
            .unwrap();
        let e = w.write_at(1, 1, &[0; 3]).unwrap_err().to_string();
        assert!(
            e.contains("bytes 1..4 written to tensor 'b' of 3 bytes"),
            "{e}"
        );
        w.write_at(0, 0, &payload(0, 1000)).unwrap();
        w.write_at(1, 0, &[1, 2, 3]).unwrap();
        w.write_at(2, 0, &payload(2, 70_000)).unwrap(); // one byte short
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("71003 of 71004 data bytes were written"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Windows group consecutive tensors up to the budget; a tensor over it is a window alone,
    /// and free tensors (copies, cost 0) join their neighbours.
    #[test]
    fn windows_fill_up_to_the_budget() {
        let w: Vec<_> = Windows::new(vec![10, 0, 25, 40, 5, 5, 0, 30], 40).collect();
        assert_eq!(w, [(0, 3), (3, 4), (4, 8)]);
        assert_eq!(Windows::new(vec![], 40).count(), 0);
        assert_eq!(Windows::new(vec![0, 0], 0).collect::<Vec<_>>(), [(0, 2)]);
    }
}
