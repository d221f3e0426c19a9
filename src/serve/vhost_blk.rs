//! The vhost-user-blk side: a [`VhostUserBackend`] that only passes events
//! to the serve loop, and the loop's work on the virtqueues.
//!
//! ```text
//!  frontend thread (vhost-user-backend)     serve loop (owns graph, engine)
//!  SET_MEM_TABLE ── update_memory ──┐       take the new table: drain, new
//!  kick ── handle_event ────────────┤ Inbox  Server over MappedMemory
//!  GET_VRING_BASE ── stop_vring ────┤ ────> pop chains -> Server::submit
//!  RESET_DEVICE ── reset_device ────┘ <──── Server::poll, used ring, call
//!          (waits for the loop's ack)        eventfd; drains, then acks
//! ```
//!
//! The backend object is shared with vhost-user-backend's threads (it must
//! be `Send + Sync`); everything that touches the graph or the engine runs
//! on the serve loop's thread. The frontend thread blocks in
//! [`VhostUserBackend::stop_vring`] and [`VhostUserBackend::reset_device`]
//! until the loop has drained the requests it accepted, as the vhost-user
//! protocol asks (`GET_VRING_BASE` answers once the ring is stopped).

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{
    Error as DaemonError, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::virtio_blk::{Config, Descriptor, CONFIG_LEN};

/// The guest memory handle vhost-user-backend passes around.
pub(super) type Atomic = GuestMemoryAtomic<GuestMemoryMmap<()>>;
/// One virtqueue as vhost-user-backend keeps it.
pub(super) type Vring = VringRwLock<Atomic>;

/// `VIRTIO_BLK_F_MQ`: the config space's `num_queues` is valid.
const F_MQ: u32 = 12;
/// Offset of `num_queues` (le16) in the virtio-blk config space.
const NUM_QUEUES_AT: usize = 34;
/// Most descriptors a virtqueue may have.
pub(super) const MAX_QUEUE_SIZE: usize = 1024;

/// What the frontend's thread has told the serve loop and not yet been
/// handled.
#[derive(Default)]
pub(super) struct Inbox {
    /// The virtqueues, once the first kick showed them.
    pub vrings: Option<Vec<Vring>>,
    /// Work arrived since the loop last looked: a guest kicked a queue, an
    /// NBD request or a monitor line came.
    pub kicked: bool,
    /// The memory handle, set on every memory table change.
    pub memory: Option<Atomic>,
    /// A new memory table arrived.
    pub memory_changed: bool,
    /// Drain requests made (stop or reset), and those the loop has
    /// answered: a requester waits until `acks` reaches its number.
    pub requests: u64,
    /// See `requests`.
    pub acks: u64,
    /// A device reset is among the requests: forget unfinished chains.
    pub reset: bool,
    /// The frontend connection ended (with an error message when it broke).
    pub ended: Option<Option<String>>,
    /// `quit` was answered on the monitor.
    pub quit: bool,
    /// The serve loop has ended: nobody will ack any more.
    pub loop_gone: bool,
    /// Frontends whose end the loop has handled (requests drained, memory
    /// and vrings released): the frontend thread waits for it before
    /// taking the next frontend.
    pub frontends_released: u64,
    /// Threads waiting in [`Shared::wait`]: a change wakes them only when
    /// there are some (no system call per NBD request or kick while the
    /// loop is busy).
    waiters: usize,
}

/// The inbox and the condition variable both sides wait on.
#[derive(Default)]
pub(super) struct Shared {
    inbox: Mutex<Inbox>,
    wake: Condvar,
}

impl Shared {
    /// The inbox, locked (a thread that panicked while holding it left it
    /// consistent: every field is a plain flag or value).
    pub fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the inbox and wakes the other side if it waits.
    pub fn tell(&self, change: impl FnOnce(&mut Inbox)) {
        let mut inbox = self.lock();
        change(&mut inbox);
        if inbox.waiters > 0 {
            self.wake.notify_all();
        }
    }

    /// Waits up to `timeout` for a change, with the inbox locked.
    pub fn wait<'a>(
        &self,
        mut inbox: MutexGuard<'a, Inbox>,
        timeout: Duration,
    ) -> MutexGuard<'a, Inbox> {
        inbox.waiters += 1;
        let mut inbox = match self.wake.wait_timeout(inbox, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        };
        inbox.waiters -= 1;
        inbox
    }

    /// Asks the loop to drain (and, with `reset`, forget) its chains and
    /// waits until it has.
    fn drain_request(&self, reset: bool) {
        let mut inbox = self.lock();
        inbox.requests += 1;
        inbox.reset |= reset;
        let mine = inbox.requests;
        self.wake.notify_all();
        while inbox.acks < mine && !inbox.loop_gone {
            inbox = self.wait(inbox, Duration::from_millis(100));
        }
    }
}

