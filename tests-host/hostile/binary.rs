//! The `blockgraph` binary on hostile images.

use super::*;

/// How a command ended.
pub(crate) enum Exit {
    Code(i32, String),
    Signal(String),
    TimedOut,
}

/// Runs `blockgraph args` in `dir`, killing it after [`CLI_TIME_LIMIT`].
pub(crate) fn run_blockgraph(dir: &Path, args: &[&str], limit: Duration) -> Exit {
    let stdout = fs::File::create(dir.join(".stdout")).expect("create stdout file");
    let stderr = fs::File::create(dir.join(".stderr")).expect("create stderr file");
    let mut child = Command::new(BLOCKGRAPH)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("start blockgraph");
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait().expect("wait for blockgraph") {
            Some(status) => break status,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Exit::TimedOut;
            }
            None => thread::sleep(Duration::from_millis(5)),
        }
    };
    let err = fs::read_to_string(dir.join(".stderr")).unwrap_or_default();
    match status.code() {
        Some(code) => Exit::Code(code, err),
        None => Exit::Signal(format!("{status} {err}")),
    }
}

/// Every file of `dir` but the command outputs, with its bytes.
pub(crate) fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("list the directory")
        .map(|e| e.expect("directory entry"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !n.starts_with("w-") && !n.ends_with(".out"))
        .map(|n| {
            let bytes = fs::read(dir.join(&n)).expect("read a file");
            (n, bytes)
        })
        .collect()
}

/// A file for the CLI test: which read-only commands must refuse it (exit 1)
/// and which must succeed (exit 0); the others may do either.
pub(crate) struct CliImage {
    pub(crate) name: String,
    /// Virtual size to read with `io -r`.
    pub(crate) size: u64,
    pub(crate) must_fail: Vec<usize>,
    pub(crate) must_succeed: Vec<usize>,
}

/// The read-only commands run on every file: info, chain info as JSON, map
/// as JSON, convert, and a read of the whole virtual size.
pub(crate) fn read_only_commands<'a>(name: &'a str, read: &'a str) -> [Vec<&'a str>; 5] {
    [
        vec!["info", name],
        vec!["info", "--backing-chain", "--output=json", name],
        vec!["map", "--output=json", name],
        vec!["convert", "-O", "raw", name, "convert.out"],
        vec!["io", "-r", name, "-c", read],
    ]
}

/// Judges one `blockgraph` run: exit status 0 or 1 (as `expect` allows) with
/// one `blockgraph: ` line on stderr for 1; never a panic (101), a signal or
/// a hang.
pub(crate) fn judge(shown: &str, exit: Exit, expect: Option<i32>, failures: &mut Vec<String>) {
    match exit {
        Exit::Code(code, _) if expect.is_some_and(|e| e != code) => {
            failures.push(format!("{shown}: exit {code}, expected {expect:?}"));
        }
        Exit::Code(0, _) => {}
        Exit::Code(1, err) if err.starts_with("blockgraph: ") && err.lines().count() == 1 => {}
        Exit::Code(code, err) => failures.push(format!("{shown}: exit {code}: {}", err.trim_end())),
        Exit::Signal(s) => failures.push(format!("{shown}: killed by a signal: {s}")),
        Exit::TimedOut => failures.push(format!("{shown}: HANG (killed after {CLI_TIME_LIMIT:?})")),
    }
}

