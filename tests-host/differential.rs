//! Differential tests of the qcow2 write path: the same seeded random list of
//! qemu-io commands (unaligned writes, `write -z`, discards, flushes) is applied
//! to one copy of an image with `qemu-io` and to another with `blockgraph io`,
//! in batches: each batch is one process invocation, so every batch reopens the
//! image. After every batch `qemu-img compare` must find both copies identical,
//! `qemu-img check` must pass on blockgraph's copy, its header must be clean and
//! its backing file unchanged.
//!
//! Configurations: 512 B, 64 KiB and 2 MiB clusters, v2 and v3, refcount_bits 1
//! and 64, lazy refcounts, an internal snapshot, a compressed image, each with
//! and without a backing file (qcow2 or raw, shorter or longer than the
//! overlay), plus a refcount table that must grow.
//!
//! Every other batch runs through the request engine (`blockgraph io -d
//! 16`: up to 16 requests in flight, a command waiting only for those it
//! overlaps): the result must be the same.
//!
//! Scatter-gather requests (the last section): the library's `writev` with
//! random segment splits must leave the same image as one-buffer writes and
//! as qemu-io writing the same bytes; a long unaligned pattern write as the
//! CLI issues it must write no device byte twice and cut its data writes
//! only at 4 KiB-aligned guest offsets (watched by a MemDevice observer).
//!
//! Reproduce: every failure prints the configuration, its seed and the batches
//! run so far. `DIFFERENTIAL_SEED=N` changes the base seed, `DIFFERENTIAL_ROUNDS=N`
//! runs N seeds per configuration (default 3) and `DIFFERENTIAL_KEEP=1` keeps the
//! temporary directories.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use std::cell::RefCell;

use blockgraph::cmd::{Environment, Session};
use blockgraph::device::{DeviceEvent, FileDevice, MemDevice};
use blockgraph::graph::{ByName, OpenByName, MAX_SEGMENTS};
use blockgraph::host::PathResolver;
use blockgraph::{Access, Error, ErrorKind, Graph, OpenOptions};
use tempfile::TempDir;

mod common;
use common::{
    be32, be64, copy_dir, own_data_extents, qemu_compare, qemu_img, qemu_io, render, run,
    BLOCKGRAPH,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The overlay under test, in directories `A` (qemu-io) and `B` (blockgraph).
const IMG: &str = "img.qcow2";
/// `blockgraph io` accepts at most this many `-c` commands per invocation.
const MAX_COMMANDS: usize = 32;

// ---------------------------------------------------------------------------
// Helpers: processes and files
// ---------------------------------------------------------------------------

/// A temporary directory, kept on disk when `DIFFERENTIAL_KEEP` is set.
struct Scratch {
    _guard: Option<TempDir>,
    path: PathBuf,
}

fn scratch() -> Scratch {
    let t = common::tmpdir("bg-differential-");
    if std::env::var_os("DIFFERENTIAL_KEEP").is_some() {
        let path = t.keep();
        eprintln!("keeping {}", path.display());
        Scratch { _guard: None, path }
    } else {
        let path = t.path().to_path_buf();
        Scratch {
            _guard: Some(t),
            path,
        }
    }
}

fn io_args<'a>(fmt: &'a str, img: &'a str, cmds: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(img);
    args
}

fn bg_io_args<'a>(img: &'a str, cmds: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["io", img];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(
            "first difference at byte {i} (0x{i:x}): 0x{:02x} became 0x{:02x}",
            a[i], b[i]
        ),
        None => format!("length {} became {}", a.len(), b.len()),
    }
}

// ---------------------------------------------------------------------------
// Helpers: a seeded xorshift RNG
// ---------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 step so nearby seeds diverge at once; never zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

