//! QMP node names: each graph node a client can name, by the name QSD's
//! command line would give it (the image's file stem) or the one a
//! command chose (`snapshot-node-name`).

use std::path::Path;

use crate::graph::NodeId;

use super::{not_found, HostGraph, QmpError};

/// Node name ↔ graph node. Entries whose node left the graph (dropped by a
/// commit or a stream) are forgotten when next looked at.
#[derive(Debug, Default)]
pub struct NodeNames {
    entries: Vec<(String, NodeId)>,
    /// Names generated for nodes no name was asked for: `#block1`, ...
    generated: u32,
}

impl NodeNames {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names every image of the chain from `active` down that has no name
    /// yet by its file stem (`top.qcow2` → `top`), or `#blockN` when the
    /// stem is taken, as the serve loop does when it opens the chain.
    ///
    /// # Errors
    /// Graph errors for a stale `active`.
    pub fn register_chain(&mut self, graph: &HostGraph, active: NodeId) -> crate::Result<()> {
        graph.size(active)?;
        let layers: Vec<NodeId> = graph.chain_from(active).collect();
        for layer in layers {
            if self.name_of(graph, layer).is_none() {
                let stem = file_stem(graph.name(layer)?).to_owned();
                self.insert_or_generate(graph, Some(stem), layer);
            }
        }
        Ok(())
    }

    /// Names `node` `name`.
    ///
    /// # Errors
    /// QEMU's error when `name` is taken.
    pub fn insert(&mut self, graph: &HostGraph, name: &str, node: NodeId) -> Result<(), QmpError> {
        self.check_free(graph, name)?;
        self.entries.push((name.to_owned(), node));
        Ok(())
    }

    /// Fails when `name` names a live node.
    pub(super) fn check_free(&mut self, graph: &HostGraph, name: &str) -> Result<(), QmpError> {
        match self.lookup(graph, name) {
            Some(_) => Err(QmpError::generic("New overlay node-name already in use")),
            None => Ok(()),
        }
    }

    /// Names `node` `wanted` when that is free, or `#blockN`.
    pub(super) fn insert_or_generate(
        &mut self,
        graph: &HostGraph,
        wanted: Option<String>,
        node: NodeId,
    ) {
        let name = match wanted {
            Some(name) if !name.is_empty() && self.lookup(graph, &name).is_none() => name,
            _ => loop {
                self.generated += 1;
                let name = format!("#block{}", self.generated);
                if self.lookup(graph, &name).is_none() {
                    break name;
                }
            },
        };
        self.entries.push((name, node));
    }

    /// The node named `name`, if it is still in the graph.
    pub fn lookup(&mut self, graph: &HostGraph, name: &str) -> Option<NodeId> {
        self.forget_gone(graph);
        self.entries.iter().find(|e| e.0 == name).map(|e| e.1)
    }

    /// The node named `name`, or QEMU's error.
    pub(super) fn find(&mut self, graph: &HostGraph, name: &str) -> Result<NodeId, QmpError> {
        self.lookup(graph, name)
            .ok_or_else(|| not_found(name, name))
    }

    /// The name of `node`, if it has one.
    pub fn name_of(&self, graph: &HostGraph, node: NodeId) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.1 == node && graph.contains(node))
            .map(|e| e.0.as_str())
    }

    /// The named nodes still in the graph, in the order they were named.
    pub fn nodes(&mut self, graph: &HostGraph) -> Vec<(String, NodeId)> {
        self.forget_gone(graph);
        self.entries.clone()
    }

    fn forget_gone(&mut self, graph: &HostGraph) {
        self.entries.retain(|e| graph.contains(e.1));
    }
}

/// `dir/top.qcow2` → `top`.
fn file_stem(path: &str) -> &str {
    Path::new(path)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(path)
}