#[test]
fn cli_refuses_hostile_images_cleanly() {
    let seeds = seeds();
    let tmp = tmpdir("bg-hostile-cli-");
    let dir = tmp.path();
    let write = |name: &str, bytes: &[u8]| fs::write(dir.join(name), bytes).expect("write a file");
    let mut images: Vec<CliImage> = Vec::new();
    for seed in &seeds.all {
        write(seed.name, &seed.bytes);
        if let Some((name, bytes)) = &seed.backing {
            write(name, bytes);
        }
        images.push(CliImage {
            name: seed.name.to_owned(),
            size: seed.layout.size,
            must_fail: vec![],
            must_succeed: (0..5).collect(),
        });
    }
    let all: Vec<usize> = (0..5).collect();
    let mut corrupt = |name: &str, seed: &Seed, bytes: Vec<u8>, must_fail: Vec<usize>| {
        write(name, &bytes);
        images.push(CliImage {
            name: name.to_owned(),
            size: seed.layout.size,
            must_fail,
            must_succeed: vec![],
        });
    };
    let patched = |seed: &Seed, pos: usize, v: &[u8]| {
        let mut b = seed.bytes.clone();
        b[pos..pos + v.len()].copy_from_slice(v);
        b
    };
    let v3 = seeds.get("v3-64k.qcow2");
    let comp = seeds.get("comp-64k.qcow2");
    let over = seeds.get("overlay.qcow2");
    let bad_bits = patched(v3, 20, &30u32.to_be_bytes());
    corrupt("bad-cluster-bits.qcow2", v3, bad_bits.clone(), all.clone());
    let eof = (v3.bytes.len() as u64).next_multiple_of(v3.layout.cluster_size);
    corrupt(
        "l1-past-eof.qcow2",
        v3,
        patched(v3, 40, &(eof * 2).to_be_bytes()),
        all.clone(),
    );
    let data = v3
        .entries(|k| matches!(k, Kind::Data(_)))
        .next()
        .expect("data");
    let past_eof = (eof | COPIED).to_be_bytes();
    corrupt(
        "l2-data-past-eof.qcow2",
        v3,
        patched(v3, data.pos, &past_eof),
        vec![2, 3, 4],
    );
    let c = comp
        .entries(|k| matches!(k, Kind::Compressed { .. }))
        .next()
        .expect("compressed");
    let Kind::Compressed { host, .. } = c.kind else {
        unreachable!()
    };
    corrupt(
        "comp-garbage.qcow2",
        comp,
        patched(comp, host as usize, &[0xff; 64]),
        vec![3, 4],
    );
    let ext = v3.layout.extensions[0].0;
    let huge = patched(v3, ext + 4, &u32::MAX.to_be_bytes());
    corrupt("huge-extension.qcow2", v3, huge, all.clone());
    let table = v3.layout.l2[0].table as usize;
    corrupt(
        "truncated-mid-l2.qcow2",
        v3,
        v3.bytes[..table + 4].to_vec(),
        vec![],
    );
    let rebased = |name: &str| with_backing_name(&over.bytes, name);
    // A broken chain under a sound header: `info` without the chain shows
    // the header (as qemu-img does); everything that needs the chain fails.
    let chain_needed: Vec<usize> = (1..5).collect();
    corrupt(
        "loop-self.qcow2",
        over,
        rebased("loop-self.qcow2"),
        chain_needed.clone(),
    );
    corrupt(
        "loop-a.qcow2",
        over,
        rebased("loop-b.qcow2"),
        chain_needed.clone(),
    );
    corrupt(
        "loop-b.qcow2",
        over,
        rebased("loop-a.qcow2"),
        chain_needed.clone(),
    );
    corrupt(
        "backing-dir.qcow2",
        over,
        rebased("."),
        chain_needed.clone(),
    );
    corrupt(
        "chain-top.qcow2",
        over,
        rebased("chain-base.qcow2"),
        chain_needed.clone(),
    );
    corrupt("chain-base.qcow2", v3, bad_bits, all.clone());
    let mut rng = Rng(0xdead_beef_0000_0001);
    for seed in [v3, comp, seeds.get("v2-512.qcow2")] {
        let regions = fuzz_regions(seed);
        for i in 0..6 {
            let Change::Patch(patches) = fuzz_mutant(seed, &regions, &mut rng, i).change else {
                unreachable!()
            };
            let mut b = seed.bytes.clone();
            for (pos, data) in patches {
                b[pos..pos + data.len()].copy_from_slice(&data);
            }
            corrupt(&format!("fuzz-{i}-{}", seed.name), seed, b, vec![]);
        }
    }

    for image in &mut images {
        if image.must_fail == chain_needed {
            image.must_succeed = vec![0];
        }
    }

    // Read-only commands: every file stays as it was.
    let before = snapshot(dir);
    let mut failures = Vec::new();
    for image in &images {
        let read = format!("read 0 {}", image.size);
        for (i, args) in read_only_commands(&image.name, &read).iter().enumerate() {
            let expect = if image.must_fail.contains(&i) {
                Some(1)
            } else if image.must_succeed.contains(&i) {
                Some(0)
            } else {
                None
            };
            let shown = format!("`blockgraph {}`", args.join(" "));
            judge(
                &shown,
                run_blockgraph(dir, args, CLI_TIME_LIMIT),
                expect,
                &mut failures,
            );
        }
    }
    // collapse on chains that fail validation.
    for args in [
        &["collapse", "--top", "chain-base.qcow2", "chain-top.qcow2"][..],
        &["collapse", "--top", "chain-top.qcow2", "chain-top.qcow2"][..],
        &["collapse", "--top", "loop-b.qcow2", "loop-a.qcow2"][..],
    ] {
        let shown = format!("`blockgraph {}`", args.join(" "));
        judge(
            &shown,
            run_blockgraph(dir, args, CLI_TIME_LIMIT),
            Some(1),
            &mut failures,
        );
    }
    let after = snapshot(dir);
    for (name, bytes) in &before {
        if after.get(name) != Some(bytes) {
            failures.push(format!(
                "{name} was changed by a read-only command or a refused collapse"
            ));
        }
    }

    // Guest writes, on a copy of each file: an image that fails to open
    // stays byte for byte as it was; the others may be written.
    for image in &images {
        let copy = format!("w-{}", image.name);
        let original = fs::read(dir.join(&image.name)).expect("read an image");
        fs::write(dir.join(&copy), &original).expect("copy an image");
        let args = [
            "io",
            &copy,
            "-c",
            "write -P 0xc3 0 512",
            "-c",
            "write -P 0xc3 65536 4096",
            "-c",
            "write -z 131072 65536",
            "-c",
            "discard 196608 65536",
            "-c",
            "flush",
        ];
        let shown = format!("`blockgraph {}`", args.join(" "));
        // Opening the chain fails (`info --backing-chain` must fail).
        let refused = image.must_fail.contains(&1);
        let expect = if refused {
            Some(1)
        } else if image.must_succeed.is_empty() || image.size < 256 * 1024 {
            None
        } else {
            Some(0)
        };
        judge(
            &shown,
            run_blockgraph(dir, &args, CLI_TIME_LIMIT),
            expect,
            &mut failures,
        );
        if refused && fs::read(dir.join(&copy)).ok().as_ref() != Some(&original) {
            failures.push(format!("{shown}: the image failed to open but was changed"));
        }
    }
    let after_writes = snapshot(dir);
    // An image's external data file takes its writes: it may change.
    let data_files: Vec<&str> = seeds
        .all
        .iter()
        .filter(|s| s.layout.external)
        .filter_map(|s| s.backing.as_ref().map(|b| b.0))
        .collect();
    for (name, bytes) in &before {
        if after_writes.get(name) != Some(bytes) && !data_files.contains(&name.as_str()) {
            failures.push(format!(
                "{name} (a backing file or another image) was changed by io"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} CLI failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A backing name that names a FIFO: opening it must not block forever.
#[test]
fn cli_backing_file_that_is_a_fifo() {
    let seeds = seeds();
    let tmp = tmpdir("bg-hostile-fifo-");
    let dir = tmp.path();
    let status = Command::new("mkfifo")
        .arg(dir.join("fifo"))
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo failed");
    let overlay = &seeds.get("overlay-raw.qcow2").bytes;
    fs::write(dir.join("top.qcow2"), with_backing_name(overlay, "fifo")).expect("write");
    let mut failures = Vec::new();
    for args in [&["info", "top.qcow2"][..], &["map", "top.qcow2"][..]] {
        match run_blockgraph(dir, args, Duration::from_secs(5)) {
            Exit::Code(0 | 1, _) => {}
            Exit::Code(code, err) => failures.push(format!("{args:?}: exit {code}: {err}")),
            Exit::Signal(s) => failures.push(format!("{args:?}: signal {s}")),
            Exit::TimedOut => failures.push(format!(
                "{args:?}: HANG: opening the backing file `fifo` (a FIFO named by the image) \
                 blocks; killed after 5 s"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A data cluster that the refcounts call free (a hostile or damaged
/// image): reads work, but writes are refused before anything changes but
/// the corrupt bit in the header, since the allocator would hand that
/// cluster out a second time. QEMU then sees the image as corrupt too.
#[test]
fn data_cluster_counted_free_refuses_writes() {
    let tmp = tmpdir("bg-hostile-counted-");
    let dir = tmp.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "4M"]);
    qemu_io(dir, "qcow2", "img.qcow2", &["write -P 0x5a 1M 64k"]);
    let path = dir.join("img.qcow2");
    let mut bytes = fs::read(&path).expect("read the image");
    let at = |offset: u64| offset as usize;
    // Guest cluster 16 (1 MiB, 64 KiB clusters): L1[0] -> L2 entry 16.
    let l2 = be64(&bytes, at(be64(&bytes, 40))) & 0x00ff_ffff_ffff_fe00;
    let host = be64(&bytes, at(l2 + 16 * 8)) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(host, 0, "qemu-io allocated the data cluster");
    // Its 16-bit refcount in the first refcount block.
    let block = be64(&bytes, at(be64(&bytes, 48)));
    let entry = at(block + host / 65536 * 2);
    assert_eq!(&bytes[entry..entry + 2], &[0, 1]);
    bytes[entry..entry + 2].fill(0);
    fs::write(&path, &bytes).expect("write the image");
    // The oracle agrees the image is broken.
    let check = run(dir, "qemu-img", &["check", "img.qcow2"]);
    assert_eq!(
        check.status.code(),
        Some(2),
        "qemu-img check finds the error"
    );
    assert!(!qemu_info_corrupt(dir, "img.qcow2"), "not marked yet");

    bg_ok(dir, &["io", "-r", "img.qcow2", "-c", "read -P 0x5a 1M 64k"]);
    let marked = with_corrupt_bit(&bytes).expect("a v3 image");
    for write in [
        "write -P 0x11 2M 4k",
        "write -P 0x22 1M 512",
        "write -z 3M 64k",
    ] {
        // Each write starts from the unmarked image.
        fs::write(&path, &bytes).expect("write the image");
        let err = bg_refused(dir, &["io", "img.qcow2", "-c", write]);
        assert!(err.contains("refcount"), "{write}: {err}");
        let after = fs::read(&path).unwrap();
        assert_eq!(
            first_difference(&after, &marked),
            None,
            "{write}: the image changed beyond the corrupt bit"
        );
        assert!(after == marked, "{write}: the image changed length");
        assert!(qemu_info_corrupt(dir, "img.qcow2"), "{write}: QEMU sees it");
    }
    // Marked: later writes are refused at once, and reads still work.
    let err = bg_refused(dir, &["io", "img.qcow2", "-c", "write -P 0x33 0 4k"]);
    assert!(err.contains("marked corrupt"), "{err}");
    assert!(fs::read(&path).unwrap() == marked);
    bg_ok(dir, &["io", "-r", "img.qcow2", "-c", "read -P 0x5a 1M 64k"]);
}

/// Whether `qemu-img info --output=json` reports the qcow2 image `name` as
/// corrupt (`"corrupt": true` in its format-specific data).
pub(crate) fn qemu_info_corrupt(dir: &Path, name: &str) -> bool {
    let out = run(
        dir,
        "qemu-img",
        &["info", "-U", "-f", "qcow2", "--output=json", name],
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "qemu-img info {name} failed: {json}");
    let compact: String = json.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(compact.contains("\"corrupt\":"), "no corrupt field: {json}");
    compact.contains("\"corrupt\":true")
}