fn base_seed() -> u64 {
    std::env::var("DIFFERENTIAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0b10_c6a4)
}

fn rounds() -> u64 {
    std::env::var("DIFFERENTIAL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

/// FNV-1a of the configuration name mixed with the base seed and round.
fn seed_for(name: &str, round: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h ^ base_seed().wrapping_mul(0x9e37_79b9) ^ round.wrapping_mul(0x1_0000_0001)
}

// ---------------------------------------------------------------------------
// Configurations and image construction
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Backing {
    None,
    /// A qcow2 backing file of this size, created with these `-o` options.
    Qcow2 {
        size: u64,
        opts: &'static str,
    },
    Raw {
        size: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Plain,
    /// Data written, `qemu-img snapshot -c s1`, a little more data written.
    Snapshot,
    /// `qemu-img convert -c` from mixed data (holes left unallocated).
    Compressed,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    cluster: u64,
    /// More `qemu-img create -o` options (cluster_size is added).
    opts: &'static str,
    size: u64,
    backing: Backing,
    kind: Kind,
    batches: usize,
    commands: usize,
    /// Longest write.
    max_len: u64,
}

impl Config {
    const fn new(name: &'static str, cluster: u64, opts: &'static str, size: u64) -> Self {
        Config {
            name,
            cluster,
            opts,
            size,
            backing: Backing::None,
            kind: Kind::Plain,
            batches: 4,
            commands: 12,
            max_len: 512 * KIB,
        }
    }

    const fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    const fn kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    fn create_opts(&self) -> String {
        let mut o = format!("cluster_size={}", self.cluster);
        if !self.opts.is_empty() {
            o.push(',');
            o.push_str(self.opts);
        }
        o
    }

    fn backing_file(&self) -> Option<(&'static str, &'static str, u64)> {
        match self.backing {
            Backing::None => None,
            Backing::Qcow2 { size, .. } => Some(("base.qcow2", "qcow2", size)),
            Backing::Raw { size } => Some(("base.raw", "raw", size)),
        }
    }
}

fn pattern(rng: &mut Rng) -> String {
    let p = rng.range(1, 255);
    if rng.percent(50) {
        format!("0x{p:02x}")
    } else {
        p.to_string()
    }
}

/// A few patterned writes at scattered offsets, one at the very start and one
/// ending exactly at `size`.
fn scattered_writes(rng: &mut Rng, size: u64, count: usize) -> Vec<String> {
    let mut cmds = vec![
        format!("write -P {} 0 {}", pattern(rng), rng.range(1, 100 * KIB)),
        format!("write -P {} {} 3000", pattern(rng), size - 3000),
    ];
    for _ in 0..count {
        let len = rng.range(1, 256 * KIB).min(size);
        let off = rng.below(size - len + 1);
        cmds.push(format!("write -P {} {off} {len}", pattern(rng)));
    }
    cmds
}

/// Builds the backing file (if any) and `img.qcow2` in `dir`.
fn build(dir: &Path, cfg: &Config, rng: &mut Rng) {
    match cfg.backing {
        Backing::None => {}
        Backing::Qcow2 { size, opts } => {
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            let size = size.to_string();
            args.extend(["base.qcow2", &size]);
            qemu_img(dir, &args);
        }
        Backing::Raw { size } => {
            let f = fs::File::create(dir.join("base.raw")).unwrap();
            f.set_len(size).unwrap();
        }
    }
    if let Some((name, fmt, size)) = cfg.backing_file() {
        qemu_io(dir, fmt, name, &scattered_writes(rng, size, 10));
    }
    let opts = cfg.create_opts();
    let size = cfg.size.to_string();
    match cfg.kind {
        Kind::Plain | Kind::Snapshot => {
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
            if let Some((name, fmt, _)) = cfg.backing_file() {
                args.extend(["-b", name, "-F", fmt]);
            }
            args.extend([IMG, &size]);
            qemu_img(dir, &args);
        }
        Kind::Compressed => {
            fs::write(dir.join("src.raw"), mixed_data(rng, cfg.size, cfg.cluster)).unwrap();
            qemu_img(
                dir,
                &[
                    "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, "src.raw", IMG,
                ],
            );
            fs::remove_file(dir.join("src.raw")).unwrap();
            // Holes in the source stay unallocated: the backing shows through.
            if let Some((name, fmt, _)) = cfg.backing_file() {
                qemu_img(dir, &["rebase", "-u", "-b", name, "-F", fmt, IMG]);
            }
            let map = qemu_img(dir, &["map", "--output=json", IMG]);
            assert!(
                map.contains("\"compressed\": true"),
                "construction: {} has no compressed cluster: {map}",
                cfg.name
            );
        }
    }
    if cfg.kind == Kind::Snapshot {
        qemu_io(dir, "qcow2", IMG, &scattered_writes(rng, cfg.size, 6));
        qemu_img(dir, &["snapshot", "-c", "s1", IMG]);
        // Some clusters get a private copy again (refcount 1, COPIED).
        let mut after = scattered_writes(rng, cfg.size, 2);
        after.truncate(3);
        qemu_io(dir, "qcow2", IMG, &after);
    }
}

/// Guest data for a compressed image: per cluster a hole (zero), or 4 KiB pieces
/// of a repeated byte, text, random bytes or a few symbols.
fn mixed_data(rng: &mut Rng, size: u64, cluster: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    for chunk in data.chunks_mut(cluster as usize) {
        if rng.percent(20) {
            continue;
        }
        for piece in chunk.chunks_mut(4096) {
            match rng.below(4) {
                0 => piece.fill(rng.range(1, 255) as u8),
                1 => {
                    let mut text = String::new();
                    let mut n = rng.below(1000);
                    while text.len() < piece.len() {
                        let _ = writeln!(text, "differential line {n}: the quick brown fox");
                        n += 1;
                    }
                    piece.copy_from_slice(&text.as_bytes()[..piece.len()]);
                }
                2 => piece.iter_mut().for_each(|b| *b = rng.next() as u8),
                _ => piece
                    .iter_mut()
                    .for_each(|b| *b = b"ACGT"[rng.below(4) as usize]),
            }
        }
    }
    data
}

// ---------------------------------------------------------------------------
// Command generation
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Write(u8),
    Zero,
    Discard,
    Flush,
}

#[derive(Clone, Copy, Debug)]
struct Cmd {
    op: Op,
    off: u64,
    len: u64,
}

impl Cmd {
    fn text(&self, rng: &mut Rng) -> String {
        let (off, len) = (self.off, self.len);
        match self.op {
            Op::Write(p) if rng.percent(50) => format!("write -P 0x{p:02x} {off} {len}"),
            Op::Write(p) => format!("write -P {p} {off} {len}"),
            Op::Zero => format!("write -z {off} {len}"),
            Op::Discard => format!("discard {off} {len}"),
            Op::Flush => "flush".to_string(),
        }
    }

    fn overlaps(&self, other: &Cmd, cluster: u64) -> bool {
        if other.op == Op::Flush {
            return false;
        }
        // A discard may affect whole clusters around its range.
        let (start, end) = if other.op == Op::Discard {
            (
                other.off / cluster * cluster,
                (other.off + other.len).next_multiple_of(cluster),
            )
        } else {
            (other.off, other.off + other.len)
        };
        self.off < end && start < self.off + self.len
    }
}

struct Generator<'a> {
    cfg: &'a Config,
    rng: Rng,
    /// Interesting offsets: 0, L2 table boundaries, the backing file's end, the
    /// image's end.
    anchors: Vec<u64>,
    history: Vec<Cmd>,
}

impl<'a> Generator<'a> {
    fn new(cfg: &'a Config, rng: Rng) -> Self {
        let entry_bytes = if cfg.opts.contains("extended_l2=on") {
            16
        } else {
            8
        };
        let l2_span = cfg.cluster * (cfg.cluster / entry_bytes);
        let mut anchors = vec![0, cfg.size];
        let boundaries = (cfg.size - 1) / l2_span;
        // At most 64 boundaries, spread over the image.
        let step = boundaries.div_ceil(64).max(1);
        anchors.extend((1..=boundaries).step_by(step as usize).map(|k| k * l2_span));
        if let Some((_, _, backing_size)) = cfg.backing_file() {
            if backing_size < cfg.size {
                anchors.push(backing_size);
            }
        }
        Generator {
            cfg,
            rng,
            anchors,
            history: Vec::new(),
        }
    }

    /// A start offset: uniform, near an anchor, or inside an earlier range.
    fn offset(&mut self) -> u64 {
        let (cs, size) = (self.cfg.cluster, self.cfg.size);
        let r = self.rng.below(100);
        let off = if r < 35 || (r < 60 && self.history.is_empty()) {
            self.rng.below(size)
        } else if r < 60 {
            let h = self.history[self.rng.below(self.history.len() as u64) as usize];
            let delta = self.rng.below(cs);
            if self.rng.percent(50) {
                h.off.saturating_sub(delta)
            } else {
                h.off + h.len.max(1) - 1 + delta
            }
        } else {
            let a = self.anchors[self.rng.below(self.anchors.len() as u64) as usize];
            let delta = self.rng.below(2 * cs + 200);
            if self.rng.percent(60) || a + delta >= size {
                a.saturating_sub(delta)
            } else {
                a + delta
            }
        };
        off.min(size - 1)
    }

    fn length(&mut self) -> u64 {
        let cs = self.cfg.cluster;
        let len = match self.rng.below(100) {
            0..=29 => self.rng.range(1, 600.min(cs)),
            30..=59 => self.rng.range(1, cs),
            60..=91 => self.rng.range(cs / 2, 3 * cs),
            _ => self.rng.range(cs, 80 * cs),
        };
        len.clamp(1, self.cfg.max_len)
    }

    /// Cluster-aligned offset and a length of 1..=3 clusters (cut at the end).
    fn aligned(&mut self) -> (u64, u64) {
        let cs = self.cfg.cluster;
        let off = self.offset() / cs * cs;
        let len = (cs * self.rng.range(1, 3)).min(self.cfg.size - off);
        (off, len)
    }

    fn unaligned(&mut self) -> (u64, u64) {
        let off = self.offset();
        (off, self.length().min(self.cfg.size - off))
    }

    fn command(&mut self) -> Cmd {
        let r = self.rng.below(100);
        let (op, (off, len)) = match r {
            0..=49 => (Op::Write(self.rng.range(1, 255) as u8), self.unaligned()),
            50..=69 if self.rng.percent(50) => (Op::Zero, self.aligned()),
            50..=69 => (Op::Zero, self.unaligned()),
            70..=91 if self.rng.percent(80) => (Op::Discard, self.aligned()),
            70..=91 => (Op::Discard, self.unaligned()),
            _ => (Op::Flush, (0, 0)),
        };
        let cmd = Cmd { op, off, len };
        if op != Op::Flush {
            self.history.push(cmd);
        }
        cmd
    }

    fn batch(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let c = self.command();
                c.text(&mut self.rng)
            })
            .collect()
    }

    /// `read -P` commands for written ranges that no later command touched.
    fn intact_reads(&self, max: usize) -> Vec<String> {
        let mut reads = Vec::new();
        for (i, c) in self.history.iter().enumerate().rev() {
            let later = &self.history[i + 1..];
            if later.iter().any(|o| c.overlaps(o, self.cfg.cluster)) {
                continue;
            }
            match c.op {
                Op::Write(p) => reads.push(format!("read -P 0x{p:02x} {} {}", c.off, c.len)),
                Op::Zero => reads.push(format!("read -P 0 {} {}", c.off, c.len)),
                _ => {}
            }
            if reads.len() == max {
                break;
            }
        }
        reads
    }
}

