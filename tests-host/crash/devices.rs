//! Live devices: MemDevice with an observer, fault arming and a resolver.

use super::*;

/// Per-image state shared between the test and the image's device.
#[derive(Default)]
pub(crate) struct DiskState {
    /// Current length of the device.
    pub(crate) len: Cell<u64>,
    /// A pending `fail_operation` request, applied at the next operation.
    pub(crate) arm: Cell<Option<Option<u64>>>,
    /// The armed operation index (counted from arming).
    pub(crate) fault_at: Cell<Option<u64>>,
    /// Operations since arming.
    pub(crate) count: Cell<u64>,
    /// Whether the armed operation was reached (and failed).
    pub(crate) hit: Cell<bool>,
}

/// A MemDevice plus the bookkeeping the test needs. Writes the request
/// engine submits stay queued (as copies: the device took the bytes) and
/// are performed, and completed, a few per poll in a pseudo-random order.
pub(crate) struct Disk<'a> {
    pub(crate) mem: MemDevice<'a>,
    pub(crate) st: Rc<DiskState>,
    pub(crate) queued: Vec<(Tag, u64, Vec<u8>)>,
    pub(crate) order: Rng,
}

impl Disk<'_> {
    /// Applies a pending arm request, then counts an operation that reaches
    /// MemDevice's operation counter.
    pub(crate) fn before_op(&mut self, counted: bool) {
        if let Some(request) = self.st.arm.take() {
            self.mem.fail_operation(request);
            self.st.fault_at.set(request);
            self.st.count.set(0);
        }
        if counted {
            let count = self.st.count.get();
            if self.st.fault_at.get() == Some(count) {
                self.st.hit.set(true);
            }
            self.st.count.set(count + 1);
        }
    }
}

impl Device for Disk<'_> {
    fn size(&self) -> u64 {
        self.mem.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> blockgraph::Result<()> {
        self.before_op(true);
        self.mem.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> blockgraph::Result<()> {
        // MemDevice refuses writes to a read-only device before counting.
        let counted = !self.mem.is_read_only();
        self.before_op(counted);
        let result = self.mem.write_at(offset, buf);
        self.st.len.set(self.mem.size());
        result
    }

    fn write_vectored_at(&mut self, offset: u64, bufs: &[&[u8]]) -> blockgraph::Result<()> {
        // One operation, as MemDevice counts it.
        let counted = !self.mem.is_read_only();
        self.before_op(counted);
        let result = self.mem.write_vectored_at(offset, bufs);
        self.st.len.set(self.mem.size());
        result
    }

    fn flush(&mut self) -> blockgraph::Result<()> {
        self.before_op(true);
        self.mem.flush()
    }

    fn is_read_only(&self) -> bool {
        self.mem.is_read_only()
    }

    fn identity(&self) -> DeviceId {
        self.mem.identity()
    }
}

impl<'b> Queue<'b> for Disk<'_> {
    fn submit(&mut self, tag: Tag, op: Op<'b>) -> Submitted<'b> {
        match op {
            Op::Write { offset, buf } => {
                self.queued.push((tag, offset, buf.to_vec()));
                Submitted::Queued
            }
            op => {
                let (result, buf) = perform(self, op);
                Submitted::Done(result, buf)
            }
        }
    }

    fn poll(&mut self, done: Completion<'_, 'b>) {
        let count = self.queued.len().div_ceil(2);
        for _ in 0..count {
            let pick = (self.order.next() % self.queued.len() as u64) as usize;
            let (tag, offset, data) = self.queued.swap_remove(pick);
            done(tag, self.write_at(offset, &data), None);
        }
    }

    fn busy(&self) -> bool {
        !self.queued.is_empty()
    }
}

pub(crate) type Observer = Box<dyn FnMut(DeviceEvent<'_>)>;

/// A buffer lent to a device, with the observer that logs its events.
pub(crate) type Lent<'a> = (&'a mut [u8], &'a mut dyn FnMut(DeviceEvent<'_>));

/// The buffers and observers of one run; every device event lands in `log`.
pub(crate) struct Storage {
    /// Per image: buffers (several for a blank image, which a failed
    /// snapshot may need to take again) with their observers.
    pub(crate) copies: Vec<Vec<(Vec<u8>, Observer)>>,
    pub(crate) disks: Vec<Rc<DiskState>>,
    pub(crate) log: Log,
}

