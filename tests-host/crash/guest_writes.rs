//! Guest writes of every kind.

use super::*;

pub(crate) fn base_and_top(size: u64, cluster: u64, base: &[&str], top: &[&str]) -> Vec<ImageSpec> {
    vec![
        ImageSpec::new("base.qcow2", size, cluster).io(base),
        ImageSpec::new("top.qcow2", size, cluster)
            .on("base.qcow2")
            .io(top),
    ]
}

#[test]
fn allocating_write_into_empty_overlay() {
    let images = base_and_top(2 * MIB, 64 * KIB, &["write -P 0x11 0 2M"], &[]);
    prove(
        Scenario::new("allocating write", images, "top.qcow2")
            .steps(vec![write(192 * KIB, 128 * KIB, 1)])
            .faults(&["top.qcow2"]),
    );
}

#[test]
fn copy_on_write_over_backing_data() {
    let images = base_and_top(
        2 * MIB,
        64 * KIB,
        &["write -P 0x22 0 1M", "write -P 0x23 1M 1M"],
        &[],
    );
    prove(
        Scenario::new("copy-on-write", images, "top.qcow2")
            .steps(vec![
                write(64 * KIB + 1000, 70_000, 2),
                write(MIB - 300, 600, 3),
            ])
            .faults(&["top.qcow2", "base.qcow2"])
            .qemu_sample(2),
    );
}

#[test]
fn scatter_gather_write() {
    // One request of many segments: an unaligned copy-on-write head and
    // tail over backing data, whole clusters between, one batch boundary.
    let images = base_and_top(
        6 * MIB,
        64 * KIB,
        &["write -P 0x24 0 3M", "write -P 0x25 3M 3M"],
        &[],
    );
    prove(
        Scenario::new("scatter-gather write", images, "top.qcow2")
            .steps(vec![Step::WriteV {
                off: 12345,
                len: 4 * MIB + 777,
                seed: 4,
                segments: 40,
            }])
            .faults(&["top.qcow2"])
            .qemu_sample(2),
    );
}

#[test]
fn many_writes_in_flight() {
    // In place (clusters top owns) and allocating (over backing data and
    // over nothing, partial and whole clusters), all submitted together;
    // the engine sends the in-place writes and the data of the allocating
    // ones (more of them than it keeps in flight at once) to the device,
    // which completes them out of order; the new clusters are mapped as
    // their data completes.
    let images = base_and_top(
        4 * MIB,
        64 * KIB,
        &["write -P 0x26 0 2M"],
        &["write -P 0x27 0 1M"],
    );
    let mut writes: Vec<(u64, u64, u64)> = (0..8u64)
        .map(|i| (i * 128 * KIB + 512 * i, 4 * KIB + 512 * i, 10 + i))
        .collect();
    writes.push((MIB + 1000, 70_000, 20));
    writes.push((3 * MIB, 64 * KIB, 21));
    writes.push((MIB + 256 * KIB + 512, 512, 22));
    writes.push((3 * MIB / 2, 128 * KIB, 23));
    writes.push((2 * MIB + 4 * KIB, 8 * KIB, 24));
    writes.push((5 * MIB / 2 - 1000, 3000, 25));
    prove(
        Scenario::new("requests in flight", images, "top.qcow2")
            .steps(vec![Step::Requests(writes)])
            .faults(&["top.qcow2"])
            .qemu_sample(2),
    );
}

#[test]
fn write_zeroes() {
    let images = base_and_top(
        2 * MIB,
        64 * KIB,
        &["write -P 0x31 0 2M"],
        &["write -P 0x32 0 512k"],
    );
    let sc = Scenario::new("write -z", images, "top.qcow2")
        .steps(vec![
            // Whole owned clusters: the zero flag, storage freed.
            Step::Zero {
                off: 64 * KIB,
                len: 192 * KIB,
            },
            // Part of an owned cluster: zeros written in place.
            Step::Zero {
                off: 300 * KIB,
                len: 10 * KIB,
            },
            // Part of a cluster the backing file holds: copy-on-write.
            Step::Zero {
                off: MIB + 4 * KIB,
                len: 8 * KIB,
            },
        ])
        .faults(&["top.qcow2", "base.qcow2"]);
    prove(sc);
}

#[test]
fn discard() {
    let images = base_and_top(
        2 * MIB,
        64 * KIB,
        &["write -P 0x41 0 2M"],
        &["write -P 0x42 0 1M"],
    );
    prove(
        Scenario::new("discard", images, "top.qcow2")
            .steps(vec![
                Step::Discard {
                    off: 128 * KIB,
                    len: 256 * KIB,
                },
                Step::Discard {
                    off: MIB + 100,
                    len: 200 * KIB,
                },
            ])
            .faults(&["top.qcow2"]),
    );
}