/// The device as vhost-user-backend sees it: features, config space,
/// and events forwarded to the serve loop.
#[derive(Clone)]
pub(super) struct Backend {
    pub shared: Arc<Shared>,
    pub config: Config,
    pub num_queues: usize,
}

impl Backend {
    /// Virtio feature bits offered: the disk's, indirect descriptors,
    /// event indexes, multi-queue when there is more than one queue, and
    /// vhost-user's protocol features.
    fn device_features(&self) -> u64 {
        let mut bits = self.config.features()
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX;
        if self.num_queues > 1 {
            bits |= 1 << F_MQ;
        }
        bits | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.device_features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.shared.drain_request(true);
    }

    // vhost-user-backend sets it on the vrings, which is all it changes:
    // `rearm` and `signal_used` ask them.
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut bytes = self.config.bytes();
        let queues = u16::try_from(self.num_queues).unwrap_or(1);
        bytes[NUM_QUEUES_AT..NUM_QUEUES_AT + 2].copy_from_slice(&queues.to_le_bytes());
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        let mut out = bytes[start..end].to_vec();
        // Bytes past the config space read as zero.
        out.resize(size.min(4096) as usize, 0);
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // The writeback field is not offered: the config space is read-only.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the virtio-blk config space is read-only",
        ))
    }

    fn update_memory(&self, memory: Atomic) -> io::Result<()> {
        self.shared.tell(|inbox| {
            inbox.memory = Some(memory);
            inbox.memory_changed = true;
        });
        Ok(())
    }

    // Without an exit event a worker thread never ends, and dropping the
    // daemon (which joins them) would hang.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.shared.drain_request(false);
        Ok(())
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        self.shared.tell(|inbox| {
            if inbox.vrings.is_none() {
                inbox.vrings = Some(vrings.to_vec());
            }
            inbox.kicked = true;
        });
        Ok(())
    }
}

/// The next available chain of `vring`, as the device side's descriptors
/// (virtio-queue walks direct and indirect tables and bounds the walk);
/// `None` when the queue is empty, disabled or not ready.
pub(super) fn pop<'a>(
    vring: &Vring,
    table: &'a GuestMemoryMmap<()>,
) -> Option<(u16, impl Iterator<Item = Descriptor> + 'a)> {
    let mut state = vring.get_mut();
    if !state.is_enabled() {
        return None;
    }
    let chain = state.get_queue_mut().pop_descriptor_chain(table)?;
    let head = chain.head_index();
    let descriptors = chain.map(|d| Descriptor {
        addr: d.addr().0,
        len: d.len(),
        device_writable: d.is_write_only(),
    });
    Some((head, descriptors))
}

/// Puts the chain just popped back (the server had no room after all).
pub(super) fn unpop(vring: &Vring) {
    vring.get_mut().get_queue_mut().go_to_previous_position();
}

/// Asks the guest to kick `vring` for the next chain it makes available
/// (with EVENT_IDX: the available event is where the device stopped);
/// whether a chain came meanwhile, to be taken now. A disabled or unready
/// queue is left alone.
pub(super) fn rearm(vring: &Vring) -> bool {
    let mut state = vring.get_mut();
    if !state.is_enabled() || !state.get_queue().ready() {
        return false;
    }
    // A ring the frontend broke gets no kick request: it is stopped.
    state.enable_notification().unwrap_or(false)
}

/// Interrupts the guest for the chains just put in `vring`'s used ring,
/// unless (with EVENT_IDX) it asked to be told later.
pub(super) fn signal_used(vring: &Vring) {
    if vring.needs_notification().unwrap_or(true) {
        // A frontend that closed its call descriptor is leaving anyway.
        let _ = vring.signal_used_queue();
    }
}

/// Serves one frontend connection on `listener` until it ends: `Ok` when
/// the frontend disconnected, the error's text when a message broke the
/// protocol (vhost-user-backend refused it and dropped the connection;
/// nothing of it reached the images).
pub(super) fn serve_frontend(listener: &mut Listener, backend: Backend) -> Result<(), String> {
    let memory = Atomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("blockgraph-vhost-user-blk".to_owned(), backend, memory)
        .map_err(|e| e.to_string())?;
    daemon.start(listener).map_err(|e| e.to_string())?;
    match daemon.wait() {
        Ok(())
        | Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(err) => Err(err.to_string()),
    }
}
