//! `info [-f FMT] [-U] [--backing-chain] [--output=json|human] IMAGE`: image facts with
//! qemu-img's field names.

use super::{image_command, json, json_option, Ctx, Environment, Outcome};
use crate::format::qcow2::header::{Compression, Header, Incompatible};
use crate::format::Format;
use crate::graph::{Graph, NameBuf, NodeId, OpenOptions, Resolver};

const USAGE: &str = "usage: info [-f FMT] [-U] [--backing-chain] [--output=json|human] IMAGE";

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `info`.
    pub(crate) fn info<'a>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        let (mut chain, mut as_json) = (false, false);
        let (image, opts) = image_command(words, USAGE, |word, rest| {
            if word == "--backing-chain" {
                chain = true;
                return Some(Ok(()));
            }
            json_option(word, rest, &mut as_json)
        })?;
        // Without --backing-chain only IMAGE's header is shown: its backing
        // files are not opened (they may be missing), as in qemu-img.
        let options = OpenOptions {
            no_backing: !chain,
            ..opts.read_only()
        };
        self.with_image(image, options, |cx, top| {
            let layers = cx
                .graph
                .chain_from(top)
                .take(if chain { usize::MAX } else { 1 });
            let mut first = true;
            if as_json && chain {
                cx.out.write_str("[\n")?;
            }
            for layer in layers.collect::<heapless::Vec<NodeId, N>>() {
                if !first {
                    cx.out.write_str(if as_json { ",\n" } else { "\n" })?;
                }
                first = false;
                if as_json {
                    cx.describe_json(layer)?;
                } else {
                    cx.describe_human(layer)?;
                }
            }
            if as_json {
                cx.out.write_str(if chain { "\n]\n" } else { "\n" })?;
            }
            Ok(())
        })
    }

    /// The name `layer`'s backing file resolves to: its node's when the
    /// chain is open, else as the resolver would resolve it.
    fn full_backing(&mut self, layer: NodeId, out: &mut NameBuf) -> crate::Result<()> {
        let graph = &*self.graph;
        if let Some(backing) = graph.backing(layer)? {
            out.clear();
            // Same capacity, cannot fail.
            let _ = out.push_str(graph.name(backing)?);
            return Ok(());
        }
        match graph.qcow2(layer).ok().and_then(|q| q.backing_name()) {
            Some(reference) => {
                self.env
                    .resolver()
                    .resolve_backing(graph.name(layer)?, reference, out)
            }
            None => Ok(()),
        }
    }

    /// Facts about `layer`, whose backing file resolves to `full_backing`
    /// and whose external data file is named `data_file` (empty: none).
    fn facts<'g>(
        graph: &'g Graph<E::Device, N, B, C, J>,
        layer: NodeId,
        (full_backing, data_file): (&'g str, &'g str),
    ) -> crate::Result<Facts<'g>> {
        let format = graph.format(layer)?.unwrap_or(Format::Raw);
        let qcow2 = graph.qcow2(layer).ok();
        Ok(Facts {
            filename: graph.name(layer)?,
            format,
            size: graph.size(layer)?,
            cluster_size: qcow2.map(|q| q.cluster_size()),
            backing: qcow2.and_then(|q| {
                q.backing_name()
                    .map(|n| (n, q.backing_format(), full_backing))
            }),
            dirty: qcow2.map(|q| q.is_dirty()),
            specific: qcow2.map(|q| Qcow2Facts::of(q.header())),
            data_file: (!data_file.is_empty()).then_some(data_file),
        })
    }

    /// The names [`Self::facts`] takes for `layer`: where its backing file
    /// resolves, and its external data file's.
    fn names(&mut self, layer: NodeId) -> crate::Result<(NameBuf, NameBuf)> {
        let (mut full, mut data) = (NameBuf::new(), NameBuf::new());
        self.full_backing(layer, &mut full)?;
        self.graph.data_file_reference(layer, &mut data)?;
        Ok((full, data))
    }

    /// Writes `layer`'s facts as a qemu-img JSON object (no newline after it).
    fn describe_json(&mut self, layer: NodeId) -> Outcome<'static> {
        let (full, data) = self.names(layer)?;
        let f = Self::facts(self.graph, layer, (&full, &data))?;
        let out = &mut *self.out;
        out.write_str("{\n    \"filename\": ")?;
        json::string(out, f.filename)?;
        write!(
            out,
            ",\n    \"format\": \"{}\",\n    \"virtual-size\": {}",
            f.format, f.size
        )?;
        if let Some(cs) = f.cluster_size {
            write!(out, ",\n    \"cluster-size\": {cs}")?;
        }
        if let Some((name, format, full)) = f.backing {
            out.write_str(",\n    \"backing-filename\": ")?;
            json::string(out, name)?;
            if let Some(format) = format {
                out.write_str(",\n    \"backing-filename-format\": ")?;
                json::string(out, format)?;
            }
            out.write_str(",\n    \"full-backing-filename\": ")?;
            json::string(out, full)?;
        }
        if let Some(q) = f.specific {
            out.write_str(
                ",\n    \"format-specific\": {\n        \"type\": \"qcow2\",\n        \"data\": {",
            )?;
            write!(
                out,
                "\n            \"compat\": \"{}\",\n            \"compression-type\": \"{}\"",
                q.compat(),
                q.compression.name()
            )?;
            if q.v3 {
                write!(
                    out,
                    ",\n            \"lazy-refcounts\": {}",
                    q.lazy_refcounts
                )?;
            }
            write!(out, ",\n            \"refcount-bits\": {}", q.refcount_bits)?;
            if let Some(name) = f.data_file {
                out.write_str(",\n            \"data-file\": ")?;
                json::string(out, name)?;
                write!(out, ",\n            \"data-file-raw\": {}", q.data_file_raw)?;
            }
            if q.v3 {
                write!(
                    out,
                    ",\n            \"corrupt\": {},\n            \"extended-l2\": {}",
                    q.corrupt, q.extended_l2
                )?;
            }
            out.write_str("\n        }\n    }")?;
        }
        if let Some(dirty) = f.dirty {
            write!(out, ",\n    \"dirty-flag\": {dirty}")?;
        }
        out.write_str("\n}")?;
        Ok(())
    }

    /// Writes `layer`'s facts as qemu-img's human-readable lines.
    fn describe_human(&mut self, layer: NodeId) -> Outcome<'static> {
        let (full, data) = self.names(layer)?;
        let f = Self::facts(self.graph, layer, (&full, &data))?;
        let out = &mut *self.out;
        writeln!(out, "image: {}", f.filename)?;
        writeln!(out, "file format: {}", f.format)?;
        writeln!(out, "virtual size: {} bytes", f.size)?;
        if let Some(cs) = f.cluster_size {
            writeln!(out, "cluster_size: {cs}")?;
        }
        if let Some((name, format, full)) = f.backing {
            writeln!(out, "backing file: {name} (actual path: {full})")?;
            if let Some(format) = format {
                writeln!(out, "backing file format: {format}")?;
            }
        }
        if let Some(dirty) = f.dirty {
            writeln!(out, "dirty flag: {dirty}")?;
        }
        if let Some(q) = f.specific {
            writeln!(out, "Format specific information:")?;
            writeln!(out, "    compat: {}", q.compat())?;
            writeln!(out, "    compression type: {}", q.compression.name())?;
            if q.v3 {
                writeln!(out, "    lazy refcounts: {}", q.lazy_refcounts)?;
            }
            writeln!(out, "    refcount bits: {}", q.refcount_bits)?;
            if let Some(name) = f.data_file {
                writeln!(out, "    data file: {name}")?;
                writeln!(out, "    data file raw: {}", q.data_file_raw)?;
            }
            if q.v3 {
                writeln!(out, "    corrupt: {}", q.corrupt)?;
                writeln!(out, "    extended l2: {}", q.extended_l2)?;
            }
        }
        Ok(())
    }
}

