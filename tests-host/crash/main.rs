//! Crash safety, proven by replay (issue "Prove crash safety").
//!
//! Every operation of the write path runs on in-memory images
//! ([`MemDevice`]) made by qemu-img/qemu-io: guest writes of every kind
//! (one at a time, and many in flight through the request engine with
//! their device writes completing out of order),
//! `drop_intermediate`, commit, active commit with pivot, stream and live
//! snapshot. Two attacks follow.
//!
//! 1. **Power cuts.** The devices' observers log every write (offset and
//!    bytes) and flush, in one global sequence across the scenario's images.
//!    For every cut point `k` the images are rebuilt as their initial bytes
//!    plus the first `k` logged writes. At cut points with writes not yet
//!    flushed, a disk may have reordered them, so subsets of those writes
//!    are tried too: all of them when at most three are unflushed, else the
//!    newest write alone (it overtook everything it may depend on) and a few
//!    random subsets. Every rebuilt state must
//!    - open through the library (`Graph::open_image`, `Qcow2::open`) and
//!      pass `qemu-img check` (leaks allowed: exit 0 or 3, never 2);
//!    - show, for every image, a backing reference and a guest view (unit
//!      by unit, the unit being the smallest cluster size) that the image
//!      had at one of the API calls around the cut ("marks"): old or new,
//!      never reaching back past the last mark whose writes are all there;
//!    - hold, in the guest's image, the guest view acknowledged by the last
//!      API call that returned before the cut: a completed flush loses
//!      nothing, whatever the disk did with later writes.
//! 2. **Faults.** The same operations run again with the N-th device
//!    operation of one image failing, for every N until the operation
//!    completes without reaching it. The call must return the I/O error (no
//!    panic), the graph must be unchanged (or consistently advanced), disk
//!    and memory must agree on the chain at once and on the data after one
//!    flush once the fault is gone (the metadata cache is write-back: a
//!    failed flush leaves updates to write), `qemu-img check` must find no
//!    corruption,
//!    nothing acknowledged may be lost (the failed request reads old or
//!    new), and repeating the failed call must succeed and leave the images
//!    as a run without the fault leaves them.
//!
//! A missing qemu-img or qemu-io fails these tests; it never skips them.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use blockgraph::device::{
    perform, Completion, DeviceEvent, DeviceId, MemDevice, Op, Queue, Submitted, Tag,
};
use blockgraph::engine::Engine;
use blockgraph::graph::{ByName, OpenByName};
use blockgraph::jobs::{CommitRequest, JobId, JobStatus, OnError, StreamRequest};
use blockgraph::{Access, BackendId, Device, Error, ErrorKind, Format, Graph, NodeId, OpenOptions};

#[path = "../common/mod.rs"]
mod common;
use common::{be32, be64, qemu_img, qemu_io, render, run};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// Copy buffer of a job step.
const SCRATCH: usize = 64 * 1024;
/// Upper bound on the steps of one job.
const STEP_LIMIT: u64 = 10_000;
/// Upper bound on N in the fault phase (a run that never ends is a bug).
const FAULT_LIMIT: u64 = 20_000;
/// The graph under test. Its metadata cache is tiny (four 4 KiB slices) so
/// that dirty table slices are evicted, and written back, in the middle of
/// operations: the power cuts hit those write-backs too.
type LiveGraph<'a> = Graph<Disk<'a>, 64, 8, 4>;

/// Random subsets tried at each cut point with unflushed writes.
const REORDERINGS: usize = 4;
/// Failures printed in full (the rest are counted).
const SHOWN_FAILURES: usize = 12;
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";

// ===========================================================================
// qemu-img and qemu-io.
// ===========================================================================

