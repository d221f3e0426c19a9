//! `cargo xtask qemu`: build the x86_64 kernel and boot it under QEMU.
//!
//! ```text
//! cargo xtask qemu [--machine microvm|q35] [--disk PATH]... [--disk-ro PATH]...
//!                  [--release|--debug] [--accel tcg|kvm] [--timeout SECS]
//!                  [-- SCRIPT...]
//! ```
//!
//! Each disk file becomes a virtio-blk device whose serial is the file's
//! name (at most 20 bytes, the size of a virtio-blk serial), in the order
//! given, so the kernel's `disk N` is the Nth disk and images are known by
//! their file names. `SCRIPT` (the words after `--`, joined by spaces) is the
//! kernel's command line (`-append`). Serial output is shown live; QEMU is
//! killed after the timeout (default 60 s) or when xtask stops.
//!
//! The kernel ends the run through isa-debug-exit: QEMU exits with
//! [`KERNEL_SUCCESS`] (33) or [`KERNEL_FAILURE`] (35). Only 33 counts as
//! success: 0 is what QEMU returns after a triple fault with `-no-reboot`.
//!
//! Facts this relies on (checked with QEMU 10.0.2):
//!
//! - microvm's virtio-mmio transports default to the legacy interface
//!   (`force-legacy=true`); `-global virtio-mmio.force-legacy=false` gives
//!   virtio 1.0, which is used here (virtio-drivers handles both).
//! - q35 boots through qboot (`-bios qboot.rom`) when QEMU ships it: qboot
//!   leaves ECAM on at 0xB000_0000 and the BARs unassigned, which the kernel
//!   assigns. Without it SeaBIOS runs (slower).
//! - microvm's firmware overwrites `hvm_start_info` with a command line of
//!   4128 bytes or more: scripts there are limited to 4 KiB (q35: 16 KiB,
//!   the kernel's buffer).
//! - The PVH note must sit in a 4-byte aligned note segment: with 8, QEMU
//!   refuses the kernel ("Error loading uncompressed kernel without PVH ELF
//!   Note").
//! - KVM on this kind of machine (nested) costs about 3 s per boot just to
//!   set the VM up, TCG boots and runs the self-check in under 0.2 s; so TCG
//!   is the default and `--accel kvm` asks for `-accel kvm -accel tcg`.
//!
//! A boot may also take a disk served by a vhost-user-blk backend
//! ([`VhostUser`], e.g. `blockgraph serve`): the guest's RAM is then a
//! shared memfd of the same [`MEMORY`] (`-object
//! memory-backend-memfd,...,share=on`, `-machine ...,memory-backend=mem`;
//! the backend maps it to reach the rings and buffers), the socket a
//! `-chardev`, and the device `vhost-user-blk-pci` on q35 or
//! `vhost-user-blk` on microvm (its virtio-mmio bus takes the plain virtio
//! device; `vhost-user-blk-pci` there fails: microvm has no PCI bus).
//!
//! [`Boot`] and [`boot`] are the reusable part: boot tests build a [`Boot`],
//! call [`boot`] and get the exit status and the captured serial output.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use crate::cmd::{indented, Cmd};
use crate::prereq::{self, BARE_METAL_TARGET};
use crate::{Error, Result, Workspace};

/// QEMU's exit status when the kernel reports success (0x10 written to
/// isa-debug-exit: `(0x10 << 1) | 1`).
pub const KERNEL_SUCCESS: i32 = 33;
/// QEMU's exit status when the kernel reports failure (0x11 written).
pub const KERNEL_FAILURE: i32 = 35;

/// The kernel crate and its binary.
const KERNEL_PACKAGE: &str = "blockgraph-kernel";

/// Longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_MAX: usize = 20;

/// Longest kernel command line: the kernel's buffer
/// (`targets/x86_64-qemu/src/start_info.rs`, `CMDLINE_CAPACITY`).
pub const CMDLINE_MAX: usize = 16 * 1024;

/// Longest command line on microvm: its firmware (qboot) puts the command
/// line in front of `hvm_start_info`, and with QEMU 10.0.2 a line of 4128
/// bytes or more overwrites the structure (the kernel then sees a bad magic).
pub const MICROVM_CMDLINE_MAX: usize = 4096;