/// qcow2's "Format specific information", as qemu-img prints it.
#[derive(Clone, Copy)]
struct Qcow2Facts {
    /// Version 3 (`compat: 1.1`), else 2 (`0.10`).
    v3: bool,
    compression: Compression,
    lazy_refcounts: bool,
    refcount_bits: u32,
    corrupt: bool,
    extended_l2: bool,
    data_file_raw: bool,
}

impl Qcow2Facts {
    fn of(header: &Header) -> Self {
        Self {
            v3: header.version >= 3,
            compression: header.compression,
            lazy_refcounts: header.compatible & 1 != 0,
            refcount_bits: 1 << header.refcount_order,
            corrupt: header.incompatible.contains(Incompatible::CORRUPT),
            extended_l2: header.incompatible.contains(Incompatible::EXTENDED_L2),
            data_file_raw: header.data_file_raw(),
        }
    }

    fn compat(self) -> &'static str {
        if self.v3 {
            "1.1"
        } else {
            "0.10"
        }
    }
}

/// Facts about one layer.
struct Facts<'g> {
    filename: &'g str,
    format: Format,
    size: u64,
    cluster_size: Option<u64>,
    backing: Option<(&'g str, Option<&'g str>, &'g str)>,
    dirty: Option<bool>,
    specific: Option<Qcow2Facts>,
    /// The external data file's name, as stored.
    data_file: Option<&'g str>,
}
