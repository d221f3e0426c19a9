//! Block commands: queries of the nodes, the live snapshot, and the starts
//! of stream and commit jobs. Arguments are all checked before anything
//! changes; chain changes run in a drained section of the engine.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::device::FileDevice;
use crate::error::ErrorKind;
use crate::graph::NameBuf;
use crate::graph::{NodeId, Parent, Resolver};
use crate::host::PathResolver;
use crate::jobs::{CommitRequest, JobId, OnError, StreamRequest};

use super::args::Args;
use super::{not_found, Control, HostGraph, QmpError, Reply};

/// `query-block`: the export's BlockBackend (QEMU's `BlockInfo`, device
/// name `""`; QSD lists no backend here, its export's being anonymous).
pub(super) fn query_block(args: &mut Args, cx: &mut Control<'_>) -> Reply {
    args.finish()?;
    let root = cx.graph.root(cx.backend)?;
    Ok(json!([{
        "device": "",
        "locked": false,
        "removable": false,
        "inserted": node_info(cx, root, false)?,
    }]))
}

/// `query-named-block-nodes [flat]`: QEMU's `BlockDeviceInfo` of every
/// named node (format nodes: the images).
pub(super) fn query_named_block_nodes(args: &mut Args, cx: &mut Control<'_>) -> Reply {
    let flat = args.opt_bool("flat")?.unwrap_or(false);
    args.finish()?;
    let nodes = cx.names.nodes(cx.graph);
    let infos: Result<Vec<Value>, QmpError> = nodes
        .into_iter()
        .map(|(_, node)| node_info(cx, node, flat))
        .collect();
    Ok(Value::Array(infos?))
}

/// QEMU's `BlockDeviceInfo` of `node`.
fn node_info(cx: &Control<'_>, node: NodeId, flat: bool) -> Reply {
    let graph = &*cx.graph;
    let mut info = Map::new();
    let mut put = |key: &str, value: Value| {
        info.insert(key.into(), value);
    };
    put("file", graph.name(node)?.into());
    put(
        "node-name",
        cx.names.name_of(graph, node).unwrap_or_default().into(),
    );
    put("ro", graph.is_read_only(node)?.into());
    put("active", true.into());
    put("drv", format_name(graph, node)?.into());
    if let Ok(Some(backing)) = graph.qcow2(node).map(|q| q.backing_name()) {
        put("backing_file", backing.into());
    }
    put(
        "backing_file_depth",
        (graph.chain_from(node).count() - 1).into(),
    );
    put("encrypted", false.into());
    put("detect_zeroes", "off".into());
    for key in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        put(key, 0.into());
    }
    put("image", image_info(graph, node, !flat)?);
    put(
        "cache",
        json!({"writeback": true, "direct": cx.resolver.direct, "no-flush": false}),
    );
    put("write_threshold", 0.into());
    Ok(Value::Object(info))
}

/// QEMU's `ImageInfo` of `node`, with its backing chain when `chain`.
fn image_info(graph: &HostGraph, node: NodeId, chain: bool) -> Reply {
    let mut info = Map::new();
    info.insert("virtual-size".into(), graph.size(node)?.into());
    info.insert("filename".into(), graph.name(node)?.into());
    info.insert("format".into(), format_name(graph, node)?.into());
    if let Ok(qcow2) = graph.qcow2(node) {
        info.insert("cluster-size".into(), qcow2.cluster_size().into());
        info.insert("dirty-flag".into(), false.into());
        if let Some(name) = qcow2.backing_name() {
            info.insert("backing-filename".into(), name.into());
        }
        if let Some(format) = qcow2.backing_format() {
            info.insert("backing-filename-format".into(), format.into());
        }
    }
    if let Some(backing) = graph.backing(node)? {
        info.insert("full-backing-filename".into(), graph.name(backing)?.into());
        if chain {
            info.insert("backing-image".into(), image_info(graph, backing, true)?);
        }
    }
    Ok(Value::Object(info))
}

/// The node's driver name (`qcow2`, `raw`; `file` for a protocol node).
fn format_name(graph: &HostGraph, node: NodeId) -> Result<&'static str, QmpError> {
    Ok(graph.format(node)?.map_or("file", |f| f.name()))
}