// ---------------------------------------------------------------------------
// The differential run
// ---------------------------------------------------------------------------

struct Run {
    name: String,
    seed: u64,
    /// How to rerun this case.
    repro: String,
    root: PathBuf,
    a: PathBuf,
    b: PathBuf,
    backing: Option<(&'static str, Vec<u8>)>,
    size: u64,
    batches: Vec<Vec<String>>,
}

impl Run {
    /// Builds the image in `orig`, copies it to `A` and `B`.
    fn new<'c>(root: &Path, cfg: &'c Config, round: u64) -> (Run, Generator<'c>) {
        let repro = format!(
            "DIFFERENTIAL_SEED={} DIFFERENTIAL_ROUNDS={}",
            base_seed(),
            round + 1
        );
        Run::with_seed(root, cfg, seed_for(cfg.name, round), repro)
    }

    fn with_seed<'c>(
        root: &Path,
        cfg: &'c Config,
        seed: u64,
        repro: String,
    ) -> (Run, Generator<'c>) {
        let mut rng = Rng::new(seed);
        let orig = root.join("orig");
        fs::create_dir_all(&orig).unwrap();
        build(&orig, cfg, &mut rng);
        let (a, b) = (root.join("A"), root.join("B"));
        copy_dir(&orig, &a);
        copy_dir(&orig, &b);
        let backing = cfg
            .backing_file()
            .map(|(name, _, _)| (name, fs::read(orig.join(name)).unwrap()));
        let run = Run {
            name: cfg.name.to_string(),
            seed,
            repro,
            root: root.to_path_buf(),
            a,
            b,
            backing,
            size: cfg.size,
            batches: Vec::new(),
        };
        let generator = Generator::new(cfg, Rng::new(seed ^ 0x5151_5151));
        (run, generator)
    }

    fn fail(&self, what: &str, detail: &str) -> ! {
        let test = std::thread::current().name().unwrap_or("").to_string();
        let mut msg = format!(
            "differential `{}` (seed {}): {what} (after batch {})\n  reproduce: {} \
             DIFFERENTIAL_KEEP=1 cargo test --test differential {test}\n",
            self.name,
            self.seed,
            self.batches.len(),
            self.repro,
        );
        for (i, batch) in self.batches.iter().enumerate() {
            let _ = writeln!(msg, "  batch {}:", i + 1);
            for c in batch {
                let _ = writeln!(msg, "    -c \"{c}\"");
            }
        }
        let _ = write!(msg, "{detail}");
        panic!("{msg}");
    }

    /// Applies one batch with qemu-io to A and blockgraph to B, then checks.
    fn batch(&mut self, cmds: Vec<String>) {
        assert!(
            cmds.len() <= MAX_COMMANDS,
            "at most {MAX_COMMANDS} commands"
        );
        self.batches.push(cmds);
        let cmds = self.batches.last().unwrap();
        let args = io_args("qcow2", IMG, cmds);
        let q = run(&self.a, "qemu-io", &args);
        if !q.status.success() || String::from_utf8_lossy(&q.stdout).contains("failed") {
            self.fail(
                "construction: qemu-io failed",
                &render(&self.a, "qemu-io", &args, &q),
            );
        }
        let mut args = bg_io_args(IMG, cmds);
        if self.batches.len().is_multiple_of(2) {
            // Every other batch through the request engine, 16 in flight.
            args.splice(1..1, ["-d", "16"]);
        }
        let out = run(&self.b, BLOCKGRAPH, &args);
        if !out.status.success() {
            self.fail(
                "blockgraph io failed",
                &render(&self.b, BLOCKGRAPH, &args, &out),
            );
        }
        self.check();
    }

    fn check(&self) {
        let (a, b) = (format!("A/{IMG}"), format!("B/{IMG}"));
        let args = ["compare", "-f", "qcow2", "-F", "qcow2", &a, &b];
        let out = run(&self.root, "qemu-img", &args);
        if out.status.code() != Some(0) {
            self.fail(
                "qemu-img compare: A (qemu-io) and B (blockgraph) differ",
                &render(&self.root, "qemu-img", &args, &out),
            );
        }
        let args = ["check", "-f", "qcow2", IMG];
        let out = run(&self.b, "qemu-img", &args);
        if out.status.code() != Some(0) {
            self.fail(
                "qemu-img check of blockgraph's image",
                &render(&self.b, "qemu-img", &args, &out),
            );
        }
        let header = fs::read(self.b.join(IMG)).unwrap();
        if be64(&header, 24) != self.size {
            self.fail(
                "header",
                &format!("virtual size {} became {}", self.size, be64(&header, 24)),
            );
        }
        if be32(&header, 4) >= 3 && be64(&header, 72) & 3 != 0 {
            self.fail(
                "header",
                &format!(
                    "dirty or corrupt bit left set: incompatible_features 0x{:x}",
                    be64(&header, 72)
                ),
            );
        }
        if let Some((name, original)) = &self.backing {
            for dir in [&self.a, &self.b] {
                let now = fs::read(dir.join(name)).unwrap();
                if &now != original {
                    self.fail(
                        &format!("backing file {} changed", dir.join(name).display()),
                        &first_difference(original, &now),
                    );
                }
            }
        }
    }

    /// Verifies intact written ranges: qemu-io on A first, then blockgraph on
    /// both copies.
    fn reads(&self, reads: &[String]) {
        if reads.is_empty() {
            return;
        }
        qemu_io(&self.a, "qcow2", IMG, reads);
        for dir in [&self.b, &self.a] {
            let args = bg_io_args(IMG, reads);
            let out = run(dir, BLOCKGRAPH, &args);
            if !out.status.success() {
                self.fail(
                    "blockgraph read -P of written ranges",
                    &render(dir, BLOCKGRAPH, &args, &out),
                );
            }
        }
    }

    /// The final checks of qemu's own copy (a failure is a test bug).
    fn check_qemu_copy(&self) {
        qemu_img(&self.a, &["check", "-f", "qcow2", IMG]);
    }

    /// The snapshot `s1` survived: listed in B, and after `snapshot -a s1` on
    /// copies of orig, A and B all three compare equal.
    fn check_snapshot(&self) {
        let list = |dir: &Path| qemu_img(dir, &["snapshot", "-l", IMG]);
        let (la, lb) = (list(&self.a), list(&self.b));
        let names = |l: &str| -> Vec<String> {
            l.lines()
                .skip(2)
                .filter_map(|line| line.split_whitespace().nth(1).map(str::to_string))
                .collect()
        };
        if names(&lb) != vec!["s1".to_string()] || names(&la) != names(&lb) {
            self.fail(
                "qemu-img snapshot -l of blockgraph's image",
                &format!("A:\n{la}\nB:\n{lb}"),
            );
        }
        for d in ["orig", "A", "B"] {
            let to = self.root.join(format!("{d}-s1"));
            copy_dir(&self.root.join(d), &to);
            qemu_img(&to, &["snapshot", "-a", "s1", IMG]);
        }
        for (x, y) in [("A-s1", "B-s1"), ("orig-s1", "B-s1")] {
            let (x, y) = (format!("{x}/{IMG}"), format!("{y}/{IMG}"));
            let args = ["compare", "-f", "qcow2", "-F", "qcow2", &x, &y];
            let out = run(&self.root, "qemu-img", &args);
            if out.status.code() != Some(0) {
                self.fail(
                    "snapshot s1 data after `qemu-img snapshot -a s1`",
                    &render(&self.root, "qemu-img", &args, &out),
                );
            }
        }
        let b = self.root.join("B-s1");
        let out = run(&b, "qemu-img", &["check", IMG]);
        if out.status.code() != Some(0) {
            self.fail(
                "qemu-img check after `qemu-img snapshot -a s1` on blockgraph's image",
                &render(&b, "qemu-img", &["check", IMG], &out),
            );
        }
    }
}

