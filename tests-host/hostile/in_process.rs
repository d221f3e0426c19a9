//! Tests in-process: every mutated image through the library.

use super::*;

/// The harness reports a panic with its message and location.
#[test]
fn harness_catches_panics() {
    let empty: Vec<u8> = Vec::new();
    let (message, location) =
        catch(|| empty[std::hint::black_box(3)]).expect_err("the closure panics");
    assert!(message.contains("index out of bounds"), "{message}");
    assert!(location.contains("in_process.rs"), "{location}");
    assert_eq!(first_difference(b"abcd", b"abxd"), Some(2));
    assert_eq!(first_difference(b"ab", b"abcd"), None);
}

/// The harness itself: every seed opens, reads exactly `qemu-img convert`'s
/// view and writes nothing. Without this the other tests could pass vacuously.
#[test]
fn seeds_read_like_qemu() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("seeds_read_like_qemu");
        let mut findings = Findings::new("seeds_read_like_qemu");
        for seed in &seeds.all {
            for opts in [READ_ONLY, READ_WRITE] {
                let mut case = seed.case(format!("{} unmodified", seed.name), &seed.bytes, opts);
                case.expect = Some(&seed.raw);
                let outcome = findings.run::<64>(&watchdog, &case);
                assert!(
                    outcome.open_error.is_none() && outcome.reads_failed == 0,
                    "{}: {:?}",
                    seed.name,
                    outcome.open_error
                );
            }
        }
        findings.assert_clean();
    });
}

#[test]
fn header_fields_at_boundaries() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("header_fields_at_boundaries");
        let mut findings = Findings::new("header_fields_at_boundaries");
        for seed in &seeds.all {
            let mutants = header_mutants(seed);
            run_mutants(
                &mut findings,
                &watchdog,
                seed,
                &mutants,
                &[READ_ONLY, READ_WRITE],
            );
        }
        assert!(findings.opened > 0 && findings.open_errors.len() > 10);
        findings.assert_clean();
    });
}

#[test]
fn header_extensions_corrupted() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("header_extensions_corrupted");
        let mut findings = Findings::new("header_extensions_corrupted");
        for seed in &seeds.all {
            let mutants = extension_mutants(seed);
            run_mutants(
                &mut findings,
                &watchdog,
                seed,
                &mutants,
                &[READ_ONLY, READ_WRITE],
            );
        }
        assert!(findings.cases > 100);
        findings.assert_clean();
    });
}

/// Overlays with hostile headers and extensions that still open: dropping
/// their backing file rewrites cluster 0, which must work or change nothing.
#[test]
fn collapse_of_hostile_headers() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("collapse_of_hostile_headers");
        let mut findings = Findings::new("collapse_of_hostile_headers");
        let options = OpenOptions {
            writable_devices: true,
            ..READ_ONLY
        };
        for name in ["overlay.qcow2", "overlay-raw.qcow2"] {
            let seed = seeds.get(name);
            let mut mutants = header_mutants(seed);
            mutants.extend(extension_mutants(seed));
            mutants.push(Mutant {
                label: "unmodified".into(),
                change: Change::Patch(Vec::new()),
            });
            let mut work = seed.bytes.clone();
            for m in &mutants {
                let Change::Patch(patches) = &m.change else {
                    continue;
                };
                for (pos, data) in patches {
                    work[*pos..*pos + data.len()].copy_from_slice(data);
                }
                let label = format!("{name}: {} [collapse]", m.label);
                let mut case = seed.case(label, &work, options);
                case.collapse = true;
                case.reads = Reads::Ranges(Vec::new());
                findings.run::<64>(&watchdog, &case);
                work.copy_from_slice(&seed.bytes);
            }
        }
        assert!(findings.writes.0 > 100, "collapse succeeded too rarely");
        findings.assert_clean();
    });
}

