//! Fetching and caching what the guest is made of, from Debian packages.
//!
//! ```text
//! target/guest/
//!   debs/             the .deb files (apt-get download; kept)
//!   current           the name of the complete kernel directory below
//!   <kernel>/         e.g. 6.1.0-57-amd64, complete once `current` names it
//!     vmlinux         the bzImage's xz payload, booted through PVH
//!     modules/*.ko    the virtio modules (.ko.xz unpacked)
//!     bin/busybox bin/fio
//!     libs/*          fio's shared libraries by soname, stripped
//!     interp/         the ELF interpreter, and interp.txt its path
//! ```
//!
//! When `current` names a complete directory nothing is asked of apt (not
//! even which kernel is newest): remove `target/guest/` to refresh.
//! Otherwise the kernel is the one `linux-image-amd64` depends on
//! (`apt-cache depends`); packages are fetched with `apt-get download` and
//! unpacked with `dpkg-deb -x` into a scratch directory, never installed.
//! When apt knows no packages (empty lists) and we run as root, `apt-get
//! update` runs first, as in `prereq.rs`.
//!
//! fio (bookworm: 3.33) is linked against librbd, libgfapi, libnbd,
//! libpmemblk...: the libraries come from the host where it has them (`ldd`
//! on the unpacked fio), and the packages that are missing on the host are
//! downloaded: fio's `Depends` (and theirs, recursively) whose names start
//! with `lib` and that `dpkg-query` does not list as installed. On this
//! machine kind that is libgfapi0, libgfrpc0, libgfxdr0, libglusterfs0,
//! libnbd0, libpmemblk1, librados2, librbd1, libboost-thread1.74.0 and
//! libfmt9 (19 MB of packages; librados' libceph-common lives in
//! `/usr/lib/x86_64-linux-gnu/ceph`). `ldd` must then resolve every
//! library, or this fails naming the missing ones.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::initramfs::MODULES;
use crate::cmd::Cmd;
use crate::prereq;
use crate::{Context, Error, Result, Workspace};

/// The metapackage whose dependency names the current kernel package.
const KERNEL_META: &str = "linux-image-amd64";

/// Everything the initramfs and the boot need, in the cache.
pub struct Pieces {
    pub kernel_release: String,
    pub vmlinux: PathBuf,
    pub busybox: PathBuf,
    pub fio: PathBuf,
    /// The virtio modules in load order ([`MODULES`]).
    pub modules: Vec<PathBuf>,
    /// fio's libraries: (soname, cached file).
    pub libs: Vec<(String, PathBuf)>,
    /// The ELF interpreter: (path in the guest, cached file).
    pub interp: (String, PathBuf),
}

/// The cached pieces, fetched and prepared first when missing.
pub fn ensure(ws: &Workspace) -> Result<Pieces> {
    let cache = ws.target_dir.join("guest");
    if let Ok(name) = fs::read_to_string(cache.join("current")) {
        let name = name.trim();
        if let Some(pieces) = cached(&cache.join(name), name)? {
            println!("    guest pieces: cached in {}", cache.join(name).display());
            return Ok(pieces);
        }
    }
    for tool in [
        "apt-get",
        "apt-cache",
        "dpkg-deb",
        "dpkg-query",
        "xz",
        "ldd",
    ] {
        if prereq::find_on_path(tool).is_none() {
            return Err(Error::msg(format!(
                "`cargo xtask guest` builds its guest from Debian packages and needs \
                 `{tool}` on PATH (apt, dpkg, xz-utils, libc-bin)"
            )));
        }
    }
    let release = kernel_release()?;
    let dir = cache.join(&release);
    if dir.exists() {
        fs::remove_dir_all(&dir).context(format!("removing {}", dir.display()))?;
    }
    let debs = cache.join("debs");
    let scratch = cache.join("scratch");
    // Left over from an interrupted run: start clean.
    let _ = fs::remove_dir_all(&scratch);
    let outcome = prepare(&debs, &scratch, &dir, &release);
    // Hundreds of MB of unpacked modules: only a few files were needed.
    let _ = fs::remove_dir_all(&scratch);
    outcome?;
    fs::write(cache.join("current"), format!("{release}\n")).context("writing the cache stamp")?;
    cached(&dir, &release)?.ok_or_else(|| {
        Error::msg(format!(
            "{} is incomplete after preparing it",
            dir.display()
        ))
    })
}

