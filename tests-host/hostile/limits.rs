//! QEMU's limits, bounded open, complete overlap checks.

use super::*;

/// A [`MemDevice`] that counts what is read: all bytes, and the bytes read
/// from `watched` (a device range); and the reads.
pub(crate) struct Counted<'a> {
    pub(crate) inner: MemDevice<'a>,
    pub(crate) watched: (u64, u64),
    /// (bytes read, bytes read inside `watched`).
    pub(crate) read: Rc<Cell<(u64, u64)>>,
    /// Reads done.
    pub(crate) reads: Rc<Cell<u64>>,
}

/// Synchronous: every operation completes in `submit`.
impl<'b> Queue<'b> for Counted<'_> {}

impl Device for Counted<'_> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> blockgraph::Result<()> {
        self.inner.read_at(offset, buf)?;
        let (start, end) = self.watched;
        let inside = (offset + buf.len() as u64)
            .min(end)
            .saturating_sub(offset.max(start));
        let (all, watched) = self.read.get();
        self.read.set((all + buf.len() as u64, watched + inside));
        self.reads.set(self.reads.get() + 1);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> blockgraph::Result<()> {
        self.inner.write_at(offset, buf)
    }

    fn flush(&mut self) -> blockgraph::Result<()> {
        self.inner.flush()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn identity(&self) -> DeviceId {
        self.inner.identity()
    }
}

/// Hands out one device, once.
pub(crate) struct One<D>(pub(crate) Option<D>);

impl<D: Device> OpenByName<D> for One<D> {
    fn open_by_name(&mut self, _name: &str, _writable: bool) -> blockgraph::Result<D> {
        self.0
            .take()
            .ok_or(Error::new(ErrorKind::NotFound, "opened already"))
    }
}

/// A hostile ~50 MB image whose L1 table names two L2 tables thousands of
/// times (entry `i` names table `i % 2`), with 2 MiB and 64 KiB clusters:
/// QEMU opens it; blockgraph opens it and checks it before the first write
/// reading each L2 table once, not once per L1 entry (that took 30 minutes
/// with 2 MiB clusters). Judged by bytes read, not by time.
#[test]
fn l1_naming_one_l2_table_thousands_of_times_is_read_once() {
    let tmp = tmpdir("bg-hostile-l1-alias-");
    let dir = tmp.path();
    for (cluster, entries) in [(2u64 << 20, 2048u64), (64 << 10, 4096)] {
        let coverage = cluster / 8 * cluster;
        let name = format!("alias-{cluster}.qcow2");
        let size = (entries * coverage).to_string();
        let cs_opt = format!("cluster_size={cluster}");
        qemu_img(
            dir,
            &["create", "-q", "-f", "qcow2", "-o", &cs_opt, &name, &size],
        );
        let second = format!("write -P 0x5a {coverage} 4k");
        qemu_io(dir, "qcow2", &name, &["write -P 0x5a 0 4k", &second]);
        let mut bytes = fs::read(dir.join(&name)).expect("read the image");
        let l1 = be64(&bytes, 40) as usize;
        assert_eq!(be64(&bytes, 36) >> 32, entries, "L1 entries");
        let tables = [be64(&bytes, l1), be64(&bytes, l1 + 8)];
        assert!(
            tables.iter().all(|&t| t & OFFSET_MASK != 0),
            "two L2 tables"
        );
        for i in 0..entries as usize {
            bytes[l1 + 8 * i..l1 + 8 * i + 8].copy_from_slice(&tables[i % 2].to_be_bytes());
        }
        bytes.resize(50 << 20, 0);
        fs::write(dir.join(&name), &bytes).expect("write the image");
        qemu_img(dir, &["info", "-f", "qcow2", &name]);

        let first = tables[0] & OFFSET_MASK;
        let read = Rc::new(Cell::new((0, 0)));
        let mut storage = bytes.clone();
        storage.resize(bytes.len() + (16 << 20), 0);
        let device = Counted {
            inner: MemDevice::new(&mut storage, bytes.len() as u64, 1).expect("device"),
            watched: (first, first + cluster),
            read: Rc::clone(&read),
            reads: Rc::default(),
        };
        let mut graph: Box<Graph<Counted<'_>, 8>> = Box::default();
        let top = graph
            .open_image(&mut ByName(One(Some(device))), &name, READ_WRITE)
            .expect("the image opens");
        let (opened, table_at_open) = read.get();
        // The first write runs the "used clusters counted" pass; in place.
        graph
            .write(top, 0, &[0xc3; 4096])
            .expect("an in-place write");
        graph.flush(top).expect("flush");
        let (all, table) = read.get();
        let file = bytes.len() as u64;
        eprintln!(
            "{name}: open read {opened} bytes ({table_at_open} of table 0); \
             open + first write {all} ({table} of table 0); file {file}"
        );
        // Table 0: once at open, once before the first write, and what the
        // write path's cache reads of it (at most the table again).
        assert!(
            table_at_open <= cluster,
            "open read table 0 {table_at_open} bytes"
        );
        assert!(table <= 3 * cluster, "table 0 read {table} bytes in all");
        assert!(all <= 2 * file, "read {all} bytes of a {file}-byte file");
        drop(graph);
        let l2 = &storage[first as usize..(first + cluster) as usize];
        assert!(
            !l2.windows(8).any(|w| w == [0xc3; 8]),
            "guest data never lands on an L2 table"
        );
    }
}

