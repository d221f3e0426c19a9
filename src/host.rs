//! Host support (feature `std`): resolving image names as file paths.
//!
//! Backing names resolve as QEMU resolves them: an absolute name as is, a
//! relative one against the directory of the overlay that stores it.

use std::path::{Component, Path, PathBuf};

use crate::device::FileDevice;
use crate::error::{fail, ErrorKind, Result};
use crate::graph::{NameBuf, Resolver};

/// Resolves image names as host paths and opens them as [`FileDevice`]s.
#[derive(Clone, Copy, Debug, Default)]
pub struct PathResolver {
    /// When set, files opened for writing may not grow past this many bytes
    /// (they behave like a fixed-size disk: writes beyond fail with
    /// [`ErrorKind::NoSpace`]).
    pub max_file_size: Option<u64>,
}

impl PathResolver {
    fn open_file(&self, path: &str, writable: bool) -> Result<FileDevice> {
        let mut device = FileDevice::open(Path::new(path), writable)?;
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

impl Resolver<FileDevice> for PathResolver {
    fn open(&mut self, name: &str, writable: bool) -> Result<FileDevice> {
        self.open_file(name, writable)
    }

    fn open_backing(
        &mut self,
        overlay: &str,
        reference: &str,
        writable: bool,
        resolved: &mut NameBuf,
    ) -> Result<FileDevice> {
        if reference.starts_with("json:") || reference.contains("://") {
            return fail(ErrorKind::Unsupported, "unsupported backing file protocol");
        }
        let path = combine(overlay, reference);
        store(&path, resolved)?;
        self.open_file(&path, writable)
            .map_err(|err| match err.kind() {
                ErrorKind::NotFound => {
                    crate::Error::new(ErrorKind::NotFound, "backing file not found")
                }
                _ => err,
            })
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
