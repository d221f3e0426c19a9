//! Model-based property test of the block graph.
//!
//! Random sequences of graph operations run against a real [`Graph`] and
//! against a small reference model kept here. Every node of the model is a
//! qcow2 format node over its own in-memory device (a copy of an image made
//! once by `qemu-img`); the test holds references to format nodes only, and
//! each format node owns its protocol node.
//!
//! The model keeps, per live node: its backing link, the references the test
//! holds, how often its backing link is frozen, its read-only flag and its
//! device's; and the backends with their roots and whether they write. A
//! node's expected refcount is derived, never tracked: references held by the
//! test + overlays whose backing it is + backends whose root it is. A node
//! whose derived refcount reaches zero is released, with whatever only it kept
//! alive. Expected errors follow `block-semantics.md`; where several checks
//! fail at once, any of their errors is accepted (the order is not specified).
//!
//! After every operation the graph must agree with the model (liveness,
//! refcounts, backing links, frozen and read-only state, parents, backend
//! roots, node count) and every released handle must be stale. A
//! `drop_intermediate` that fails — refused by validation or hit by an
//! injected device failure while rewriting an overlay's header — must leave
//! the graph *and the bytes of every device* as they were. A successful one
//! must have rewritten the header of every overlay of `top` on disk (checked
//! by parsing the bytes again), and written no other device.
//!
//! `qemu-img` must be on PATH: without it the tests fail, they never skip.

use std::fmt::Debug;
use std::fs;
use std::sync::OnceLock;

use blockgraph::device::MemDevice;
use blockgraph::format::qcow2::Qcow2;
use blockgraph::graph::{NamesOnly, Parent};
use blockgraph::{Access, BackendId, ErrorKind, Format, Graph, NodeId};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError};

mod common;

// ---------------------------------------------------------------------------
// Set-up: graph shape, images, devices, resolver
// ---------------------------------------------------------------------------

const NODES: usize = 16;
const BACKENDS: usize = 4;
const CACHE: usize = 8;
/// Every image takes two pool slots: its format node and its protocol node.
const MAX_IMAGES: usize = NODES / 2;
/// Room for a device to grow past its image.
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
        let dir = common::tmpdir("bg-graph-model-");
        IMAGE_SPECS
            .iter()
            .map(|spec| {
                let mut args = vec!["create", "-q", "-f", "qcow2"];
                args.extend_from_slice(spec);
                common::qemu_img(dir.path(), &args);
                let file = spec[spec.len() - 2];
                fs::read(dir.path().join(file)).expect("read the image qemu-img created")
            })
            .collect()
    })
}

/// One zeroed device buffer per image, each big enough for any template.
fn buffers(count: usize) -> Vec<Vec<u8>> {
    let len = templates().iter().map(Vec::len).max().expect("templates") + SPARE;
    vec![vec![0; len]; count]
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
    let q = ok(Qcow2::open(&mut device), "reopen an image")?;
    Ok(stored_ref(&q))
}

// ---------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------

/// The outcomes an operation may have: success, and any of some error kinds.
#[derive(Clone, Debug, PartialEq)]
struct Expect {
    ok: bool,
    errors: Vec<ErrorKind>,
}

impl Expect {
    fn ok() -> Self {
        Self {
            ok: true,
            errors: Vec::new(),
        }
    }

    fn err(kind: ErrorKind) -> Self {
        Self {
            ok: false,
            errors: vec![kind],
        }
    }