/// Writes `bytes` as `name` in `dir`, checks that `qemu-img info` refuses it
/// and that blockgraph refuses it too (info, and a write) with a message
/// containing `want`, leaving the file as it was.
pub(crate) fn refused_like_qemu(dir: &Path, name: &str, bytes: &[u8], want: &str) {
    fs::write(dir.join(name), bytes).expect("write the image");
    let qemu = run(dir, "qemu-img", &["info", "-f", "qcow2", name]);
    assert!(
        !qemu.status.success(),
        "qemu-img info opens {name}: {}",
        String::from_utf8_lossy(&qemu.stdout)
    );
    for args in [&["info", name][..], &["io", name, "-c", "write 0 512"][..]] {
        let err = bg_refused(dir, args);
        assert!(
            err.contains(want),
            "{args:?}: {err} (QEMU: {})",
            String::from_utf8_lossy(&qemu.stderr).trim()
        );
    }
    assert!(
        fs::read(dir.join(name)).unwrap() == bytes,
        "{name} was changed"
    );
}

/// QEMU's limits at open: a refcount table over 8 MiB, 0xffffffff
/// snapshots, a snapshot entry with 0xffffffff bytes of extra data, and a
/// compression type other than zlib without its incompatible bit are all
/// refused, by qemu-img and by blockgraph, and nothing is written.
#[test]
fn images_over_qemus_limits_are_refused_like_qemu() {
    let tmp = tmpdir("bg-hostile-limits-");
    let dir = tmp.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io(dir, "qcow2", "base.qcow2", &["write -P 0x5a 0 64k"]);
    let base = fs::read(dir.join("base.qcow2")).expect("read");
    let cs = 65536u64;
    let patched = |patches: &[(usize, &[u8])], len: u64| {
        let mut b = base.clone();
        b.resize(len.max(b.len() as u64) as usize, 0);
        for &(at, v) in patches {
            b[at..at + v.len()].copy_from_slice(v);
        }
        b
    };

    // 129 clusters of 64 KiB: 8 MiB + 64 KiB, all inside the file.
    let rt = be64(&base, 48);
    let clusters = (8 << 20) / cs as u32 + 1;
    let big_rt = patched(
        &[(56, &clusters.to_be_bytes())],
        rt + u64::from(clusters) * cs,
    );
    refused_like_qemu(dir, "rt.qcow2", &big_rt, "refcount table too large");

    // nb_snapshots 0xffffffff, the table at a fresh cluster.
    let eof = (base.len() as u64).next_multiple_of(cs);
    let many = patched(
        &[(60, &u32::MAX.to_be_bytes()), (64, &eof.to_be_bytes())],
        eof + cs,
    );
    refused_like_qemu(dir, "many.qcow2", &many, "too many snapshots");

    // A real snapshot, then its entry claims 0xffffffff bytes of extra data.
    fs::write(dir.join("snap.qcow2"), &base).expect("write");
    qemu_img(dir, &["snapshot", "-c", "s1", "snap.qcow2"]);
    let snap = fs::read(dir.join("snap.qcow2")).expect("read");
    assert_eq!(be64(&snap, 56) & 0xffff_ffff, 1, "one snapshot");
    let table = be64(&snap, 64) as usize;
    let mut extra = snap.clone();
    extra[table + 36..table + 40].copy_from_slice(&u32::MAX.to_be_bytes());
    refused_like_qemu(dir, "extra.qcow2", &extra, "extra data");

    // zstd (type 1) in a 112-byte header, incompatible bit 3 clear.
    assert_eq!(be64(&base, 96) & 0xffff_ffff, 112, "header_length 112");
    let zstd = patched(&[(104, &[1])], 0);
    refused_like_qemu(dir, "zstd.qcow2", &zstd, "incompatible bit");
}