/// The pieces in `dir`, if it is complete.
fn cached(dir: &Path, release: &str) -> Result<Option<Pieces>> {
    let Ok(interp_path) = fs::read_to_string(dir.join("interp.txt")) else {
        return Ok(None);
    };
    let interp_path = interp_path.trim().to_owned();
    let interp_name = Path::new(&interp_path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut libs = Vec::new();
    let lib_dir = dir.join("libs");
    for entry in fs::read_dir(&lib_dir).context(format!("listing {}", lib_dir.display()))? {
        let entry = entry.context("listing the cached libraries")?;
        libs.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    libs.sort();
    let pieces = Pieces {
        kernel_release: release.to_owned(),
        vmlinux: dir.join("vmlinux"),
        busybox: dir.join("bin/busybox"),
        fio: dir.join("bin/fio"),
        modules: MODULES
            .iter()
            .map(|m| dir.join("modules").join(format!("{m}.ko")))
            .collect(),
        libs,
        interp: (interp_path, dir.join("interp").join(interp_name)),
    };
    let files = [
        &pieces.vmlinux,
        &pieces.busybox,
        &pieces.fio,
        &pieces.interp.1,
    ];
    let complete = files
        .into_iter()
        .chain(&pieces.modules)
        .all(|f| f.is_file());
    Ok(complete.then_some(pieces))
}

/// `6.1.0-57-amd64`: what `linux-image-amd64` depends on.
fn kernel_release() -> Result<String> {
    let ask = || -> Result<Option<String>> {
        let out = Cmd::new("apt-cache")
            .env("LC_ALL", "C")
            .args(["depends", KERNEL_META])
            .quiet()
            .output()?;
        Ok(out.stdout_text().lines().find_map(|line| {
            let name = line.trim().strip_prefix("Depends:")?.trim();
            name.strip_prefix("linux-image-").map(str::to_owned)
        }))
    };
    if let Some(release) = ask()? {
        return Ok(release);
    }
    if !prereq::running_as_root()? {
        return Err(Error::msg(format!(
            "apt knows no package `{KERNEL_META}` (empty package lists?); run \
             `sudo apt-get update` or rerun as root to let xtask do it"
        )));
    }
    apt_get().arg("update").run()?;
    ask()?.ok_or_else(|| {
        Error::msg(format!(
            "apt-cache depends {KERNEL_META} names no linux-image package, even after \
             apt-get update"
        ))
    })
}

fn apt_get() -> Cmd {
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C")
        // As root apt downloads as `_apt`, which cannot write to our cache
        // (a warning, and the download runs unsandboxed anyway).
        .args(["-o", "APT::Sandbox::User=root"])
}

fn prepare(debs: &Path, scratch: &Path, dir: &Path, release: &str) -> Result<()> {
    let kernel_package = format!("linux-image-{release}");
    let files = download(debs, &[&kernel_package, "busybox-static", "fio"])?;
    for deb in &files {
        unpack(deb, scratch)?;
    }
    for sub in ["bin", "modules", "libs", "interp"] {
        fs::create_dir_all(dir.join(sub)).context(format!("creating {}", dir.display()))?;
    }
    let vmlinuz = scratch.join(format!("boot/vmlinuz-{release}"));
    extract_vmlinux(&vmlinuz, &dir.join("vmlinux"), scratch)?;
    copy(&scratch.join("bin/busybox"), &dir.join("bin/busybox"))?;
    copy(&scratch.join("usr/bin/fio"), &dir.join("bin/fio"))?;
    let module_root = scratch.join(format!("lib/modules/{release}/kernel"));
    for module in MODULES {
        let found = find_module(&module_root, module)?;
        let to = dir.join("modules").join(format!("{module}.ko"));
        if found.extension().is_some_and(|e| e == "xz") {
            let out = Cmd::new("xz").arg("-dc").arg(&found).quiet().output()?;
            if !out.status.success() {
                return Err(Error::msg(format!("xz -dc {} failed", found.display())));
            }
            fs::write(&to, out.stdout).context(format!("writing {}", to.display()))?;
        } else {
            copy(&found, &to)?;
        }
    }
    fio_libraries(debs, scratch, dir)
}

/// `apt-get download`s the packages that are not in `debs` yet; returns
/// the .deb of each package.
fn download(debs: &Path, packages: &[&str]) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(debs).context(format!("creating {}", debs.display()))?;
    let find = |package: &str| -> Result<Option<PathBuf>> {
        let prefix = format!("{package}_");
        for entry in fs::read_dir(debs).context(format!("listing {}", debs.display()))? {
            let entry = entry.context("listing the .deb cache")?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".deb") {
                return Ok(Some(entry.path()));
            }
        }
        Ok(None)
    };
    let mut missing = Vec::new();
    for package in packages {
        if find(package)?.is_none() {
            missing.push(*package);
        }
    }
    if !missing.is_empty() {
        apt_get().arg("download").args(&missing).cwd(debs).run()?;
    }
    packages
        .iter()
        .map(|package| {
            find(package)?.ok_or_else(|| {
                Error::msg(format!(
                    "apt-get download left no {package}_*.deb in {}",
                    debs.display()
                ))
            })
        })
        .collect()
}