fn differential(cfg: &Config) {
    assert!(cfg.commands <= MAX_COMMANDS);
    for round in 0..rounds() {
        let dir = scratch();
        let (mut run, mut generator) = Run::new(&dir.path, cfg, round);
        run.check();
        for _ in 0..cfg.batches {
            let cmds = generator.batch(cfg.commands);
            run.batch(cmds);
        }
        run.check_qemu_copy();
        run.reads(&generator.intact_reads(12));
        if cfg.kind == Kind::Snapshot {
            run.check_snapshot();
        }
    }
}

/// Runs `cfg` without a backing file and with each of `backings`.
fn with_backings(cfg: Config, backings: &[(&'static str, Backing)]) {
    differential(&cfg);
    for &(name, backing) in backings {
        let mut c = cfg.backing(backing);
        c.name = name;
        differential(&c);
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

const QCOW2_BACKING_3M: Backing = Backing::Qcow2 {
    size: 3 * MIB,
    opts: "",
};

#[test]
fn clusters_512_v3() {
    // One L2 table covers 32 KiB: table boundaries are crossed all the time.
    with_backings(
        Config::new("512-v3", 512, "", 4 * MIB),
        &[("512-v3+backing", QCOW2_BACKING_3M)],
    );
}

#[test]
fn clusters_64k_v3() {
    // A virtual size that ends inside a cluster.
    with_backings(
        Config::new("64k-v3", 64 * KIB, "", 8 * MIB + 5120),
        &[
            (
                "64k-v3+backing",
                Backing::Qcow2 {
                    size: 5 * MIB,
                    opts: "cluster_size=4096",
                },
            ),
            // Ends inside a cluster of the overlay.
            (
                "64k-v3+raw-backing",
                Backing::Raw {
                    size: 3 * MIB + 1536,
                },
            ),
        ],
    );
}

#[test]
fn clusters_64k_across_l2_tables() {
    // One L2 table covers 512 MiB: a 1 GiB image (sparse) has three.
    let mut cfg = Config::new("64k-v3-1G", 64 * KIB, "", 1024 * MIB + 200_192);
    cfg.batches = 3;
    with_backings(
        cfg,
        &[(
            "64k-v3-1G+backing",
            Backing::Qcow2 {
                size: 512 * MIB + 66_560,
                opts: "",
            },
        )],
    );
}

#[test]
fn clusters_2m_v3() {
    let mut cfg = Config::new("2M-v3", 2 * MIB, "", 16 * MIB);
    cfg.batches = 3;
    cfg.commands = 8;
    cfg.max_len = 2 * MIB + 512 * KIB;
    with_backings(
        cfg,
        &[(
            "2M-v3+backing",
            Backing::Qcow2 {
                size: 7 * MIB,
                opts: "",
            },
        )],
    );
}

#[test]
fn compat_v2() {
    // The backing file is longer than the overlay here.
    with_backings(
        Config::new("64k-v2", 64 * KIB, "compat=0.10", 8 * MIB),
        &[(
            "64k-v2+backing",
            Backing::Qcow2 {
                size: 10 * MIB,
                opts: "compat=0.10",
            },
        )],
    );
}

#[test]
fn refcount_bits_1() {
    with_backings(
        Config::new("64k-refcount1", 64 * KIB, "refcount_bits=1", 6 * MIB),
        &[("64k-refcount1+raw-backing", Backing::Raw { size: 4 * MIB })],
    );
    differential(&Config::new(
        "512-refcount1",
        512,
        "refcount_bits=1",
        4 * MIB,
    ));
}

#[test]
fn refcount_bits_64() {
    with_backings(
        Config::new("64k-refcount64", 64 * KIB, "refcount_bits=64", 6 * MIB),
        &[("64k-refcount64+backing", QCOW2_BACKING_3M)],
    );
}

#[test]
fn lazy_refcounts() {
    with_backings(
        Config::new("64k-lazy", 64 * KIB, "lazy_refcounts=on", 6 * MIB),
        &[("64k-lazy+backing", QCOW2_BACKING_3M)],
    );
}

#[test]
fn internal_snapshot() {
    with_backings(
        Config::new("64k-snapshot", 64 * KIB, "", 6 * MIB).kind(Kind::Snapshot),
        &[("64k-snapshot+backing", QCOW2_BACKING_3M)],
    );
    differential(
        &Config::new("512-v2-snapshot+backing", 512, "compat=0.10", 4 * MIB)
            .kind(Kind::Snapshot)
            .backing(QCOW2_BACKING_3M),
    );
}

#[test]
fn compressed() {
    with_backings(
        Config::new("64k-compressed", 64 * KIB, "", 4 * MIB).kind(Kind::Compressed),
        &[("64k-compressed+backing", QCOW2_BACKING_3M)],
    );
}

/// Extended L2 entries (32 subclusters per cluster): writes, zero writes
/// and discards at every alignment allocate, copy and zero whole
/// subclusters; reopened between batches, with and without a backing file.
#[test]
fn extended_l2() {
    with_backings(
        Config::new("64k-extended", 64 * KIB, "extended_l2=on", 6 * MIB + 3072),
        &[
            ("64k-extended+backing", QCOW2_BACKING_3M),
            (
                "64k-extended+raw-backing",
                Backing::Raw {
                    size: 3 * MIB + 1536,
                },
            ),
        ],
    );
    // The layout QEMU recommends for overlays; the smallest subclusters
    // (512 bytes, across many L2 tables); the largest (64 KiB).
    differential(
        &Config::new(
            "128k-extended+backing",
            128 * KIB,
            "extended_l2=on",
            6 * MIB,
        )
        .backing(QCOW2_BACKING_3M),
    );
    let mut small = Config::new("16k-extended+backing", 16 * KIB, "extended_l2=on", 4 * MIB);
    small.max_len = 128 * KIB;
    differential(&small.backing(QCOW2_BACKING_3M));
    let mut large = Config::new("2M-extended+backing", 2 * MIB, "extended_l2=on", 12 * MIB);
    large.batches = 3;
    large.commands = 8;
    differential(&large.backing(Backing::Qcow2 {
        size: 7 * MIB,
        opts: "",
    }));
}

/// Extended L2 entries with an internal snapshot (shared clusters are
/// copied whole) and with compressed clusters (no subclusters).
#[test]
fn extended_l2_snapshot_and_compressed() {
    differential(
        &Config::new(
            "64k-extended-snapshot+backing",
            64 * KIB,
            "extended_l2=on",
            6 * MIB,
        )
        .kind(Kind::Snapshot)
        .backing(QCOW2_BACKING_3M),
    );
    with_backings(
        Config::new(
            "64k-extended-compressed",
            64 * KIB,
            "extended_l2=on",
            4 * MIB,
        )
        .kind(Kind::Compressed),
        &[("64k-extended-compressed+backing", QCOW2_BACKING_3M)],
    );
}

/// 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters
/// and the initial one-cluster refcount table only 4096 (2 MiB of file), so
/// scattered writes over 64 MiB make it grow.
#[test]
fn refcount_table_growth() {
    let cfg = Config::new("512-refcount64-growth", 512, "refcount_bits=64", 64 * MIB);
    for round in 0..rounds() {
        let dir = scratch();
        let (run, _) = Run::new(&dir.path, &cfg, round);
        refcount_table_growth_run(&cfg, run);
    }
    // Seeds that found bugs before, run always.
    for &seed in GROWTH_REGRESSIONS {
        let dir = scratch();
        let repro = format!("(regression seed {seed}, always run)");
        let (run, _) = Run::with_seed(&dir.path, &cfg, seed, repro);
        refcount_table_growth_run(&cfg, run);
    }
}

/// Second growth (2 -> 3 table clusters) inside one long write handed out
/// refcount blocks 4 and 5 as data clusters.
const GROWTH_REGRESSIONS: &[u64] = &[15_388_234_686_101_796_089];

fn refcount_table_growth_run(cfg: &Config, mut run: Run) {
    let seed = run.seed;
    let table_clusters = |dir: &Path| be32(&fs::read(dir.join(IMG)).unwrap(), 56);
    assert_eq!(table_clusters(&run.a), 1, "construction: initial table");
    let mut rng = Rng::new(seed ^ 0x7777);
    // About 1.2 MiB of new clusters per batch: the table grows twice.
    for _ in 0..5 {
        // 24 scattered small writes (a new L2 table each, mostly), 8 longer ones.
        let mut cmds = Vec::new();
        for i in 0..MAX_COMMANDS {
            let len = if i % 4 == 3 {
                rng.range(100 * KIB, 200 * KIB)
            } else {
                rng.range(1, 1536)
            };
            let off = rng.below(cfg.size - len);
            cmds.push(format!("write -P {} {off} {len}", pattern(&mut rng)));
        }
        run.batch(cmds);
    }
    run.check_qemu_copy();
    assert!(
        table_clusters(&run.a) > 1,
        "construction: qemu's refcount table did not grow"
    );
    let b = table_clusters(&run.b);
    let b_len = fs::metadata(run.b.join(IMG)).unwrap().len();
    if b_len > 2 * MIB && b <= 1 {
        run.fail(
            "refcount table",
            &format!("file is {b_len} bytes but the refcount table has {b} cluster(s)"),
        );
    }
    let info = qemu_img(&run.b, &["info", "--output=json", IMG]);
    for field in [
        "\"format\": \"qcow2\"",
        "\"virtual-size\": 67108864",
        "\"cluster-size\": 512",
        "\"refcount-bits\": 64",
        "\"corrupt\": false",
        "\"dirty-flag\": false",
    ] {
        if !info.contains(field) {
            run.fail(
                &format!("qemu-img info of blockgraph's image lacks {field}"),
                &info,
            );
        }
    }
}

/// A disk that cannot grow (`--max-file-size`) runs out of space: the write
/// fails with "no space", nothing is corrupted or leaked, what fitted
/// before is intact, and a smaller write afterwards still works.
#[test]
fn device_full_is_no_space_and_consistent() {
    let tmp = scratch();
    let dir = tmp.path.as_path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    qemu_io(
        dir,
        "qcow2",
        "base.qcow2",
        &["write -P 0x31 0 8M".to_string()],
    );
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "8M",
        ],
    );
    let base_before = fs::read(dir.join("base.qcow2")).unwrap();
    let bg = BLOCKGRAPH;
    let limited = |cmds: &[&str]| {
        let mut args = vec!["--max-file-size", "1M", "io", "top.qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        run(dir, bg, &args)
    };
    let fits = limited(&["write -P 0x42 0 300k", "flush"]);
    assert!(fits.status.success(), "{}", render(dir, bg, &[], &fits));
    let full = limited(&["write -P 0x43 1M 3M"]);
    assert_eq!(
        full.status.code(),
        Some(1),
        "{}",
        render(dir, bg, &[], &full)
    );
    let stderr = String::from_utf8_lossy(&full.stderr);
    assert!(stderr.contains("no space"), "stderr: {stderr}");
    assert!(fs::metadata(dir.join("top.qcow2")).unwrap().len() <= 1 << 20);
    // Consistent and without leaks: the failed write gave its clusters back.
    let check = run(dir, "qemu-img", &["check", "top.qcow2"]);
    assert!(
        check.status.success(),
        "{}",
        render(dir, "qemu-img", &["check"], &check)
    );
    let after = limited(&[
        "read -P 0x42 0 300k",
        "read -P 0x31 300k 700k",
        "write -P 0x44 400k 64k",
    ]);
    assert!(after.status.success(), "{}", render(dir, bg, &[], &after));
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &["read -P 0x44 400k 64k", "read -P 0x42 0 300k"],
    );
    qemu_img(dir, &["check", "-q", "top.qcow2"]);
    assert_eq!(
        fs::read(dir.join("base.qcow2")).unwrap(),
        base_before,
        "backing file changed"
    );
}

// ---------------------------------------------------------------------------
// Scatter-gather requests through the library
// ---------------------------------------------------------------------------

/// Size of the images of the scatter-gather tests.
const SG_SIZE: u64 = 8 * MIB;

fn writable() -> OpenOptions {
    OpenOptions {
        read_only: false,
        writable_devices: true,
        ..OpenOptions::probing()
    }
}

/// Makes `img.qcow2` (`SG_SIZE`, `cluster`-byte clusters) in `dir`, over a
/// patterned `base.qcow2` when `backing`.
fn sg_images(dir: &Path, cluster: u64, backing: bool) {
    let size = SG_SIZE.to_string();
    let opts = format!("cluster_size={cluster}");
    if backing {
        qemu_img(dir, &["create", "-f", "qcow2", "base.qcow2", &size]);
        let writes = ["write -P 0x5a 0 3M", "write -P 0x6b 3333333 2M"];
        qemu_io(dir, "qcow2", "base.qcow2", &writes);
        let args = ["create", "-f", "qcow2", "-o", &opts, "-b", "base.qcow2"];
        let mut args = args.to_vec();
        args.extend(["-F", "qcow2", IMG, &size]);
        qemu_img(dir, &args);
    } else {
        qemu_img(dir, &["create", "-f", "qcow2", "-o", &opts, IMG, &size]);
    }
}

/// Random requests: odd lengths, within a cluster, across a few clusters,
/// up to 2 MiB and more.
fn sg_requests(rng: &mut Rng, cluster: u64) -> Vec<(u64, Vec<u8>)> {
    (0..10)
        .map(|_| {
            let len = match rng.below(4) {
                0 => rng.range(1, 700),
                1 => rng.range(1, 3 * cluster + 1),
                2 => rng.range(cluster, 2 * MIB + 777),
                _ => rng.range(1, 40_000),
            }
            .min(SG_SIZE);
            let off = rng.below(SG_SIZE - len + 1);
            let data = (0..len).map(|_| rng.next() as u8).collect();
            (off, data)
        })
        .collect()
}

/// `data` cut at random points into at most `max` segments (cuts may
/// coincide: empty segments, at the ends too).
fn sg_split<'d>(rng: &mut Rng, data: &'d [u8], max: usize) -> Vec<&'d [u8]> {
    let count = rng.range(1, max as u64) as usize;
    let mut cuts: Vec<usize> = (1..count)
        .map(|_| rng.below(data.len() as u64 + 1) as usize)
        .collect();
    cuts.sort_unstable();
    let mut segments = Vec::with_capacity(count);
    let mut at = 0;
    for cut in cuts {
        segments.push(&data[at..cut]);
        at = cut;
    }
    segments.push(&data[at..]);
    segments
}