/// An active L2 entry (with COPIED, in an L2 table the L1 calls owned)
/// that points a guest cluster at an internal snapshot's L1 table: a guest
/// write there is refused, the corrupt bit is set in the header (and QEMU
/// sees it), and nothing else in the file changes.
#[test]
fn write_onto_an_inactive_l1_table_is_refused_and_marks_the_image_corrupt() {
    let tmp = tmpdir("bg-hostile-inactive-l1-");
    let dir = tmp.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "4M"]);
    qemu_io(dir, "qcow2", "img.qcow2", &["write -P 0x5a 0 128k"]);
    qemu_img(dir, &["snapshot", "-c", "s1", "img.qcow2"]);
    let path = dir.join("img.qcow2");
    let mut bytes = fs::read(&path).expect("read the image");
    let table = be64(&bytes, 64) as usize;
    let snapshot_l1 = be64(&bytes, table);
    let l1 = be64(&bytes, 40) as usize;
    assert_ne!(snapshot_l1, be64(&bytes, 40), "the snapshot has its own L1");
    let l2 = be64(&bytes, l1) & OFFSET_MASK;
    // L1[0] claims the table (COPIED); L2[0] points at the snapshot's L1.
    let owned = (l2 | COPIED).to_be_bytes();
    bytes[l1..l1 + 8].copy_from_slice(&owned);
    let alias = (snapshot_l1 | COPIED).to_be_bytes();
    bytes[l2 as usize..l2 as usize + 8].copy_from_slice(&alias);
    fs::write(&path, &bytes).expect("write the image");
    assert!(!qemu_info_corrupt(dir, "img.qcow2"));

    let err = bg_refused(dir, &["io", "img.qcow2", "-c", "write -P 0xc3 0 4k"]);
    assert!(err.contains("metadata"), "{err}");
    let after = fs::read(&path).expect("read the image");
    let marked = with_corrupt_bit(&bytes).expect("v3");
    assert_eq!(
        first_difference(&after, &marked),
        None,
        "only the corrupt bit changed"
    );
    assert_eq!(after.len(), bytes.len(), "nothing appended");
    assert_eq!(
        be64(&after, 72) & 2,
        2,
        "incompatible bit 1 (corrupt) is set"
    );
    assert!(
        qemu_info_corrupt(dir, "img.qcow2"),
        "qemu-img info shows corrupt: true"
    );
    let err = bg_refused(dir, &["io", "img.qcow2", "-c", "write -P 0xc3 1M 4k"]);
    assert!(err.contains("marked corrupt"), "{err}");
    assert!(
        fs::read(&path).unwrap() == after,
        "a later write changed nothing"
    );
}

/// Guest bytes one L2 table of a 512-byte-cluster image maps.
pub(crate) const L2_SPAN: u64 = 512 / 8 * 512;

/// A qcow2 image of 512-byte clusters mapping `ranges` L2 tables' worth of
/// guest bytes, with one sector written (0x5a) in the range of each table
/// in `written`: its bytes and those tables' offsets.
pub(crate) fn l2_tables_at(dir: &Path, ranges: u64, written: &[u64]) -> (Vec<u8>, Vec<u64>) {
    let name = "many-l2.qcow2";
    let size = (ranges * L2_SPAN).to_string();
    let create = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
    qemu_img(dir, &[&create[..], &[name, &size]].concat());
    let writes: Vec<String> = written
        .iter()
        .map(|i| format!("write -P 0x5a {} 512", i * L2_SPAN))
        .collect();
    qemu_io(dir, "qcow2", name, &writes);
    let bytes = fs::read(dir.join(name)).expect("read the image");
    let l1 = be64(&bytes, 40) as usize;
    let offsets: Vec<u64> = written
        .iter()
        .map(|&i| be64(&bytes, l1 + 8 * i as usize) & OFFSET_MASK)
        .collect();
    assert!(offsets.iter().all(|&t| t != 0), "an L2 table per range");
    (bytes, offsets)
}