#[test]
fn write_needing_new_l2_tables() {
    let images = vec![ImageSpec::new("disk.qcow2", MIB, 512).io(&["write -P 0x51 0 64k"])];
    let sc = Scenario::new("new L2 tables", images, "disk.qcow2")
        .steps(vec![
            write(300 * KIB, KIB, 4),
            // 80 clusters: two batches, two new L2 tables.
            write(700 * KIB + 512, 40 * KIB, 5),
            write(MIB - 512, 512, 6),
        ])
        .faults(&["disk.qcow2"]);
    prove(sc.qemu_sample(4));
}

/// Refcount table clusters and used entries of a qcow2 image.
pub(crate) fn refcount_table(bytes: &[u8]) -> (u64, u32, usize) {
    let offset = be64(bytes, 48);
    let clusters = be32(bytes, 56);
    let cs = 1usize << be32(bytes, 20);
    let table = &bytes[offset as usize..offset as usize + clusters as usize * cs];
    let used = table
        .chunks(8)
        .filter(|e| e.iter().any(|&b| b != 0))
        .count();
    (offset, clusters, used)
}

/// 512-byte clusters with 64-bit refcounts: a refcount block covers 64
/// clusters (32 KiB), the one-cluster refcount table 64 blocks (2 MiB of
/// file). The file is filled to just below a block boundary under 2 MiB;
/// scattered writes then need a new block, and then a larger table.
pub(crate) fn refcount_growth() -> Scenario {
    let images = vec![ImageSpec::new("disk.qcow2", 2 * MIB + 512 * KIB, 512)
        .refcount_bits(64)
        .io(&["write -P 0x61 0 1945k"])];
    // Each write: 16 data clusters and a new L2 table.
    let steps = (0..5u64)
        .map(|i| write(1960 * KIB + i * 110 * KIB + 1024, 8 * KIB, 100 + i))
        .collect();
    let mut sc = Scenario::new("refcount growth", images, "disk.qcow2")
        .steps(steps)
        .faults(&["disk.qcow2"]);
    // The largest scenario: qemu-img checks every power cut but only every
    // eighth reordered state.
    sc.qemu_sample = 8;
    sc.covers = Some(|fx, finals| {
        let before = refcount_table(&fx.initial[0]);
        let after = refcount_table(&finals[0]);
        println!("refcount table (offset, clusters, used entries): {before:?} -> {after:?}");
        assert!(
            after.0 != before.0 && after.1 > before.1,
            "the refcount table did not grow"
        );
        assert!(after.2 >= before.2 + 2, "no new refcount block besides");
    });
    sc
}

/// [`refcount_growth`] with the writes in flight together through the
/// request engine: new refcount blocks and a new table placed while the
/// data of other allocating writes has not reached the device yet (the
/// device's end lags behind the clusters counted), new L2 tables at link;
/// the fault phase fails data writes in flight too.
pub(crate) fn refcount_growth_in_flight() -> Scenario {
    let mut sc = refcount_growth();
    sc.name = "refcount growth, writes in flight";
    let writes = (0..8u64)
        .map(|i| (1960 * KIB + i * 70 * KIB + 1024, 8 * KIB, 200 + i))
        .collect();
    sc.steps = vec![Step::Requests(writes)];
    sc
}

#[test]
fn refcount_growth_with_writes_in_flight_faults() {
    prove_phases(refcount_growth_in_flight(), Phases::Faults);
}

#[test]
fn refcount_growth_with_writes_in_flight_power_cuts() {
    prove_phases(refcount_growth_in_flight(), Phases::PowerCuts);
}

// The largest scenario runs as two tests, so that they share the cores.
#[test]
fn refcount_block_and_table_growth_power_cuts() {
    prove_phases(refcount_growth(), Phases::PowerCuts);
}

#[test]
fn refcount_block_and_table_growth_faults() {
    prove_phases(refcount_growth(), Phases::Faults);
}

#[test]
fn write_over_snapshot_shared_cluster() {
    let images = vec![ImageSpec::new("disk.qcow2", MIB, 64 * KIB)
        .io(&["write -P 0x71 0 512k"])
        .snapshot("s1")];
    prove(
        Scenario::new("internal snapshot", images, "disk.qcow2")
            .steps(vec![
                // Partial write: copy-on-write of the shared cluster and of
                // the shared L2 table.
                write(64 * KIB + 100, 4 * KIB, 7),
                // A whole shared cluster: no copy, one reference dropped.
                write(128 * KIB, 64 * KIB, 8),
                write(700 * KIB, 4 * KIB, 9),
            ])
            .faults(&["disk.qcow2"]),
    );
}

#[test]
fn write_over_compressed_cluster() {
    let images = vec![ImageSpec::new("disk.qcow2", MIB, 64 * KIB).io(&[
        "write -c -P 0x81 0 64k",
        "write -c -P 0x82 64k 64k",
        "write -c -P 0x83 128k 64k",
    ])];
    prove(
        Scenario::new("compressed", images, "disk.qcow2")
            .steps(vec![
                // Partial: the rest of the cluster is inflated.
                write(64 * KIB + 512, KIB, 10),
                // Whole cluster: nothing to inflate, the extent is released.
                write(0, 64 * KIB, 11),
            ])
            .faults(&["disk.qcow2"]),
    );
}