fn unpack(deb: &Path, into: &Path) -> Result<()> {
    Cmd::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(into)
        .quiet()
        .run()
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .context(format!("copying {} to {}", from.display(), to.display()))
}

/// `NAME.ko` or `NAME.ko.xz` somewhere under `root`.
fn find_module(root: &Path, name: &str) -> Result<PathBuf> {
    let wanted = [format!("{name}.ko"), format!("{name}.ko.xz")];
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).context(format!("listing {}", dir.display()))? {
            let entry = entry.context("listing kernel modules")?;
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if wanted.iter().any(|w| entry.file_name() == w.as_str()) {
                return Ok(path);
            }
        }
    }
    Err(Error::msg(format!(
        "module {name} is not in {} (is CONFIG_{} built in now? then drop it from the list)",
        root.display(),
        name.to_uppercase()
    )))
}

/// The xz magic that starts a bzImage's payload (Debian's kernels are xz).
const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0x00];

/// Decompresses the xz payload of a bzImage into an ELF vmlinux, which QEMU
/// boots through its PVH note (about 3.3 s to /init under TCG, against
/// 12.7 s for the bzImage).
fn extract_vmlinux(vmlinuz: &Path, to: &Path, scratch: &Path) -> Result<()> {
    let image = crate::tasks::read_file(vmlinuz)?;
    let at = image
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .ok_or_else(|| Error::msg(format!("no xz payload in {}", vmlinuz.display())))?;
    let payload = scratch.join("payload.xz");
    fs::write(&payload, &image[at..]).context("writing the kernel payload")?;
    // --single-stream: the payload is followed by the bzImage's trailer.
    let out = Cmd::new("xz")
        .args(["-dc", "--single-stream"])
        .arg(&payload)
        .quiet()
        .output()?;
    if !out.status.success() || !out.stdout.starts_with(b"\x7fELF") {
        return Err(Error::msg(format!(
            "xz could not unpack the payload of {} into an ELF file ({}){}",
            vmlinuz.display(),
            out.status,
            crate::cmd::indented(&out.stderr_text())
        )));
    }
    fs::write(to, out.stdout).context(format!("writing {}", to.display()))
}

/// Resolves fio's libraries (downloading the packages the host lacks) and
/// copies them, stripped, into `dir/libs`, the interpreter into
/// `dir/interp`.
fn fio_libraries(debs: &Path, scratch: &Path, dir: &Path) -> Result<()> {
    let fio = dir.join("bin/fio");
    let mut wanted = missing_lib_packages("fio")?;
    let lib_root = scratch.join("libroot");
    let mut done = BTreeSet::new();
    while !wanted.is_empty() {
        let batch: Vec<String> = wanted.difference(&done).cloned().collect();
        if batch.is_empty() {
            break;
        }
        let names: Vec<&str> = batch.iter().map(String::as_str).collect();
        println!("    fio needs packages the host lacks: {}", names.join(" "));
        for deb in download(debs, &names)? {
            unpack(&deb, &lib_root)?;
        }
        done.extend(batch.iter().cloned());
        for package in &batch {
            wanted.extend(missing_lib_packages(package)?);
        }
    }
    let search = library_dirs(&lib_root)?;
    let listing = Cmd::new("ldd")
        .arg(&fio)
        .env("LD_LIBRARY_PATH", search.join(":"))
        .quiet()
        .read()?;
    let (libs, interp) = parse_ldd(&listing);
    let missing: Vec<&str> = libs
        .iter()
        .filter(|(_, path)| path.is_none())
        .map(|(name, _)| name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(Error::msg(format!(
            "ldd finds no {} for fio, on the host or in the downloaded packages",
            missing.join(", ")
        )));
    }
    let interp = interp.ok_or_else(|| Error::msg("ldd shows no ELF interpreter for fio"))?;
    let strip = prereq::find_on_path("strip");
    if strip.is_none() {
        println!("    strip is not on PATH: fio's libraries go into the initramfs unstripped");
    }
    let interp_name = Path::new(&interp)
        .file_name()
        .ok_or_else(|| Error::msg(format!("odd interpreter path {interp}")))?;
    let interp_copy = dir.join("interp").join(interp_name);
    copy(Path::new(&interp), &interp_copy)?;
    let mut copies = Vec::new();
    for (name, path) in libs {
        let to = dir.join("libs").join(&name);
        copy(&path.unwrap_or_default(), &to)?;
        copies.push(to);
    }
    if strip.is_some() {
        Cmd::new("strip")
            .arg("--strip-unneeded")
            .args(&copies)
            .quiet()
            .run()?;
    }
    fs::write(dir.join("interp.txt"), format!("{interp}\n")).context("writing interp.txt")
}

