//! Model-based property test of the block graph.
//!
//! Random sequences of graph operations run against a real [`Graph`] and
//! against a small reference model kept here. Every node of the model is a
//! qcow2 format node over its own in-memory device (a copy of an image made
//! once by `qemu-img`); the test holds references to format nodes only, and
//! each format node owns its protocol node.
//!
//! The model keeps, per live node: its backing link, the references the test
//! holds and how often its backing link is frozen; and the backends with their
//! roots. A node's expected refcount is derived, never tracked: references held
//! by the test + overlays whose backing it is + backends whose root it is. A
//! node whose derived refcount reaches zero is released, with whatever only it
//! kept alive.
//!
//! After every operation the graph must agree with the model (liveness,
//! refcounts, backing links, frozen state, parents, backend roots, node
//! count) and every released handle must be stale. A `drop_intermediate` that
//! fails — refused by validation or hit by an injected device failure while
//! rewriting an overlay's header — must leave the graph *and the bytes of
//! every device* as they were. A successful one must have rewritten the
//! header of every overlay of `top` on disk, and touched no other device.
//!
//! `qemu-img` must be on PATH: without it the test fails, it is never skipped.

use std::fmt::Debug;
use std::fs;
use std::process::Command;
use std::sync::OnceLock;

use blockgraph::device::MemDevice;
use blockgraph::format::qcow2::Qcow2;
use blockgraph::graph::{NameBuf, Parent};
use blockgraph::{Access, BackendId, Error, ErrorKind, Format, Graph, NodeId, Resolver};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError};

// ---------------------------------------------------------------------------
// Set-up: graph shape, images, devices, resolver
// ---------------------------------------------------------------------------

const NODES: usize = 16;
const BACKENDS: usize = 4;
const CACHE: usize = 8;
/// Every image takes two pool slots: its format node and its protocol node.
const MAX_IMAGES: usize = NODES / 2;
/// Room for a device to grow past its image (header rewrites).
const SPARE: usize = 4096;
/// The part of an image a backing-reference rewrite may change.
const HEADER_AREA: usize = 4096;

type TestGraph<'a> = Graph<MemDevice<'a>, NODES, BACKENDS, CACHE>;

/// `qemu-img create -f qcow2` arguments, one image each (run in one
/// directory, in order): v3 and v2 images, two sizes, and images whose header
/// already records a backing file (a short and a long name, laid out by QEMU).
const IMAGE_SPECS: [&[&str]; 5] = [
    &["t0.qcow2", "1M"],
    &["-o", "compat=0.10", "t1.qcow2", "1M"],
    &["t2.qcow2", "2M"],
    &["-b", "t0.qcow2", "-F", "qcow2", "t3.qcow2", "1M"],
    &[
        "-u",
        "-b",
        "../a/rather/long/relative/path/to/some-backing-file-name.qcow2",
        "-F",
        "qcow2",
        "-o",
        "compat=0.10",
        "t4.qcow2",
        "1M",
    ],
];

/// Bytes of the template images, created once per test binary.
fn templates() -> &'static [Vec<u8>] {
    static TEMPLATES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("bg-graph-model-")
            .tempdir()
            .expect("create a temporary directory");
        IMAGE_SPECS
            .iter()
            .map(|spec| {
                let out = Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .args(*spec)
                    .current_dir(dir.path())
                    .output()
                    .unwrap_or_else(|e| {
                        panic!(
                            "cannot run `qemu-img` ({e}): this test needs it on PATH \
                             (Debian: apt-get install qemu-utils)"
                        )
                    });
                assert!(
                    out.status.success(),
                    "qemu-img create {spec:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let file = spec[spec.len() - 2];
                fs::read(dir.path().join(file)).expect("read the image qemu-img created")
            })
            .collect()
    })
}

/// Resolves nothing; a backing reference is simply the target's name.
struct Names;

impl<'a> Resolver<MemDevice<'a>> for Names {
    fn open(&mut self, _name: &str, _writable: bool) -> blockgraph::Result<MemDevice<'a>> {
        Err(Error::new(ErrorKind::NotFound, "the test resolver opens nothing"))
    }

    fn open_backing(
        &mut self,
        _overlay: &str,
        _reference: &str,
        _writable: bool,
        _resolved: &mut NameBuf,
    ) -> blockgraph::Result<MemDevice<'a>> {
        Err(Error::new(ErrorKind::NotFound, "the test resolver opens nothing"))
    }

    fn reference(&mut self, _overlay: &str, target: &str, out: &mut NameBuf) -> blockgraph::Result<()> {
        out.clear();
        out.push_str(target)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "name too long"))
    }
}

