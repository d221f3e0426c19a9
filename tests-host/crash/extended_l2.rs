//! Extended L2 entries (32 subclusters per cluster): every write path that
//! sets subcluster bits, under power cuts and faults.

use super::*;

/// base (data everywhere) <- top, both with extended L2 entries and 64 KiB
/// clusters (2 KiB subclusters); top holds `top` already.
fn extended_pair(size: u64, top: &[&str]) -> Vec<ImageSpec> {
    let half = size / 2;
    let base = [
        format!("write -P 0x51 0 {half}"),
        format!("write -P 0x52 {half} {half}"),
    ];
    let base: Vec<&str> = base.iter().map(String::as_str).collect();
    vec![
        ImageSpec::new("base.qcow2", size, 64 * KIB)
            .extended_l2()
            .io(&base),
        ImageSpec::new("top.qcow2", size, 64 * KIB)
            .extended_l2()
            .on("base.qcow2")
            .io(top),
    ]
}

/// Writes into clusters top does not hold: a new cluster whose partial
/// subclusters are copied from base, the others left to show base
/// through; one write over two clusters and one inside one subcluster.
#[test]
fn subcluster_writes_into_new_clusters() {
    prove(
        Scenario::new(
            "extended: new clusters",
            extended_pair(2 * MIB, &[]),
            "top.qcow2",
        )
        .steps(vec![
            write(64 * KIB + 3000, 5000, 60),
            write(192 * KIB - 1000, 2000, 61),
            write(MIB + 512, 512, 62),
        ])
        .faults(&["top.qcow2", "base.qcow2"]),
    );
}

/// Writes into a cluster top owns whose subclusters written hold no data
/// yet (unallocated or zero): filled in place, then their bits set.
#[test]
fn subcluster_writes_into_owned_clusters() {
    let top = [
        "write -P 0x53 0 4k",
        "write -z 8k 4k",
        "write -P 0x54 128k 2k",
    ];
    prove(
        Scenario::new(
            "extended: owned clusters",
            extended_pair(2 * MIB, &top),
            "top.qcow2",
        )
        .steps(vec![
            // Over allocated, unallocated and zero subclusters.
            write(3000, 10_000, 63),
            // Inside one unallocated subcluster.
            write(128 * KIB + 5000, 100, 64),
        ])
        .faults(&["top.qcow2"]),
    );
}

/// Zero writes: whole subclusters get their zero bits (storage kept),
/// partial ones are written, whole clusters get the zero flag.
#[test]
fn subcluster_zero_writes() {
    let top = ["write -P 0x55 0 256k"];
    prove(
        Scenario::new(
            "extended: write -z",
            extended_pair(2 * MIB, &top),
            "top.qcow2",
        )
        .steps(vec![
            Step::Zero {
                off: 4 * KIB,
                len: 8 * KIB,
            },
            Step::Zero {
                off: 100 * KIB + 100,
                len: 200 * KIB,
            },
            Step::Zero {
                off: MIB + 1000,
                len: 5000,
            },
            // Discards take whole clusters only, as QEMU's.
            Step::Discard {
                off: 60 * KIB,
                len: 200 * KIB,
            },
            // Subclusters holding data zeroed, then written in part before
            // any flush: the write must not fill them in place while the
            // disk still maps their old data (R18).
            Step::ZeroThenWrite {
                zero: (132 * KIB, 10 * KIB),
                write: (132 * KIB + 100, 6 * KIB, 65),
            },
        ])
        .faults(&["top.qcow2"]),
    );
}

/// Requests in flight through the engine, several into one new cluster
/// and into owned clusters' empty subclusters, completing out of order.
#[test]
fn subcluster_requests_in_flight() {
    let top = ["write -P 0x56 512k 64k", "write -z 576k 2k"];
    let writes: Vec<(u64, u64, u64)> = vec![
        (1000, 3000, 70),
        (64 * KIB, 4 * KIB, 71),
        (72 * KIB + 100, 200, 72),
        (512 * KIB + 10 * KIB, 4 * KIB, 73),
        (576 * KIB + 100, 3000, 74),
        (MIB, 130 * KIB, 75),
        (3 * MIB / 2 + 700, 9000, 76),
    ];
    prove(
        Scenario::new(
            "extended: requests in flight",
            extended_pair(2 * MIB, &top),
            "top.qcow2",
        )
        .steps(vec![Step::Requests(writes)])
        .faults(&["top.qcow2"])
        .qemu_sample(2),
    );
}

/// Stream and active commit (with a pivot) over an extended chain: their
/// copies go through the same write path.
#[test]
fn jobs_on_an_extended_chain() {
    let top = [
        "write -P 0x57 4k 6k",
        "write -z 100k 2k",
        "write -P 0x58 900k 10k",
    ];
    prove(
        Scenario::new("extended: stream", extended_pair(MIB, &top), "top.qcow2")
            .steps(vec![Step::Stream { base: None }])
            .faults(&["top.qcow2"]),
    );
    let writes = vec![GuestWrite {
        after_step: 1,
        off: 64 * KIB + 10,
        len: 5000,
        seed: 77,
    }];
    prove(
        Scenario::new(
            "extended: active commit",
            extended_pair(MIB, &top),
            "top.qcow2",
        )
        .steps(vec![
            Step::Commit {
                top: "top.qcow2",
                base: "base.qcow2",
                writes,
            },
            write(500 * KIB + 3, 3000, 78),
        ])
        .faults(&["base.qcow2", "top.qcow2"]),
    );
}