/// The guest's RAM (`-m`, and the memfd's size with a vhost-user disk): the
/// kernel needs about 4 MiB (`targets/x86_64-qemu/README.md`, "Memory") and
/// identity-maps the first 4 GiB, so any size up to 3 GiB works.
pub const MEMORY: &str = "128M";

/// The default limit on one boot.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A QEMU x86_64 machine type the kernel supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// `-machine microvm`: virtio-mmio.
    Microvm,
    /// `-machine q35`: virtio-pci.
    Q35,
}

impl Machine {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "microvm" => Ok(Machine::Microvm),
            "q35" => Ok(Machine::Q35),
            _ => Err(Error::msg(format!(
                "unknown machine `{name}` (expected microvm or q35)"
            ))),
        }
    }

    fn virtio_blk_device(self) -> &'static str {
        match self {
            Machine::Microvm => "virtio-blk-device",
            Machine::Q35 => "virtio-blk-pci",
        }
    }

    fn vhost_user_blk_device(self) -> &'static str {
        match self {
            Machine::Microvm => "vhost-user-blk",
            Machine::Q35 => "vhost-user-blk-pci",
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Machine::Microvm => "microvm",
            Machine::Q35 => "q35",
        })
    }
}

/// How QEMU runs the guest CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// `-accel tcg`: emulation; the fastest for short boots here.
    Tcg,
    /// `-accel kvm -accel tcg`: KVM when available, else emulation.
    Kvm,
}

impl Accel {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            _ => Err(Error::msg(format!(
                "unknown accelerator `{name}` (expected tcg or kvm)"
            ))),
        }
    }
}

/// A disk file for the guest.
#[derive(Clone, Debug)]
pub struct Disk {
    pub path: PathBuf,
    /// Attach with `readonly=on`: the guest sees a read-only disk.
    pub read_only: bool,
    /// The image format the kernel is told the disk has (`qcow2` or `raw`;
    /// `--disk PATH,format=FMT`): the script starts with `image-format
    /// SERIAL FMT`, so commands that name no format never probe it.
    pub format: Option<String>,
    /// The descriptors of the disk's virtio-blk ring QEMU offers
    /// (`queue-size=`); `None`: QEMU's default (256).
    pub queue_size: Option<u16>,
}

impl Disk {
    /// A disk attached as `--disk PATH[,format=FMT]` (or `--disk-ro`) says.
    ///
    /// # Errors
    /// A format other than qcow2 or raw.
    pub fn from_option(value: &str, read_only: bool) -> Result<Self> {
        let (path, format) = match value.rsplit_once(",format=") {
            Some((path, format @ ("qcow2" | "raw"))) => (path, Some(format.to_owned())),
            Some((_, other)) => {
                return Err(Error::msg(format!(
                    "`{value}`: unknown disk format `{other}` (qcow2 or raw)"
                )))
            }
            None => (value, None),
        };
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
            format,
            queue_size: None,
        })
    }

    /// The virtio serial the kernel will know the disk by: its file name.
    ///
    /// # Errors
    /// When the file name is missing, not UTF-8 or longer than
    /// [`SERIAL_MAX`] bytes.
    pub fn serial(&self) -> Result<&str> {
        let name = self.path.file_name().ok_or_else(|| {
            Error::msg(format!("disk `{}` has no file name", self.path.display()))
        })?;
        let name = name.to_str().ok_or_else(|| {
            Error::msg(format!(
                "disk `{}`: the file name is not UTF-8",
                self.path.display()
            ))
        })?;
        if name.len() > SERIAL_MAX {
            return Err(Error::msg(format!(
                "disk `{}`: the file name `{name}` is {} bytes long, but it becomes the \
                 disk's virtio serial, which holds at most {SERIAL_MAX} bytes; rename or \
                 link the file to a shorter name",
                self.path.display(),
                name.len()
            )));
        }
        Ok(name)
    }
}

/// A disk whose requests a vhost-user-blk backend serves over a unix
/// socket (`blockgraph serve IMAGE --vhost-user-blk SOCKET`), after the
/// file disks.
#[derive(Clone, Debug)]
pub struct VhostUser {
    /// The backend's socket, which must exist (the backend listens).
    pub socket: PathBuf,
    /// The serial the backend answers GET_ID with (`blockgraph serve`:
    /// the image's file stem), by which the kernel knows the disk.
    pub serial: String,
    /// The format the kernel is told the disk has, as [`Disk::format`]:
    /// the backend exports the chain's guest view, a raw disk.
    pub format: Option<String>,
}

