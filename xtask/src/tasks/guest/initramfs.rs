//! The guest's initramfs: an uncompressed newc ("070701") cpio archive
//! written here (the `cpio` tool may be missing), and its `/init`.
//!
//! newc, as the kernel's `init/initramfs.c` reads it: per entry a 110-byte
//! ASCII header (`070701` and 13 fields of 8 hex digits: ino, mode, uid,
//! gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
//! namesize including the NUL, check), the name and its NUL padded to a
//! multiple of 4, the data padded to a multiple of 4; `TRAILER!!!` ends the
//! archive. Directories come before what they hold. An uncompressed archive
//! boots about 2 s faster under TCG than a gzipped one.
//!
//! `/dev/console` is in the archive as a character device (5, 1): the kernel
//! opens it for init's stdin/stdout before `/init` can mount devtmpfs, and
//! without it `/init`'s output is lost.

use std::collections::BTreeSet;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// An archive being built in memory.
#[derive(Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl Archive {
    /// A directory (and its parents), once.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, S_IFDIR | 0o755, 2, (0, 0), &[]);
    }

    /// A regular file with permission bits `perm` (its directory made first).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.parent(path);
        self.entry(path, S_IFREG | perm, 1, (0, 0), data);
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.parent(path);
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[]);
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.bytes
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.trim_matches('/').rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        let name = path.trim_matches('/');
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

/// The first line `/init` prints after the fio job that runs while the
/// host drives the block jobs has started; the host waits for it.
pub const FIO_START: &str = "GUEST: fio-live start";
/// Printed when that fio run has ended (`GUEST: fio-live end rc=N`).
pub const FIO_END: &str = "GUEST: fio-live end";
/// The result line: `GUEST: result live=N verify=N md5=HASH`.
pub const RESULT: &str = "GUEST: result";
/// Markers around the kernel messages `/init` reports.
pub const DMESG_BEGIN: &str = "GUEST: ---- dmesg (error|i/o) begin ----";
pub const DMESG_END: &str = "GUEST: ---- dmesg (error|i/o) end ----";

/// The virtio modules, in the order they must be loaded (each needs the
/// ones before it); the archive holds them as `/lib/modules/NAME.ko`.
pub const MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

/// The start of every fio job file here: the disk, through O_DIRECT and
/// libaio.
pub const FIO_GLOBAL: &str = "[global]\nfilename=/dev/vda\ndirect=1\nioengine=libaio\n";

/// The fio job's parameters (one job file, run twice: writing with
/// verification, then `--verify_only`).
#[derive(Clone, Debug)]
pub struct FioJob {
    /// Bytes written (once each block, in random order) from offset 0.
    pub size_mib: u32,
    /// Write rate limit, so the run lasts long enough for the live block
    /// jobs and leaves the host CPU to the server.
    pub write_iops: u32,
}

impl FioJob {
    /// The job file: random 4 KiB writes at queue depth 16 with crc32c
    /// headers, every block once (fio's random map), then read back and
    /// checked (`do_verify`, the default), fatal on the first mismatch.
    pub fn job_file(&self) -> String {
        format!(
            "{FIO_GLOBAL}\
             iodepth=16\n\
             bs=4k\n\
             size={}m\n\
             verify=crc32c\n\
             verify_fatal=1\n\
             verify_dump=1\n\
             randrepeat=1\n\
             rate_iops=,{}\n\
             \n\
             [verify]\n\
             rw=randwrite\n",
            self.size_mib, self.write_iops
        )
    }
}

/// The start of every `/init` (busybox sh): mounts, the virtio modules,
/// `fail` (prints a failure and powers off) and a wait for `/dev/vda`.
fn prologue() -> String {
    let modules: String = MODULES
        .iter()
        .map(|m| format!("insmod /lib/modules/{m}.ko || fail \"insmod {m}\"\n"))
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
fail() {{ echo "GUEST: FAILED: $*"; poweroff -f; }}
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{modules}i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1)); [ $i -gt 100 ] && fail "no /dev/vda after 10 s"
  sleep 0.1
done
echo "GUEST: /dev/vda is $(cat /sys/block/vda/size) sectors"
"#
    )
}

