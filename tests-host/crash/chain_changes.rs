//! Chain changes and jobs.

use super::*;

/// base <- mid <- top, 1 MiB, 64 KiB clusters, with data, zero clusters and
/// holes in every layer.
pub(crate) fn three_layers() -> Vec<ImageSpec> {
    vec![
        ImageSpec::new("base.qcow2", MIB, 64 * KIB).io(&["write -P 0x91 0 768k"]),
        ImageSpec::new("mid.qcow2", MIB, 64 * KIB)
            .on("base.qcow2")
            .io(&[
                "write -P 0x92 256k 256k",
                "write -z 640k 64k",
                "write -P 0x95 832k 64k",
            ]),
        ImageSpec::new("top.qcow2", MIB, 64 * KIB)
            .on("mid.qcow2")
            .io(&["write -P 0x93 0 128k", "write -P 0x94 900k 10k"]),
    ]
}

#[test]
fn drop_intermediate_collapse() {
    let mut sc = Scenario::new("drop_intermediate", three_layers(), "top.qcow2")
        .steps(vec![Step::Collapse {
            top: "mid.qcow2",
            base: Some("base.qcow2"),
        }])
        .faults(&["top.qcow2"]);
    sc.rebase = Some(("top.qcow2", "base.qcow2"));
    prove(sc);
}

#[test]
fn intermediate_commit() {
    let mut sc = Scenario::new("commit", three_layers(), "top.qcow2")
        .steps(vec![Step::Commit {
            top: "mid.qcow2",
            base: "base.qcow2",
            writes: Vec::new(),
        }])
        .faults(&["base.qcow2", "mid.qcow2", "top.qcow2"]);
    sc.final_equals = vec![("base.qcow2", "mid.qcow2")];
    prove(sc);
}

#[test]
fn active_commit_with_pivot() {
    let images = base_and_top(
        MIB,
        64 * KIB,
        &["write -P 0xa1 0 1M"],
        &[
            "write -P 0xa2 128k 256k",
            "write -z 640k 64k",
            "write -P 0xa3 900k 10k",
        ],
    );
    let writes = vec![
        GuestWrite {
            after_step: 1,
            off: 64 * KIB + 10,
            len: 5000,
            seed: 20,
        },
        GuestWrite {
            after_step: 3,
            off: 800 * KIB,
            len: 64 * KIB,
            seed: 21,
        },
        // Issued while ready: re-copied before the pivot.
        GuestWrite {
            after_step: 40,
            off: 300 * KIB,
            len: 512,
            seed: 22,
        },
    ];
    prove(
        Scenario::new("active commit", images, "top.qcow2")
            .steps(vec![
                Step::Commit {
                    top: "top.qcow2",
                    base: "base.qcow2",
                    writes,
                },
                // After the pivot the guest writes into base.
                write(500 * KIB, 4 * KIB, 23),
            ])
            .faults(&["base.qcow2", "top.qcow2"]),
    );
}

#[test]
fn stream() {
    prove(
        Scenario::new("stream", three_layers(), "top.qcow2")
            .steps(vec![Step::Stream {
                base: Some("base.qcow2"),
            }])
            .faults(&["top.qcow2", "mid.qcow2"]),
    );
}

#[test]
fn live_snapshot() {
    let mut images = base_and_top(
        MIB,
        64 * KIB,
        &["write -P 0xb1 0 1M"],
        &["write -P 0xb2 0 256k"],
    );
    images.push(ImageSpec::blank("snap.qcow2"));
    prove(
        Scenario::new("live snapshot", images, "top.qcow2")
            .steps(vec![
                Step::Snapshot {
                    image: "snap.qcow2",
                },
                write(100 * KIB, 8 * KIB, 30),
            ])
            .faults(&["snap.qcow2", "top.qcow2"]),
    );
}

/// `snapshot -c` (R15): references counted and COPIED flags cleared, the
/// L1 copy and the new table written, one header write commits; a write
/// after it copies the shared cluster out (R4, R5).
#[test]
fn internal_snapshot_create() {
    let images = base_and_top(
        MIB,
        64 * KIB,
        &["write -P 0xc1 0 1M"],
        &["write -P 0xc2 0 256k", "write -P 0xc3 512k 64k"],
    );
    prove(
        Scenario::new("internal snapshot", images, "top.qcow2")
            .steps(vec![
                Step::InternalSnapshot { name: "first" },
                write(100 * KIB, 8 * KIB, 31),
                Step::InternalSnapshot { name: "second" },
            ])
            .faults(&["top.qcow2"]),
    );
}

/// `snapshot -d` (R16): the new table, one header write, then the
/// snapshot's references dropped (a cluster a write copied out is freed)
/// and COPIED flags set again.
#[test]
fn internal_snapshot_delete() {
    let images = base_and_top(
        MIB,
        64 * KIB,
        &["write -P 0xd1 0 1M"],
        &["write -P 0xd2 0 256k", "write -P 0xd3 512k 64k"],
    );
    prove(
        Scenario::new("internal snapshot delete", images, "top.qcow2")
            .steps(vec![
                Step::InternalSnapshot { name: "first" },
                write(100 * KIB, 8 * KIB, 41),
                Step::DeleteInternalSnapshot { name: "first" },
            ])
            .faults(&["top.qcow2"]),
    );
}

/// `snapshot -a` (R17): the snapshot's clusters counted, a new L1 table
/// (its entries, COPIED off), one header write switches to it; then the
/// old tables' references dropped. Writes before and after it.
#[test]
fn internal_snapshot_apply() {
    let images = base_and_top(
        MIB,
        64 * KIB,
        &["write -P 0xe1 0 1M"],
        &["write -P 0xe2 0 256k", "write -P 0xe3 512k 64k"],
    );
    prove(
        Scenario::new("internal snapshot apply", images, "top.qcow2")
            .steps(vec![
                Step::InternalSnapshot { name: "first" },
                write(100 * KIB, 8 * KIB, 51),
                Step::ApplyInternalSnapshot { name: "first" },
                write(200 * KIB, 8 * KIB, 52),
            ])
            .faults(&["top.qcow2"]),
    );
}