/// Runs `change` in a drained section: polls the engine (blocking in the
/// devices when nothing else progresses) until no device operation is in
/// flight, as QEMU's `bdrv_drained_begin` does for a QMP command.
fn drained<T>(
    cx: &mut Control<'_>,
    mut change: impl FnMut(&mut HostGraph, &mut PathResolver) -> T,
) -> T {
    let resolver = &mut *cx.resolver;
    loop {
        if let Some(done) = cx.engine.drained(cx.graph, |graph| change(graph, resolver)) {
            return done;
        }
        cx.engine.advance(cx.graph);
    }
}

/// `blockdev-snapshot-sync`: creates `snapshot-file` as an empty qcow2
/// overlay of the node, which becomes the active layer (the export moves
/// to it, as QSD's does), named `snapshot-node-name` (or by its file stem).
pub(super) fn snapshot_sync(args: &mut Args, cx: &mut Control<'_>) -> Reply {
    let device = args.opt_str("device")?;
    let node_name = args.opt_str("node-name")?;
    let file = args.str("snapshot-file")?;
    let snapshot_name = args.opt_str("snapshot-node-name")?;
    let format = args.opt_str("format")?;
    let mode = args.opt_enum("mode", &["existing", "absolute-paths"])?;
    args.finish()?;
    if format.as_deref().is_some_and(|f| f != "qcow2") {
        return Err(QmpError::generic(
            "only qcow2 overlays can be created (format)",
        ));
    }
    if mode == Some(0) {
        return Err(QmpError::generic(
            "mode 'existing' is not supported: the overlay is always created",
        ));
    }
    if node_name.is_some() && snapshot_name.is_none() {
        return Err(QmpError::generic("New overlay node-name missing"));
    }
    let name = match (&device, &node_name) {
        (Some(name), None) | (None, Some(name)) => name.clone(),
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "Cannot specify both 'device' and 'node-name'",
            ))
        }
        (None, None) => String::new(),
    };
    let active = cx.names.lookup(cx.graph, &name).ok_or_else(|| {
        not_found(
            device.as_deref().unwrap_or_default(),
            node_name.as_deref().unwrap_or_default(),
        )
    })?;
    if !cx
        .graph
        .parents(active)
        .any(|p| matches!(p, Parent::Backend(_)))
    {
        return Err(QmpError::generic(format!(
            "Node '{name}' is not the active layer of the export"
        )));
    }
    if let Some(wanted) = &snapshot_name {
        cx.names.check_free(cx.graph, wanted)?;
    }
    // Refused (nothing truncated) when the file is in use, as an image of
    // the chain is.
    let mut device = FileDevice::create(Path::new(&file))?;
    let created = device.created();
    if let Some(max) = cx.resolver.max_file_size {
        device.limit_size(max);
    }
    let mut device = Some(device);
    let snapshot = drained(cx, |graph, resolver| match device.take() {
        Some(device) => graph.snapshot(resolver, active, device, &file),
        None => Err(crate::Error::new(ErrorKind::Busy, "the overlay is taken")),
    });
    let overlay = match snapshot {
        Ok(overlay) => overlay,
        Err(err) => {
            if created {
                // Best effort: the snapshot's own failure is what counts.
                let _ = std::fs::remove_file(&file);
            }
            return Err(err.into());
        }
    };
    let wanted = snapshot_name.or_else(|| {
        Path::new(&file)
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_owned)
    });
    cx.names.insert_or_generate(cx.graph, wanted, overlay);
    // The backends moved to the overlay hold it.
    cx.graph.unref(overlay)?;
    Ok(json!({}))
}

/// The job arguments common to stream and commit.
struct JobOptions {
    id: Option<String>,
    speed: u64,
    on_error: OnError,
    auto_finalize: bool,
    auto_dismiss: bool,
}

impl JobOptions {
    /// Takes `job-id`, `speed`, `on-error`, `auto-finalize`,
    /// `auto-dismiss` and refuses `filter-node-name`.
    fn take(args: &mut Args) -> Result<Self, QmpError> {
        let id = args.opt_str("job-id")?;
        let speed = args.opt_u64("speed")?.unwrap_or(0);
        let on_error =
            args.opt_enum("on-error", &["report", "ignore", "enospc", "stop", "auto"])?;
        let auto_finalize = args.opt_bool("auto-finalize")?.unwrap_or(true);
        let auto_dismiss = args.opt_bool("auto-dismiss")?.unwrap_or(true);
        if args.opt_str("filter-node-name")?.is_some() {
            return Err(QmpError::generic("filter-node-name is not supported"));
        }
        let on_error = match on_error {
            None | Some(0) => OnError::Report,
            Some(1) => OnError::Ignore,
            Some(3) => OnError::Stop,
            Some(_) => {
                return Err(QmpError::generic(
                    "on-error 'enospc' and 'auto' are not supported (report, ignore, stop)",
                ))
            }
        };
        Ok(Self {
            id,
            speed,
            on_error,
            auto_finalize,
            auto_dismiss,
        })
    }