/// The backing reference a qcow2 header records: name and format.
type StoredRef = Option<(String, Option<String>)>;

fn stored_ref(q: &Qcow2) -> StoredRef {
    q.backing_name()
        .map(|name| (name.to_string(), q.backing_format().map(str::to_string)))
}

/// Parses the header of an image from a copy of its bytes.
fn on_disk_ref(bytes: &[u8]) -> Result<StoredRef, TestCaseError> {
    let mut copy = bytes.to_vec();
    let len = copy.len() as u64;
    let mut device = ok(MemDevice::new(&mut copy, len, u64::MAX), "scratch device")?;
    let q = ok(Qcow2::open(&mut device), "reopen an overlay's image")?;
    Ok(stored_ref(&q))
}

// ---------------------------------------------------------------------------
// Assertion helpers
// ---------------------------------------------------------------------------

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// The value of a graph call that must succeed.
fn ok<T>(result: blockgraph::Result<T>, what: &str) -> Result<T, TestCaseError> {
    result.map_err(|e| fail(format!("{what}: unexpected error {:?} ({e})", e.kind())))
}

/// A graph call that must fail with `kind`.
fn refused<T: Debug>(
    result: blockgraph::Result<T>,
    kind: ErrorKind,
    what: &str,
) -> Result<(), TestCaseError> {
    match result {
        Err(e) if e.kind() == kind => Ok(()),
        other => Err(fail(format!("{what}: expected {kind:?}, got {other:?}"))),
    }
}

/// A graph call whose outcome must be `expected` (`Ok` or the error kind).
fn outcome<T: Debug>(
    result: blockgraph::Result<T>,
    expected: Result<(), ErrorKind>,
    what: &str,
) -> Result<Option<T>, TestCaseError> {
    match expected {
        Ok(()) => ok(result, what).map(Some),
        Err(kind) => refused(result, kind, what).map(|()| None),
    }
}