#[test]
fn l1_and_l2_entries_hostile() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("l1_and_l2_entries_hostile");
        let mut findings = Findings::new("l1_and_l2_entries_hostile");
        for seed in &seeds.all {
            let mutants = table_mutants(seed);
            run_mutants(&mut findings, &watchdog, seed, &mutants, &[READ_ONLY]);
        }
        // Hostile entries must be caught: at open (L1/L2/refcount tables are
        // validated there) or, for what open cannot see, when read.
        let refused_at_open = findings.open_errors.values().sum::<u64>();
        assert!(refused_at_open > 0 || (findings.reads.1 > 0 && findings.statuses.1 > 0));
        findings.assert_clean();
    });
}

#[test]
fn compressed_payloads_corrupted() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("compressed_payloads_corrupted");
        let mut findings = Findings::new("compressed_payloads_corrupted");
        for name in ["comp-64k.qcow2", "comp-512.qcow2"] {
            let seed = seeds.get(name);
            run_mutants(
                &mut findings,
                &watchdog,
                seed,
                &payload_mutants(seed),
                &[READ_ONLY],
            );

            // Random flips inside compressed payloads; read only that cluster.
            let entries: Vec<L2Entry> = seed
                .entries(|k| matches!(k, Kind::Compressed { .. }))
                .copied()
                .collect();
            let cs = seed.layout.cluster_size;
            let mut rng = Rng(0xc0ff_ee00_0000_0001);
            let mut work = seed.bytes.clone();
            for i in 0..300 {
                let e = entries[rng.below(entries.len() as u64) as usize];
                let Kind::Compressed { host, len } = e.kind else {
                    unreachable!()
                };
                let n = len.min(work.len() as u64 - host);
                let mut flips = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let pos = (host + rng.below(n)) as usize;
                    let x = (rng.below(255) + 1) as u8;
                    work[pos] ^= x;
                    flips.push(format!("{pos}^{x:#x}"));
                }
                let label = format!(
                    "{name}: payload flips #{i} in the cluster at guest {}: {}",
                    e.guest,
                    flips.join(" ")
                );
                let mut case = seed.case(label, &work, READ_ONLY);
                case.reads = Reads::Ranges(vec![(e.guest, cs), (e.guest + cs / 3, cs / 2)]);
                findings.run::<64>(&watchdog, &case);
                work.copy_from_slice(&seed.bytes);
            }
        }
        // Inflating damaged streams must fail at least sometimes.
        assert!(findings.reads.1 > 0);
        findings.assert_clean();
    });
}

/// A valid stored deflate block as a compressed cluster reads back as its
/// payload: "error or valid data" includes data that is right.
#[test]
fn crafted_stored_block_reads_back() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("crafted_stored_block_reads_back");
        let mut findings = Findings::new("crafted_stored_block_reads_back");
        let seed = seeds.get("comp-512.qcow2");
        let e = *seed
            .entries(|k| matches!(k, Kind::Compressed { .. }))
            .next()
            .expect("a compressed cluster");
        let Kind::Compressed { host, .. } = e.kind else {
            unreachable!()
        };
        let bits = compressed_offset_bits(seed.layout.cluster_bits);
        let mut bytes = seed.bytes.clone();
        let mut stream = vec![0x01, 0x00, 0x02, 0xff, 0xfd];
        stream.extend([0x5a; 512]);
        let sectors = ((host % 512) as usize + stream.len()).div_ceil(512) as u64;
        let h = host as usize;
        bytes[h..h + stream.len()].copy_from_slice(&stream);
        put_be(
            &mut bytes,
            e.pos,
            8,
            COMPRESSED | ((sectors - 1) << bits) | host,
        );
        let mut case = seed.case(
            "stored block of 512 bytes of 0x5a".into(),
            &bytes,
            READ_ONLY,
        );
        case.reads = Reads::Ranges(vec![(e.guest, 512)]);
        let mut view = seed.raw.clone();
        view[e.guest as usize..e.guest as usize + 512].fill(0x5a);
        case.expect = Some(&view);
        findings.run::<64>(&watchdog, &case);
        findings.assert_clean();
    });
}