    /// Starts the job `start` makes on `device` (in a drained section) and
    /// adds it to the job table under the checked id.
    fn start(
        self,
        cx: &mut Control<'_>,
        device: (NodeId, &str),
        start: impl FnMut(&mut HostGraph, &mut PathResolver) -> crate::Result<JobId>,
    ) -> Reply {
        // QEMU's op blocker, checked before the job id.
        let busy = cx.graph.jobs.iter().find(|(_, job)| job.involves(device.0));
        if let Some(info) = busy.and_then(|(job, _)| cx.graph.job_info(job).ok()) {
            return Err(QmpError::generic(format!(
                "Node '{}' is busy: block device is in use by block job: {}",
                device.1,
                info.kind.name()
            )));
        }
        let id = cx.jobs.check_new_id(self.id.as_deref())?;
        let job = drained(cx, start)?;
        let info = cx.graph.job_info(job)?;
        cx.jobs.add(
            id,
            job,
            info,
            (self.speed, self.auto_finalize, self.auto_dismiss),
        );
        Ok(json!({}))
    }
}

/// The layer of the chain below `from` (excluded) named `file` (as opened,
/// or the same file), QEMU's `bdrv_find_backing_image`.
fn backing_image(graph: &HostGraph, from: NodeId, file: &str) -> Option<NodeId> {
    let wanted = Path::new(file).canonicalize().ok();
    graph.chain_from(from).skip(1).find(|&layer| {
        graph.name(layer).is_ok_and(|name| {
            name == file || wanted.is_some() && Path::new(name).canonicalize().ok() == wanted
        })
    })
}

/// Whether `node` is below `upper` (excluded) in its chain.
fn is_below(graph: &HostGraph, upper: NodeId, node: NodeId) -> bool {
    graph.chain_from(upper).skip(1).any(|layer| layer == node)
}

/// The base node named by `base-node` (a node) or `base` (a file) below
/// `top` (for a commit, `top` itself passes: the caller refuses it);
/// `None` when neither is given.
fn named_base(
    cx: &mut Control<'_>,
    top: (NodeId, &str),
    (base_node, base): (Option<String>, Option<String>),
    commit: bool,
) -> Result<Option<NodeId>, QmpError> {
    match (base_node, base) {
        (Some(_), Some(_)) => Err(QmpError::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        )),
        (Some(name), None) => {
            let node = cx.names.find(cx.graph, &name)?;
            match (commit, node == top.0 || is_below(cx.graph, top.0, node)) {
                (true, true) => Ok(Some(node)),
                (true, false) => Err(QmpError::generic(format!(
                    "'{name}' is not in this backing file chain"
                ))),
                (false, _) if is_below(cx.graph, top.0, node) => Ok(Some(node)),
                (false, _) => Err(QmpError::generic(format!(
                    "Node '{name}' is not a backing image of '{}'",
                    top.1
                ))),
            }
        }
        (None, Some(file)) => backing_image(cx.graph, top.0, &file)
            .map(Some)
            .ok_or_else(|| QmpError::generic(format!("Can't find '{file}' in the backing chain"))),
        (None, None) => Ok(None),
    }
}

/// Checks a `backing-file` argument: the graph writes the reference the
/// resolver forms (relative to the overlay's directory when both paths
/// are relative, as QEMU's default), so only that one is accepted.
fn check_backing_file(
    cx: &mut Control<'_>,
    overlay: NodeId,
    base: NodeId,
    given: &str,
) -> Result<(), QmpError> {
    let mut reference = NameBuf::new();
    let overlay_name = cx.graph.name(overlay)?.to_owned();
    let base_name = cx.graph.name(base)?.to_owned();
    cx.resolver
        .reference(&overlay_name, &base_name, &mut reference)?;
    if reference.as_str() != given {
        return Err(QmpError::generic(format!(
            "backing-file '{given}' differs from the reference written: '{}'",
            reference.as_str()
        )));
    }
    Ok(())
}