/// Opens `dir/img.qcow2` through the library with a read-write backend.
fn sg_open(dir: &Path) -> (Box<Graph<FileDevice>>, blockgraph::BackendId) {
    let mut graph: Box<Graph<FileDevice>> = Box::default();
    let path = dir.join(IMG).to_str().unwrap().to_string();
    let node = graph
        .open_image(&mut PathResolver::default(), &path, writable())
        .unwrap();
    let backend = graph
        .attach_backend(node, Access::READ_WRITE_DEVICE)
        .unwrap();
    graph.unref(node).unwrap();
    (graph, backend)
}

fn sg_close(mut graph: Box<Graph<FileDevice>>, backend: blockgraph::BackendId) {
    graph.backend_flush(backend).unwrap();
    graph.detach_backend(backend).unwrap();
    assert_eq!(graph.node_count(), 0);
}

fn scatter_gather(cluster: u64, backing: bool) {
    let dir = scratch();
    let root = &dir.path;
    let orig = root.join("orig");
    fs::create_dir_all(&orig).unwrap();
    sg_images(&orig, cluster, backing);
    let [a, b, c] = ["A", "B", "C"].map(|d| root.join(d));
    for d in [&a, &b, &c] {
        copy_dir(&orig, d);
    }
    let mut rng = Rng::new(seed_for("scatter-gather", cluster + u64::from(backing)));
    let requests = sg_requests(&mut rng, cluster);

    // A: qemu-io writes the same bytes, each request from a file.
    let mut cmds = Vec::new();
    for (i, (off, data)) in requests.iter().enumerate() {
        let name = format!("req{i}.bin");
        fs::write(a.join(&name), data).unwrap();
        cmds.push(format!("write -q -s {name} {off} {}", data.len()));
    }
    qemu_io(&a, "qcow2", IMG, &cmds);

    // B: one buffer per request.
    let (mut graph, backend) = sg_open(&b);
    for (off, data) in &requests {
        graph.backend_write(backend, *off, data).unwrap();
    }
    sg_close(graph, backend);

    // C: random segment lists.
    let (mut graph, backend) = sg_open(&c);
    for (i, (off, data)) in requests.iter().enumerate() {
        let max = if i % 2 == 0 { 8 } else { MAX_SEGMENTS };
        let segments = sg_split(&mut rng, data, max);
        graph.backend_writev(backend, *off, &segments).unwrap();
    }
    // Reads: a segment list reads what one buffer reads.
    for _ in 0..8 {
        let len = rng.range(1, 3 * MIB) as usize;
        let off = rng.below(SG_SIZE - len as u64 + 1);
        let mut whole = vec![0u8; len];
        graph.backend_read(backend, off, &mut whole).unwrap();
        let mut parts = vec![0xeeu8; len];
        let lens: Vec<usize> = sg_split(&mut rng, &parts, MAX_SEGMENTS)
            .iter()
            .map(|s| s.len())
            .collect();
        let mut segments: Vec<&mut [u8]> = Vec::new();
        let mut rest = &mut parts[..];
        for n in lens {
            let (head, tail) = rest.split_at_mut(n);
            segments.push(head);
            rest = tail;
        }
        graph.backend_readv(backend, off, &mut segments).unwrap();
        assert!(whole == parts, "readv at {off} of {len} bytes differs");
    }
    // Too many segments: refused, nothing written, nothing read.
    graph.backend_flush(backend).unwrap();
    let before = fs::read(c.join(IMG)).unwrap();
    let byte = [0x77u8];
    let many = vec![&byte[..]; MAX_SEGMENTS + 1];
    let err = graph.backend_writev(backend, 4096, &many).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let mut one = [[0u8; 1]; MAX_SEGMENTS + 1];
    let mut out: Vec<&mut [u8]> = one.iter_mut().map(|b| &mut b[..]).collect();
    let err = graph.backend_readv(backend, 4096, &mut out).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    graph.backend_flush(backend).unwrap();
    assert!(
        before == fs::read(c.join(IMG)).unwrap(),
        "a refused writev changed the image"
    );
    sg_close(graph, backend);

    qemu_compare(
        root,
        &format!("A/{IMG}"),
        &format!("B/{IMG}"),
        "one-buffer writes",
    );
    qemu_compare(
        root,
        &format!("A/{IMG}"),
        &format!("C/{IMG}"),
        "scatter-gather writes",
    );
    qemu_img(&c, &["check", IMG]);
    assert!(
        fs::read(b.join(IMG)).unwrap() == fs::read(c.join(IMG)).unwrap(),
        "scatter-gather and one-buffer writes left different image files"
    );
}