fn pick<T: Copy>(items: &[T], index: &Index) -> Option<T> {
    (!items.is_empty()).then(|| items[index.index(items.len())])
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
struct ModelNode {
    id: NodeId,
    proto: NodeId,
    name: String,
    backing: Option<NodeId>,
    /// References the test holds.
    held: u32,
    /// How many times its backing link is frozen.
    frozen: u32,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    nodes: Vec<ModelNode>,
    backends: Vec<(BackendId, NodeId)>,
    /// Released format and protocol nodes.
    dead_nodes: Vec<NodeId>,
    dead_backends: Vec<BackendId>,
}

/// What a `drop_intermediate` the model accepts does.
#[derive(Debug)]
struct DropPlan {
    noop: bool,
    overlays: Vec<NodeId>,
    backends: Vec<BackendId>,
}

impl Model {
    fn node(&self, id: NodeId) -> &ModelNode {
        self.nodes.iter().find(|n| n.id == id).expect("live model node")
    }

    fn node_mut(&mut self, id: NodeId) -> &mut ModelNode {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("live model node")
    }

    fn is_live(&self, id: NodeId) -> bool {
        self.nodes.iter().any(|n| n.id == id)
    }

    fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    fn overlays_of(&self, id: NodeId) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.backing == Some(id))
            .map(|n| n.id)
            .collect()
    }

    fn backends_of(&self, id: NodeId) -> Vec<BackendId> {
        self.backends
            .iter()
            .filter(|(_, root)| *root == id)
            .map(|(b, _)| *b)
            .collect()
    }

    fn refcount(&self, id: NodeId) -> u32 {
        let n = self.node(id);
        n.held + self.overlays_of(id).len() as u32 + self.backends_of(id).len() as u32
    }

    /// `start` and every node below it.
    fn chain(&self, start: NodeId) -> Vec<NodeId> {
        let mut chain = vec![start];
        while let Some(below) = self.node(*chain.last().expect("non-empty")).backing {
            assert!(chain.len() <= self.nodes.len(), "model chain loops");
            chain.push(below);
        }
        chain
    }

    /// Releases every node nobody references any more.
    fn collect(&mut self) {
        while let Some(i) = (0..self.nodes.len()).find(|&i| self.refcount(self.nodes[i].id) == 0) {
            let gone = self.nodes.remove(i);
            self.dead_nodes.push(gone.id);
            self.dead_nodes.push(gone.proto);
        }
    }

    /// The expected outcome of `drop_intermediate(active, top, base)` on live
    /// nodes (see `docs`/`block-semantics.md`).
    fn plan_drop(
        &self,
        active: NodeId,
        top: NodeId,
        base: Option<NodeId>,
    ) -> Result<DropPlan, ErrorKind> {
        let live = |id| self.is_live(id);
        if !live(active) || !live(top) || base.is_some_and(|b| !live(b)) {
            return Err(ErrorKind::StaleHandle);
        }
        if Some(top) == base {
            return Ok(DropPlan {
                noop: true,
                overlays: Vec::new(),
                backends: Vec::new(),
            });
        }
        if !self.chain(active).contains(&top) {
            return Err(ErrorKind::InvalidInput);
        }
        let below_top = self.node(top).backing;
        if let Some(base) = base {
            if !below_top.is_some_and(|b| self.chain(b).contains(&base)) {
                return Err(ErrorKind::InvalidInput);
            }
        }
        let overlays = self.overlays_of(top);
        let backends = self.backends_of(top);
        if overlays.iter().any(|&o| self.node(o).frozen > 0) {
            return Err(ErrorKind::Busy);
        }
        let dropped = self
            .chain(top)
            .into_iter()
            .take_while(|&n| Some(n) != base);
        if dropped.into_iter().any(|n| self.node(n).frozen > 0) {
            return Err(ErrorKind::Busy);
        }
        if base.is_none() && !backends.is_empty() {
            return Err(ErrorKind::InvalidInput);
        }
        Ok(DropPlan {
            noop: false,
            overlays,
            backends,
        })
    }
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// How `drop_intermediate`'s arguments are chosen.
#[derive(Clone, Copy, Debug)]
enum DropShape {
    /// `top` in `active`'s chain, `base` below `top` (or none at the bottom).
    Chain,
    /// `top` in `active`'s chain, no `base`.
    ChainNoBase,
    /// `top == base`, anywhere.
    TopIsBase,
    /// Three random live nodes.
    Random,
    /// Two random live nodes, no `base`.
    RandomNoBase,
    /// One of the three is a released handle.
    Stale,
}

/// A device failure armed on one device for the duration of a drop.
#[derive(Clone, Debug)]
struct Fault {
    /// Which device: an overlay of `top` when there is one (unless `anywhere`).
    target: Index,
    /// Fail that operation of the device, counted from the drop's start.
    op: u64,
    /// Pick any live node's device, involved or not.
    anywhere: bool,
}

#[derive(Clone, Debug)]
enum Op {
    /// Open a new qcow2 node over a fresh device made from a template.
    Open { template: Index, read_only: bool },
    /// Open a new node and make an existing one its backing node (with
    /// `branch`, one that already has an overlay).
    Snapshot {
        template: Index,
        read_only: bool,
        on: Index,
        branch: bool,
    },
    Ref(Index),
    /// Drop one of the references the test holds.
    Unref(Index),
    /// An operation on a released handle: it must fail and change nothing.
    Stale { dead: Index, live: Index, kind: u8 },
    SetBacking { node: Index, target: Option<Index> },
    Attach(Index),
    Detach { backend: Index, stale: bool },
    ReplaceRoot { backend: Index, node: Index },
    Freeze(Index),
    Unfreeze(Index),
    Drop {
        shape: DropShape,
        active: Index,
        top: Index,
        base: Index,
        fault: Option<Fault>,
    },
    Read { node: Index, sector: Index },
}

fn drop_shape() -> impl Strategy<Value = DropShape> {
    prop_oneof![
        5 => Just(DropShape::Chain),
        2 => Just(DropShape::ChainNoBase),
        1 => Just(DropShape::TopIsBase),
        2 => Just(DropShape::Random),
        1 => Just(DropShape::RandomNoBase),
        1 => Just(DropShape::Stale),
    ]
}

