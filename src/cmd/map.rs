//! `map [-f FMT] [-U] [--output=json|human] IMAGE`: allocation of the chain's guest view,
//! in qemu-img map's terms (start, length, depth, present, zero, data).

use core::fmt;

use super::{image_command, json_option, Ctx, Environment, Outcome};
use crate::graph::BlockStatus;

const USAGE: &str = "usage: map [-f FMT] [-U] [--output=json|human] IMAGE";

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `map`.
    pub(crate) fn map<'a>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        let mut as_json = false;
        let (image, opts) = image_command(words, USAGE, |word, rest| {
            json_option(word, rest, &mut as_json)
        })?;
        self.with_image(image, opts.read_only(), |cx, top| {
            let (graph, out) = (&mut *cx.graph, &mut *cx.out);
            let size = graph.size(top)?;
            if as_json {
                out.write_str("[")?;
            } else {
                writeln!(
                    out,
                    "{:<20}{:<20}{:<7}{:<9}{:<7}Data",
                    "Offset", "Length", "Depth", "Present", "Zero"
                )?;
            }
            let mut offset = 0;
            let mut pending: Option<(u64, u64, BlockStatus)> = None;
            let mut first = true;
            while offset < size {
                let (status, run) = graph.block_status(top, offset, size - offset)?;
                pending = match pending {
                    Some((start, len, prev)) if prev == status => Some((start, len + run, prev)),
                    Some(done) => {
                        emit(out, done, as_json, first)?;
                        first = false;
                        Some((offset, run, status))
                    }
                    None => Some((offset, run, status)),
                };
                offset += run;
            }
            if let Some(done) = pending {
                emit(out, done, as_json, first)?;
            }
            if as_json {
                out.write_str("]\n")?;
            }
            Ok(())
        })
    }
}

fn emit(
    out: &mut dyn fmt::Write,
    (start, length, s): (u64, u64, BlockStatus),
    as_json: bool,
    first: bool,
) -> fmt::Result {
    if as_json {
        write!(
            out,
            "{}{{ \"start\": {start}, \"length\": {length}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}}}",
            if first { "" } else { ",\n" },
            s.depth,
            s.present,
            s.zero,
            s.data,
            s.compressed
        )
    } else {
        writeln!(
            out,
            "{:<#20x}{:<#20x}{:<7}{:<9}{:<7}{}",
            start, length, s.depth, s.present, s.zero, s.data
        )
    }
}
