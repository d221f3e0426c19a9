//! A lab: one directory of disk images that qemu-img/qemu-io build, the
//! kernel works on under QEMU, and qemu-img/qemu-io check afterwards.
//!
//! The boot tests and the demo share it. Everything runs with the lab's
//! directory as the working directory, so images are named by their file
//! names and backing references are relative, as the kernel resolves them
//! (by the last path component: the disk's serial).
//!
//! ```text
//!  build     create / write (qemu-img, qemu-io), pad (a virtio disk
//!            cannot grow: a file the kernel writes gets room first)
//!  boot      the kernel with a script, the files as disks (and perhaps
//!            a vhost-user-blk disk a server in the lab exports)
//!  verify    check (qemu-img check), same_view (qemu-img compare and the
//!            virtual sizes), view_fnv (FNV-1a 64 of `convert -O raw`,
//!            what the kernel's `checksum` prints), chain (qemu-img info
//!            --backing-chain), unchanged (file bytes)
//! ```

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::qemu::{self, Boot, BootResult, Disk, Machine};
use crate::cmd::{indented, Cmd};
use crate::{json, Context, Error, Result};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// No single qemu-img/qemu-io command may take longer than this.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Ranges of a guest view that hold one byte value each, later ranges
/// winning; everything else reads as zeros.
pub type Layout = [(u64, u64, u8)];

/// The view a layout describes, as maximal runs of one byte covering
/// `0..size` (zero runs included).
pub fn runs(layout: &Layout, size: u64) -> Vec<(u64, u64, u8)> {
    let mut edges: Vec<u64> = layout
        .iter()
        .flat_map(|&(start, len, _)| [start, start + len])
        .chain([0, size])
        .filter(|&edge| edge <= size)
        .collect();
    edges.sort_unstable();
    edges.dedup();
    let byte_at = |offset: u64| {
        layout
            .iter()
            .rev()
            .find(|(start, len, _)| (*start..start + len).contains(&offset))
            .map_or(0, |&(_, _, byte)| byte)
    };
    let mut out: Vec<(u64, u64, u8)> = Vec::new();
    for pair in edges.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        let byte = byte_at(start);
        match out.last_mut() {
            Some(last) if last.2 == byte && last.0 + last.1 == start => last.1 += end - start,
            _ => out.push((start, end - start, byte)),
        }
    }
    out
}

/// qemu-io `read -P` commands that verify every byte of `0..size` against
/// `layout`.
pub fn pattern_reads(layout: &Layout, size: u64) -> Vec<String> {
    runs(layout, size)
        .into_iter()
        .map(|(start, len, byte)| format!("read -P {byte:#04x} {start} {len}"))
        .collect()
}

/// `io [-r] IMAGE -c "CMD" ...` for a kernel script.
pub fn io_command(image: &str, read_only: bool, commands: &[String]) -> String {
    let mut line = format!("io{} {image}", if read_only { " -r" } else { "" });
    for command in commands {
        line.push_str(&format!(" -c \"{command}\""));
    }
    line
}

/// FNV-1a 64 of a reader's bytes, and how many there were: the kernel's
/// `checksum`.
pub fn fnv1a64(mut reader: impl Read) -> io::Result<(u64, u64)> {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut size = 0u64;
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        for &byte in &buf[..n] {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        size += n as u64;
    }
    Ok((hash, size))
}

/// The `checksum NAME: HASH (SIZE bytes)` lines of a kernel transcript.
pub fn checksums(serial: &str) -> Vec<(String, u64, u64)> {
    serial
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("checksum ")?;
            let (name, rest) = rest.split_once(": ")?;
            let (hash, rest) = rest.split_once(" (")?;
            let size = rest.strip_suffix(" bytes)")?;
            Some((
                name.to_owned(),
                u64::from_str_radix(hash, 16).ok()?,
                size.parse().ok()?,
            ))
        })
        .collect()
}