#[test]
fn scatter_gather_512() {
    scatter_gather(512, false);
    scatter_gather(512, true);
}

#[test]
fn scatter_gather_64k() {
    scatter_gather(64 * KIB, false);
    scatter_gather(64 * KIB, true);
}

#[test]
fn scatter_gather_2m() {
    scatter_gather(2 * MIB, false);
    scatter_gather(2 * MIB, true);
}

// --- the CLI's pattern write, watched on a MemDevice ------------------------

/// Every write the observed image's device made: offset and length.
type WriteLog = RefCell<Vec<(u64, u64)>>;

/// An in-memory image: its name, and its buffer with the content's length
/// until it is opened.
type MemImage<'a> = (String, Option<(&'a mut [u8], u64)>);

/// In-memory images by name; `img.qcow2`'s device is observed.
struct MemImages<'a> {
    images: Vec<MemImage<'a>>,
    observer: Option<&'a mut dyn FnMut(DeviceEvent<'_>)>,
}

impl<'a> OpenByName<MemDevice<'a>> for MemImages<'a> {
    fn open_by_name(&mut self, name: &str, writable: bool) -> blockgraph::Result<MemDevice<'a>> {
        let Some(index) = self.images.iter().position(|(n, _)| n == name) else {
            return Err(Error::new(ErrorKind::NotFound, "no such in-memory image"));
        };
        let Some((buf, len)) = self.images[index].1.take() else {
            return Err(Error::new(ErrorKind::Busy, "in-memory image already open"));
        };
        let mut device = MemDevice::new(buf, len, index as u64 + 1)?;
        device.set_read_only(!writable);
        if name == IMG {
            if let Some(observer) = self.observer.take() {
                device.observe(observer);
            }
        }
        Ok(device)
    }
}

