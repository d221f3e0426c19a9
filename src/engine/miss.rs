//! Metadata misses without blocking: a read or write whose plan misses the
//! metadata cache loads the slice split-phase and waits for it; requests
//! that need no such load go ahead meanwhile.
//!
//! The VMM lends the engine buffers of [`SLICE_SIZE`] bytes
//! ([`Engine::lend_metadata_buffer`]); with none lent (the default) plans
//! load what they miss synchronously, as the graph's lookups always do.
//! With buffers, a read or write is planned with loading off
//! (`Graph::without_loading`): a miss reads nothing, the plan is discarded
//! (plans are pure) and the slice it names is read into a free buffer as an
//! [`Op::Read`] of the whole buffer; the request waits, queued. A second
//! request missing the same slice waits for the same load. When the read
//! completes, the poll that collects it puts the bytes in the cache
//! (`MetaCache::insert`: the same slots, eviction and write-back order as a
//! load; the entries are checked where they are read, as always) and the
//! waiting requests are planned again; a load that fails fails them.
//!
//! Two fallbacks keep every request moving: a slice whose whole buffer
//! would reach past its device's end (only possible for images with
//! clusters under 4 KiB, at the end of the file), and a request that has
//! missed [`MISSES`] times (a tiny cache can evict one slice of a plan
//! while loading the next), are planned with loading on. A write's plan
//! (its whole validation, the in-place or allocating decision) loads this
//! way, including the refcount slices that show room for its new clusters
//! (`Qcow2::check_replacements`): placing them, in the same poll, touches
//! only slices the plan found cached, so it reads nothing. Only refcount
//! growth (a new refcount block, every 2 GiB of file with 64 KiB
//! clusters, or a larger refcount table) writes synchronously there.
//!
//! Inserting may evict a dirty slice, whose image is then written back
//! synchronously in the poll (R3 order kept), as any load's eviction does.
//!
//! Memory: the buffers are the VMM's (4 KiB each; a host file's queue
//! takes `'static` ones); the engine keeps [`METADATA_BUFFERS`] entries of
//! 104 bytes.

use super::{plan, tag, Engine, Payload, Route, Slot, State};
use crate::device::{Op, Queue, Submitted};
use crate::error::{fail, ErrorKind, Result};
use crate::format::cache::{Miss, SLICE_SIZE};
use crate::graph::place::Place;
use crate::graph::Graph;

/// Most metadata buffers an [`Engine`] takes: slices loading at once.
pub const METADATA_BUFFERS: usize = 8;

/// The slot index in the tags of metadata loads (request slots are fewer).
pub(super) const LOAD_SLOT: usize = 0xffff;

/// Misses after which a request is planned with loading on.
const MISSES: u8 = 8;

/// One lent buffer and the load it serves.
pub(super) struct Load<'b> {
    /// The buffer, while no device holds it.
    buf: Option<&'b mut [u8]>,
    /// The slice it is being read for.
    miss: Option<Miss>,
    /// The read's result, once collected (the cache has not got it yet).
    result: Option<Result<()>>,
    /// The buffer is out with a write-back (module `writeback`).
    pub(super) out: bool,
}

impl<'b> Load<'b> {
    /// No buffer lent.
    pub(super) const IDLE: Self = Self {
        buf: None,
        miss: None,
        result: None,
        out: false,
    };

    /// Whether this entry holds an idle buffer.
    pub(super) fn lend_ready(&self) -> bool {
        self.buf.is_some() && self.miss.is_none()
    }

    /// Lends this entry's buffer out to a write-back, when it is idle.
    pub(super) fn lend_out(&mut self) -> Option<&'b mut [u8]> {
        if self.miss.is_some() {
            return None;
        }
        let buf = self.buf.take()?;
        self.out = true;
        Some(buf)
    }

    /// Takes back the buffer lent out.
    pub(super) fn give_back(&mut self, buf: Option<&'b mut [u8]>) {
        self.buf = buf;
        self.out = false;
    }
}

/// Records the completion of load `index` (in a device's poll).
pub(super) fn collected<'b>(
    loads: &mut [Load<'b>; METADATA_BUFFERS],
    index: usize,
    result: Result<()>,
    buf: Option<&'b mut [u8]>,
) {
    if let Some(load) = loads.get_mut(index) {
        load.buf = buf;
        load.result = Some(result);
    }
}

/// What starting the load of a missed slice did.
enum Loading {
    /// In flight in this entry (`true`: submitted just now): wait for it.
    Waiting(usize, bool),
    /// Read at once and in the cache: plan again.
    Loaded,
    /// Every buffer is busy: try again at a later poll.
    NoBuffer,
    /// Not for a buffer: plan with loading on.
    Synchronous,
}

