//! `cargo xtask demo`: the host CLI against qemu-img on a real backing chain.
//!
//! In a fresh `target/demo/`, qemu-img and qemu-io build
//!
//! ```text
//! base.qcow2  <-  snap1.qcow2  <-  snap2.qcow2  <-  active.qcow2
//! 0x11 @0 1M      0x22 @1M 1M      0x33 @2M 1M      0x44 @3M 512k
//!                                  zeroes @0 64k
//! ```
//!
//! then `blockgraph collapse --top snap2.qcow2 --base base.qcow2 active.qcow2`
//! drops snap1 and snap2 (metadata only, like `qemu-img rebase -u`), leaving
//!
//! ```text
//! base.qcow2  <-  active.qcow2
//! ```
//!
//! The guest view changes with that collapse: the data of snap1 and snap2 is
//! no longer part of the chain. So blockgraph is compared with qemu-img on each
//! side of the collapse, never across it.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmd::{indented, Cmd};
use crate::{json, prereq, Context, Error, Result, Workspace};

/// No single command of the demo may take longer than this.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const DISK_SIZE: u64 = 64 * MIB;

/// Ranges of a raw guest view holding one byte value; everything else is zero.
type Layout = [(u64, u64, u8)];

/// The chain's guest view as built (top layer wins).
const BUILT: &Layout = &[
    (0, 64 * KIB, 0x00),
    (64 * KIB, MIB - 64 * KIB, 0x11),
    (MIB, MIB, 0x22),
    (2 * MIB, MIB, 0x33),
    (3 * MIB, 512 * KIB, 0x44),
];

/// The guest view after the collapse: base plus active only.
const COLLAPSED: &Layout = &[(0, MIB, 0x11), (3 * MIB, 512 * KIB, 0x44)];

pub fn run(ws: &Workspace) -> Result<()> {
    let started = Instant::now();
    prereq::ensure_all(ws)?;
    ws.cargo().args(["build", "--bin", "blockgraph"]).run()?;
    let cli = ws.target_dir.join("debug").join("blockgraph");
    if !cli.is_file() {
        return Err(Error::msg(format!(
            "cargo built the CLI but {} does not exist",
            cli.display()
        )));
    }

    let dir = ws.target_dir.join("demo");
    if dir.exists() {
        fs::remove_dir_all(&dir).context(format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).context(format!("creating {}", dir.display()))?;
    let demo = Demo { dir, cli };
    demo.build_chain()?;

    let mut report = Report::default();
    demo.checks(&mut report);
    report.print(started.elapsed());
    if report.all_passed() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "demo: {} of {} checks failed",
            report.failures(),
            report.checks.len()
        )))
    }
}

struct Demo {
    dir: PathBuf,
    cli: PathBuf,
}

impl Demo {
    fn in_dir(&self, program: impl AsRef<std::ffi::OsStr>) -> Cmd {
        Cmd::new(program).cwd(&self.dir).timeout(COMMAND_TIMEOUT)
    }

    fn qemu_img(&self) -> Cmd {
        self.in_dir("qemu-img")
    }

    fn qemu_io(&self, image: &str, commands: &[&str]) -> Cmd {
        let mut cmd = self.in_dir("qemu-io").args(["-f", "qcow2"]);
        for command in commands {
            cmd = cmd.args(["-c", command]);
        }
        cmd.arg(image)
    }

    fn blockgraph(&self) -> Cmd {
        self.in_dir(&self.cli)
    }

    /// base <- snap1 <- snap2 <- active, relative backing names, `-F qcow2`.
    fn build_chain(&self) -> Result<()> {
        println!("==> building the chain in {}", self.dir.display());
        self.qemu_img()
            .args(["create", "-f", "qcow2", "base.qcow2", "64M"])
            .read()?;
        self.qemu_io("base.qcow2", &["write -P 0x11 0 1M"]).read()?;
        let layers: [(&str, &str, &[&str]); 3] = [
            ("snap1.qcow2", "base.qcow2", &["write -P 0x22 1M 1M"]),
            (
                "snap2.qcow2",
                "snap1.qcow2",
                &["write -P 0x33 2M 1M", "write -z 0 64k"],
            ),
            ("active.qcow2", "snap2.qcow2", &["write -P 0x44 3M 512k"]),
        ];
        for (image, backing, writes) in layers {
            self.qemu_img()
                .args(["create", "-f", "qcow2", "-b", backing, "-F", "qcow2", image])
                .read()?;
            self.qemu_io(image, writes).read()?;
        }
        Ok(())
    }