    /// Success, unless some of `errors` apply: then any one of them.
    fn unless(errors: Vec<ErrorKind>) -> Self {
        Self {
            ok: errors.is_empty(),
            errors,
        }
    }
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// The value of a graph call that must succeed.
fn ok<T>(result: blockgraph::Result<T>, what: &str) -> Result<T, TestCaseError> {
    result.map_err(|e| fail(format!("{what}: unexpected error {:?} ({e})", e.kind())))
}

/// Checks a graph call against `expect`; its value when it succeeded.
fn outcome<T: Debug>(
    result: blockgraph::Result<T>,
    expect: &Expect,
    what: &str,
) -> Result<Option<T>, TestCaseError> {
    match result {
        Ok(value) if expect.ok => Ok(Some(value)),
        Err(e) if expect.errors.contains(&e.kind()) => Ok(None),
        other => Err(fail(format!("{what}: expected {expect:?}, got {other:?}"))),
    }
}

/// A graph call that must fail with `kind`.
fn refused<T: Debug>(
    result: blockgraph::Result<T>,
    kind: ErrorKind,
    what: &str,
) -> Result<(), TestCaseError> {
    outcome(result, &Expect::err(kind), what).map(|_| ())
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
    /// The node refuses guest writes.
    read_only: bool,
    /// Its device refuses writes.
    device_ro: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct ModelBackend {
    id: BackendId,
    root: NodeId,
    writer: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    nodes: Vec<ModelNode>,
    backends: Vec<ModelBackend>,
    /// Released format and protocol nodes.
    dead_nodes: Vec<NodeId>,
    dead_backends: Vec<BackendId>,
}

/// What an accepted `drop_intermediate` does.
#[derive(Debug)]
struct DropPlan {
    /// Overlays of `top`: their backing reference is rewritten.
    overlays: Vec<NodeId>,
    /// The model afterwards.
    after: Model,
}

impl Model {
    fn node(&self, id: NodeId) -> &ModelNode {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("live model node")
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

    fn backends_of(&self, id: NodeId) -> impl Iterator<Item = &ModelBackend> {
        self.backends.iter().filter(move |b| b.root == id)
    }

    fn has_writer(&self, id: NodeId) -> bool {
        self.backends_of(id).any(|b| b.writer)
    }

    fn refcount(&self, id: NodeId) -> u32 {
        let n = self.node(id);
        n.held + self.overlays_of(id).len() as u32 + self.backends_of(id).count() as u32
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

    /// The expected outcome of `drop_intermediate(active, top, base)`.
    fn plan_drop(
        &self,
        active: NodeId,
        top: NodeId,
        base: Option<NodeId>,
    ) -> Result<DropPlan, Vec<ErrorKind>> {
        let live = |id| self.is_live(id);
        if !live(active) || !live(top) || base.is_some_and(|b| !live(b)) {
            return Err(vec![ErrorKind::StaleHandle]);
        }
        if !self.chain(active).contains(&top) {
            return Err(vec![ErrorKind::InvalidInput]);
        }
        if Some(top) == base {
            // A successful no-op.
            return Ok(DropPlan {
                overlays: Vec::new(),
                after: self.clone(),
            });
        }
        if !self.chain(active).contains(&top) {
            return Err(vec![ErrorKind::InvalidInput]);
        }
        let below_top = self.node(top).backing;
        if let Some(base) = base {
            if !below_top.is_some_and(|b| self.chain(b).contains(&base)) {
                return Err(vec![ErrorKind::InvalidInput]);
            }
        }

        // Every user of top moves to base: overlays and backends alike.
        let overlays = self.overlays_of(top);
        let moved: Vec<ModelBackend> = self.backends_of(top).copied().collect();
        let mut after = self.clone();
        for &overlay in &overlays {
            after.node_mut(overlay).backing = base;
        }
        let writers = moved.iter().any(|b| b.writer);
        if let Some(base) = base {
            for backend in after.backends.iter_mut().filter(|b| b.root == top) {
                backend.root = base;
            }
            if writers {
                after.node_mut(base).read_only = false;
            }
        }
        after.collect();

        let mut errors = Vec::new();
        // A frozen link that would change: an overlay's, or one in the
        // dropped range (everything below top without a base).
        let dropped = self.chain(top).into_iter().take_while(|&n| Some(n) != base);
        if overlays
            .iter()
            .copied()
            .chain(dropped)
            .any(|n| self.node(n).frozen > 0)
        {
            errors.push(ErrorKind::Busy);
        }
        // An overlay's header cannot be rewritten.
        if overlays.iter().any(|&o| self.node(o).device_ro) {
            errors.push(ErrorKind::ReadOnly);
        }
        match base {
            // A device would be left without a node.
            None if !moved.is_empty() => errors.push(ErrorKind::InvalidInput),
            None => {}
            // A writer moved to base while an overlay still reads it, or to a
            // base that cannot be made writable.
            Some(base) if writers => {
                if !after.overlays_of(base).is_empty() {
                    errors.push(ErrorKind::PermissionConflict);
                }
                let n = self.node(base);
                if n.read_only && n.device_ro {
                    errors.push(ErrorKind::ReadOnly);
                }
            }
            Some(_) => {}
        }
        if errors.is_empty() {
            Ok(DropPlan { overlays, after })
        } else {
            Err(errors)
        }
    }
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// How `drop_intermediate`'s arguments are chosen.
#[derive(Clone, Copy, Debug)]
enum DropShape {
    /// A `top` with users, an `active` above it, a `base` below it.
    Chain,
    /// A `top` with users, an `active` above it, no `base`.
    ChainNoBase,
    /// `top == active`, the root of a backend (a writer's, when there is
    /// one with something below it), any `base` below it: a pivot.
    Pivot,
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
    /// Fail that operation of the device, counted from the drop's start
    /// (a header rewrite reads the header, writes it, then flushes).
    op: u64,
    /// Pick any live node's device, involved or not.
    anywhere: bool,
}

#[derive(Clone, Debug)]
enum Op {
    /// Open a new qcow2 node over a fresh device made from a template.
    Open {
        template: Index,
        read_only: bool,
        device_ro: bool,
    },
    /// Open a new node and make an existing one its backing node (with
    /// `branch`, one that already has an overlay); with `hand_over`, then drop
    /// a reference the test holds to it, so that the overlay keeps it alive.
    Snapshot {
        template: Index,
        read_only: bool,
        on: Index,
        branch: bool,
        hand_over: bool,
    },
    Ref(Index),
    /// Drop one of the references the test holds.
    Unref(Index),
    /// An operation on a released handle: it must fail and change nothing.
    Stale {
        dead: Index,
        live: Index,
        kind: u8,
    },
    SetBacking {
        node: Index,
        target: Option<Index>,
    },
    /// Attach a backend; with `hand_over`, then drop a reference the test
    /// holds to its root, so that the backend keeps it alive.
    Attach {
        node: Index,
        writer: bool,
        hand_over: bool,
    },
    Detach {
        backend: Index,
        stale: bool,
    },
    ReplaceRoot {
        backend: Index,
        node: Index,
    },
    Freeze(Index),
    Unfreeze(Index),
    SetReadOnly {
        node: Index,
        read_only: bool,
    },
    DeviceReadOnly {
        node: Index,
        read_only: bool,
    },
    Drop {
        shape: DropShape,
        active: Index,
        top: Index,
        base: Index,
        fault: Option<Fault>,
    },
    Read {
        node: Index,
        sector: Index,
    },
}

fn drop_shape() -> impl Strategy<Value = DropShape> {
    prop_oneof![
        5 => Just(DropShape::Chain),
        2 => Just(DropShape::ChainNoBase),
        2 => Just(DropShape::Pivot),
        1 => Just(DropShape::TopIsBase),
        2 => Just(DropShape::Random),
        1 => Just(DropShape::RandomNoBase),
        1 => Just(DropShape::Stale),
    ]
}

fn fault() -> impl Strategy<Value = Option<Fault>> {
    let fault =
        (any::<Index>(), 0u64..3, prop::bool::weighted(0.2)).prop_map(|(target, op, anywhere)| {
            Fault {
                target,
                op,
                anywhere,
            }
        });
    prop::option::weighted(0.4, fault)
}

fn op() -> impl Strategy<Value = Op> {
    let index = any::<Index>;
    let rarely = || prop::bool::weighted(0.15);
    prop_oneof![
        2 => (index(), any::<bool>(), rarely()).prop_map(|(template, read_only, device_ro)| {
            Op::Open {
                template,
                read_only: read_only || device_ro,
                device_ro,
            }
        }),
        4 => (index(), any::<bool>(), index(), prop::bool::weighted(0.3), any::<bool>())
            .prop_map(|(template, read_only, on, branch, hand_over)| Op::Snapshot {
                template,
                read_only,
                on,
                branch,
                hand_over,
            }),
        2 => index().prop_map(Op::Ref),
        2 => index().prop_map(Op::Unref),
        1 => (index(), index(), 0u8..11).prop_map(|(dead, live, kind)| Op::Stale {
            dead,
            live,
            kind
        }),
        3 => (index(), prop::option::weighted(0.85, index()))
            .prop_map(|(node, target)| Op::SetBacking { node, target }),
        3 => (index(), prop::bool::weighted(0.4), any::<bool>()).prop_map(
            |(node, writer, hand_over)| Op::Attach {
                node,
                writer,
                hand_over,
            }
        ),
        2 => (index(), rarely()).prop_map(|(backend, stale)| Op::Detach { backend, stale }),
        2 => (index(), index()).prop_map(|(backend, node)| Op::ReplaceRoot { backend, node }),
        1 => index().prop_map(Op::Freeze),
        2 => index().prop_map(Op::Unfreeze),
        1 => (index(), any::<bool>())
            .prop_map(|(node, read_only)| Op::SetReadOnly { node, read_only }),
        1 => (index(), prop::bool::weighted(0.3))
            .prop_map(|(node, read_only)| Op::DeviceReadOnly { node, read_only }),
        8 => (drop_shape(), index(), index(), index(), fault()).prop_map(
            |(shape, active, top, base, fault)| Op::Drop {
                shape,
                active,
                top,
                base,
                fault,
            }
        ),
        1 => (index(), index()).prop_map(|(node, sector)| Op::Read { node, sector }),
    ]
}

// ---------------------------------------------------------------------------
// The harness: graph + model
// ---------------------------------------------------------------------------

struct Harness<'a> {
    graph: Box<TestGraph<'a>>,
    model: Model,
    /// Unused device buffers, one per open still to come.
    buffers: Vec<&'a mut [u8]>,
    opened: u64,
}

/// Device and header state of every live node, to compare around a drop.
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
                device_ro,
            } => self.open(template, *read_only, *device_ro).map(|_| ()),
            Op::Snapshot {
                template,
                read_only,
                on,
                branch,
                hand_over,
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
                let (Some(below), Some(new)) = (below, self.open(template, *read_only, false)?)
                else {
                    return Ok(());
                };
                self.set_backing(new, Some(below))?;
                let linked = self.model.node(new).backing == Some(below);
                if *hand_over && linked && self.model.node(below).held > 0 {
                    self.unref(below)?;
                }
                Ok(())
            }
            Op::Ref(i) => {
                if let Some(id) = pick(&live, i) {
                    ok(self.graph.ref_node(id), "ref_node")?;
                    self.model.node_mut(id).held += 1;
                }
                Ok(())
            }
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
            Op::Stale {
                dead,
                live: other,
                kind,
            } => self.stale(dead, other, *kind),
            Op::SetBacking { node, target } => match pick(&live, node) {
                Some(node) => {
                    let target = target.as_ref().and_then(|t| pick(&live, t));
                    self.set_backing(node, target)
                }
                None => Ok(()),
            },
            Op::Attach {
                node,
                writer,
                hand_over,
            } => {
                let Some(root) = pick(&live, node) else {
                    return Ok(());
                };
                let attached = self.attach(root, *writer)?;
                if *hand_over && attached && self.model.node(root).held > 0 {
                    self.unref(root)?;
                }
                Ok(())
            }
            Op::Detach { backend, stale } => self.detach(backend, *stale),
            Op::ReplaceRoot { backend, node } => {
                match (pick(&self.model.backends, backend), pick(&live, node)) {
                    (Some(b), Some(root)) => self.replace_root(b, root),
                    _ => Ok(()),
                }
            }
            Op::Freeze(i) => {
                if let Some(id) = pick(&live, i) {
                    ok(self.graph.freeze_backing(id), "freeze_backing")?;
                    self.model.node_mut(id).frozen += 1;
                }
                Ok(())
            }
            Op::Unfreeze(i) => {
                if let Some(id) = pick(&live, i) {
                    let n = self.model.node(id);
                    let expect = match n.frozen {
                        0 => Expect::err(ErrorKind::InvalidInput),
                        _ => Expect::ok(),
                    };
                    if outcome(self.graph.unfreeze_backing(id), &expect, "unfreeze")?.is_some() {
                        self.model.node_mut(id).frozen -= 1;
                    }
                }
                Ok(())
            }
            Op::SetReadOnly { node, read_only } => match pick(&live, node) {
                Some(id) => self.set_read_only(id, *read_only),
                None => Ok(()),
            },
            Op::DeviceReadOnly { node, read_only } => {
                if let Some(id) = pick(&live, node) {
                    let proto = self.model.node(id).proto;
                    ok(self.graph.device_mut(proto), "device_mut")?.set_read_only(*read_only);
                    self.model.node_mut(id).device_ro = *read_only;
                }
                Ok(())
            }
            Op::Drop {
                shape,
                active,
                top,
                base,
                fault,
            } => match self.drop_args(*shape, active, top, base) {
                Some((active, top, base)) => {
                    self.drop_intermediate(active, top, base, fault.as_ref())
                }
                None => Ok(()),
            },
            Op::Read { node, sector } => {
                if let Some(id) = pick(&live, node) {
                    let sectors = ok(self.graph.size(id), "size")? / 512;
                    let offset = sector.index(sectors as usize) as u64 * 512;
                    let mut buf = [0xa5u8; 512];
                    ok(self.graph.read(id, offset, &mut buf), "read")?;
                    prop_assert!(buf.iter().all(|&b| b == 0), "empty images read as zeros");
                }
                Ok(())
            }
        }
    }