impl<'b, const SLOTS: usize, const SEGMENTS: usize, const PIECES: usize>
    Engine<'b, SLOTS, SEGMENTS, PIECES>
{
    /// Lends the engine `buf` for loading metadata slices without blocking
    /// (module docs). The engine keeps it until it is dropped; each buffer
    /// is one slice loading at a time.
    ///
    /// # Errors
    /// `buf` back when it is not [`SLICE_SIZE`] bytes long or the engine
    /// has [`METADATA_BUFFERS`] already.
    pub fn lend_metadata_buffer(
        &mut self,
        buf: &'b mut [u8],
    ) -> core::result::Result<(), &'b mut [u8]> {
        if buf.len() != SLICE_SIZE {
            return Err(buf);
        }
        match self
            .loads
            .iter_mut()
            .find(|l| l.buf.is_none() && l.miss.is_none() && !l.out)
        {
            Some(load) => {
                load.buf = Some(buf);
                Ok(())
            }
            None => Err(buf),
        }
    }

    /// Metadata slices being loaded without blocking.
    pub fn metadata_loads_in_flight(&self) -> usize {
        self.loads.iter().filter(|l| l.miss.is_some()).count()
    }

    /// Puts the slices of collected loads in the cache; the requests
    /// waiting for them are planned again (or fail with the load).
    #[inline(never)] // Stack: its frame and its siblings' do not add up.
    pub(super) fn finish_loads<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) {
        for index in 0..METADATA_BUFFERS {
            let load = &mut self.loads[index];
            let Some(result) = load.result.take() else {
                continue;
            };
            let Some(miss) = load.miss.take() else {
                continue;
            };
            let inserted = result.and_then(|()| match load.buf.as_deref() {
                Some(buf) => graph.insert_loaded(&miss, &buf[..miss.len]),
                None => lost(),
            });
            for slot in self.slots.iter_mut().flatten() {
                if slot.load != Some(index) {
                    continue;
                }
                slot.load = None;
                if let Err(err) = inserted {
                    slot.fail(err);
                    slot.state = State::Done;
                }
            }
        }
    }
}

/// How `slot` (request `index`) goes to the devices, with the slices its
/// plan misses loaded split-phase when buffers are lent; `None` while it
/// waits for a load.
pub(super) fn plan_or_load<
    'b,
    D: Queue<'b>,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
    const S: usize,
    const P: usize,
>(
    (loads, ops): (&mut [Load<'b>; METADATA_BUFFERS], &mut usize),
    graph: &mut Graph<D, N, B, C, J>,
    slot: &mut Slot<'b, S, P>,
) -> Option<Result<Route>> {
    let lent = loads
        .iter()
        .any(|l| l.buf.is_some() || l.miss.is_some() || l.out);
    loop {
        if !lent
            || slot.misses >= MISSES
            || !matches!(slot.payload, Payload::Read(_) | Payload::Write(_))
        {
            return Some(plan(graph, slot));
        }
        let (route, miss) = graph.without_loading(|graph| plan(graph, slot));
        let Some(miss) = miss else {
            return Some(route);
        };
        // The plan met the miss: whatever it found is discarded.
        slot.extent = None;
        match start_load(loads, graph, &miss) {
            Ok(Loading::Waiting(index, submitted)) => {
                slot.misses += 1;
                slot.load = Some(index);
                *ops += usize::from(submitted);
                return None;
            }
            Ok(Loading::Loaded) => slot.misses += 1,
            Ok(Loading::NoBuffer) => return None,
            Ok(Loading::Synchronous) => return Some(plan(graph, slot)),
            Err(err) => return Some(Err(err)),
        }
    }
}

/// Starts loading `miss` into a free buffer, or finds it loading already.
///
/// # Errors
/// The read's error when it failed at once; an insert's (write-back) error.
fn start_load<'b, D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
    loads: &mut [Load<'b>; METADATA_BUFFERS],
    graph: &mut Graph<D, N, B, C, J>,
    miss: &Miss,
) -> Result<Loading> {
    if let Some(index) = loads
        .iter()
        .position(|l| l.miss.is_some_and(|m| m.same_slice(miss)))
    {
        return Ok(Loading::Waiting(index, false));
    }
    let Some(index) = loads.iter().position(|l| l.buf.is_some()) else {
        return Ok(Loading::NoBuffer);
    };
    let Some(device) = graph
        .devices
        .get_mut(miss.image.device)
        .and_then(Place::as_mut)
    else {
        return Ok(Loading::Synchronous);
    };
    if device.size() < miss.offset.saturating_add(SLICE_SIZE as u64) {
        return Ok(Loading::Synchronous);
    }
    let load = &mut loads[index];
    let Some(buf) = load.buf.take() else {
        return Ok(Loading::NoBuffer);
    };
    let op = Op::Read {
        offset: miss.offset,
        buf,
    };
    match device.submit(tag(LOAD_SLOT, index), op) {
        Submitted::Queued => {
            load.miss = Some(*miss);
            Ok(Loading::Waiting(index, true))
        }
        Submitted::Done(result, buf) => {
            load.buf = buf;
            result?;
            match load.buf.as_deref() {
                Some(bytes) => graph.insert_loaded(miss, &bytes[..miss.len])?,
                None => return lost(),
            };
            Ok(Loading::Loaded)
        }
    }
}

/// The error of a read that did not give its buffer back.
fn lost<T>() -> Result<T> {
    fail(ErrorKind::Io, "a metadata buffer was not given back")
}