    fn checks(&self, report: &mut Report) {
        report.check("blockgraph info --backing-chain runs", || {
            let out = self
                .blockgraph()
                .args(["info", "--backing-chain", "active.qcow2"])
                .read()?;
            print!("{}", indented(&out).trim_start_matches('\n'));
            println!();
            Ok(())
        });
        report.check("qemu-img sees the chain as built", || {
            self.qemu_img()
                .args(["convert", "-O", "raw", "active.qcow2", "before.qemu.raw"])
                .read()?;
            expect_layout(&self.dir.join("before.qemu.raw"), BUILT)
        });
        report.check(
            "before collapse: blockgraph convert == qemu-img convert",
            || {
                self.blockgraph()
                    .args(["convert", "active.qcow2", "before.raw"])
                    .read()?;
                self.compare("before.raw", "before.qemu.raw")
            },
        );
        report.check("blockgraph collapse --top snap2 --base base runs", || {
            self.blockgraph()
                .args([
                    "collapse",
                    "--top",
                    "snap2.qcow2",
                    "--base",
                    "base.qcow2",
                    "active.qcow2",
                ])
                .read()
                .map(drop)
        });
        report.check("after collapse: qemu-img chain is active -> base", || {
            self.check_collapsed_chain()
        });
        report.check(
            "after collapse: qemu-img check active.qcow2 exits 0",
            || {
                self.qemu_img()
                    .args(["check", "active.qcow2"])
                    .read()
                    .map(drop)
            },
        );
        report.check("after collapse: guest view is base + active only", || {
            self.qemu_img()
                .args(["convert", "-O", "raw", "active.qcow2", "after.qemu.raw"])
                .read()?;
            expect_layout(&self.dir.join("after.qemu.raw"), COLLAPSED)
        });
        report.check(
            "after collapse: blockgraph convert == qemu-img convert",
            || {
                self.blockgraph()
                    .args(["convert", "active.qcow2", "after.raw"])
                    .read()?;
                self.compare("after.raw", "after.qemu.raw")
            },
        );
        report.check("after collapse: blockgraph io reads 0x44 and 0x11", || {
            self.blockgraph()
                .args([
                    "io",
                    "active.qcow2",
                    "-c",
                    "read -P 0x44 3M 512k",
                    "-c",
                    "read -P 0x11 0 64k",
                ])
                .read()
                .map(drop)
        });
    }

    fn compare(&self, ours: &str, oracle: &str) -> Result<()> {
        match first_difference(&self.dir.join(ours), &self.dir.join(oracle))? {
            None => Ok(()),
            Some(diff) => Err(Error::msg(format!("{ours} and {oracle} differ: {diff}"))),
        }
    }

    fn check_collapsed_chain(&self) -> Result<()> {
        let text = self
            .qemu_img()
            .args(["info", "--backing-chain", "--output=json", "active.qcow2"])
            .read()?;
        let chain = json::parse(&text).map_err(Error::msg)?;
        let images = chain
            .as_array()
            .ok_or_else(|| Error::msg("qemu-img info did not print a JSON array"))?;
        let names: Vec<&str> = images
            .iter()
            .map(|image| {
                image
                    .get("filename")
                    .and_then(json::Value::as_str)
                    .map(file_name)
                    .unwrap_or("?")
            })
            .collect();
        if names != ["active.qcow2", "base.qcow2"] {
            return Err(Error::msg(format!(
                "chain is {}, expected active.qcow2 -> base.qcow2",
                names.join(" -> ")
            )));
        }
        let top = &images[0];
        let field = |key: &str| top.get(key).and_then(json::Value::as_str);
        if field("backing-filename") != Some("base.qcow2") {
            return Err(Error::msg(format!(
                "active.qcow2 names its backing file {} (expected \"base.qcow2\", relative)",
                top.get("backing-filename")
                    .map(json::render)
                    .unwrap_or_else(|| "(none)".into())
            )));
        }
        if field("backing-filename-format") != Some("qcow2") {
            return Err(Error::msg(format!(
                "active.qcow2 records backing format {} (expected \"qcow2\")",
                top.get("backing-filename-format")
                    .map(json::render)
                    .unwrap_or_else(|| "(none)".into())
            )));
        }
        Ok(())
    }
}

fn file_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or(path)
}

/// The byte the layout puts at `offset`.
fn expected_byte(layout: &Layout, offset: u64) -> u8 {
    layout
        .iter()
        .rev()
        .find(|(start, len, _)| (*start..start + len).contains(&offset))
        .map_or(0, |(_, _, byte)| *byte)
}