/// [`l2_tables_at`] with a table for each of `tables` ranges.
pub(crate) fn many_l2_tables(dir: &Path, tables: u64) -> (Vec<u8>, Vec<u64>) {
    l2_tables_at(dir, tables, &(0..tables).collect::<Vec<_>>())
}

/// Runs [`Graph::check_tables_step`] on `top` with `budget` to its end,
/// asserting that no call reads more than `budget` times; returns the
/// calls made, or the error that ended the check.
pub(crate) fn check_in_steps<D: Device>(
    graph: &mut Graph<D, 8>,
    top: NodeId,
    budget: u64,
    reads: &Cell<u64>,
) -> blockgraph::Result<u64> {
    let mut steps = 0;
    loop {
        let before = reads.get();
        let done = graph.check_tables_step(top, budget);
        let step = reads.get() - before;
        assert!(step <= budget, "one step read {step} times");
        steps += 1;
        if done? {
            return Ok(steps);
        }
    }
}

/// A graph over `storage` (the image's `len` bytes and room to grow),
/// opened with `options`; the device's read count goes to `reads`.
pub(crate) fn open_counted<'a>(
    storage: &'a mut [u8],
    len: usize,
    options: OpenOptions,
    reads: &Rc<Cell<u64>>,
) -> (Box<Graph<Counted<'a>, 8>>, blockgraph::Result<NodeId>) {
    let device = Counted {
        inner: MemDevice::new(storage, len as u64, 1).expect("device"),
        watched: (0, 0),
        read: Rc::default(),
        reads: Rc::clone(reads),
    };
    let mut graph: Box<Graph<Counted<'a>, 8>> = Box::default();
    let top = graph.open_image(&mut ByName(One(Some(device))), "many-l2.qcow2", options);
    (graph, top)
}

/// Opening an image reads none of its L2 tables (a few reads, however many
/// tables); [`Graph::check_tables_step`] then reads them all, never more
/// than its budget of reads per call; a strict open
/// ([`OpenOptions::check_tables`]) reads them all at open.
#[test]
fn open_reads_no_l2_table_and_the_check_keeps_to_its_budget() {
    let tmp = tmpdir("bg-hostile-open-scan-");
    let tables = 256;
    let (bytes, _) = many_l2_tables(tmp.path(), tables);
    let mut storage = bytes.clone();
    storage.resize(bytes.len() + (1 << 20), 0);
    let reads = Rc::new(Cell::new(0));
    let (mut graph, top) = open_counted(&mut storage, bytes.len(), READ_ONLY, &reads);
    let top = top.expect("the image opens");
    let at_open = reads.get();
    eprintln!("open: {at_open} reads for {tables} L2 tables");
    assert!(at_open <= 16, "open read {at_open} times");
    let budget = 3;
    let steps = check_in_steps(&mut graph, top, budget, &reads).expect("a clean image");
    let checked = reads.get() - at_open;
    assert!(checked >= tables, "the check read {checked} times");
    assert!(steps >= tables / budget, "{steps} steps");
    assert!(graph.qcow2(top).expect("qcow2").tables_checked());
    assert!(graph.check_tables_step(top, 0).expect("done already"));
    graph.unref(top).expect("close");
    drop(graph);

    reads.set(0);
    let strict = OpenOptions {
        check_tables: true,
        ..READ_ONLY
    };
    let (mut graph, top) = open_counted(&mut storage, bytes.len(), strict, &reads);
    let top = top.expect("the image opens");
    assert!(
        reads.get() >= tables,
        "a strict open read {} times",
        reads.get()
    );
    assert!(graph.qcow2(top).expect("qcow2").tables_checked());
    graph.unref(top).expect("close");
    drop(graph);

    // A sparse L1 table (two tables 4095 entries apart): the zero entries
    // between are read in budgeted steps too.
    let (bytes, _) = l2_tables_at(tmp.path(), 4096, &[0, 4095]);
    let mut storage = bytes.clone();
    storage.resize(bytes.len() + (1 << 20), 0);
    let (mut graph, top) = open_counted(&mut storage, bytes.len(), READ_ONLY, &reads);
    let top = top.expect("the image opens");
    let steps = check_in_steps(&mut graph, top, 1, &reads).expect("a clean image");
    assert!(steps >= 4096 / 512, "{steps} steps");
    graph.unref(top).expect("close");
}

