//! External data files: guest data in a second file, its clusters at their
//! guest offsets, mappings in the image (R19), under power cuts and faults
//! of either file.

use super::*;

/// base (data everywhere) <- top, whose data lies in `top.data`; top
/// holds `top_cmds` already.
fn over_base(top_cmds: &[&str], extended: bool) -> Vec<ImageSpec> {
    let mut top = ImageSpec::new("top.qcow2", MIB, 64 * KIB)
        .on("base.qcow2")
        .with_data_file("top.data")
        .io(top_cmds);
    if extended {
        top = top.extended_l2();
    }
    vec![
        ImageSpec::new("base.qcow2", MIB, 64 * KIB).io(&["write -P 0x71 0 1M"]),
        top,
        ImageSpec::data_file("top.data"),
    ]
}

/// Writes into new clusters (copy-on-write from the backing file into the
/// data file), in place, zero writes and a discard.
#[test]
fn data_file_writes() {
    let images = over_base(&["write -P 0x72 128k 64k", "write -P 0x73 600k 4k"], false);
    prove(
        Scenario::new("data file: writes", images, "top.qcow2")
            .steps(vec![
                write(10_000, 70_000, 80),
                write(128 * KIB + 512, 1024, 81),
                Step::Zero {
                    off: 256 * KIB,
                    len: 128 * KIB,
                },
                Step::Zero {
                    off: 600 * KIB + 100,
                    len: 1000,
                },
                Step::Discard {
                    off: 128 * KIB,
                    len: 64 * KIB,
                },
                // A whole cluster holding data zeroed, then written in part
                // before any flush: not in place while the disk still maps
                // its old data (R19).
                Step::ZeroThenWrite {
                    zero: (576 * KIB, 64 * KIB),
                    write: (600 * KIB + 1, 3000, 87),
                },
            ])
            .faults(&["top.qcow2", "top.data"]),
    );
}

/// Requests in flight through the engine into an image with a data file,
/// with extended L2 entries.
#[test]
fn data_file_requests_in_flight() {
    let images = over_base(&["write -P 0x74 512k 64k"], true);
    let writes: Vec<(u64, u64, u64)> = vec![
        (1000, 3000, 82),
        (64 * KIB, 4 * KIB, 83),
        (512 * KIB + 10 * KIB, 4 * KIB, 84),
        (700 * KIB + 1, 70_000, 85),
    ];
    prove(
        Scenario::new("data file: requests in flight", images, "top.qcow2")
            .steps(vec![Step::Requests(writes)])
            .faults(&["top.qcow2", "top.data"])
            .qemu_sample(2),
    );
}

/// A stream into the image with a data file, and an active commit out of
/// it into its base, with a pivot.
#[test]
fn data_file_jobs() {
    let top = [
        "write -P 0x75 4k 6k",
        "write -z 100k 64k",
        "write -P 0x76 900k 10k",
    ];
    prove(
        Scenario::new("data file: stream", over_base(&top, false), "top.qcow2")
            .steps(vec![Step::Stream { base: None }])
            .faults(&["top.qcow2", "top.data"]),
    );
    let writes = vec![GuestWrite {
        after_step: 1,
        off: 64 * KIB + 10,
        len: 5000,
        seed: 86,
    }];
    prove(
        Scenario::new(
            "data file: active commit",
            over_base(&top, false),
            "top.qcow2",
        )
        .steps(vec![Step::Commit {
            top: "top.qcow2",
            base: "base.qcow2",
            writes,
        }])
        .faults(&["base.qcow2", "top.data"]),
    );
}
