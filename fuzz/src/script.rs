//! `script`: the input, as UTF-8, is a script. First the parsers:
//! `split_commands`, `split_words` of each command and `parse_size` /
//! `parse_pattern` of each word. Then, up to [`MAX_SCRIPT`] bytes, the whole
//! script runs through `cmd::run_script` in an environment like the
//! kernel's: two disks, `a` (a qcow2 overlay whose backing file is `b`) and
//! `b` (a qcow2 image with data), each a fixed-size buffer with 1 MiB of
//! room (a virtio disk does not grow), shared by every open of the same
//! name so that a script's writes persist from one command to the next.
//! Backing names resolve by their last path component; creating an image
//! fails. Afterwards the graph must be empty.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use blockgraph::cmd::{self, args, Environment};
use blockgraph::device::{Device, DeviceId};
use blockgraph::graph::NameBuf;
use blockgraph::{Error, ErrorKind, Graph, Resolver};

const A: &[u8] = include_bytes!("../fixtures/a.qcow2");
const B: &[u8] = include_bytes!("../fixtures/base.qcow2");
/// Room after each image on its disk.
const ROOM: usize = 1 << 20;
/// Longest script that is run (the parsers see any length).
const MAX_SCRIPT: usize = 4096;
/// The interpreter's working memory.
const SCRATCH: usize = 64 << 10;

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for command in args::split_commands(text) {
        assert!(!command.trim().is_empty(), "an empty command was returned");
        if let Ok(words) = args::split_words(command) {
            for word in words {
                let _ = args::parse_size(word);
                let _ = args::parse_pattern(word);
            }
        }
    }
    if text.len() > MAX_SCRIPT {
        return;
    }
    let mut env = Env {
        disks: Disks {
            a: Disk::new(A),
            b: Disk::new(B),
        },
    };
    let mut graph: Box<Graph<SharedDisk>> = Box::default();
    let mut scratch = vec![0u8; SCRATCH];
    let mut out = Sink(0);
    let _ = cmd::run_script(&mut env, &mut graph, text, &mut scratch, &mut out);
    assert_eq!(graph.node_count(), 0, "the script left nodes open");
    assert_eq!(
        graph.backend_count(),
        0,
        "the script left backends attached"
    );
}

/// Counts the output and drops it.
struct Sink(usize);

impl fmt::Write for Sink {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

/// A disk's bytes: `len` in use, the rest of `bytes` (zeros) room to grow.
struct Storage {
    bytes: Vec<u8>,
    len: usize,
}

/// One disk, shared by every device opened on it.
#[derive(Clone)]
struct Disk {
    storage: Rc<RefCell<Storage>>,
}

impl Disk {
    fn new(image: &[u8]) -> Self {
        let mut bytes = vec![0u8; image.len() + ROOM];
        bytes[..image.len()].copy_from_slice(image);
        let storage = Storage {
            bytes,
            len: image.len(),
        };
        Self {
            storage: Rc::new(RefCell::new(storage)),
        }
    }
}

/// A device on a [`Disk`].
struct SharedDisk {
    disk: Disk,
    id: u64,
    read_only: bool,
}

impl Device for SharedDisk {
    fn size(&self) -> u64 {
        self.disk.storage.borrow().len as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> blockgraph::Result<()> {
        let storage = self.disk.storage.borrow();
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= storage.len as u64 => {
                buf.copy_from_slice(&storage.bytes[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(Error::new(ErrorKind::Io, "read past the end of the disk")),
        }
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> blockgraph::Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "the disk is read-only"));
        }
        let mut storage = self.disk.storage.borrow_mut();
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= storage.bytes.len() as u64 => {
                // Bytes past `len` are still zeros: nothing to fill.
                storage.bytes[offset as usize..end as usize].copy_from_slice(buf);
                storage.len = storage.len.max(end as usize);
                Ok(())
            }
            _ => Err(Error::new(ErrorKind::NoSpace, "no space left on the disk")),
        }
    }

    fn flush(&mut self) -> blockgraph::Result<()> {
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn identity(&self) -> DeviceId {
        DeviceId(0, self.id)
    }
}

/// The synchronous defaults: every operation completes inside `submit`.
impl<'b> blockgraph::device::Queue<'b> for SharedDisk {}

/// The disks by name: `a` and `b`.
struct Disks {
    a: Disk,
    b: Disk,
}

impl Disks {
    fn open(&self, name: &str, writable: bool) -> blockgraph::Result<SharedDisk> {
        let (disk, id) = match name {
            "a" => (&self.a, 1),
            "b" => (&self.b, 2),
            _ => return Err(Error::new(ErrorKind::NotFound, "no such disk")),
        };
        Ok(SharedDisk {
            disk: disk.clone(),
            id,
            read_only: !writable,
        })
    }
}

impl Resolver<SharedDisk> for Disks {
    fn open(&mut self, name: &str, writable: bool) -> blockgraph::Result<SharedDisk> {
        Disks::open(self, name, writable)
    }

    fn open_backing(
        &mut self,
        _overlay: &str,
        reference: &str,
        writable: bool,
        resolved: &mut NameBuf,
    ) -> blockgraph::Result<SharedDisk> {
        let name = reference.rsplit('/').next().unwrap_or(reference);
        let disk = Disks::open(self, name, writable)?;
        resolved.set(name)?;
        Ok(disk)
    }

    fn reference(
        &mut self,
        _overlay: &str,
        target: &str,
        out: &mut NameBuf,
    ) -> blockgraph::Result<()> {
        out.set(target)
    }
}

struct Env {
    disks: Disks,
}

impl Environment for Env {
    type Device = SharedDisk;
    type Resolver = Disks;

    fn resolver(&mut self) -> &mut Disks {
        &mut self.disks
    }

    /// Warnings (a probed raw disk) are not the fuzzer's concern.
    fn warn(&mut self, _message: core::fmt::Arguments<'_>) {}

    fn create(&mut self, _name: &str, _size: u64) -> blockgraph::Result<SharedDisk> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the fuzzer's environment creates no images",
        ))
    }
}