struct MemEnv<'a> {
    resolver: ByName<MemImages<'a>>,
}

impl<'a> Environment for MemEnv<'a> {
    type Device = MemDevice<'a>;
    type Resolver = ByName<MemImages<'a>>;

    fn resolver(&mut self) -> &mut ByName<MemImages<'a>> {
        &mut self.resolver
    }

    fn create(&mut self, _name: &str, _size: u64) -> blockgraph::Result<MemDevice<'a>> {
        Err(Error::new(ErrorKind::Unsupported, "no new images here"))
    }

    fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        eprintln!("{message}");
    }
}

/// `write -P 0x55 12345 6M` through the CLI's library path on an in-memory
/// image with `scratch` bytes of scratch: no data write overlaps another,
/// data writes start and end only at the request's ends or at aligned guest
/// offsets (4 KiB; with 512-byte clusters the partly written first and last
/// clusters are written whole, so cluster-aligned), and the image equals
/// qemu-io's.
fn pattern_write_observed(cluster: u64, backing: bool, scratch_len: usize) {
    const OFF: u64 = 12345;
    const LEN: u64 = 6 * MIB;
    let command = format!("write -P 0x55 {OFF} {LEN}");
    let what = format!("{cluster}-byte clusters, backing {backing}, scratch {scratch_len}");
    let dir = scratch();
    let root = &dir.path;
    let orig = root.join("orig");
    fs::create_dir_all(&orig).unwrap();
    sg_images(&orig, cluster, backing);
    let (a, b) = (root.join("A"), root.join("B"));
    copy_dir(&orig, &a);
    copy_dir(&orig, &b);
    qemu_io(&a, "qcow2", IMG, &[command.as_str()]);

    let top = fs::read(orig.join(IMG)).unwrap();
    let top_len = top.len() as u64;
    let mut top_buf = top.clone();
    top_buf.resize(top.len() + 24 * MIB as usize, 0);
    let mut base_buf = match backing {
        true => fs::read(orig.join("base.qcow2")).unwrap(),
        false => Vec::new(),
    };
    let base_len = base_buf.len() as u64;
    let log: WriteLog = RefCell::new(Vec::new());
    let mut observer = |event: DeviceEvent<'_>| {
        if let DeviceEvent::Write { offset, data } = event {
            log.borrow_mut().push((offset, data.len() as u64));
        }
    };
    {
        let mut images = vec![(IMG.to_string(), Some((&mut top_buf[..], top_len)))];
        if backing {
            images.push((
                "base.qcow2".to_string(),
                Some((&mut base_buf[..], base_len)),
            ));
        }
        let mut env = MemEnv {
            resolver: ByName(MemImages {
                images,
                observer: Some(&mut observer),
            }),
        };
        let mut graph: Box<Graph<MemDevice<'_>>> = Box::default();
        let mut session: Session = Session::new();
        let mut scratch = vec![0u8; scratch_len];
        let mut out = String::new();
        let words = ["io", IMG, "-c", command.as_str()];
        blockgraph::cmd::run(
            &mut env,
            &mut graph,
            &mut session,
            &words,
            &mut scratch,
            &mut out,
        )
        .unwrap_or_else(|f| panic!("{what}: io failed: {f:?}"));
        assert_eq!(graph.node_count(), 0);
    }
    let log = log.into_inner();
    let end = log.iter().map(|&(o, l)| o + l).fold(top_len, u64::max);
    fs::write(b.join(IMG), &top_buf[..end as usize]).unwrap();
    qemu_compare(root, &format!("A/{IMG}"), &format!("B/{IMG}"), &what);
    qemu_img(&b, &["check", IMG]);

    // Data writes: no byte of the device written twice, cut only at
    // aligned guest offsets. (Metadata tables are written back as the
    // cache needs, a 512-byte L2 table more than once as it fills.)
    let extents = own_data_extents(&b, IMG);
    let align = cluster.min(4096);
    let mut data_writes = Vec::new();
    for &(offset, len) in &log {
        let Some(&(start, elen, host)) = extents
            .iter()
            .find(|&&(_, elen, host)| offset < host + elen && host < offset + len)
        else {
            continue;
        };
        assert!(
            offset >= host && offset + len <= host + elen,
            "{what}: write {offset}+{len} straddles a data extent's edge"
        );
        let guest = start + (offset - host);
        for edge in [guest, guest + len] {
            assert!(
                edge == OFF || edge == OFF + LEN || edge % align == 0,
                "{what}: data write at guest {guest}+{len} ends unaligned ({log:?})"
            );
        }
        data_writes.push((offset, len));
    }
    data_writes.sort_unstable();
    for pair in data_writes.windows(2) {
        let ((o1, l1), (o2, _)) = (pair[0], pair[1]);
        assert!(
            o1 + l1 <= o2,
            "{what}: data writes {:?} and {:?} overlap",
            pair[0],
            pair[1]
        );
    }
    let data_bytes: u64 = data_writes.iter().map(|w| w.1).sum();
    assert!(
        data_bytes >= LEN,
        "{what}: only {data_bytes} data bytes seen"
    );
}