/// The directories under `root` that hold shared libraries.
fn library_dirs(root: &Path) -> Result<Vec<String>> {
    let mut dirs = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue; // nothing downloaded: no directory
        };
        for entry in entries {
            let entry = entry.context("listing unpacked libraries")?;
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry.file_name().to_string_lossy().contains(".so") {
                dirs.insert(dir.display().to_string());
            }
        }
    }
    Ok(dirs.into_iter().collect())
}

/// `ldd` output: each `soname => path` (`None` for `not found`) and the
/// interpreter (the absolute path without `=>`). The vDSO is skipped.
fn parse_ldd(text: &str) -> (Vec<(String, Option<PathBuf>)>, Option<String>) {
    let mut libs = Vec::new();
    let mut interp = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some((name, rest)) = line.split_once(" => ") {
            let path = rest.split_whitespace().next().unwrap_or("");
            let path = (path.starts_with('/') || path.contains('/')).then(|| PathBuf::from(path));
            libs.push((name.to_owned(), path));
        } else if line.starts_with('/') {
            interp = line.split_whitespace().next().map(str::to_owned);
        }
    }
    (libs, interp)
}

/// The library packages (`lib*`) `package` depends on that are not
/// installed on the host (first alternative of each dependency).
fn missing_lib_packages(package: &str) -> Result<BTreeSet<String>> {
    let text = Cmd::new("apt-cache")
        .env("LC_ALL", "C")
        .args([
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
        ])
        .args(["--no-breaks", "--no-replaces", "--no-enhances", package])
        .quiet()
        .read()?;
    let mut missing = BTreeSet::new();
    for name in depends_first_alternatives(&text) {
        if name.starts_with("lib") && !installed(&name)? {
            missing.insert(name);
        }
    }
    Ok(missing)
}

/// The first alternative of each `Depends:`/`PreDepends:` line of
/// `apt-cache depends` output (a `|` marks a line with alternatives after
/// it); virtual packages (`<name>`) are skipped.
fn depends_first_alternatives(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut after_alternative = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let (alternative, rest) = match trimmed.strip_prefix('|') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let name = rest
            .strip_prefix("Depends:")
            .or_else(|| rest.strip_prefix("PreDepends:"))
            .map(str::trim);
        if let Some(name) = name {
            if !after_alternative && !name.starts_with('<') {
                names.push(name.to_owned());
            }
            after_alternative = alternative;
        }
    }
    names
}

fn installed(package: &str) -> Result<bool> {
    let out = Cmd::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .quiet()
        .output()?;
    Ok(out.status.success() && out.stdout_text().starts_with("ii"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f9b)\n\
                    \tlibrbd.so.1 => not found\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f9b50cd9000)\n";
        let (libs, interp) = parse_ldd(text);
        assert_eq!(
            libs,
            [
                (
                    "libz.so.1".to_owned(),
                    Some(PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"))
                ),
                ("librbd.so.1".to_owned(), None),
            ]
        );
        assert_eq!(interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
    }

    #[test]
    fn first_alternatives_only() {
        let text = "libgfapi0\n  Depends: libacl1\n |Depends: debconf\n  Depends: <debconf-2.0>\n\
                    \x20   cdebconf\n  PreDepends: libc6\n  Depends: <virtual>\n  Breaks: x\n";
        assert_eq!(
            depends_first_alternatives(text),
            ["libacl1", "debconf", "libc6"]
        );
    }
}