/// The guest view of `img` (or of its internal snapshot) as qemu-img
/// converts it.
fn qemu_view(dir: &Path, img: &str, snapshot: Option<&str>) -> Vec<u8> {
    let raw = format!("{img}.view.raw");
    let snap = snapshot.map(|s| format!("snapshot.name={s}"));
    let mut args = vec!["convert", "-U", "-f", "qcow2"];
    if let Some(snap) = &snap {
        args.extend(["-l", snap.as_str()]);
    }
    args.extend(["-O", "raw", img, &raw]);
    qemu_img(dir, &args);
    let view = std::fs::read(dir.join(&raw)).expect("read converted view");
    std::fs::remove_file(dir.join(&raw)).expect("remove converted view");
    view
}

// ===========================================================================
// Small helpers: random numbers, fingerprints, replay.
// ===========================================================================

/// SplitMix64.
struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `len` pseudo-random bytes from `seed` (guest data: every unit differs).
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = vec![0u8; len as usize];
    for chunk in out.chunks_mut(8) {
        let word = rng.next().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    out
}

/// Identifies image content: length and two Adler-32 sums (forward, and
/// over 4 KiB blocks taken back to front). The sums run in miniz_oxide,
/// which is built optimised even in debug builds.
type Fp = (usize, u32, u32);

fn fingerprint(bytes: &[u8]) -> Fp {
    let forward = miniz_oxide::mz_adler32_oxide(1, bytes);
    let backward = bytes
        .chunks(4096)
        .rev()
        .fold(7, miniz_oxide::mz_adler32_oxide);
    (bytes.len(), forward, backward)
}

/// One logged device event.
#[derive(Clone, Debug)]
enum Ev {
    Write {
        img: usize,
        offset: u64,
        data: Vec<u8>,
    },
    Flush {
        img: usize,
    },
}

type Log = Rc<RefCell<Vec<Ev>>>;

/// Applies one logged write to an image's bytes (a write past the end
/// grows the image, the gap reading zeros, as a MemDevice or a file does).
fn apply(state: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    let end = start + data.len();
    if state.len() < end {
        state.resize(end, 0);
    }
    state[start..end].copy_from_slice(data);
}

/// Image `img` after every logged write.
fn replay_image(initial: &[u8], events: &[Ev], img: usize) -> Vec<u8> {
    let mut state = initial.to_vec();
    for ev in events {
        if let Ev::Write {
            img: i,
            offset,
            data,
        } = ev
        {
            if *i == img {
                apply(&mut state, *offset, data);
            }
        }
    }
    state
}

fn has_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && &bytes[..4] == QCOW2_MAGIC
}

/// How a view is compared, unit by unit, with the views it may show.
#[derive(Clone, Copy)]
struct Units {
    /// The unit: the smallest cluster size of the scenario.
    size: u64,
}

/// Compares `view` with `candidates` unit by unit: `Ok(())` when every
/// unit equals the same unit of some candidate, `Err(unit)` for the first
/// unit that does not.
fn compare_units(view: &[u8], candidates: &[Rc<Vec<u8>>], units: Units) -> Result<(), usize> {
    let same_len: Vec<&Rc<Vec<u8>>> = candidates
        .iter()
        .filter(|c| c.len() == view.len())
        .collect();
    if same_len.iter().any(|c| c.as_slice() == view) {
        return Ok(());
    }
    if same_len.is_empty() {
        return Err(0);
    }
    let matches = |range: std::ops::Range<usize>| {
        same_len
            .iter()
            .any(|c| c[range.clone()] == view[range.clone()])
    };
    let unit = units.size as usize;
    match (0..view.len().div_ceil(unit))
        .find(|u| !matches(u * unit..((u + 1) * unit).min(view.len())))
    {
        Some(u) => Err(u),
        None => Ok(()),
    }
}

mod devices;
use devices::*;
mod rebuilt;
use rebuilt::*;
mod scenarios;
use scenarios::*;
mod running;
use running::*;
mod judging;
use judging::*;
mod driver;
mod faults;
use driver::*;
mod guest_writes;
use guest_writes::*;
mod chain_changes;
mod data_file;
mod extended_l2;