fn fault() -> impl Strategy<Value = Option<Fault>> {
    let fault = (any::<Index>(), 0u64..3, prop::bool::weighted(0.2)).prop_map(
        |(target, op, anywhere)| Fault {
            target,
            op,
            anywhere,
        },
    );
    prop::option::weighted(0.4, fault)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (any::<Index>(), any::<bool>())
            .prop_map(|(template, read_only)| Op::Open { template, read_only }),
        4 => (any::<Index>(), any::<bool>(), any::<Index>(), prop::bool::weighted(0.3))
            .prop_map(|(template, read_only, on, branch)| Op::Snapshot {
                template,
                read_only,
                on,
                branch,
            }),
        2 => any::<Index>().prop_map(Op::Ref),
        2 => any::<Index>().prop_map(Op::Unref),
        1 => (any::<Index>(), any::<Index>(), 0u8..9)
            .prop_map(|(dead, live, kind)| Op::Stale { dead, live, kind }),
        3 => (any::<Index>(), prop::option::weighted(0.85, any::<Index>()))
            .prop_map(|(node, target)| Op::SetBacking { node, target }),
        3 => any::<Index>().prop_map(Op::Attach),
        2 => (any::<Index>(), prop::bool::weighted(0.2))
            .prop_map(|(backend, stale)| Op::Detach { backend, stale }),
        2 => (any::<Index>(), any::<Index>())
            .prop_map(|(backend, node)| Op::ReplaceRoot { backend, node }),
        1 => any::<Index>().prop_map(Op::Freeze),
        2 => any::<Index>().prop_map(Op::Unfreeze),
        8 => (drop_shape(), any::<Index>(), any::<Index>(), any::<Index>(), fault()).prop_map(
            |(shape, active, top, base, fault)| Op::Drop {
                shape,
                active,
                top,
                base,
                fault,
            }
        ),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(node, sector)| Op::Read { node, sector }),
    ]
}

// ---------------------------------------------------------------------------
// The harness: graph + model
// ---------------------------------------------------------------------------

struct Harness<'a> {
    graph: Box<TestGraph<'a>>,
    model: Model,
    /// Unused device buffers, one per `Open` still to come.
    buffers: Vec<&'a mut [u8]>,
    opened: u64,
}

/// Everything a failed operation must leave as it was, beyond the model.
#[derive(Debug, PartialEq)]
struct Snapshot {
    /// Per live node: its protocol node's bytes.
    bytes: Vec<(NodeId, Vec<u8>)>,
    /// Per live node: the backing reference its in-memory header records.
    headers: Vec<(NodeId, StoredRef)>,
}