#[test]
fn truncated_files() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("truncated_files");
        let mut findings = Findings::new("truncated_files");
        for seed in &seeds.all {
            let mutants: Vec<Mutant> = truncation_lengths(seed)
                .into_iter()
                .map(|n| Mutant {
                    label: format!("truncated to {n} bytes (of {})", seed.bytes.len()),
                    change: Change::Truncate(n),
                })
                .collect();
            run_mutants(&mut findings, &watchdog, seed, &mutants, &[READ_ONLY]);
        }
        // The backing image truncated under an intact overlay.
        let seed = seeds.get("overlay.qcow2");
        let (base_name, base) = &seeds.base;
        let cs = seed.layout.cluster_size as usize;
        for n in [
            0,
            3,
            72,
            104,
            512,
            cs,
            cs + 8,
            base.len() / 2,
            base.len() - 1,
        ] {
            let mut case = seed.case(
                format!("overlay.qcow2 over {base_name} truncated to {n}"),
                &seed.bytes,
                READ_ONLY,
            );
            case.images[1].bytes = &base[..n];
            findings.run::<64>(&watchdog, &case);
        }
        findings.assert_clean();
    });
}

#[test]
fn random_byte_flips() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("random_byte_flips");
        let mut findings = Findings::new("random_byte_flips");
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for seed in &seeds.all {
            let regions = fuzz_regions(seed);
            let mutants: Vec<Mutant> = (0..1000)
                .map(|i| fuzz_mutant(seed, &regions, &mut rng, i))
                .collect();
            run_mutants(&mut findings, &watchdog, seed, &mutants, &[READ_ONLY]);
        }
        findings.assert_clean();
    });
}

/// One layer of a crafted chain: `bytes` served as `name`, with device
/// identity `id` (`None`: a new identity on every open).
pub(crate) fn chain_layer<'d>(name: &str, bytes: &'d [u8], id: Option<u64>) -> Img<'d> {
    Img {
        name: name.to_owned(),
        bytes,
        id,
    }
}

/// A read-only case over a crafted chain whose top is `images[0]`, with
/// room for `opens` device opens.
pub(crate) fn chain_case<'d>(label: &str, images: Vec<Img<'d>>, opens: usize) -> Case<'d> {
    Case {
        label: label.to_owned(),
        top: images[0].name.clone(),
        images,
        options: READ_ONLY,
        reads: Reads::Whole,
        opens,
        expect: None,
        writes: false,
        collapse: false,
    }
}

/// Asserts that `outcome` is a failed open of kind `want` (one of them).
pub(crate) fn expect_open_error(
    findings: &mut Findings,
    label: &str,
    outcome: &Outcome,
    want: &[ErrorKind],
) {
    match outcome.open_error {
        Some(err) if want.contains(&err.kind()) => {}
        other => findings.problem(
            &format!("{label}: wrong result"),
            label,
            &format!("expected an open error of kind {want:?}, got {other:?}"),
        ),
    }
}

#[test]
fn backing_chains_that_loop() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("backing_chains_that_loop");
        let mut findings = Findings::new("backing_chains_that_loop");
        let overlay = &seeds.get("overlay.qcow2").bytes;
        let to_a = with_backing_name(overlay, "a.qcow2");
        let to_b = with_backing_name(overlay, "b.qcow2");
        let to_c = with_backing_name(overlay, "c.qcow2");

        // A -> A: the image names itself.
        let label = "A whose backing is A";
        let case = chain_case(label, vec![chain_layer("a.qcow2", &to_a, Some(1))], 4);
        let outcome = findings.run::<64>(&watchdog, &case);
        expect_open_error(&mut findings, label, &outcome, &[ErrorKind::Corrupt]);

        // A -> B -> A.
        let label = "A -> B -> A";
        let images = vec![
            chain_layer("a.qcow2", &to_b, Some(1)),
            chain_layer("b.qcow2", &to_a, Some(2)),
        ];
        let outcome = findings.run::<64>(&watchdog, &chain_case(label, images, 4));
        expect_open_error(&mut findings, label, &outcome, &[ErrorKind::Corrupt]);

        // A -> C, where C is another name of A (same device identity).
        let label = "A -> C, C the same file as A";
        let images = vec![
            chain_layer("a.qcow2", &to_c, Some(1)),
            chain_layer("c.qcow2", &to_c, Some(1)),
        ];
        let outcome = findings.run::<64>(&watchdog, &chain_case(label, images, 4));
        expect_open_error(&mut findings, label, &outcome, &[ErrorKind::Corrupt]);

        // A -> B -> A where every open looks like a new file: only the node
        // pool or the depth limit can stop it.
        let label = "A -> B -> A, identities unknown, 64 nodes";
        let images = vec![
            chain_layer("a.qcow2", &to_b, None),
            chain_layer("b.qcow2", &to_a, None),
        ];
        let outcome = findings.run::<64>(&watchdog, &chain_case(label, images.clone(), 80));
        expect_open_error(&mut findings, label, &outcome, &[ErrorKind::NoCapacity]);
        let label = "A -> B -> A, identities unknown, 256 nodes";
        let outcome = findings.run::<256>(&watchdog, &chain_case(label, images, 80));
        expect_open_error(&mut findings, label, &outcome, &[ErrorKind::Unsupported]);
        findings.assert_clean();
    });
}

