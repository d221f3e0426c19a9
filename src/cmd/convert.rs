//! `convert [-f FMT] [-U] [-O raw] [-t CACHE] IMAGE OUTPUT`: the chain's guest view as a
//! raw image. Ranges that read as zeros are skipped: the new output already
//! reads zero. Where the environment has several workers (host threads,
//! [`Environment::copy_in_parallel`]) each copies a part of the image with
//! its own graph, as qemu-img keeps several requests in flight. As with
//! qemu-img, the output's cache mode defaults to `unsafe` (no flush at the
//! end); `-t writeback` flushes it before the command succeeds.

use core::ops::Range;

use super::{invalid, Ctx, Environment, Failure, ImageOpts, Outcome};
use crate::format::Format;
use crate::graph::{piece_len, Graph, NodeId};
use crate::Device;

const USAGE: &str = "usage: convert [-f FMT] [-U] [-O raw] [-t writeback|unsafe] IMAGE OUTPUT";

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `convert`.
    pub(crate) fn convert<'a>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        let mut names = heapless::Vec::<&str, 2>::new();
        let mut flush = false;
        let mut opts = ImageOpts::default();
        let mut words = words.iter().copied();
        while let Some(word) = words.next() {
            if let Some(taken) = opts.take(word, &mut words) {
                taken?;
                continue;
            }
            match word {
                "-t" => {
                    flush = match words.next() {
                        Some("writeback") => true,
                        Some("unsafe") => false,
                        Some(_) => {
                            return Err(Failure::new(
                                crate::Error::new(
                                    crate::ErrorKind::Unsupported,
                                    "unsupported cache mode (writeback or unsafe)",
                                ),
                                "-t",
                            ))
                        }
                        None => return Err(invalid(USAGE)),
                    }
                }
                "-O" => {
                    let name = words.next().ok_or_else(|| invalid(USAGE))?;
                    if Format::from_name(name) != Ok(Format::Raw) {
                        return Err(Failure::new(
                            crate::Error::new(
                                crate::ErrorKind::Unsupported,
                                "unsupported output format (only raw)",
                            ),
                            "-O",
                        ));
                    }
                }
                _ if word.starts_with('-') => return Err(invalid(USAGE)),
                _ => names.push(word).map_err(|_| invalid(USAGE))?,
            }
        }
        let [image, output] = names.as_slice() else {
            return Err(invalid(USAGE));
        };
        self.with_image(image, opts.read_only(), |cx, top| {
            let size = cx.graph.size(top)?;
            let format = cx.graph.format(top)?.unwrap_or(Format::Raw);
            let mut target = cx
                .env
                .create(output, size)
                .map_err(|e| Failure::new(e, output))?;
            let copied = match cx.env.copy_in_parallel((image, format), output, size) {
                Some(copied) => copied,
                None => copy_range(cx.graph, top, 0..size, (&mut target, output), cx.scratch),
            };
            let done = copied.and_then(|()| {
                if flush {
                    target.flush().map_err(|e| Failure::new(e, output))?;
                }
                Ok(())
            });
            if done.is_err() {
                cx.env.remove(output);
            }
            done
        })
    }
}

/// Copies guest bytes `range` of `top`'s chain to the same offsets of
/// `target` (named `output` in errors) through `scratch`, skipping ranges that
/// read as zeros: the target must read zeros there already. A run is cut
/// into pieces only at multiples of the largest power of two that fits in
/// `scratch` (1 MiB for the CLI's scratch; at least 4 KiB for any scratch
/// of 4 KiB or more), so no target write starts or ends inside a sector
/// but at the ends of a run.
///
/// # Errors
/// Read errors name the image's node; write errors name `output`.
pub fn copy_range<
    'a,
    D: Device,
    T: Device,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    graph: &mut Graph<D, N, B, C, J>,
    top: NodeId,
    range: Range<u64>,
    (target, output): (&mut T, &'a str),
    scratch: &mut [u8],
) -> Outcome<'a> {
    let mut offset = range.start;
    while offset < range.end {
        let (status, run) = graph.block_status(top, offset, range.end - offset)?;
        if !status.zero {
            let mut done = 0;
            while done < run {
                let n = piece_len(offset + done, run - done, scratch.len() as u64) as usize;
                graph.read(top, offset + done, &mut scratch[..n])?;
                target
                    .write_at(offset + done, &scratch[..n])
                    .map_err(|e| Failure::new(e, output))?;
                done += n as u64;
            }
        }
        offset += run;
    }
    Ok(())
}
