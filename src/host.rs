//! Host support (feature `std`): resolving image names as file paths, and
//! convert's copy spread over threads.
//!
//! Backing names resolve as QEMU resolves them: an absolute name as is, a
//! relative one against the directory of the overlay that stores it.

// Copy workers report a `cmd::Failure`, which names the backing image at
// fault: its size is accepted as in `cmd`.
#![allow(clippy::result_large_err)]

use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use crate::cmd::{copy_range, Failure, Outcome};
use crate::device::FileDevice;
use crate::error::{fail, Error, ErrorKind, Result};
use crate::format::Format;
use crate::graph::{Graph, NameBuf, OpenOptions, Resolver};

/// Parts of a parallel copy start at multiples of this.
const PART_ALIGN: u64 = 2 << 20;
/// Bytes each copy worker moves per step.
const WORKER_SCRATCH: usize = 1 << 20;

/// Copies guest bytes `0..size` of `image` (a name and its format) to the
/// existing file `output` (which reads as zeros), leaving zeros unwritten
/// as `convert -S sparse` says ([`copy_range`]), with `workers` threads:
/// each opens the chain read-only in its own graph and copies one part
/// (split at 2 MiB boundaries) through its own scratch. The first failing part's error is
/// returned.
///
/// The caller holds `image` open while the workers run and `output` as
/// [`FileDevice::create`] made it. The workers open the chain with
/// force-share (the caller's open already keeps other writers out, and
/// nothing in this process writes it during the copy) and the output with
/// [`FileDevice::open_output`] (the writers share it).
pub fn copy_in_parallel<'a>(
    resolver: PathResolver,
    image: (&'a str, Format),
    (output, size, sparse): (&'a str, u64, u64),
    workers: usize,
) -> Outcome<'a> {
    let parts = split(size, workers.max(1));
    std::thread::scope(|scope| {
        let running: Vec<_> = parts
            .iter()
            .map(|part| {
                let part = part.clone();
                scope.spawn(move || copy_part(resolver, image, (output, sparse), part))
            })
            .collect();
        let mut result = Ok(());
        for worker in running {
            let outcome = worker.join().unwrap_or_else(|_| {
                Err(Failure::new(
                    Error::new(ErrorKind::Io, "a copy worker stopped unexpectedly"),
                    output,
                ))
            });
            result = result.and(outcome);
        }
        result
    })
}

/// `0..size` in `workers` parts of about equal length, aligned.
fn split(size: u64, workers: usize) -> Vec<Range<u64>> {
    let share = size.div_ceil(workers as u64).next_multiple_of(PART_ALIGN);
    (0..workers as u64)
        .map(|i| (i * share).min(size)..((i + 1) * share).min(size))
        .filter(|part| !part.is_empty())
        .collect()
}

fn copy_part<'a>(
    mut resolver: PathResolver,
    (image, format): (&'a str, Format),
    (output, sparse): (&'a str, u64),
    part: Range<u64>,
) -> Outcome<'a> {
    let mut graph: Box<Graph<FileDevice>> = Box::default();
    let options = OpenOptions {
        force_share: true,
        ..OpenOptions::new(format)
    };
    let top = graph
        .open_image(&mut resolver, image, options)
        .map_err(|e| Failure::new(e, image))?;
    let mut target =
        FileDevice::open_output(Path::new(output)).map_err(|e| Failure::new(e, output))?;
    let mut scratch = vec![0u8; WORKER_SCRATCH];
    copy_range(
        &mut graph,
        top,
        part,
        (&mut target, output),
        (&mut scratch, sparse),
    )
}

/// Resolves image names as host paths and opens them as [`FileDevice`]s.
#[derive(Clone, Copy, Debug, Default)]
pub struct PathResolver {
    /// When set, files opened for writing may not grow past this many bytes
    /// (they behave like a fixed-size disk: writes beyond fail with
    /// [`ErrorKind::NoSpace`]).
    pub max_file_size: Option<u64>,
    /// Cache mode `none`: files are opened with
    /// [`FileDevice::open_direct`] (`O_DIRECT` for aligned transfers).
    pub direct: bool,
}

impl PathResolver {
    fn open_file(&self, path: &str, writable: bool) -> Result<FileDevice> {
        let mut device = if self.direct {
            FileDevice::open_direct(Path::new(path), writable)?
        } else {
            FileDevice::open(Path::new(path), writable)?
        };
        if let (true, Some(max)) = (writable, self.max_file_size) {
            device.limit_size(max);
        }
        Ok(device)
    }
}