#[test]
fn pattern_write_no_torn_or_repeated_writes() {
    for cluster in [512, 64 * KIB, 2 * MIB] {
        for backing in [false, true] {
            pattern_write_observed(cluster, backing, 1 << 20);
        }
    }
    // Several requests (a 4 KiB scratch needs 1500 segments): split at
    // cluster boundaries.
    for cluster in [512, 64 * KIB] {
        pattern_write_observed(cluster, true, 4096);
    }
}

#[test]
fn cli_pattern_write_is_one_request() {
    let dir = scratch();
    let root = &dir.path;
    for cluster in [64 * KIB, 2 * MIB] {
        let orig = root.join(format!("orig-{cluster}"));
        fs::create_dir_all(&orig).unwrap();
        sg_images(&orig, cluster, true);
        let (a, b) = (
            root.join(format!("A-{cluster}")),
            root.join(format!("B-{cluster}")),
        );
        copy_dir(&orig, &a);
        copy_dir(&orig, &b);
        let cmds = ["write -P 0x55 12345 6M".to_string()];
        qemu_io(&a, "qcow2", IMG, &cmds);
        let args = bg_io_args(IMG, &cmds);
        let out = run(&b, BLOCKGRAPH, &args);
        assert!(
            out.status.success(),
            "{}",
            render(&b, BLOCKGRAPH, &args, &out)
        );
        let (x, y) = (a.join(IMG), b.join(IMG));
        qemu_compare(
            root,
            x.to_str().unwrap(),
            y.to_str().unwrap(),
            "blockgraph io write",
        );
        qemu_img(&b, &["check", IMG]);
    }
}