/// `depth` images: `depth - 1` overlays, then the base. Every layer holds the
/// same data, so the guest view is the overlay seed's.
pub(crate) fn deep_chain<'d>(layers: &'d [Vec<u8>], base: &'d [u8], depth: usize) -> Vec<Img<'d>> {
    let mut images: Vec<Img<'d>> = layers[..depth - 1]
        .iter()
        .enumerate()
        .map(|(i, bytes)| chain_layer(&format!("l{i:03}.qcow2"), bytes, Some(i as u64 + 1)))
        .collect();
    images.push(chain_layer(
        &format!("l{:03}.qcow2", depth - 1),
        base,
        Some(depth as u64),
    ));
    images
}

#[test]
fn backing_chains_too_deep() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("backing_chains_too_deep");
        let mut findings = Findings::new("backing_chains_too_deep");
        let seed = seeds.get("overlay.qcow2");
        let layers: Vec<Vec<u8>> = (0..200)
            .map(|i| with_backing_name(&seed.bytes, &format!("l{:03}.qcow2", i + 1)))
            .collect();
        let (_, base) = &seeds.base;
        let chain = |depth: usize| deep_chain(&layers, base, depth);
        let run =
            |findings: &mut Findings, depth: usize, nodes: usize, want: Option<&[ErrorKind]>| {
                let label = format!("chain of {depth} images, {nodes} node slots");
                let mut case = chain_case(&label, chain(depth), depth + 2);
                if want.is_none() {
                    case.expect = Some(&seed.raw);
                }
                let outcome = if nodes == 64 {
                    findings.run::<64>(&watchdog, &case)
                } else {
                    findings.run::<256>(&watchdog, &case)
                };
                if let Some(want) = want {
                    expect_open_error(findings, &label, &outcome, want);
                }
            };
        // The pool's limit and the depth limit each have their own kind.
        let pool_full: &[ErrorKind] = &[ErrorKind::NoCapacity];
        run(&mut findings, 32, 64, None);
        run(&mut findings, 33, 64, Some(pool_full));
        run(&mut findings, 40, 64, Some(pool_full));
        run(&mut findings, MAX_CHAIN_DEPTH, 256, None);
        let too_deep: &[ErrorKind] = &[ErrorKind::Unsupported];
        run(&mut findings, MAX_CHAIN_DEPTH + 1, 256, Some(too_deep));
        run(&mut findings, 200, 256, Some(too_deep));
        findings.assert_clean();
    });
}

/// Set in the environment of the write worker: the index of its first case.
pub(crate) const WORKER_ENV: &str = "BG_HOSTILE_WRITE_WORKER";
/// One write case running longer than this is a hang.
pub(crate) const WRITE_CASE_LIMIT: Duration = Duration::from_secs(5);
/// The worker may take this long to make its seeds.
pub(crate) const WORKER_SETUP_LIMIT: Duration = Duration::from_secs(120);
/// Worker restarts (after hangs or crashes) before giving up.
pub(crate) const MAX_WORKER_RUNS: usize = 12;

