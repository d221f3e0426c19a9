//! `collapse [-f FMT] --top TOP [--base BASE] IMAGE`: metadata-only
//! `drop_intermediate` on IMAGE's chain, like `qemu-img rebase -u`.
//!
//! TOP and BASE name chain members; they are matched by the identity of the
//! storage they open (same file), not by spelling. With TOP == IMAGE the
//! active layer itself is dropped: a BlockBackend standing for the device is
//! re-pointed to BASE, which becomes the active image.

use super::{invalid, Ctx, Environment, Failure, Outcome};
use crate::device::Device;
use crate::error::{Error, ErrorKind};
use crate::graph::{Access, NodeId, Resolver};

const USAGE: &str = "usage: collapse [-f FMT] --top TOP [--base BASE] IMAGE";

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `collapse`.
    pub(crate) fn collapse<'a>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        let (mut top, mut base, mut image, mut format) = (None, None, None, None);
        let mut words = words.iter().copied();
        while let Some(word) = words.next() {
            match word {
                "-f" => format = Some(super::jobs::parse_format(words.next(), USAGE)?),
                "--top" | "-t" => top = Some(words.next().ok_or_else(|| invalid(USAGE))?),
                "--base" | "-b" => base = Some(words.next().ok_or_else(|| invalid(USAGE))?),
                _ if word.starts_with('-') || image.is_some() => return Err(invalid(USAGE)),
                _ => image = Some(word),
            }
        }
        let (Some(top_name), Some(image)) = (top, image) else {
            return Err(invalid(USAGE));
        };
        let (active, backend) = self.open_as_device(image, format, Access::READ_ONLY_DEVICE)?;
        let result = (|| {
            let top = self.find_in_chain(active, top_name)?;
            let base = match base {
                Some(name) => Some(self.find_in_chain(active, name)?),
                None => None,
            };
            self.graph
                .drop_intermediate(self.env.resolver(), active, top, base)
                .map_err(|e| Failure::new(e, image))?;
            if top == active {
                let now = self.graph.root(backend)?;
                writeln!(
                    self.out,
                    "Image '{}' is now the active image",
                    self.graph.name(now)?
                )?;
            } else if top != base.unwrap_or(top) || base.is_none() {
                self.report_overlays(active, base)?;
            }
            Ok(())
        })();
        self.graph.detach_backend(backend)?;
        result
    }

    /// Prints the new backing reference of the overlay that now sits on `base`.
    fn report_overlays(&mut self, active: NodeId, base: Option<NodeId>) -> Outcome<'static> {
        let (graph, out) = (&*self.graph, &mut *self.out);
        for layer in graph.chain_from(active) {
            if graph.backing(layer)? == base {
                let q = graph.qcow2(layer)?;
                match q.backing_name() {
                    Some(name) => writeln!(
                        out,
                        "Backing file of '{}' is now '{}'",
                        graph.name(layer)?,
                        name
                    )?,
                    None => writeln!(
                        out,
                        "Image '{}' no longer has a backing file",
                        graph.name(layer)?
                    )?,
                }
                break;
            }
        }
        Ok(())
    }

    /// The member of `active`'s chain stored where `name` points.
    pub(crate) fn find_in_chain<'a>(
        &mut self,
        active: NodeId,
        name: &'a str,
    ) -> Result<NodeId, Failure<'a>> {
        let identity = self
            .env
            .resolver()
            .open(name, false)
            .map_err(|e| Failure::new(e, name))?
            .identity();
        for layer in self.graph.chain_from(active) {
            if self.graph.identity(layer)? == identity {
                return Ok(layer);
            }
        }
        Err(Failure::new(
            Error::new(ErrorKind::InvalidInput, "image is not in the backing chain"),
            name,
        ))
    }
}