/// A bad L2 entry (a data cluster past the end of the file) in an image
/// opened without the L2 scan: open succeeds; a read through its L2 slice
/// is refused as corrupt (the entry itself and a good neighbour: the slice
/// is checked whole when loaded), a read through another table works, any
/// write is refused (the check before the first write checks every entry)
/// and nothing is written; the check in steps finds it within its budget;
/// a strict open and the CLI refuse the image.
#[test]
fn hostile_l2_entry_is_refused_at_first_use() {
    let tmp = tmpdir("bg-hostile-first-use-");
    let dir = tmp.path();
    let (mut bytes, tables) = many_l2_tables(dir, 64);
    let bad = 40;
    let past_end = (bytes.len() as u64 + (1 << 20)) & OFFSET_MASK;
    let at = tables[bad] as usize;
    bytes[at..at + 8].copy_from_slice(&(past_end | COPIED).to_be_bytes());
    let guest = bad as u64 * L2_SPAN;
    let corrupt = |result: blockgraph::Result<()>, what: &str| {
        let err = result.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
        assert!(
            err.to_string().contains("past the end of the image"),
            "{what}: {err}"
        );
    };

    let mut storage = bytes.clone();
    storage.resize(bytes.len() + (1 << 20), 0);
    let reads = Rc::new(Cell::new(0));
    let (mut graph, top) = open_counted(&mut storage, bytes.len(), READ_WRITE, &reads);
    let top = top.expect("open does not read the L2 tables");
    let mut buf = [0u8; 512];
    corrupt(graph.read(top, guest, &mut buf), "the bad entry read");
    corrupt(
        graph.read(top, guest + 5 * 512, &mut buf),
        "a neighbour read",
    );
    graph.read(top, 0, &mut buf).expect("another table reads");
    assert_eq!(buf, [0x5a; 512]);
    corrupt(graph.write(top, 0, &[0xc3; 512]), "a write elsewhere");
    corrupt(graph.write(top, guest, &[0xc3; 512]), "a write through it");
    graph.unref(top).expect("close");
    drop(graph);
    assert!(storage[..bytes.len()] == bytes[..], "nothing was written");
    assert!(
        storage[bytes.len()..].iter().all(|&b| b == 0),
        "nor past it"
    );

    let (mut graph, top) = open_counted(&mut storage, bytes.len(), READ_ONLY, &reads);
    let top = top.expect("the image opens");
    {
        // Through the request engine, a buffer lent for metadata misses:
        // the slice it loads is checked at first use all the same, so a
        // good entry next to the bad one is refused too.
        let backend = graph
            .attach_backend(top, blockgraph::Access::READ_ONLY_DEVICE)
            .expect("attach");
        let (mut meta, mut data) = ([0u8; 4096], [0u8; 512]);
        let mut engine: Engine<'_> = Engine::new();
        engine
            .lend_metadata_buffer(&mut meta)
            .expect("lend a buffer");
        let neighbour = guest + 5 * 512;
        let ticket = engine
            .submit_read(backend, neighbour, [&mut data[..]])
            .unwrap();
        let done = engine.wait(&mut graph, ticket).expect("the read finishes");
        corrupt(done.result, "an engine read of a neighbour");
        engine.drain(&mut graph);
        graph.detach_backend(backend).expect("detach");
    }
    let found = check_in_steps(&mut graph, top, 2, &reads).expect_err("the check fails");
    corrupt(Err(found), "the check");
    graph.unref(top).expect("close");
    drop(graph);

    let strict = OpenOptions {
        check_tables: true,
        ..READ_ONLY
    };
    let (_graph, top) = open_counted(&mut storage, bytes.len(), strict, &reads);
    corrupt(top.map(|_| ()), "a strict open");

    fs::write(dir.join("bad.qcow2"), &bytes).expect("write the image");
    let err = bg_refused(dir, &["info", "-f", "qcow2", "bad.qcow2"]);
    assert!(err.contains("past the end of the image"), "{err}");
}