/// The write-phase cases, in a fixed order (the worker resumes by index).
pub(crate) fn write_case_specs(seeds: &Seeds) -> Vec<(usize, Mutant)> {
    let mut specs = Vec::new();
    let mut rng = Rng(0x7777_0000_0000_0001);
    let written = [
        "v3-64k.qcow2",
        "v2-512.qcow2",
        "comp-64k.qcow2",
        "overlay.qcow2",
    ];
    for (i, seed) in seeds.all.iter().enumerate() {
        if !written.contains(&seed.name) {
            continue;
        }
        let mut add = |m: Mutant| specs.push((i, m));
        add(Mutant {
            label: "unmodified".into(),
            change: Change::Patch(Vec::new()),
        });
        // The full-block mutation makes allocation scan 2^28 clusters on
        // 64 KiB clusters: one hang, reported once (each costs a restart).
        refcount_mutants(seed)
            .into_iter()
            .filter(|m| i == 0 || !m.label.ends_with("all 0xff") || seed.layout.cluster_bits < 16)
            .for_each(&mut add);
        table_mutants(seed).into_iter().for_each(&mut add);
        // The header fields the write path uses.
        header_mutants(seed)
            .into_iter()
            .filter(|m| {
                [
                    "size",
                    "cluster_bits",
                    "l1_size",
                    "l1_table_offset",
                    "refcount_table_offset",
                    "refcount_table_clusters",
                    "refcount_order",
                    "incompatible_features",
                    "autoclear_features",
                    "version",
                ]
                .iter()
                .any(|f| m.label.starts_with(&format!("header {f} =")))
                    || !m.label.contains(" = ")
            })
            .for_each(&mut add);
        for n in truncation_lengths(seed) {
            add(Mutant {
                label: format!("truncated to {n} bytes (of {})", seed.bytes.len()),
                change: Change::Truncate(n),
            });
        }
        let regions = fuzz_regions(seed);
        for f in 0..100 {
            add(fuzz_mutant(seed, &regions, &mut rng, f));
        }
    }
    specs
}

pub(crate) fn clean(text: &str) -> String {
    text.replace(['\t', '\n'], " ")
}

/// The worker: runs the write cases from `start`, one protocol line per event
/// on stdout (`START`, `PROBLEM`, then `STATS`, `OPENERR` and `DONE`).
pub(crate) fn write_worker(start: usize) {
    let seeds = seeds();
    let specs = write_case_specs(seeds);
    let mut findings = Findings::new("write worker");
    for (i, (seed, m)) in specs.iter().enumerate().skip(start) {
        let seed = &seeds.all[*seed];
        let label = format!("{}: {} [write phase]", seed.name, m.label);
        println!("START\t{i}\t{}", clean(&label));
        let bytes: Vec<u8> = match &m.change {
            Change::Patch(patches) => {
                let mut bytes = seed.bytes.clone();
                for (pos, data) in patches {
                    bytes[*pos..*pos + data.len()].copy_from_slice(data);
                }
                bytes
            }
            Change::Truncate(n) => seed.bytes[..*n].to_vec(),
        };
        let expected = matches!(&m.change, Change::Patch(p) if p.is_empty()).then(|| {
            let cs = seed.layout.cluster_size;
            let mut view = seed.raw.clone();
            apply_ops(&mut view, &write_ops(seed.layout.size, cs), cs, false);
            view
        });
        let mut case = seed.case(label.clone(), &bytes, READ_WRITE);
        case.writes = true;
        case.expect = expected.as_deref();
        let outcome = run_case::<64>(&case);
        for p in &outcome.problems {
            println!(
                "PROBLEM\t{}\t{}\t{}",
                clean(&p.key),
                clean(&label),
                clean(&p.detail)
            );
        }
        findings.add(&label, &outcome);
    }
    let f = &findings;
    println!(
        "STATS\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        f.cases, f.opened, f.reads.0, f.reads.1, f.statuses.0, f.statuses.1, f.writes.0, f.writes.1
    );
    for (error, count) in &f.open_errors {
        println!("OPENERR\t{}\t{count}", clean(error));
    }
    println!("DONE");
}