/// Which cargo profile builds the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

/// One boot of the kernel.
#[derive(Clone, Debug)]
pub struct Boot {
    pub machine: Machine,
    pub accel: Accel,
    pub disks: Vec<Disk>,
    /// A disk served over vhost-user-blk, after `disks`.
    pub vhost_user: Option<VhostUser>,
    /// The kernel command line (`-append`).
    pub cmdline: String,
    pub timeout: Duration,
    /// Show serial output (and QEMU's stderr) live while capturing it.
    pub live: bool,
}

impl Boot {
    /// A boot on `machine` with TCG, no disks, an empty command line and the
    /// default timeout, output captured silently.
    pub fn new(machine: Machine) -> Self {
        Boot {
            machine,
            accel: Accel::Tcg,
            disks: Vec::new(),
            vhost_user: None,
            cmdline: String::new(),
            timeout: DEFAULT_TIMEOUT,
            live: false,
        }
    }

    /// The kernel command line: `image-format SERIAL FMT; ` for each disk
    /// with a format, then [`Boot::cmdline`].
    ///
    /// # Errors
    /// A disk whose file name cannot be its serial.
    pub fn script(&self) -> Result<String> {
        let mut script = String::new();
        for disk in &self.disks {
            if let Some(format) = &disk.format {
                script.push_str(&format!("image-format {} {format}; ", disk.serial()?));
            }
        }
        if let Some(VhostUser {
            serial,
            format: Some(format),
            ..
        }) = &self.vhost_user
        {
            script.push_str(&format!("image-format {serial} {format}; "));
        }
        script.push_str(&self.cmdline);
        Ok(script)
    }
}

/// How a boot ended.
#[derive(Debug)]
pub struct BootResult {
    /// QEMU's exit status; `None` when it was killed at the timeout.
    pub status: Option<ExitStatus>,
    /// Everything the kernel wrote to its serial console (`\r\n` as `\n`).
    pub serial: String,
    /// QEMU's own messages.
    pub stderr: String,
    pub elapsed: Duration,
}

impl BootResult {
    /// Whether the kernel reported success through isa-debug-exit.
    pub fn succeeded(&self) -> bool {
        self.code() == Some(KERNEL_SUCCESS)
    }

    fn code(&self) -> Option<i32> {
        self.status.and_then(|status| status.code())
    }

    /// One line on how the boot ended.
    pub fn verdict(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        match (self.status, self.code()) {
            (None, _) => format!("timed out after {secs:.1} s; QEMU was killed"),
            (_, Some(KERNEL_SUCCESS)) => {
                format!(
                    "kernel reported success (QEMU exit status {KERNEL_SUCCESS}) after {secs:.2} s"
                )
            }
            (_, Some(KERNEL_FAILURE)) => {
                format!(
                    "kernel reported failure (QEMU exit status {KERNEL_FAILURE}) after {secs:.2} s"
                )
            }
            (_, Some(0)) => format!(
                "QEMU exited with status 0 after {secs:.2} s: the kernel never reported \
                 (a triple fault under -no-reboot ends QEMU that way)"
            ),
            (Some(status), _) => format!("QEMU failed ({status}) after {secs:.2} s"),
        }
    }
}

/// Builds the kernel and returns the path of its ELF file.
pub fn build_kernel(ws: &Workspace, profile: Profile) -> Result<PathBuf> {
    let mut cargo = ws
        .cargo()
        .args(["build", "-p", KERNEL_PACKAGE, "--target", BARE_METAL_TARGET]);
    if profile == Profile::Release {
        cargo = cargo.arg("--release");
    }
    cargo.run()?;
    let dir = match profile {
        Profile::Release => "release",
        Profile::Debug => "debug",
    };
    let kernel = ws
        .target_dir
        .join(BARE_METAL_TARGET)
        .join(dir)
        .join(KERNEL_PACKAGE);
    if !kernel.is_file() {
        return Err(Error::msg(format!(
            "cargo built the kernel but {} does not exist",
            kernel.display()
        )));
    }
    Ok(kernel)
}

/// QEMU's option syntax: a comma inside a value is written twice.
fn option_value(text: &str) -> String {
    text.replace(',', ",,")
}