impl Storage {
    pub(crate) fn new(fx: &Fixture) -> Self {
        let log: Log = Rc::default();
        let spare = (2 * fx.max_size + MIB) as usize;
        let mut copies = Vec::new();
        let mut disks = Vec::new();
        for (img, initial) in fx.initial.iter().enumerate() {
            let count = if fx.blank[img] { 3 } else { 1 };
            let mut list: Vec<(Vec<u8>, Observer)> = Vec::new();
            for _ in 0..count {
                let mut buf = vec![0u8; initial.len() + spare];
                buf[..initial.len()].copy_from_slice(initial);
                let log = Rc::clone(&log);
                let observer: Observer = Box::new(move |event: DeviceEvent<'_>| {
                    let ev = match event {
                        DeviceEvent::Write { offset, data } => Ev::Write {
                            img,
                            offset,
                            data: data.to_vec(),
                        },
                        DeviceEvent::Flush => Ev::Flush { img },
                    };
                    log.borrow_mut().push(ev);
                });
                list.push((buf, observer));
            }
            copies.push(list);
            let state = DiskState::default();
            state.len.set(initial.len() as u64);
            disks.push(Rc::new(state));
        }
        Self { copies, disks, log }
    }

    /// Back to the initial images, for the next run (the buffers are kept:
    /// bytes past an image's length are never read, and a write past it
    /// zeroes the gap).
    pub(crate) fn reset(&mut self, fx: &Fixture) {
        self.log.borrow_mut().clear();
        for (img, list) in self.copies.iter_mut().enumerate() {
            let initial = &fx.initial[img];
            for (buf, _) in list.iter_mut() {
                buf[..initial.len()].copy_from_slice(initial);
            }
            let state = DiskState::default();
            state.len.set(initial.len() as u64);
            self.disks[img] = Rc::new(state);
        }
    }
}

/// One image a [`LiveResolver`] serves.
pub(crate) struct Slot<'a> {
    pub(crate) name: String,
    pub(crate) id: u64,
    /// Buffers not handed out yet, last first.
    pub(crate) copies: Vec<Lent<'a>>,
    pub(crate) taken: usize,
    pub(crate) disk: Rc<DiskState>,
}

/// Serves the scenario's images by name as observed MemDevices.
pub(crate) struct LiveImages<'a> {
    pub(crate) slots: Vec<Slot<'a>>,
    pub(crate) initial: Rc<Vec<Vec<u8>>>,
    pub(crate) log: Log,
}

impl<'a> LiveImages<'a> {
    pub(crate) fn new(storage: &'a mut Storage, fx: &Fixture) -> Self {
        let log = Rc::clone(&storage.log);
        let slots = storage
            .copies
            .iter_mut()
            .zip(&storage.disks)
            .enumerate()
            .map(|(img, (list, disk))| {
                let mut copies: Vec<Lent<'a>> = list
                    .iter_mut()
                    .map(|(buf, observer)| {
                        let observer: &'a mut dyn FnMut(DeviceEvent<'_>) = &mut **observer;
                        (&mut buf[..], observer)
                    })
                    .collect();
                copies.reverse();
                Slot {
                    name: fx.names[img].clone(),
                    id: img as u64 + 1,
                    copies,
                    taken: 0,
                    disk: Rc::clone(disk),
                }
            })
            .collect();
        Self {
            slots,
            initial: Rc::clone(&fx.initial),
            log,
        }
    }

    pub(crate) fn take(&mut self, name: &str, writable: bool) -> blockgraph::Result<Disk<'a>> {
        let Some(img) = self.slots.iter().position(|s| s.name == name) else {
            return Err(Error::new(ErrorKind::NotFound, "no such in-memory image"));
        };
        let slot = &mut self.slots[img];
        let Some((buf, observer)) = slot.copies.pop() else {
            return Err(Error::new(ErrorKind::Busy, "in-memory image already open"));
        };
        if slot.taken > 0 {
            // Opened again (after a failed snapshot): what is on the disk now.
            let current = replay_image(&self.initial[img], &self.log.borrow(), img);
            buf[..current.len()].copy_from_slice(&current);
            slot.disk.len.set(current.len() as u64);
        }
        slot.taken += 1;
        let mut mem = MemDevice::new(buf, slot.disk.len.get(), slot.id)?;
        mem.set_read_only(!writable);
        mem.observe(observer);
        Ok(Disk {
            mem,
            st: Rc::clone(&slot.disk),
            queued: Vec::new(),
            order: Rng::new(img as u64 + 1),
        })
    }
}

/// The live images as a resolver.
pub(crate) type LiveResolver<'a> = ByName<LiveImages<'a>>;

impl<'a> OpenByName<Disk<'a>> for LiveImages<'a> {
    fn open_by_name(&mut self, name: &str, writable: bool) -> blockgraph::Result<Disk<'a>> {
        self.take(name, writable)
    }
}