/// One image of a backing chain, as `qemu-img info --backing-chain` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The file name (without directories).
    pub name: String,
    /// The backing reference as stored in the image.
    pub backing: Option<String>,
    pub backing_format: Option<String>,
    pub virtual_size: u64,
}

/// A chain as `top -> next -> base` (file names).
pub fn chain_text(chain: &[Layer]) -> String {
    chain
        .iter()
        .map(|layer| layer.name.as_str())
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// Saved file contents, to prove later that the files were not written.
pub struct Saved(Vec<(String, Vec<u8>)>);

/// A directory of images and the kernel that boots on them.
pub struct Lab {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub machine: Machine,
    /// One boot may take this long.
    pub timeout: Duration,
    /// Show the kernel's serial output live.
    pub live: bool,
}

impl Lab {
    /// A lab over the images in `dir` as they are, for image tools only
    /// (nothing boots: no kernel).
    pub fn images(dir: PathBuf) -> Lab {
        Lab {
            dir,
            kernel: PathBuf::new(),
            machine: Machine::Microvm,
            timeout: Duration::from_secs(60),
            live: false,
        }
    }

    /// A lab in `dir`, emptied first.
    pub fn fresh(dir: PathBuf, kernel: &Path, machine: Machine) -> Result<Lab> {
        if dir.exists() {
            fs::remove_dir_all(&dir).context(format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).context(format!("creating {}", dir.display()))?;
        Ok(Lab {
            dir,
            kernel: kernel.to_owned(),
            machine,
            timeout: Duration::from_secs(30),
            live: false,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn tool(&self, program: &str) -> Cmd {
        Cmd::new(program)
            .cwd(&self.dir)
            .timeout(TOOL_TIMEOUT)
            .quiet()
    }

    /// `qemu-img ARGS`, which must exit with 0; returns its stdout.
    pub fn qemu_img(&self, args: &[&str]) -> Result<String> {
        self.tool("qemu-img").args(args).read()
    }

    /// `qemu-io -f qcow2 -c CMD... IMAGE`, which must exit with 0 and report
    /// no failed pattern check.
    pub fn qemu_io<S: AsRef<str>>(&self, image: &str, commands: &[S]) -> Result<String> {
        let mut cmd = self.tool("qemu-io").args(["-f", "qcow2"]);
        for command in commands {
            cmd = cmd.args(["-c", command.as_ref()]);
        }
        let cmd = cmd.arg(image);
        let out = cmd.output()?;
        let text = out.stdout_text() + &out.stderr_text();
        if !out.status.success() || text.contains("verification failed") {
            return Err(Error::msg(format!(
                "`{cmd}` failed ({}){}",
                out.status,
                indented(&text)
            )));
        }
        Ok(text)
    }

    /// A new qcow2 image of `size` (qemu-img syntax), on `backing` (a
    /// qcow2 file name) if given, with `-o OPTIONS` if given, then written
    /// by qemu-io with `writes`.
    pub fn create(
        &self,
        name: &str,
        size: &str,
        backing: Option<&str>,
        options: Option<&str>,
        writes: &[&str],
    ) -> Result<()> {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if let Some(backing) = backing {
            args.extend(["-b", backing, "-F", "qcow2"]);
        }
        if let Some(options) = options {
            args.extend(["-o", options]);
        }
        args.extend([name, size]);
        self.qemu_img(&args)?;
        if !writes.is_empty() {
            self.qemu_io(name, writes)?;
        }
        Ok(())
    }

    /// Grows the file to `size` bytes (zeros; no-op when it is larger), so
    /// that the image can grow on a virtio disk, which cannot.
    pub fn pad(&self, name: &str, size: u64) -> Result<()> {
        let len = self.file_len(name)?;
        if len < size {
            self.set_len(name, size)?;
        }
        Ok(())
    }

    /// Grows the file by `extra` bytes of zeros.
    pub fn pad_by(&self, name: &str, extra: u64) -> Result<()> {
        let len = self.file_len(name)?;
        self.set_len(name, len + extra)
    }

    fn set_len(&self, name: &str, size: u64) -> Result<()> {
        let path = self.path(name);
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .context(format!("opening {}", path.display()))?;
        file.set_len(size)
            .context(format!("padding {}", path.display()))
    }

    pub fn file_len(&self, name: &str) -> Result<u64> {
        let path = self.path(name);
        Ok(fs::metadata(&path)
            .context(format!("stat {}", path.display()))?
            .len())
    }

    /// Copies a file within the lab.
    pub fn copy(&self, from: &str, to: &str) -> Result<()> {
        fs::copy(self.path(from), self.path(to))
            .map(drop)
            .context(format!("copying {from} to {to} in {}", self.dir.display()))
    }

    /// Copies a chain (`names` base first) to `PREFIX-NAME` files whose
    /// backing references name the copies (`qemu-img rebase -u`); returns
    /// the copies' names, base first.
    pub fn copy_chain(&self, names: &[&str], prefix: &str) -> Result<Vec<String>> {
        let mut copies: Vec<String> = Vec::new();
        for name in names {
            let copy = format!("{prefix}-{name}");
            self.copy(name, &copy)?;
            if let Some(below) = copies.last() {
                self.qemu_img(&["rebase", "-u", "-b", below, "-F", "qcow2", &copy])?;
            }
            copies.push(copy);
        }
        Ok(copies)
    }

    /// The contents of `names` now.
    pub fn save(&self, names: &[&str]) -> Result<Saved> {
        let mut files = Vec::new();
        for name in names {
            let path = self.path(name);
            let bytes = super::read_file(&path)?;
            files.push(((*name).to_owned(), bytes));
        }
        Ok(Saved(files))
    }

    /// Fails unless every saved file still holds the same bytes.
    pub fn unchanged(&self, saved: &Saved) -> Result<()> {
        for (name, before) in &saved.0 {
            let path = self.path(name);
            let now = super::read_file(&path)?;
            if now.len() != before.len() {
                return Err(Error::msg(format!(
                    "{name} was modified: {} bytes, was {}",
                    now.len(),
                    before.len()
                )));
            }
            if let Some(at) = now.iter().zip(before).position(|(a, b)| a != b) {
                return Err(Error::msg(format!(
                    "{name} was modified: first difference at byte {at:#x}"
                )));
            }
        }
        Ok(())
    }

    /// A disk for [`Lab::boot`]: writable (`ro` false) or read-only.
    pub fn disk(&self, name: &str, read_only: bool) -> Disk {
        Disk {
            path: self.path(name),
            read_only,
            format: None,
            queue_size: None,
        }
    }

    /// Boots the kernel on the lab's machine with `disks` and `script`.
    pub fn boot(&self, disks: Vec<Disk>, script: &str) -> Result<BootResult> {
        self.run(&self.prepare(disks, script))
    }

    /// The boot [`Lab::boot`] makes, to amend before [`Lab::run`] (a
    /// vhost-user disk, a smaller ring).
    pub fn prepare(&self, disks: Vec<Disk>, script: &str) -> Boot {
        let mut boot = Boot::new(self.machine);
        boot.disks = disks;
        boot.cmdline = script.to_owned();
        boot.timeout = self.timeout;
        boot.live = self.live;
        boot
    }

    /// Boots the kernel as `boot` says; the transcript is appended to the
    /// lab's `boots.log`.
    pub fn run(&self, boot: &Boot) -> Result<BootResult> {
        let result = qemu::boot(&self.kernel, boot)?;
        // Kept for a look afterwards: every boot's transcript, appended.
        let log = self.path("boots.log");
        let entry = format!(
            "=== {} {:?}\n{}{}--- {}\n\n",
            self.machine,
            boot.cmdline,
            result.serial,
            result.stderr,
            result.verdict()
        );
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut file| io::Write::write_all(&mut file, entry.as_bytes()))
            .context(format!("writing {}", log.display()))?;
        Ok(result)
    }

    /// `qemu-img check IMAGE`'s exit status (0 clean, 2 corrupt, 3 leaks)
    /// and output.
    pub fn check_status(&self, image: &str) -> Result<(i32, String)> {
        let out = self
            .tool("qemu-img")
            .args(["check", "-f", "qcow2", image])
            .output()?;
        let code = out.status.code().unwrap_or(-1);
        Ok((code, out.stdout_text() + &out.stderr_text()))
    }

    /// `qemu-img check` must find nothing (exit status 0) on each image.
    pub fn check(&self, images: &[&str]) -> Result<()> {
        for image in images {
            let (code, text) = self.check_status(image)?;
            if code != 0 {
                return Err(Error::msg(format!(
                    "qemu-img check {image} exited with {code}{}",
                    indented(&text)
                )));
            }
        }
        Ok(())
    }

    /// The two images show the same guest view: `qemu-img compare` finds
    /// them identical and their virtual sizes are equal. A `.raw` name is a
    /// raw image, anything else qcow2.
    pub fn same_view(&self, a: &str, b: &str) -> Result<()> {
        let format = |name: &str| {
            if name.ends_with(".raw") {
                "raw"
            } else {
                "qcow2"
            }
        };
        let out = self
            .tool("qemu-img")
            .args(["compare", "-f", format(a), "-F", format(b), a, b])
            .output()?;
        match out.status.code() {
            Some(0) => {}
            Some(1) => {
                return Err(Error::msg(format!(
                    "{a} and {b} differ: {}",
                    out.stdout_text().trim()
                )))
            }
            _ => {
                return Err(Error::msg(format!(
                    "qemu-img compare {a} {b} failed ({}){}",
                    out.status,
                    indented(&(out.stdout_text() + &out.stderr_text()))
                )))
            }
        }
        let size = |name: &str| -> Result<u64> {
            if name.ends_with(".raw") {
                self.file_len(name)
            } else {
                Ok(self.chain(name)?[0].virtual_size)
            }
        };
        let (size_a, size_b) = (size(a)?, size(b)?);
        if size_a != size_b {
            return Err(Error::msg(format!(
                "{a} is {size_a} bytes and {b} {size_b} bytes (virtual sizes)"
            )));
        }
        Ok(())
    }

    /// FNV-1a 64 and size of the guest view, through `qemu-img convert -O
    /// raw` (the raw file is kept as `NAME.view.raw`).
    pub fn view_fnv(&self, image: &str) -> Result<(u64, u64)> {
        let raw = format!("{image}.view.raw");
        self.qemu_img(&["convert", "-O", "raw", image, &raw])?;
        let path = self.path(&raw);
        let file = File::open(&path).context(format!("opening {}", path.display()))?;
        fnv1a64(file).context(format!("reading {}", path.display()))
    }

    /// The kernel printed `checksum NAME: ...` (the last such line counts)
    /// and it equals the FNV-1a 64 of `host_image`'s view computed here.
    pub fn expect_checksum(&self, serial: &str, name: &str, host_image: &str) -> Result<u64> {
        let (_, hash, size) = checksums(serial)
            .into_iter()
            .rev()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| {
                Error::msg(format!("no `checksum {name}:` line in the kernel's output"))
            })?;
        let (want, want_size) = self.view_fnv(host_image)?;
        if (hash, size) != (want, want_size) {
            return Err(Error::msg(format!(
                "the kernel's checksum of {name} is {hash:016x} ({size} bytes), the host's of \
                 {host_image} {want:016x} ({want_size} bytes)"
            )));
        }
        Ok(hash)
    }

    /// `qemu-img info --backing-chain --output=json IMAGE`, top first.
    pub fn chain(&self, image: &str) -> Result<Vec<Layer>> {
        let text = self.qemu_img(&["info", "--backing-chain", "--output=json", image])?;
        let value =
            json::parse(&text).map_err(|err| Error::msg(format!("qemu-img info: {err}")))?;
        let images = value
            .as_array()
            .ok_or_else(|| Error::msg("qemu-img info did not print a JSON array"))?;
        images
            .iter()
            .map(|image| {
                let text = |key: &str| image.get(key).and_then(json::Value::as_str);
                let name = text("filename")
                    .map(|path| {
                        Path::new(path)
                            .file_name()
                            .and_then(|name| name.to_str())
                            .unwrap_or(path)
                            .to_owned()
                    })
                    .ok_or_else(|| Error::msg("qemu-img info: an image without a filename"))?;
                let virtual_size = match image.get("virtual-size") {
                    Some(json::Value::Number(n)) => *n as u64,
                    _ => {
                        return Err(Error::msg(format!(
                            "qemu-img info: no virtual-size in {}",
                            json::render(image)
                        )))
                    }
                };
                Ok(Layer {
                    name,
                    backing: text("backing-filename").map(str::to_owned),
                    backing_format: text("backing-filename-format").map(str::to_owned),
                    virtual_size,
                })
            })
            .collect()
    }

    /// The chain of `image` is exactly `names` (top first), each image
    /// naming the next by its bare file name with format qcow2.
    pub fn expect_chain(&self, image: &str, names: &[&str]) -> Result<Vec<Layer>> {
        let chain = self.chain(image)?;
        let got: Vec<&str> = chain.iter().map(|layer| layer.name.as_str()).collect();
        if got != names {
            return Err(Error::msg(format!(
                "the chain of {image} is {}, expected {}",
                got.join(" -> "),
                names.join(" -> ")
            )));
        }
        for (layer, below) in chain.iter().zip(names.iter().skip(1)) {
            if layer.backing.as_deref() != Some(*below)
                || layer.backing_format.as_deref() != Some("qcow2")
            {
                return Err(Error::msg(format!(
                    "{} names its backing file {:?} (format {:?}); expected {below:?} (qcow2)",
                    layer.name, layer.backing, layer.backing_format
                )));
            }
        }
        if let Some(last) = chain.last() {
            if last.backing.is_some() {
                return Err(Error::msg(format!(
                    "{} still names a backing file {:?}",
                    last.name, last.backing
                )));
            }
        }
        Ok(chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_the_view_and_merge_equal_neighbours() {
        let layout = [(0, 10, 1), (5, 10, 2), (15, 5, 2), (30, 5, 0)];
        assert_eq!(runs(&layout, 40), [(0, 5, 1), (5, 15, 2), (20, 20, 0)]);
        assert_eq!(runs(&[], 8), [(0, 8, 0)]);
        assert_eq!(runs(&[(4, 100, 7)], 8), [(0, 4, 0), (4, 4, 7)]);
        assert_eq!(
            pattern_reads(&[(4, 4, 0x11)], 8),
            ["read -P 0x00 0 4", "read -P 0x11 4 4"]
        );
    }

    #[test]
    fn fnv_matches_the_reference_values() {
        // The FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(&b""[..]).unwrap(), (0xcbf2_9ce4_8422_2325, 0));
        assert_eq!(fnv1a64(&b"a"[..]).unwrap(), (0xaf63_dc4c_8601_ec8c, 1));
        assert_eq!(fnv1a64(&b"foobar"[..]).unwrap(), (0x8594_4171_f739_67e8, 6));
    }

    #[test]
    fn checksum_lines_are_parsed() {
        let serial = "> checksum a.qcow2\nchecksum a.qcow2: 00000000000000ff (512 bytes)\n\
                      checksum b: zz (1 bytes)\n";
        assert_eq!(checksums(serial), [("a.qcow2".to_owned(), 0xff, 512)]);
    }

    #[test]
    fn io_commands_quote_each_command() {
        let line = io_command("t.qcow2", true, &["read -P 0x11 0 4k".to_owned()]);
        assert_eq!(line, "io -r t.qcow2 -c \"read -P 0x11 0 4k\"");
    }
}