/// qboot, if this QEMU ships it (`-L help` lists its data directories).
fn find_qboot() -> Option<PathBuf> {
    let dirs = Cmd::new("qemu-system-x86_64")
        .args(["-L", "help"])
        .quiet()
        .read()
        .ok()?;
    dirs.lines()
        .map(|dir| Path::new(dir.trim()).join("qboot.rom"))
        .find(|rom| rom.is_file())
}

/// The QEMU command line for `boot` of `kernel`.
///
/// # Errors
/// A command line too long for the machine, a disk whose file name cannot be
/// its serial, two disks with one serial, or a disk file that does not exist.
pub fn qemu_command(kernel: &Path, boot: &Boot) -> Result<Cmd> {
    let max = match boot.machine {
        Machine::Microvm => MICROVM_CMDLINE_MAX,
        Machine::Q35 => CMDLINE_MAX,
    };
    let script = boot.script()?;
    if script.len() > max {
        return Err(Error::msg(format!(
            "the script is {} bytes long; the kernel command line on {} holds at most {max}{}",
            script.len(),
            boot.machine,
            if boot.machine == Machine::Microvm {
                " (q35 takes up to 16 KiB)"
            } else {
                ""
            }
        )));
    }
    let mut machine = boot.machine.to_string();
    if boot.vhost_user.is_some() {
        machine.push_str(",memory-backend=mem");
    }
    let mut cmd = Cmd::new("qemu-system-x86_64")
        .arg("-machine")
        .arg(machine)
        .args(["-m", MEMORY, "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    cmd = match boot.accel {
        Accel::Tcg => cmd.args(["-accel", "tcg"]),
        Accel::Kvm => cmd.args(["-accel", "kvm", "-accel", "tcg"]),
    };
    match boot.machine {
        Machine::Microvm => cmd = cmd.args(["-global", "virtio-mmio.force-legacy=false"]),
        Machine::Q35 => {
            if let Some(qboot) = find_qboot() {
                cmd = cmd.arg("-bios").arg(qboot);
            }
        }
    }
    cmd = cmd.arg("-kernel").arg(kernel).arg("-append").arg(&script);
    let mut serials: Vec<&str> = Vec::new();
    for (index, disk) in boot.disks.iter().enumerate() {
        let serial = disk.serial()?;
        if serials.contains(&serial) {
            return Err(Error::msg(format!(
                "two disks are named `{serial}`: the kernel tells disks apart by file name"
            )));
        }
        serials.push(serial);
        if !disk.path.is_file() {
            return Err(Error::msg(format!(
                "disk `{}` is not a file",
                disk.path.display()
            )));
        }
        let path = disk.path.to_str().ok_or_else(|| {
            Error::msg(format!("disk path `{}` is not UTF-8", disk.path.display()))
        })?;
        let readonly = if disk.read_only { ",readonly=on" } else { "" };
        let queue_size = disk
            .queue_size
            .map_or(String::new(), |size| format!(",queue-size={size}"));
        cmd = cmd
            .arg("-drive")
            .arg(format!(
                "file={},if=none,format=raw,id=d{index}{readonly}",
                option_value(path)
            ))
            .arg("-device")
            .arg(format!(
                "{},drive=d{index},serial={}{queue_size}",
                boot.machine.virtio_blk_device(),
                option_value(serial)
            ));
    }
    if let Some(vhost) = &boot.vhost_user {
        if serials.contains(&vhost.serial.as_str()) {
            return Err(Error::msg(format!(
                "a disk file and the vhost-user disk are both named `{}`",
                vhost.serial
            )));
        }
        let socket = vhost.socket.to_str().ok_or_else(|| {
            Error::msg(format!(
                "socket path `{}` is not UTF-8",
                vhost.socket.display()
            ))
        })?;
        cmd = cmd
            .arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={MEMORY},share=on"
            ))
            .arg("-chardev")
            .arg(format!("socket,id=vhost0,path={}", option_value(socket)))
            .arg("-device")
            .arg(format!(
                "{},chardev=vhost0",
                boot.machine.vhost_user_blk_device()
            ));
    }
    Ok(cmd.timeout(boot.timeout))
}