    /// Opens a new node; `None` when that is refused (as expected).
    fn open(
        &mut self,
        template: &Index,
        read_only: bool,
        device_ro: bool,
    ) -> Result<Option<NodeId>, TestCaseError> {
        let templates = templates();
        let image = &templates[template.index(templates.len())];
        let buffer = self.buffers.pop().expect("one buffer per open");
        buffer[..image.len()].copy_from_slice(image);
        self.opened += 1;
        let name = format!("img{}", self.opened);
        let mut device = ok(
            MemDevice::new(buffer, image.len() as u64, self.opened),
            "MemDevice::new",
        )?;
        device.set_read_only(device_ro);
        let added = self.graph.add_device(device, &name);
        if self.model.nodes.len() == MAX_IMAGES {
            refused(added, ErrorKind::NoCapacity, "add_device to a full pool")?;
            return Ok(None);
        }
        let proto = ok(added, "add_device")?;
        let expect = match device_ro && !read_only {
            true => Expect::err(ErrorKind::ReadOnly),
            false => Expect::ok(),
        };
        let opened = self.graph.open_format(proto, Format::Qcow2, read_only);
        let opened = outcome(opened, &expect, "open_format")?;
        // The format node holds its own reference to the protocol node.
        ok(self.graph.unref(proto), "unref the protocol node")?;
        let Some(id) = opened else {
            self.model.dead_nodes.push(proto);
            return Ok(None);
        };
        self.model.nodes.push(ModelNode {
            id,
            proto,
            name,
            backing: None,
            held: 1,
            frozen: 0,
            read_only,
            device_ro,
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
        let mut expect = if n.backing == target {
            // Not a change: fine even on a frozen link, or refused as busy.
            Expect::ok()
        } else {
            let mut errors = Vec::new();
            if target.is_some_and(|t| self.model.chain(t).contains(&node)) {
                errors.push(ErrorKind::InvalidInput);
            }
            if target.is_some_and(|t| self.model.has_writer(t)) {
                // A backing edge does not share WRITE.
                errors.push(ErrorKind::PermissionConflict);
            }
            Expect::unless(errors)
        };
        if n.frozen > 0 {
            expect.errors.push(ErrorKind::Busy);
            expect.ok &= n.backing == target;
        }
        if outcome(result, &expect, "set_backing")?.is_some() {
            self.model.node_mut(node).backing = target;
            self.model.collect();
        }
        Ok(())
    }

    /// Errors for `root` as a backend's root (attach or replace).
    fn root_errors(&self, root: NodeId, writer: bool) -> Vec<ErrorKind> {
        let mut errors = Vec::new();
        if writer && self.model.node(root).read_only {
            errors.push(ErrorKind::ReadOnly);
        }
        if writer && !self.model.overlays_of(root).is_empty() {
            errors.push(ErrorKind::PermissionConflict);
        }
        errors
    }

    /// Attaches a backend to `root`; whether that succeeded (as expected).
    fn attach(&mut self, root: NodeId, writer: bool) -> Result<bool, TestCaseError> {
        let access = match writer {
            true => Access::READ_WRITE_DEVICE,
            false => Access::READ_ONLY_DEVICE,
        };
        let result = self.graph.attach_backend(root, access);
        let mut errors = self.root_errors(root, writer);
        if self.model.backends.len() == BACKENDS {
            errors.push(ErrorKind::NoCapacity);
        }
        let attached = outcome(result, &Expect::unless(errors), "attach_backend")?;
        if let Some(id) = attached {
            self.model.backends.push(ModelBackend { id, root, writer });
        }
        Ok(attached.is_some())
    }

    fn replace_root(&mut self, b: ModelBackend, root: NodeId) -> Result<(), TestCaseError> {
        let result = self.graph.replace_root(b.id, root);
        let expect = match b.root == root {
            true => Expect::ok(),
            false => Expect::unless(self.root_errors(root, b.writer)),
        };
        if outcome(result, &expect, "replace_root")?.is_some() {
            for backend in self.model.backends.iter_mut().filter(|x| x.id == b.id) {
                backend.root = root;
            }
            self.model.collect();
        }
        Ok(())
    }

    fn detach(&mut self, backend: &Index, stale: bool) -> Result<(), TestCaseError> {
        if stale {
            if let Some(b) = pick(&self.model.dead_backends, backend) {
                refused(
                    self.graph.detach_backend(b),
                    ErrorKind::StaleHandle,
                    "detach twice",
                )?;
                return refused(
                    self.graph.root(b),
                    ErrorKind::StaleHandle,
                    "root of detached",
                );
            }
        }
        if self.model.backends.is_empty() {
            return Ok(());
        }
        let b = self
            .model
            .backends
            .remove(backend.index(self.model.backends.len()));
        ok(self.graph.detach_backend(b.id), "detach_backend")?;
        self.model.dead_backends.push(b.id);
        self.model.collect();
        Ok(())
    }

    fn set_read_only(&mut self, id: NodeId, read_only: bool) -> Result<(), TestCaseError> {
        let n = self.model.node(id);
        let expect = match read_only {
            // Taking write away from an attached writer is refused.
            true if self.model.has_writer(id) => Expect::err(ErrorKind::PermissionConflict),
            true => Expect::ok(),
            false if n.device_ro => Expect::err(ErrorKind::ReadOnly),
            false => Expect::ok(),
        };
        let result = self.graph.set_read_only(id, read_only);
        if outcome(result, &expect, "set_read_only")?.is_some() {
            self.model.node_mut(id).read_only = read_only;
        }
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
            (6, _) => refused(g.set_read_only(d, true), stale, "set_read_only stale"),
            (7, Some(l)) => {
                let mut expect = Expect::err(stale);
                if self.model.node(l).frozen > 0 {
                    expect.errors.push(ErrorKind::Busy);
                }
                outcome(g.set_backing(l, Some(d)), &expect, "set_backing to stale").map(|_| ())
            }
            (8, Some(l)) => match self.model.backends.first() {
                Some(b) => refused(g.replace_root(b.id, d), stale, "replace_root to stale"),
                None => refused(
                    g.drop_intermediate(&mut NamesOnly, l, d, None),
                    stale,
                    "drop a stale top",
                ),
            },
            (9, Some(l)) => refused(
                g.drop_intermediate(&mut NamesOnly, l, l, Some(d)),
                stale,
                "drop to a stale base",
            ),
            (_, Some(l)) => refused(
                g.drop_intermediate(&mut NamesOnly, d, l, None),
                stale,
                "drop from a stale active",
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
        let m = &self.model;
        let live = m.ids();
        let active = pick(&live, a)?;
        match shape {
            DropShape::Chain | DropShape::ChainNoBase => {
                // A top with users (with a base to find, one with something
                // below it), any active layer above it, any base below it.
                let used: Vec<NodeId> = live
                    .iter()
                    .copied()
                    .filter(|&n| !m.overlays_of(n).is_empty() || m.backends_of(n).count() > 0)
                    .collect();
                let layered: Vec<NodeId> = used
                    .iter()
                    .copied()
                    .filter(|&n| m.node(n).backing.is_some())
                    .collect();
                let top = match shape {
                    DropShape::Chain => pick(&layered, t).or_else(|| pick(&used, t)),
                    _ => pick(&used, t),
                }
                .unwrap_or(active);
                let above: Vec<NodeId> = live
                    .iter()
                    .copied()
                    .filter(|&n| m.chain(n).contains(&top))
                    .collect();
                let active = pick(&above, a).unwrap_or(top);
                let base = match shape {
                    DropShape::Chain => pick(&m.chain(top)[1..], b),
                    _ => None,
                };
                Some((active, top, base))
            }
            DropShape::Pivot => {
                let roots = |writer: bool| -> Vec<NodeId> {
                    m.backends
                        .iter()
                        .filter(|b| b.writer || !writer)
                        .map(|b| b.root)
                        .filter(|&n| m.node(n).backing.is_some())
                        .collect()
                };
                let top = pick(&roots(true), t).or_else(|| pick(&roots(false), t))?;
                Some((top, top, pick(&m.chain(top)[1..], b)))
            }
            DropShape::TopIsBase => {
                let top = pick(&live, t)?;
                Some((active, top, Some(top)))
            }
            DropShape::Random => Some((active, pick(&live, t)?, pick(&live, b))),
            DropShape::RandomNoBase => Some((active, pick(&live, t)?, None)),
            DropShape::Stale => {
                let dead = pick(&m.dead_nodes, b)?;
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
        // The fault goes on an overlay of `top` when there is one.
        let armed = fault.and_then(|f| {
            let overlays = self.model.overlays_of(top);
            let candidates = match f.anywhere || overlays.is_empty() {
                true => self.model.ids(),
                false => overlays,
            };
            pick(&candidates, &f.target).map(|node| (node, self.model.node(node).proto, f.op))
        });
        let before = self.snapshot()?;
        if let Some((_, proto, op)) = armed {
            ok(self.graph.device_mut(proto), "device_mut")?.fail_operation(Some(op));
        }

        let result = self
            .graph
            .drop_intermediate(&mut NamesOnly, active, top, base);

        if let Some((_, proto, _)) = armed {
            if self.graph.contains(proto) {
                ok(self.graph.device_mut(proto), "device_mut")?.fail_operation(None);
            }
        }
        let expect = match &plan {
            Err(kinds) => Expect::unless(kinds.clone()),
            Ok(p) if armed.is_some_and(|(n, _, _)| p.overlays.contains(&n)) => {
                Expect::err(ErrorKind::Io)
            }
            Ok(_) => Expect::ok(),
        };
        let what = format!(
            "drop_intermediate(active {active:?}, top {top:?}, base {base:?}), \
             fault (node, protocol node, op) {armed:?}"
        );
        if outcome(result, &expect, &what)?.is_none() {
            // Refused or failed: nothing changed, on disk included. (The
            // model is untouched; `check` compares the graph with it.)
            let after = self.snapshot()?;
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
            prop_assert_eq!(
                &before.headers,
                &after.headers,
                "{}: in-memory headers",
                what
            );
            return Ok(());
        }

        let plan = plan.expect("an accepted drop has a plan");
        let want: StoredRef = base.map(|b| (self.model.node(b).name.clone(), Some("qcow2".into())));
        self.model = plan.after;
        // Every overlay refers to base, on disk and in memory; no other
        // device was written.
        let after = self.snapshot()?;
        for ((id, new), (_, header)) in after.bytes.iter().zip(&after.headers) {
            let find = |list: &[(NodeId, Vec<u8>)]| list.iter().find(|(n, _)| n == id).cloned();
            let (_, old) = find(&before.bytes).expect("live before the drop");
            if plan.overlays.contains(id) {
                prop_assert_eq!(old.len(), new.len(), "{}: overlay {:?} resized", &what, id);
                prop_assert!(
                    old[HEADER_AREA..] == new[HEADER_AREA..],
                    "{}: overlay {:?} changed past its header",
                    what,
                    id
                );
                prop_assert_eq!(
                    &on_disk_ref(new)?,
                    &want,
                    "{}: on-disk ref of {:?}",
                    &what,
                    id
                );
                prop_assert_eq!(header, &want, "{}: in-memory ref of {:?}", &what, id);
            } else {
                prop_assert!(&old == new, "{}: device of {:?} written", what, id);
                let old_header = before.headers.iter().find(|(n, _)| n == id);
                prop_assert_eq!(old_header.map(|h| &h.1), Some(header), "{}: header", what);
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
            prop_assert_eq!(
                ok(g.refcount(id), "refcount")?,
                m.refcount(id),
                "refcount of {:?}",
                id
            );
            prop_assert_eq!(
                ok(g.backing(id), "backing")?,
                n.backing,
                "backing of {:?}",
                id
            );
            prop_assert_eq!(
                ok(g.is_frozen(id), "is_frozen")?,
                n.frozen > 0,
                "frozen {:?}",
                id
            );
            prop_assert_eq!(
                ok(g.is_read_only(id), "is_read_only")?,
                n.read_only,
                "read-only {:?}",
                id
            );
            prop_assert_eq!(ok(g.file(id), "file")?, Some(n.proto), "file of {:?}", id);
            prop_assert_eq!(ok(g.name(id), "name")?, n.name.as_str());
            prop_assert_eq!(ok(g.format(id), "format")?, Some(Format::Qcow2));
            prop_assert!(g.contains(n.proto), "protocol node of {:?} released", id);
            prop_assert_eq!(
                ok(g.refcount(n.proto), "refcount")?,
                1,
                "protocol of {:?}",
                id
            );

            let mut want: Vec<Parent> =
                m.overlays_of(id).into_iter().map(Parent::Backing).collect();
            want.extend(m.backends_of(id).map(|b| Parent::Backend(b.id)));
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
        for b in &m.backends {
            prop_assert_eq!(ok(g.root(b.id), "root")?, b.root, "root of {:?}", b.id);
        }
        for &d in &m.dead_nodes {
            prop_assert!(!g.contains(d), "released {:?} is live", d);
            refused(
                g.refcount(d),
                ErrorKind::StaleHandle,
                "refcount of released",
            )?;
            refused(g.backing(d), ErrorKind::StaleHandle, "backing of released")?;
        }
        for &b in &m.dead_backends {
            refused(g.root(b), ErrorKind::StaleHandle, "root of detached")?;
        }
        Ok(())
    }

    /// Releases everything the test holds: the graph must end up empty.
    fn release_all(&mut self) -> Result<(), TestCaseError> {
        while let Some(b) = self.model.backends.first().copied() {
            ok(self.graph.detach_backend(b.id), "detach_backend")?;
            self.model.backends.remove(0);
            self.model.dead_backends.push(b.id);
            self.model.collect();
            self.check()?;
        }
        while let Some(id) = self.model.nodes.iter().find(|n| n.held > 0).map(|n| n.id) {
            self.unref(id)?;
            self.check()?;
        }
        prop_assert!(
            self.model.nodes.is_empty(),
            "model nodes left: {:?}",
            self.model.nodes
        );
        prop_assert_eq!(
            self.graph.node_count(),
            0,
            "nodes left after releasing everything"
        );
        prop_assert_eq!(self.graph.backend_count(), 0);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The property
// ---------------------------------------------------------------------------

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let opens = ops
        .iter()
        .filter(|op| matches!(op, Op::Open { .. } | Op::Snapshot { .. }))
        .count();
    // The graph borrows the device buffers; they are freed with the case.
    let mut storage = buffers(opens);
    let mut h = Harness::new(storage.iter_mut().map(Vec::as_mut_slice).collect());
    h.check()?;
    for op in ops {
        h.apply(op)?;
        h.check()?;
    }
    h.release_all()
}

/// 128 cases unless `PROPTEST_CASES` asks for more (a soak run); failures
/// are printed (with the shrunk op sequence), not persisted to files.
fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok());
    Config {
        cases: cases.unwrap_or(128),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn graph_matches_model(ops in prop::collection::vec(op(), 1..=40)) {
        run(&ops)?;
    }
}

// ---------------------------------------------------------------------------
// Fixed scenarios
// ---------------------------------------------------------------------------

/// Opens `count` writable qcow2 nodes over `storage` (template 0 each).
fn open_nodes<'a>(g: &mut TestGraph<'a>, storage: &'a mut [Vec<u8>]) -> Vec<(NodeId, NodeId)> {
    let image = &templates()[0];
    storage
        .iter_mut()
        .enumerate()
        .map(|(i, buffer)| {
            buffer[..image.len()].copy_from_slice(image);
            let device = MemDevice::new(buffer, image.len() as u64, i as u64).expect("device");
            let proto = g.add_device(device, &format!("n{i}")).expect("add_device");
            let node = g.open_format(proto, Format::Qcow2, false).expect("open");
            g.unref(proto).expect("unref the protocol node");
            (node, proto)
        })
        .collect()
}

/// base <- mid <- {top1, top2}: dropping mid rewrites both tops. A failure of
/// any operation of either top's rewrite leaves every device as it was.
#[test]
fn failed_header_rewrite_restores_every_overlay() {
    let mut storage = buffers(4);
    let mut g: Box<TestGraph<'_>> = Box::new(Graph::new());
    let nodes = open_nodes(&mut g, &mut storage);
    let [(base, _), (mid, _), (top1, p1), (top2, p2)] = nodes[..] else {
        unreachable!()
    };
    g.set_backing(mid, Some(base)).unwrap();
    g.set_backing(top1, Some(mid)).unwrap();
    g.set_backing(top2, Some(mid)).unwrap();
    g.unref(mid).unwrap();
    g.unref(base).unwrap();
    let contents =
        |g: &mut TestGraph<'_>| [p1, p2].map(|p| g.device_mut(p).unwrap().contents().to_vec());
    for victim in [p1, p2] {
        for op in 0..3 {
            let before = contents(&mut g);
            g.device_mut(victim).unwrap().fail_operation(Some(op));
            let err = g
                .drop_intermediate(&mut NamesOnly, top1, mid, Some(base))
                .unwrap_err();
            g.device_mut(victim).unwrap().fail_operation(None);
            assert_eq!(err.kind(), ErrorKind::Io, "victim {victim:?}, op {op}");
            assert!(
                before == contents(&mut g),
                "victim {victim:?}, op {op}: bytes changed"
            );
            assert_eq!(g.backing(top1).unwrap(), Some(mid));
            assert_eq!(g.backing(top2).unwrap(), Some(mid));
            assert_eq!(g.qcow2(top1).unwrap().backing_name(), None);
            assert_eq!(g.qcow2(top2).unwrap().backing_name(), None);
        }
    }
    g.drop_intermediate(&mut NamesOnly, top1, mid, Some(base))
        .unwrap();
    assert!(!g.contains(mid));
    for (top, p) in [(top1, p1), (top2, p2)] {
        assert_eq!(g.backing(top).unwrap(), Some(base));
        let bytes = g.device_mut(p).unwrap().contents().to_vec();
        let want = Some(("n0".to_string(), Some("qcow2".to_string())));
        assert_eq!(on_disk_ref(&bytes).unwrap(), want);
    }
    g.unref(top1).unwrap();
    g.unref(top2).unwrap();
    assert_eq!(g.node_count(), 0);
}

/// A backend attached with WRITE needs a writable root: `attach_backend` and
/// `replace_root` refuse a read-only one, so turning the root read-only under
/// the attached writer must be refused too (QEMU: a reopen read-only fails
/// while a parent holds the WRITE permission).
#[test]
fn read_only_switch_with_a_writer_attached_is_refused() {
    let mut storage = buffers(1);
    let mut g: Box<TestGraph<'_>> = Box::new(Graph::new());
    let [(node, _)] = open_nodes(&mut g, &mut storage)[..] else {
        unreachable!()
    };
    let writer = g.attach_backend(node, Access::READ_WRITE_DEVICE).unwrap();
    let switched = g.set_read_only(node, true);
    assert!(
        switched.is_err(),
        "set_read_only(root, true) under a READ_WRITE_DEVICE backend succeeded: \
         the node is now read-only ({:?}) and the writer's writes fail with {:?}",
        g.is_read_only(node),
        g.backend_write(writer, 0, &[1]).map_err(|e| e.kind()),
    );
    assert!(!g.is_read_only(node).unwrap());
    g.detach_backend(writer).unwrap();
    g.unref(node).unwrap();
    assert_eq!(g.node_count(), 0);
}

/// The pivot of an active commit: base (read-only) <- mid <- active, a device
/// writing through a backend on active. Dropping active re-points the backend
/// to base, makes base writable and releases mid and active — unless another
/// overlay still reads base, which a writer cannot share.
#[test]
fn pivot_moves_a_writer_to_base() {
    let mut storage = buffers(4);
    let mut g: Box<TestGraph<'_>> = Box::new(Graph::new());
    let nodes = open_nodes(&mut g, &mut storage);
    let [(base, _), (mid, _), (active, _), (other, _)] = nodes[..] else {
        unreachable!()
    };
    g.set_read_only(base, true).unwrap();
    g.set_backing(mid, Some(base)).unwrap();
    g.set_backing(active, Some(mid)).unwrap();
    g.unref(mid).unwrap();
    g.unref(base).unwrap();
    let device = g.attach_backend(active, Access::READ_WRITE_DEVICE).unwrap();
    g.unref(active).unwrap();

    // Another chain reads base: the writer cannot move there.
    g.set_backing(other, Some(base)).unwrap();
    let err = g
        .drop_intermediate(&mut NamesOnly, active, active, Some(base))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionConflict);
    assert_eq!(g.root(device).unwrap(), active);
    assert!(g.is_read_only(base).unwrap());

    g.set_backing(other, None).unwrap();
    g.drop_intermediate(&mut NamesOnly, active, active, Some(base))
        .unwrap();
    assert_eq!(g.root(device).unwrap(), base);
    assert!(!g.is_read_only(base).unwrap());
    assert!(!g.contains(active) && !g.contains(mid));
    assert_eq!(g.refcount(base).unwrap(), 1);
    g.detach_backend(device).unwrap();
    g.unref(other).unwrap();
    assert_eq!(g.node_count(), 0);
}