/// `/init` for `cargo xtask guest`: after the [`prologue`], runs the fio
/// job (the host drives the block jobs meanwhile), runs it again with
/// `--verify_only` (a fresh process reading every block back after the
/// jobs), hashes the disk, prints the results between markers and powers
/// off. Every path ends in `poweroff -f`, so the guest never waits.
pub fn init_script() -> String {
    format!(
        r#"{}echo "{FIO_START}"
fio /job.fio > /tmp/live.txt 2>&1
live=$?
echo "{FIO_END} rc=$live"
[ $live = 0 ] || cat /tmp/live.txt
grep -E 'write:|read:|err=' /tmp/live.txt
fio --verify_only /job.fio > /tmp/verify.txt 2>&1
verify=$?
[ $verify = 0 ] || cat /tmp/verify.txt
grep -i -E 'err=|verify' /tmp/verify.txt | head -n 5
sum=$(md5sum /dev/vda | cut -d' ' -f1)
echo "{DMESG_BEGIN}"
dmesg | grep -i -E 'error|i/o'
echo "{DMESG_END}"
echo "{RESULT} live=$live verify=$verify md5=$sum"
poweroff -f
"#,
        prologue()
    )
}

/// Markers around fio's terse (`--minimal`) output in the bench mode.
pub const TERSE_BEGIN: &str = "GUEST: ---- fio terse begin ----";
pub const TERSE_END: &str = "GUEST: ---- fio terse end ----";
/// The bench mode's result line: `GUEST: bench rc=N`.
pub const BENCH_RESULT: &str = "GUEST: bench";

/// `/init` for `cargo xtask bench --guest`, the second mode: after the
/// [`prologue`], runs the job `/jobs/NAME.fio` named by `bgjob=NAME` on
/// the kernel's command line with `--minimal`, prints its output between
/// [`TERSE_BEGIN`] and [`TERSE_END`], then [`BENCH_RESULT`] with fio's
/// exit status, and powers off.
pub fn bench_init_script() -> String {
    format!(
        r#"{}job=$(sed -n 's/.*bgjob=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -f "/jobs/$job.fio" ] || fail "no job /jobs/$job.fio (bgjob= on the command line)"
fio --minimal "/jobs/$job.fio" > /tmp/fio.txt 2>&1
rc=$?
echo "{TERSE_BEGIN}"
cat /tmp/fio.txt
echo "{TERSE_END}"
echo "{BENCH_RESULT} rc=$rc"
poweroff -f
"#,
        prologue()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(header: &[u8], index: usize) -> u32 {
        let at = 6 + 8 * index;
        let text = std::str::from_utf8(&header[at..at + 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap()
    }

    #[test]
    fn newc_entries_are_aligned_and_parents_come_first() {
        let mut archive = Archive::default();
        archive.file("/a/b/c", 0o644, b"hello");
        archive.char_device("dev/console", 0o600, 5, 1);
        let bytes = archive.finish();
        assert!(bytes.len().is_multiple_of(4));
        let mut at = 0;
        let mut names = Vec::new();
        while at < bytes.len() {
            let header = &bytes[at..at + 110];
            assert_eq!(&header[..6], b"070701");
            let size = field(header, 6) as usize;
            let namesize = field(header, 11) as usize;
            let name = &bytes[at + 110..at + 110 + namesize - 1];
            names.push(String::from_utf8(name.to_vec()).unwrap());
            if names.last().unwrap() == "dev/console" {
                assert_eq!(field(header, 1), S_IFCHR | 0o600);
                assert_eq!((field(header, 9), field(header, 10)), (5, 1));
            }
            let data_at = (at + 110 + namesize).next_multiple_of(4);
            if names.last().unwrap() == "a/b/c" {
                assert_eq!(&bytes[data_at..data_at + size], b"hello");
            }
            at = (data_at + size).next_multiple_of(4);
        }
        assert_eq!(
            names,
            ["a", "a/b", "a/b/c", "dev", "dev/console", "TRAILER!!!"]
        );
    }

    #[test]
    fn init_loads_the_modules_in_order_and_always_powers_off() {
        let init = init_script();
        let at = |m: &str| init.find(&format!("insmod /lib/modules/{m}.ko")).unwrap();
        assert!(MODULES.windows(2).all(|w| at(w[0]) < at(w[1])));
        assert!(init.trim_end().ends_with("poweroff -f"));
        let bench = bench_init_script();
        assert!(bench.contains("insmod /lib/modules/virtio_blk.ko"));
        assert!(bench.contains("fio --minimal") && bench.trim_end().ends_with("poweroff -f"));
        let job = FioJob {
            size_mib: 8,
            write_iops: 100,
        }
        .job_file();
        assert!(job.contains("size=8m\n") && job.contains("rate_iops=,100\n"));
    }
}