/// Boots `kernel` as `boot` says and waits for QEMU to exit (or kills it at
/// the timeout; it is killed as well if this thread unwinds).
///
/// # Errors
/// Only when QEMU cannot be started or the command line cannot be built;
/// how the kernel fared is in the [`BootResult`].
pub fn boot(kernel: &Path, boot: &Boot) -> Result<BootResult> {
    let mut cmd = qemu_command(kernel, boot)?;
    if boot.live {
        cmd = cmd.tee();
    } else {
        cmd = cmd.quiet();
    }
    let done = cmd.output_within_timeout()?;
    Ok(BootResult {
        status: done.status,
        serial: String::from_utf8_lossy(&done.stdout).replace("\r\n", "\n"),
        stderr: String::from_utf8_lossy(&done.stderr).into_owned(),
        elapsed: done.elapsed,
    })
}

const USAGE: &str = "\
usage: cargo xtask qemu [--machine microvm|q35] [--disk PATH[,format=FMT]]...
                        [--disk-ro PATH[,format=FMT]]...
                        [--release|--debug] [--accel tcg|kvm] [--timeout SECS]
                        [-- SCRIPT...]";

/// The options of `cargo xtask qemu`.
#[derive(Debug)]
struct Options {
    boot: Boot,
    profile: Profile,
}

fn parse(args: &[OsString]) -> Result<Options> {
    let mut boot = Boot::new(Machine::Microvm);
    boot.live = true;
    let mut profile = Profile::Release;
    let mut rest = args.iter();
    let value = |flag: &str, rest: &mut std::slice::Iter<'_, OsString>| {
        rest.next()
            .map(OsString::from)
            .ok_or_else(|| Error::msg(format!("`{flag}` needs a value\n{USAGE}")))
    };
    while let Some(arg) = rest.next() {
        let text = arg.to_str().unwrap_or("");
        match text {
            "--" => {
                let words: Vec<String> = rest
                    .by_ref()
                    .map(|w| w.to_string_lossy().into_owned())
                    .collect();
                boot.cmdline = words.join(" ");
            }
            "--machine" => {
                boot.machine = Machine::parse(&value(text, &mut rest)?.to_string_lossy())?
            }
            "--accel" => boot.accel = Accel::parse(&value(text, &mut rest)?.to_string_lossy())?,
            "--disk" | "--disk-ro" => {
                let path = value(text, &mut rest)?;
                let path = path.to_str().ok_or_else(|| {
                    Error::msg(format!("disk `{}` is not UTF-8", path.to_string_lossy()))
                })?;
                boot.disks
                    .push(Disk::from_option(path, text == "--disk-ro")?);
            }
            "--release" => profile = Profile::Release,
            "--debug" => profile = Profile::Debug,
            "--timeout" => {
                let secs = value(text, &mut rest)?;
                let secs: f64 = secs
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| {
                        Error::msg(format!(
                            "`--timeout` wants a positive number of seconds, not `{}`",
                            secs.to_string_lossy()
                        ))
                    })?;
                boot.timeout = Duration::from_secs_f64(secs);
            }
            _ => {
                return Err(Error::msg(format!(
                "`qemu`: unexpected argument `{}` (the kernel's script goes after `--`)\n{USAGE}",
                arg.to_string_lossy()
            )))
            }
        }
    }
    Ok(Options { boot, profile })
}