/// QEMU's `path_combine`: `reference` relative to the directory of `overlay`.
fn combine(overlay: &str, reference: &str) -> String {
    if reference.starts_with('/') {
        return reference.to_owned();
    }
    match overlay.rfind('/') {
        Some(slash) => format!("{}{}", &overlay[..=slash], reference),
        None => reference.to_owned(),
    }
}

fn store(name: &str, out: &mut NameBuf) -> Result<()> {
    out.clear();
    if out.push_str(name).is_err() {
        return fail(ErrorKind::InvalidInput, "image path is too long");
    }
    Ok(())
}

/// The path of `target` relative to directory `from` (both absolute and
/// canonical).
fn relative_path(from: &Path, target: &Path) -> PathBuf {
    let from: Vec<Component<'_>> = from.components().collect();
    let to: Vec<Component<'_>> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to[common..] {
        path.push(part.as_os_str());
    }
    path
}

/// The file path an image name stands for, as QEMU reads names: a leading
/// `file:` is the file protocol and is stripped; any other `PROTOCOL:`
/// before the first `/` (`nbd:`, `json:`, `http://`...) names another
/// driver, which this crate does not have.
fn file_path(name: &str) -> Result<&str> {
    if let Some(path) = name.strip_prefix("file:") {
        return Ok(path);
    }
    let before_slash = name.split('/').next().unwrap_or_default();
    if before_slash.contains(':') {
        return fail(
            ErrorKind::Unsupported,
            "unsupported protocol in image name (only file: and plain paths)",
        );
    }
    Ok(name)
}

impl Resolver<FileDevice> for PathResolver {
    fn open(&mut self, name: &str, writable: bool) -> Result<FileDevice> {
        self.open_file(file_path(name)?, writable)
    }

    fn open_backing(
        &mut self,
        overlay: &str,
        reference: &str,
        writable: bool,
        resolved: &mut NameBuf,
    ) -> Result<FileDevice> {
        self.resolve_backing(overlay, reference, resolved)?;
        self.open_file(resolved, writable)
    }

    fn resolve_backing(&mut self, overlay: &str, reference: &str, out: &mut NameBuf) -> Result<()> {
        store(&combine(file_path(overlay)?, file_path(reference)?), out)
    }

    fn reference(&mut self, overlay: &str, target: &str, out: &mut NameBuf) -> Result<()> {
        if target.starts_with('/') {
            return store(target, out);
        }
        let overlay_dir = Path::new(overlay)
            .parent()
            .filter(|p| !p.as_os_str().is_empty());
        let overlay_dir = overlay_dir.unwrap_or(Path::new("."));
        let (Ok(dir), Ok(target)) = (overlay_dir.canonicalize(), Path::new(target).canonicalize())
        else {
            return fail(ErrorKind::NotFound, "cannot resolve the base image's path");
        };
        let relative = relative_path(&dir, &target);
        match relative.to_str() {
            Some(name) => store(name, out),
            None => fail(ErrorKind::InvalidInput, "base image path is not UTF-8"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_range_at_aligned_starts() {
        assert_eq!(split(10 << 20, 2), vec![0..6 << 20, 6 << 20..10 << 20]);
        assert_eq!(split(1000, 4), vec![0..1000]);
        assert_eq!(split(0, 2), Vec::<Range<u64>>::new());
        let parts = split((1 << 30) + 512, 3);
        assert_eq!(parts.first().map(|p| p.start), Some(0));
        assert_eq!(parts.last().map(|p| p.end), Some((1 << 30) + 512));
        assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
    }

    #[test]
    fn file_protocol_is_stripped_and_others_refused() {
        assert_eq!(file_path("file:a.qcow2"), Ok("a.qcow2"));
        assert_eq!(file_path("file:/abs/a:b"), Ok("/abs/a:b"));
        assert_eq!(file_path("dir/a:b.qcow2"), Ok("dir/a:b.qcow2"));
        for name in ["json:{}", "nbd:unix:/s", "http://h/x", "nbd+unix:///e"] {
            let err = file_path(name).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unsupported, "{name}");
        }
    }

    #[test]
    fn combines_like_qemu() {
        assert_eq!(combine("a.qcow2", "b.qcow2"), "b.qcow2");
        assert_eq!(combine("dir2/dir3/top", "../mid"), "dir2/dir3/../mid");
        assert_eq!(combine("dir/top", "/abs/base"), "/abs/base");
    }

    #[test]
    fn relative_paths_climb_and_descend() {
        let rel = relative_path(Path::new("/x/dir2/dir3"), Path::new("/x/dir1/base"));
        assert_eq!(rel, PathBuf::from("../../dir1/base"));
        let rel = relative_path(Path::new("/x"), Path::new("/x/base"));
        assert_eq!(rel, PathBuf::from("base"));
    }
}
