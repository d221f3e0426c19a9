//! Rebuilt images: a read-only device over bytes, opened in a fresh graph.

use super::*;

pub(crate) struct RoDisk<'s> {
    pub(crate) data: &'s [u8],
    pub(crate) id: u64,
}

impl Device for RoDisk<'_> {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> blockgraph::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.size())
            .ok_or(Error::new(ErrorKind::Io, "read past the end of the image"))?;
        buf.copy_from_slice(&self.data[offset as usize..end as usize]);
        Ok(())
    }

    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> blockgraph::Result<()> {
        Err(Error::new(
            ErrorKind::ReadOnly,
            "rebuilt images are read-only",
        ))
    }

    fn flush(&mut self) -> blockgraph::Result<()> {
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn identity(&self) -> DeviceId {
        DeviceId(7, self.id)
    }
}

pub(crate) struct RoResolver<'s> {
    pub(crate) names: &'s [String],
    pub(crate) states: &'s [Vec<u8>],
}

impl<'s> RoResolver<'s> {
    pub(crate) fn disk(&self, name: &str) -> blockgraph::Result<RoDisk<'s>> {
        let img = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or(Error::new(ErrorKind::NotFound, "no such image"))?;
        Ok(RoDisk {
            data: &self.states[img],
            id: img as u64 + 1,
        })
    }
}

impl<'s> OpenByName<RoDisk<'s>> for RoResolver<'s> {
    fn open_by_name(&mut self, name: &str, _writable: bool) -> blockgraph::Result<RoDisk<'s>> {
        self.disk(name)
    }
}

/// A small graph for reading rebuilt chains.
pub(crate) type ViewGraph<'s> = Graph<RoDisk<'s>, 16, 2, 8, 1>;

/// An image as the library opens it: its chain (names, top first) and its
/// guest view.
#[derive(Clone)]
pub(crate) struct Opened {
    pub(crate) chain: Vec<String>,
    pub(crate) view: Rc<Vec<u8>>,
}

/// Opens image `img` of `states` (and its backing chain) through the
/// library and reads its whole guest view. `Ok(None)`: a blank image that
/// holds no qcow2 header yet.
pub(crate) fn open_fresh(
    names: &[String],
    states: &[Vec<u8>],
    blank: &[bool],
    img: usize,
) -> Result<Option<Opened>, String> {
    if !has_magic(&states[img]) {
        if blank[img] {
            return Ok(None);
        }
        return Err(format!(
            "{}: no qcow2 magic ({} bytes)",
            names[img],
            states[img].len()
        ));
    }
    let mut resolver = ByName(RoResolver { names, states });
    let mut graph = Box::new(ViewGraph::new());
    let options = OpenOptions {
        format: Some(Format::Qcow2),
        ..OpenOptions::probing()
    };
    let top = graph
        .open_image(&mut resolver, &names[img], options)
        .map_err(|e| {
            format!(
                "{}: the library cannot open it: {e} ({:?})",
                names[img],
                e.kind()
            )
        })?;
    let mut chain = Vec::new();
    let mut node = Some(top);
    while let Some(n) = node {
        chain.push(graph.name(n).expect("live node").to_owned());
        node = graph.backing(n).expect("live node");
    }
    let size = graph.size(top).expect("live node");
    let mut view = vec![0u8; size as usize];
    let read = graph.read(top, 0, &mut view);
    graph.unref(top).expect("release the chain");
    read.map_err(|e| {
        format!(
            "{}: the library cannot read it: {e} ({:?})",
            names[img],
            e.kind()
        )
    })?;
    Ok(Some(Opened {
        chain,
        view: Rc::new(view),
    }))
}