/// `cargo xtask qemu ...`: fails unless the kernel reports success.
pub fn run(ws: &Workspace, args: &[OsString]) -> Result<()> {
    let options = parse(args)?;
    // Check the disks before spending time on the build.
    for disk in &options.boot.disks {
        disk.serial()?;
        if !disk.path.is_file() {
            return Err(Error::msg(format!(
                "disk `{}` is not a file",
                disk.path.display()
            )));
        }
    }
    prereq::ensure_all(ws)?;
    let kernel = build_kernel(ws, options.profile)?;
    let result = boot(&kernel, &options.boot)?;
    let verdict = result.verdict();
    if result.succeeded() {
        println!("xtask qemu: {verdict}");
        Ok(())
    } else {
        Err(Error::msg(format!(
            "qemu ({}): {verdict}{}",
            options.boot.machine,
            // Shown live already; repeat QEMU's own complaint for the error line.
            indented(&result.stderr)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn options_and_the_script_after_the_separator() {
        let o = parse(&os(&[
            "--machine",
            "q35",
            "--disk",
            "a.raw,format=raw",
            "--disk-ro",
            "dir/b.qcow2",
            "--timeout",
            "2.5",
            "--debug",
            "--",
            "info",
            "--backing-chain",
            "b.qcow2",
        ]))
        .unwrap();
        assert_eq!(o.boot.machine, Machine::Q35);
        assert_eq!(o.profile, Profile::Debug);
        assert_eq!(o.boot.timeout, Duration::from_millis(2500));
        assert_eq!(o.boot.cmdline, "info --backing-chain b.qcow2");
        let disks: Vec<_> = o
            .boot
            .disks
            .iter()
            .map(|d| (d.serial().unwrap(), d.read_only, d.format.as_deref()))
            .collect();
        assert_eq!(
            disks,
            [("a.raw", false, Some("raw")), ("b.qcow2", true, None)]
        );
        assert!(parse(&os(&["--disk", "a.raw,format=vmdk"])).is_err());
        let o = parse(&[]).unwrap();
        assert_eq!(
            (o.boot.machine, o.profile, o.boot.accel),
            (Machine::Microvm, Profile::Release, Accel::Tcg)
        );
        assert_eq!(o.boot.cmdline, "");
        assert!(parse(&os(&["--machine", "pc"])).is_err());
        assert!(parse(&os(&["--timeout", "0"])).is_err());
        assert!(parse(&os(&["--disk"])).is_err());
        assert!(parse(&os(&["selftest"])).is_err());
    }

    #[test]
    fn a_file_name_longer_than_a_virtio_serial_is_refused() {
        let disk = |path: &str| Disk {
            path: PathBuf::from(path),
            read_only: false,
            format: None,
            queue_size: None,
        };
        assert_eq!(disk("x/12345678901234567890").serial().unwrap().len(), 20);
        let err = disk("x/123456789012345678901").serial().unwrap_err();
        assert!(err.to_string().contains("at most 20 bytes"), "{err}");
    }

    #[test]
    fn the_qemu_command_line() {
        let dir = std::env::temp_dir().join(format!("xtask-qemu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a,b.raw");
        std::fs::write(&a, [0u8; 512]).unwrap();
        let mut boot = Boot::new(Machine::Microvm);
        boot.cmdline = "checksum a,b.raw".into();
        boot.disks
            .push(Disk::from_option(a.to_str().unwrap(), true).unwrap());
        boot.disks[0].format = Some("raw".into());
        let line = qemu_command(Path::new("/k"), &boot).unwrap().to_string();
        assert!(
            line.contains("-append 'image-format a,b.raw raw; checksum a,b.raw'"),
            "{line}"
        );
        assert!(line.contains("virtio-mmio.force-legacy=false"), "{line}");
        assert!(
            line.contains("-device virtio-blk-device,drive=d0,serial=a,,b.raw"),
            "{line}"
        );
        assert!(line.contains(",readonly=on"), "{line}");
        boot.disks[0].queue_size = Some(16);
        let line = qemu_command(Path::new("/k"), &boot).unwrap().to_string();
        assert!(line.ends_with(",serial=a,,b.raw,queue-size=16"), "{line}");
        boot.disks.push(Disk {
            path: a,
            read_only: false,
            format: None,
            queue_size: None,
        });
        let err = qemu_command(Path::new("/k"), &boot).unwrap_err();
        assert!(err.to_string().contains("two disks"), "{err}");
        boot.disks.clear();
        boot.cmdline = "x".repeat(MICROVM_CMDLINE_MAX + 1);
        let err = qemu_command(Path::new("/k"), &boot).unwrap_err();
        assert!(err.to_string().contains("at most 4096"), "{err}");
        boot.machine = Machine::Q35;
        assert!(qemu_command(Path::new("/k"), &boot).is_ok());
        boot.cmdline = "checksum top".into();
        boot.vhost_user = Some(VhostUser {
            socket: dir.join("v.sock"),
            serial: "top".into(),
            format: Some("raw".into()),
        });
        let line = qemu_command(Path::new("/k"), &boot).unwrap().to_string();
        assert!(
            line.contains("-machine q35,memory-backend=mem -m 128M"),
            "{line}"
        );
        assert!(
            line.contains("memory-backend-memfd,id=mem,size=128M,share=on"),
            "{line}"
        );
        assert!(
            line.contains("-device vhost-user-blk-pci,chardev=vhost0"),
            "{line}"
        );
        assert!(
            line.contains("-append 'image-format top raw; checksum top'"),
            "{line}"
        );
        boot.machine = Machine::Microvm;
        let line = qemu_command(Path::new("/k"), &boot).unwrap().to_string();
        assert!(
            line.contains("-device vhost-user-blk,chardev=vhost0"),
            "{line}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