/// Adds what a worker reported in `text` to `findings`; returns whether it
/// finished and the last case it started.
pub(crate) fn absorb_worker_output(
    text: &str,
    findings: &mut Findings,
) -> (bool, Option<(usize, String)>) {
    let mut done = false;
    let mut last = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["START", i, label] => last = i.parse().ok().map(|i| (i, (*label).to_owned())),
            ["PROBLEM", key, label, detail] => findings.problem(key, label, detail),
            ["STATS", numbers @ ..] => {
                let n: Vec<u64> = numbers.iter().filter_map(|n| n.parse().ok()).collect();
                if let [cases, opened, r0, r1, s0, s1, w0, w1] = n[..] {
                    findings.cases += cases;
                    findings.opened += opened;
                    findings.reads = (findings.reads.0 + r0, findings.reads.1 + r1);
                    findings.statuses = (findings.statuses.0 + s0, findings.statuses.1 + s1);
                    findings.writes = (findings.writes.0 + w0, findings.writes.1 + w1);
                }
            }
            ["OPENERR", error, count] => {
                *findings.open_errors.entry((*error).to_owned()).or_default() +=
                    count.parse::<u64>().unwrap_or(0);
            }
            ["DONE"] => done = true,
            _ => {}
        }
    }
    (done, last)
}

/// The last `START` line of a worker's output so far.
pub(crate) fn last_started(text: &str) -> Option<usize> {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("START\t"))
        .and_then(|l| l.split('\t').next())
        .and_then(|i| i.parse().ok())
}

/// Hostile images opened read-write and written: no panic, no hang, no
/// metadata overwritten, no change left by a request that failed as corrupt.
/// The cases run in a child process (this test, re-run as a worker) so that
/// a hang is reported with its case, and the remaining cases still run.
#[test]
fn writes_on_hostile_images() {
    if let Ok(start) = std::env::var(WORKER_ENV) {
        let start = start.parse().expect("worker start index");
        big_stack(move || write_worker(start));
        return;
    }
    seeds();
    let tmp = tmpdir("bg-hostile-writes-");
    let mut findings = Findings::new("writes_on_hostile_images");
    let mut start = 0;
    for run in 0.. {
        if run == MAX_WORKER_RUNS {
            findings.problem(
                "write worker restarted too often: later cases did not run",
                "",
                &format!("{MAX_WORKER_RUNS} worker runs; stopped before case {start}"),
            );
            break;
        }
        let out_path = tmp.path().join(format!("worker-{run}.out"));
        let err_path = tmp.path().join(format!("worker-{run}.err"));
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--exact",
                "in_process::writes_on_hostile_images",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(WORKER_ENV, start.to_string())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).expect("create the worker's output"))
            .stderr(fs::File::create(&err_path).expect("create the worker's errors"))
            .spawn()
            .expect("start the write worker");
        let mut current = None;
        let mut since = Instant::now();
        let hung = loop {
            let finished = child.try_wait().expect("wait for the worker").is_some();
            let now = last_started(&fs::read_to_string(&out_path).unwrap_or_default());
            if now != current {
                (current, since) = (now, Instant::now());
            }
            if finished {
                break false;
            }
            let limit = match current {
                None => WORKER_SETUP_LIMIT,
                Some(_) => WRITE_CASE_LIMIT,
            };
            if since.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break true;
            }
            thread::sleep(Duration::from_millis(25));
        };
        let text = fs::read_to_string(&out_path).unwrap_or_default();
        let (done, last) = absorb_worker_output(&text, &mut findings);
        if done {
            break;
        }
        let errors = fs::read_to_string(&err_path).unwrap_or_default();
        let Some((index, label)) = last else {
            panic!("the write worker failed before its first case:\n{text}\n{errors}");
        };
        if hung {
            findings.problem(
                &format!("HANG (over {WRITE_CASE_LIMIT:?}): {label}"),
                &label,
                "the case did not finish; the worker was killed and resumed after it",
            );
        } else {
            let tail: Vec<&str> = errors.lines().rev().take(6).collect();
            findings.problem(
                &format!("CRASH of the worker process: {label}"),
                &label,
                &tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            );
        }
        start = index + 1;
    }
    findings.assert_clean();
}