/// Checks a raw image against a layout; the error names the first wrong byte.
fn expect_layout(path: &Path, layout: &Layout) -> Result<()> {
    let data = fs::read(path).context(format!("reading {}", path.display()))?;
    if data.len() as u64 != DISK_SIZE {
        return Err(Error::msg(format!(
            "{} is {} bytes, expected {DISK_SIZE}",
            path.display(),
            data.len()
        )));
    }
    // Walk the segments between range edges; each holds one value.
    let mut edges: Vec<u64> = layout
        .iter()
        .flat_map(|&(start, len, _)| [start, start + len])
        .chain([0, DISK_SIZE])
        .filter(|&edge| edge <= DISK_SIZE)
        .collect();
    edges.sort_unstable();
    edges.dedup();
    for pair in edges.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        let want = expected_byte(layout, start);
        let segment = &data[start as usize..end as usize];
        if let Some(i) = segment.iter().position(|&byte| byte != want) {
            return Err(Error::msg(format!(
                "byte {:#x} is {:#04x}, expected {want:#04x}",
                start + i as u64,
                segment[i]
            )));
        }
    }
    Ok(())
}

/// `None` if both files hold the same bytes, else where they first differ.
fn first_difference(a: &Path, b: &Path) -> Result<Option<String>> {
    let open = |p: &Path| File::open(p).context(format!("opening {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (len_a, len_b) = (file_len(&fa, a)?, file_len(&fb, b)?);
    if len_a != len_b {
        return Ok(Some(format!("sizes {len_a} and {len_b}")));
    }
    let mut buf_a = vec![0u8; MIB as usize];
    let mut buf_b = vec![0u8; MIB as usize];
    let mut offset = 0u64;
    while offset < len_a {
        let n = (len_a - offset).min(MIB) as usize;
        read_exact(&mut fa, &mut buf_a[..n], a)?;
        read_exact(&mut fb, &mut buf_b[..n], b)?;
        // Slice equality is a memcmp; only a mismatching chunk is scanned.
        if buf_a[..n] != buf_b[..n] {
            let i = buf_a[..n]
                .iter()
                .zip(&buf_b[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            let at = offset + i as u64;
            return Ok(Some(format!(
                "first at byte {at:#x} ({:#04x} vs {:#04x})",
                buf_a[i], buf_b[i]
            )));
        }
        offset += n as u64;
    }
    Ok(None)
}

fn file_len(file: &File, path: &Path) -> Result<u64> {
    Ok(file
        .metadata()
        .context(format!("stat {}", path.display()))?
        .len())
}

fn read_exact(file: &mut File, buf: &mut [u8], path: &Path) -> Result<()> {
    file.read_exact(buf)
        .map_err(|err: io::Error| Error::msg(format!("reading {}: {err}", path.display())))
}

/// PASS/FAIL per check, printed as it goes and summed up at the end.
#[derive(Default)]
struct Report {
    checks: Vec<(&'static str, Option<String>)>,
}

impl Report {
    /// Runs one check; an error fails the check, not the demo.
    fn check(&mut self, name: &'static str, check: impl FnOnce() -> Result<()>) {
        let failure = check().err().map(|err| err.to_string());
        match &failure {
            None => println!("PASS {name}"),
            Some(why) => println!("FAIL {name}{}", indented(why)),
        }
        self.checks.push((name, failure));
    }

    fn failures(&self) -> usize {
        self.checks.iter().filter(|(_, f)| f.is_some()).count()
    }

    fn all_passed(&self) -> bool {
        self.failures() == 0
    }

    fn print(&self, elapsed: Duration) {
        println!();
        println!("demo report ({:.1} s):", elapsed.as_secs_f64());
        for (name, failure) in &self.checks {
            let verdict = if failure.is_some() { "FAIL" } else { "PASS" };
            println!("  {verdict}  {name}");
        }
        let passed = self.checks.len() - self.failures();
        println!("  {passed}/{} checks passed", self.checks.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_ranges_win_and_gaps_are_zero() {
        assert_eq!(expected_byte(BUILT, 0), 0x00);
        assert_eq!(expected_byte(BUILT, 64 * KIB), 0x11);
        assert_eq!(expected_byte(BUILT, 2 * MIB - 1), 0x22);
        assert_eq!(expected_byte(BUILT, 3 * MIB + 512 * KIB - 1), 0x44);
        assert_eq!(expected_byte(BUILT, 3 * MIB + 512 * KIB), 0x00);
        assert_eq!(expected_byte(COLLAPSED, 0), 0x11);
        assert_eq!(expected_byte(COLLAPSED, 2 * MIB), 0x00);
    }

    #[test]
    fn differences_are_located() {
        let dir = std::env::temp_dir().join(format!("xtask-demo-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
        let mut data = vec![7u8; (MIB + 10) as usize];
        fs::write(&a, &data).unwrap();
        fs::write(&b, &data).unwrap();
        assert_eq!(first_difference(&a, &b).unwrap(), None);
        data[(MIB + 3) as usize] = 8;
        fs::write(&b, &data).unwrap();
        let diff = first_difference(&a, &b).unwrap().unwrap();
        assert!(diff.contains("0x100003"), "{diff}");
        fs::write(&c, [7u8; 3]).unwrap();
        assert!(first_difference(&a, &c).unwrap().unwrap().contains("sizes"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