/// `block-stream`: copies into `device` (the active layer) what the layers
/// above `base-node`/`base` hold, then makes that its backing file (none
/// without a base).
pub(super) fn stream(args: &mut Args, cx: &mut Control<'_>) -> Reply {
    let device = args.str("device")?;
    let base_node = args.opt_str("base-node")?;
    let base = args.opt_str("base")?;
    let backing_file = args.opt_str("backing-file")?;
    if args.opt_str("bottom")?.is_some() {
        return Err(QmpError::generic("bottom is not supported: use base-node"));
    }
    let options = JobOptions::take(args)?;
    args.finish()?;
    let active = cx.names.find(cx.graph, &device)?;
    let base = named_base(cx, (active, &device), (base_node, base), false)?;
    match (&backing_file, base) {
        (Some(_), None) => {
            return Err(QmpError::generic(
                "backing file specified, but streaming the entire chain",
            ))
        }
        (Some(given), Some(base)) => check_backing_file(cx, active, base, given)?,
        (None, _) => {}
    }
    let on_error = options.on_error;
    options.start(cx, (active, &device), |graph, _| {
        graph.start_stream(StreamRequest {
            active,
            base,
            on_error,
        })
    })
}

/// `block-commit`: merges `top-node`/`top` (default: the active layer of
/// `device`, an active commit) down into `base-node`/`base` (default: the
/// bottom of the chain).
pub(super) fn commit(args: &mut Args, cx: &mut Control<'_>) -> Reply {
    let device = args.str("device")?;
    let base_node = args.opt_str("base-node")?;
    let base = args.opt_str("base")?;
    let top_node = args.opt_str("top-node")?;
    let top = args.opt_str("top")?;
    let backing_file = args.opt_str("backing-file")?;
    let options = JobOptions::take(args)?;
    args.finish()?;
    let active = cx.names.find(cx.graph, &device)?;
    if cx
        .graph
        .parents(active)
        .any(|p| matches!(p, Parent::Backing(_)))
    {
        return Err(QmpError::generic("Need a root block node"));
    }
    let top = match (top_node, top) {
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "'top' and 'top-node' cannot be specified at the same time",
            ))
        }
        (Some(name), None) => {
            let node = cx.names.find(cx.graph, &name)?;
            if node != active && !is_below(cx.graph, active, node) {
                return Err(QmpError::generic(format!(
                    "'{name}' is not in this backing file chain"
                )));
            }
            (node, name)
        }
        (None, Some(file)) => {
            let node = match cx.graph.name(active)? == file {
                true => Some(active),
                false => backing_image(cx.graph, active, &file),
            };
            let node =
                node.ok_or_else(|| QmpError::generic(format!("Top image file {file} not found")))?;
            (node, file)
        }
        (None, None) => (active, device.clone()),
    };
    let base = match named_base(cx, (top.0, &top.1), (base_node, base), true)? {
        Some(base) => base,
        // QEMU's `bdrv_find_base`: the bottom of the chain (top itself
        // when it has no backing file, refused below).
        None => cx.graph.chain_from(top.0).last().unwrap_or(top.0),
    };
    let top = top.0;
    if top == base {
        return Err(QmpError::generic("cannot commit an image into itself"));
    }
    if let Some(given) = &backing_file {
        if top == active {
            return Err(QmpError::generic(
                "'backing-file' specified, but 'top' is the active layer",
            ));
        }
        let overlay = cx
            .graph
            .chain_from(active)
            .find(|&layer| cx.graph.backing(layer).ok().flatten() == Some(top))
            .ok_or_else(|| QmpError::generic("top has no overlay"))?;
        check_backing_file(cx, overlay, base, given)?;
    }
    if top == active && !options.auto_finalize {
        // The graph pivots in the step that makes the last copy, so that
        // no guest write falls between them: there is no pending state to
        // hold the pivot in.
        return Err(QmpError::generic(
            "an active commit finalizes itself: 'auto-finalize' must be true",
        ));
    }
    let on_error = options.on_error;
    options.start(cx, (active, &device), |graph, _| {
        graph.start_commit(CommitRequest {
            active,
            top,
            base,
            on_error,
        })
    })
}