impl<'a> Harness<'a> {
    fn new(buffers: Vec<&'a mut [u8]>) -> Self {
        Self {
            graph: Box::new(Graph::new()),
            model: Model::default(),
            buffers,
            opened: 0,
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let live = self.model.ids();
        match op {
            Op::Open {
                template,
                read_only,
            } => self.open(template, *read_only).map(|_| ()),
            Op::Snapshot {
                template,
                read_only,
                on,
                branch,
            } => {
                let branched: Vec<NodeId> = live
                    .iter()
                    .copied()
                    .filter(|&n| !self.model.overlays_of(n).is_empty())
                    .collect();
                let below = match branch {
                    true => pick(&branched, on).or_else(|| pick(&live, on)),
                    false => pick(&live, on),
                };
                match (below, self.open(template, *read_only)?) {
                    (Some(below), Some(new)) => self.set_backing(new, Some(below)),
                    _ => Ok(()),
                }
            }
            Op::Ref(i) => match pick(&live, i) {
                Some(id) => {
                    ok(self.graph.ref_node(id), "ref_node")?;
                    self.model.node_mut(id).held += 1;
                    Ok(())
                }
                None => Ok(()),
            },
            Op::Unref(i) => {
                let held: Vec<NodeId> = self
                    .model
                    .nodes
                    .iter()
                    .filter(|n| n.held > 0)
                    .map(|n| n.id)
                    .collect();
                match pick(&held, i) {
                    Some(id) => self.unref(id),
                    None => Ok(()),
                }
            }
            Op::Stale { dead, live: l, kind } => self.stale(dead, l, *kind),
            Op::SetBacking { node, target } => {
                let (Some(node), target) = (pick(&live, node), target.as_ref()) else {
                    return Ok(());
                };
                let target = target.and_then(|t| pick(&live, t));
                self.set_backing(node, target)
            }
            Op::Attach(i) => match pick(&live, i) {
                Some(root) => self.attach(root),
                None => Ok(()),
            },
            Op::Detach { backend, stale } => self.detach(backend, *stale),
            Op::ReplaceRoot { backend, node } => {
                let backends: Vec<BackendId> = self.model.backends.iter().map(|b| b.0).collect();
                match (pick(&backends, backend), pick(&live, node)) {
                    (Some(b), Some(root)) => {
                        ok(self.graph.replace_root(b, root), "replace_root")?;
                        self.model
                            .backends
                            .iter_mut()
                            .filter(|(id, _)| *id == b)
                            .for_each(|entry| entry.1 = root);
                        self.model.collect();
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            Op::Freeze(i) => match pick(&live, i) {
                Some(id) => {
                    ok(self.graph.freeze_backing(id), "freeze_backing")?;
                    self.model.node_mut(id).frozen += 1;
                    Ok(())
                }
                None => Ok(()),
            },
            Op::Unfreeze(i) => match pick(&live, i) {
                Some(id) => {
                    let result = self.graph.unfreeze_backing(id);
                    if self.model.node(id).frozen == 0 {
                        refused(result, ErrorKind::InvalidInput, "unfreeze an unfrozen link")
                    } else {
                        ok(result, "unfreeze_backing")?;
                        self.model.node_mut(id).frozen -= 1;
                        Ok(())
                    }
                }
                None => Ok(()),
            },
            Op::Drop {
                shape,
                active,
                top,
                base,
                fault,
            } => match { eprintln!("STAT shape {shape:?}"); self.drop_args(*shape, active, top, base) } {
                Some((active, top, base)) => self.drop_intermediate(active, top, base, fault.as_ref()),
                None => Ok(()),
            },
            Op::Read { node, sector } => match pick(&live, node) {
                Some(id) => {
                    let sectors = ok(self.graph.size(id), "size")? / 512;
                    let offset = sector.index(sectors as usize) as u64 * 512;
                    let mut buf = [0xa5u8; 512];
                    ok(self.graph.read(id, offset, &mut buf), "read")?;
                    prop_assert!(buf.iter().all(|&b| b == 0), "empty images read as zeros");
                    Ok(())
                }
                None => Ok(()),
            },
        }
    }

    /// Opens a new node; `None` when the pool is full (as expected).
    fn open(&mut self, template: &Index, read_only: bool) -> Result<Option<NodeId>, TestCaseError> {
        let templates = templates();
        let image = &templates[template.index(templates.len())];
        let buffer = self.buffers.pop().expect("one buffer per Open op");
        buffer[..image.len()].copy_from_slice(image);
        self.opened += 1;
        let name = format!("img{}", self.opened);
        let device = ok(
            MemDevice::new(buffer, image.len() as u64, self.opened),
            "MemDevice::new",
        )?;
        let added = self.graph.add_device(device, &name);
        if self.model.nodes.len() == MAX_IMAGES {
            return refused(added, ErrorKind::NoCapacity, "add_device to a full pool").map(|()| None);
        }
        let proto = ok(added, "add_device")?;
        let id = ok(
            self.graph.open_format(proto, Format::Qcow2, read_only),
            "open_format",
        )?;
        ok(self.graph.unref(proto), "unref the protocol node")?;
        self.model.nodes.push(ModelNode {
            id,
            proto,
            name,
            backing: None,
            held: 1,
            frozen: 0,
        });
        Ok(Some(id))
    }

    fn unref(&mut self, id: NodeId) -> Result<(), TestCaseError> {
        ok(self.graph.unref(id), "unref")?;
        self.model.node_mut(id).held -= 1;
        self.model.collect();
        Ok(())
    }

    fn set_backing(&mut self, node: NodeId, target: Option<NodeId>) -> Result<(), TestCaseError> {
        let result = self.graph.set_backing(node, target);
        let n = self.model.node(node);
        let expected = if n.frozen > 0 {
            Err(ErrorKind::Busy)
        } else if n.backing == target {
            Ok(())
        } else if target.is_some_and(|t| self.model.chain(t).contains(&node)) {
            Err(ErrorKind::InvalidInput)
        } else {
            Ok(())
        };
        if outcome(result, expected, "set_backing")?.is_some() {
            self.model.node_mut(node).backing = target;
            self.model.collect();
        }
        Ok(())
    }

    fn attach(&mut self, root: NodeId) -> Result<(), TestCaseError> {
        let result = self.graph.attach_backend(root, Access::READ_ONLY_DEVICE);
        let expected = if self.model.backends.len() == BACKENDS {
            Err(ErrorKind::NoCapacity)
        } else {
            Ok(())
        };
        if let Some(b) = outcome(result, expected, "attach_backend")? {
            self.model.backends.push((b, root));
        }
        Ok(())
    }

    fn detach(&mut self, backend: &Index, stale: bool) -> Result<(), TestCaseError> {
        if stale {
            if let Some(b) = pick(&self.model.dead_backends, backend) {
                refused(self.graph.detach_backend(b), ErrorKind::StaleHandle, "detach twice")?;
                return refused(self.graph.root(b), ErrorKind::StaleHandle, "root of detached");
            }
        }
        if self.model.backends.is_empty() {
            return Ok(());
        }
        let (b, _) = self
            .model
            .backends
            .remove(backend.index(self.model.backends.len()));
        ok(self.graph.detach_backend(b), "detach_backend")?;
        self.model.dead_backends.push(b);
        self.model.collect();
        Ok(())
    }

    /// Calls on a released handle: each fails and changes nothing.
    fn stale(&mut self, dead: &Index, live: &Index, kind: u8) -> Result<(), TestCaseError> {
        let Some(d) = pick(&self.model.dead_nodes, dead) else {
            return Ok(());
        };
        let live = pick(&self.model.ids(), live);
        let stale = ErrorKind::StaleHandle;
        let g = &mut self.graph;
        match (kind, live) {
            (0, _) => refused(g.unref(d), stale, "unref stale"),
            (1, _) => refused(g.ref_node(d), stale, "ref_node stale"),
            (2, _) => refused(g.set_backing(d, None), stale, "set_backing on stale"),
            (3, _) => refused(g.freeze_backing(d), stale, "freeze stale"),
            (4, _) => refused(g.unfreeze_backing(d), stale, "unfreeze stale"),
            (5, _) => refused(
                g.attach_backend(d, Access::READ_ONLY_DEVICE),
                stale,
                "attach to stale",
            ),
            (6, Some(l)) => {
                let expected = if self.model.node(l).frozen > 0 {
                    ErrorKind::Busy
                } else {
                    stale
                };
                refused(g.set_backing(l, Some(d)), expected, "set_backing to stale")
            }
            (7, Some(l)) => match self.model.backends.first() {
                Some(&(b, _)) => refused(g.replace_root(b, d), stale, "replace_root to stale"),
                None => refused(g.drop_intermediate(&mut Names, l, d, None), stale, "drop stale"),
            },
            (_, Some(l)) => refused(
                g.drop_intermediate(&mut Names, d, l, Some(d)),
                stale,
                "drop with stale",
            ),
            (_, None) => refused(g.read(d, 0, &mut [0u8; 512]), stale, "read stale"),
        }
    }

    fn drop_args(
        &self,
        shape: DropShape,
        a: &Index,
        t: &Index,
        b: &Index,
    ) -> Option<(NodeId, NodeId, Option<NodeId>)> {
        let live = self.model.ids();
        let active = pick(&live, a)?;
        match shape {
            DropShape::Chain | DropShape::ChainNoBase => {
                // Prefer a top that has users (overlays or backends), then
                // any active layer above it and any base below it.
                let m = &self.model;
                let used: Vec<NodeId> = live
                    .iter()
                    .copied()
                    .filter(|&n| !m.overlays_of(n).is_empty() || !m.backends_of(n).is_empty())
                    .collect();
                let top = pick(&used, t).unwrap_or(active);
                let above: Vec<NodeId> = live
                    .iter()
                    .copied()
                    .filter(|&n| m.chain(n).contains(&top))
                    .collect();
                let active = pick(&above, a).unwrap_or(top);
                let below = &m.chain(top)[1..];
                let base = match shape {
                    DropShape::Chain => pick(below, b),
                    _ => None,
                };
                Some((active, top, base))
            }
            DropShape::TopIsBase => {
                let top = pick(&live, t)?;
                Some((active, top, Some(top)))
            }
            DropShape::Random => Some((active, pick(&live, t)?, pick(&live, b))),
            DropShape::RandomNoBase => Some((active, pick(&live, t)?, None)),
            DropShape::Stale => {
                let dead = pick(&self.model.dead_nodes, b)?;
                let top = pick(&live, t)?;
                Some(match b.index(3) {
                    0 => (dead, top, None),
                    1 => (active, dead, None),
                    _ => (active, top, Some(dead)),
                })
            }
        }
    }

    fn snapshot(&mut self) -> Result<Snapshot, TestCaseError> {
        let mut bytes = Vec::new();
        let mut headers = Vec::new();
        for n in &self.model.nodes {
            let device = ok(self.graph.device_mut(n.proto), "device_mut")?;
            bytes.push((n.id, device.contents().to_vec()));
            let q = ok(self.graph.qcow2(n.id), "qcow2")?;
            headers.push((n.id, stored_ref(q)));
        }
        Ok(Snapshot { bytes, headers })
    }

    fn drop_intermediate(
        &mut self,
        active: NodeId,
        top: NodeId,
        base: Option<NodeId>,
        fault: Option<&Fault>,
    ) -> Result<(), TestCaseError> {
        let plan = self.model.plan_drop(active, top, base);
        // Arm the fault: on an overlay of `top` when there is one.
        let armed = match fault {
            Some(f) => {
                let overlays = self.model.overlays_of(top);
                let candidates = if f.anywhere || overlays.is_empty() {
                    self.model.ids()
                } else {
                    overlays
                };
                pick(&candidates, &f.target).map(|node| (node, f.op))
            }
            None => None,
        };
        let before_model = self.model.clone();
        let before = self.snapshot()?;
        if let Some((node, op)) = armed {
            let proto = self.model.node(node).proto;
            ok(self.graph.device_mut(proto), "device_mut")?.fail_operation(Some(op));
        }

        let result = self.graph.drop_intermediate(&mut Names, active, top, base);

        if let Some((node, _)) = armed {
            let proto = self.model.node(node).proto;
            if self.graph.contains(proto) {
                ok(self.graph.device_mut(proto), "device_mut")?.fail_operation(None);
            }
        }
        let expected = match &plan {
            Err(kind) => Err(*kind),
            Ok(p) if !p.noop && armed.is_some_and(|(n, _)| p.overlays.contains(&n)) => {
                Err(ErrorKind::Io)
            }
            Ok(_) => Ok(()),
        };
        let what = format!(
            "drop_intermediate(active {active:?}, top {top:?}, base {base:?}) with fault {armed:?}, plan {plan:?}"
        );
        eprintln!("STAT drop expected={expected:?} plan_overlays={:?} backends={:?} armed={}", plan.as_ref().map(|p| p.overlays.len()).ok(), plan.as_ref().map(|p| p.backends.len()).ok(), armed.is_some());
        if outcome(result, expected, &what)?.is_none() {
            // Refused or failed: nothing may have changed, on disk included.
            let after = self.snapshot()?;
            prop_assert_eq!(&self.model, &before_model);
            for ((id, old), (_, new)) in before.bytes.iter().zip(&after.bytes) {
                prop_assert!(
                    old == new,
                    "{}: failed, yet the device of {:?} changed ({} bytes differ, first at {:?})",
                    what,
                    id,
                    old.iter().zip(new).filter(|(a, b)| a != b).count(),
                    old.iter().zip(new).position(|(a, b)| a != b),
                );
            }
            prop_assert_eq!(&before.headers, &after.headers, "{}: in-memory headers", what);
            return Ok(());
        }
        let plan = plan.expect("accepted drop");
        for &overlay in &plan.overlays {
            self.model.node_mut(overlay).backing = base;
        }
        for (b, root) in &mut self.model.backends {
            if plan.backends.contains(b) {
                *root = base.expect("a base for re-pointed backends");
            }
        }
        self.model.collect();

        // On disk and in memory: every overlay refers to base; no other
        // device was written.
        let want: StoredRef = base.map(|b| (before_model.node(b).name.clone(), Some("qcow2".into())));
        let after = self.snapshot()?;
        for (id, new) in &after.bytes {
            let old = &before.bytes.iter().find(|(n, _)| n == id).expect("was live").1;
            if plan.overlays.contains(id) {
                prop_assert_eq!(old.len(), new.len(), "{}: overlay {:?} resized", &what, id);
                prop_assert!(
                    old[HEADER_AREA..] == new[HEADER_AREA..],
                    "{}: overlay {:?} changed past its header",
                    what,
                    id
                );
                prop_assert_eq!(&on_disk_ref(new)?, &want, "{}: on-disk ref of {:?}", &what, id);
                let in_memory = &after.headers.iter().find(|(n, _)| n == id).expect("live").1;
                prop_assert_eq!(in_memory, &want, "{}: in-memory ref of {:?}", &what, id);
            } else {
                prop_assert!(old == new, "{}: device of {:?} written", what, id);
            }
        }
        Ok(())
    }

    /// Graph and model agree; released handles are stale.
    fn check(&self) -> Result<(), TestCaseError> {
        let g = &self.graph;
        let m = &self.model;
        prop_assert_eq!(g.node_count(), 2 * m.nodes.len(), "node_count");
        prop_assert_eq!(g.backend_count(), m.backends.len(), "backend_count");
        for n in &m.nodes {
            let id = n.id;
            prop_assert!(g.contains(id), "{:?} released too early", id);
            prop_assert_eq!(ok(g.refcount(id), "refcount")?, m.refcount(id), "refcount of {:?}", id);
            prop_assert_eq!(ok(g.backing(id), "backing")?, n.backing, "backing of {:?}", id);
            prop_assert_eq!(ok(g.is_frozen(id), "is_frozen")?, n.frozen > 0, "frozen {:?}", id);
            prop_assert_eq!(ok(g.file(id), "file")?, Some(n.proto), "file of {:?}", id);
            prop_assert_eq!(ok(g.name(id), "name")?, n.name.as_str());
            prop_assert_eq!(ok(g.format(id), "format")?, Some(Format::Qcow2));
            prop_assert!(g.contains(n.proto), "protocol node of {:?} released", id);
            prop_assert_eq!(ok(g.refcount(n.proto), "refcount")?, 1, "protocol of {:?}", id);

            let mut want: Vec<Parent> = m.overlays_of(id).into_iter().map(Parent::Backing).collect();
            want.extend(m.backends_of(id).into_iter().map(Parent::Backend));
            let got: Vec<Parent> = g.parents(id).collect();
            prop_assert!(
                got.len() == want.len() && want.iter().all(|p| got.contains(p)),
                "parents of {:?}: graph {:?}, model {:?}",
                id,
                got,
                want
            );

            // The graph's own chain ends within as many steps as there are nodes.
            let mut walk = Some(id);
            for _ in 0..=m.nodes.len() {
                walk = match walk {
                    Some(w) => ok(g.backing(w), "backing")?,
                    None => break,
                };
            }
            prop_assert!(walk.is_none(), "backing chain from {:?} loops", id);
        }
        for &(b, root) in &m.backends {
            prop_assert_eq!(ok(g.root(b), "root")?, root, "root of {:?}", b);
        }
        for &d in &m.dead_nodes {
            prop_assert!(!g.contains(d), "released {:?} is live", d);
            refused(g.refcount(d), ErrorKind::StaleHandle, "refcount of released")?;
            refused(g.backing(d), ErrorKind::StaleHandle, "backing of released")?;
        }
        for &b in &m.dead_backends {
            refused(g.root(b), ErrorKind::StaleHandle, "root of detached")?;
        }
        Ok(())
    }

    /// Releases everything the test holds: the graph must end up empty.
    fn release_all(&mut self) -> Result<(), TestCaseError> {
        while let Some(&(b, _)) = self.model.backends.first() {
            ok(self.graph.detach_backend(b), "detach_backend")?;
            self.model.backends.remove(0);
            self.model.dead_backends.push(b);
            self.model.collect();
            self.check()?;
        }
        while let Some(id) = self.model.nodes.iter().find(|n| n.held > 0).map(|n| n.id) {
            self.unref(id)?;
            self.check()?;
        }
        prop_assert!(self.model.nodes.is_empty(), "model nodes left: {:?}", self.model.nodes);
        prop_assert_eq!(self.graph.node_count(), 0, "nodes left after releasing everything");
        prop_assert_eq!(self.graph.backend_count(), 0);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The property
// ---------------------------------------------------------------------------

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let slot = templates().iter().map(Vec::len).max().expect("templates") + SPARE;
    let opens = ops
        .iter()
        .filter(|op| matches!(op, Op::Open { .. } | Op::Snapshot { .. }))
        .count();
    // One buffer per device, freed with the case (the graph borrows them).
    let mut arena = vec![0u8; opens.max(1) * slot];
    let mut h = Harness::new(arena.chunks_mut(slot).collect());
    h.check()?;
    for op in ops {
        h.apply(op)?;
        h.check()?;
    }
    h.release_all()
}

proptest! {
    #![proptest_config(Config {
        cases: 128,
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn graph_matches_model(ops in prop::collection::vec(op(), 1..=40)) {
        run(&ops)?;
    }
}
