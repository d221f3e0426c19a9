//! `bench [-f FMT] [-U] [-c COUNT] [-d 1] [-s SIZE] [-o OFFSET] [-S STEP] [-w] [--pattern N] IMAGE`:
//! `qemu-img bench` at queue depth 1, through a BlockBackend; and `sizes`,
//! the static memory of the configuration the interpreter runs with.
//!
//! As `qemu-img bench`: COUNT requests (default 75000) of SIZE bytes
//! (default 4 KiB), the first at OFFSET (default 0), each next one STEP
//! bytes further (default and `-S 0`: SIZE), wrapping as qemu-img 10.0 (the
//! oracle of the tests) does: the next offset is `(offset + STEP) % image
//! size`, and a request that then reaches past the end fails the run, as it
//! does in qemu-img (QEMU 10.1 wraps modulo `image size - SIZE` instead).
//! Reads by default, with `-w` writes of pattern byte N (default 0, as
//! qemu-img; without `-w` the pattern is ignored, as there). The image is
//! opened read-only for reads and read-write for writes; writes are flushed
//! after the timed loop (qemu-img flushes when it closes the image, also
//! untimed). Output as qemu-img's:
//!
//! ```text
//! Sending 20000 read requests, 4096 bytes each, 1 in parallel (starting at offset 0, step size 4096)
//! Run completed in 0.512 seconds.
//! ```
//!
//! The request buffer is the interpreter's scratch memory, so SIZE must fit
//! in it. Where the environment has no clock the command fails
//! ("unsupported: no clock"). An image attached in the session is measured
//! through its own BlockBackend.

use core::mem::size_of;

use super::args::{parse_pattern, parse_size};
use super::{invalid, Ctx, Environment, Failure, ImageOpts, Outcome, Session};
use crate::backend::BackendId;
use crate::error::{Error, ErrorKind};
use crate::graph::{Access, Graph, OpenOptions};

const USAGE: &str =
    "usage: bench [-f FMT] [-U] [-c COUNT] [-d 1] [-s SIZE] [-o OFFSET] [-S STEP] [-w] [--pattern N] IMAGE";
const SIZES_USAGE: &str = "usage: sizes";

/// qemu-img's default request count.
const DEFAULT_COUNT: u64 = 75_000;
/// qemu-img's default request size.
const DEFAULT_SIZE: u64 = 4096;
/// qemu-img's limit for counts, sizes and steps (a C `int`).
const INT_MAX: u64 = i32::MAX as u64;
/// The memory the default configuration should fit in: graph, session and
/// scratch together.
const MEMORY_BUDGET: usize = 2 << 20;

/// A parsed `bench` command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan<'a> {
    count: u64,
    len: u64,
    offset: u64,
    /// 0: the request size.
    step: u64,
    write: bool,
    pattern: u8,
    image: &'a str,
    /// `-f FMT`, `-U`.
    opts: ImageOpts,
}

fn parse<'a>(words: &[&'a str]) -> Result<Plan<'a>, Failure<'a>> {
    let mut plan = Plan {
        count: DEFAULT_COUNT,
        len: DEFAULT_SIZE,
        offset: 0,
        step: 0,
        write: false,
        pattern: 0,
        image: "",
        opts: ImageOpts::default(),
    };
    let mut image = None;
    let mut words = words.iter().copied();
    while let Some(word) = words.next() {
        if let Some(taken) = plan.opts.take(word, &mut words) {
            taken?;
            continue;
        }
        let mut value = || words.next().ok_or_else(|| invalid(USAGE));
        let size = |text: &'a str| parse_size(text).map_err(|e| Failure::new(e, text));
        match word {
            "-c" => plan.count = size(value()?)?,
            "-s" => plan.len = size(value()?)?,
            "-o" => plan.offset = size(value()?)?,
            "-S" => plan.step = size(value()?)?,
            "-d" => {
                let text = value()?;
                if size(text)? != 1 {
                    return Err(Failure::new(
                        Error::new(
                            ErrorKind::Unsupported,
                            "unsupported queue depth (only 1: requests run one at a time)",
                        ),
                        text,
                    ));
                }
            }
            "-w" => plan.write = true,
            "--pattern" => {
                let text = value()?;
                plan.pattern = parse_pattern(text).map_err(|e| Failure::new(e, text))?;
            }
            _ if word.starts_with('-') || image.is_some() => return Err(invalid(USAGE)),
            _ => image = Some(word),
        }
    }
    plan.image = image.ok_or_else(|| invalid(USAGE))?;
    if !(1..=INT_MAX).contains(&plan.count) {
        return Err(invalid("request count must be between 1 and 2147483647"));
    }
    if !(1..=INT_MAX).contains(&plan.len) {
        return Err(invalid("request size must be between 1 and 2147483647"));
    }
    if plan.step > INT_MAX {
        return Err(invalid("step size must be between 0 and 2147483647"));
    }
    if plan.step == 0 {
        plan.step = plan.len;
    }
    Ok(plan)
}

/// The offset after `offset`, wrapped as `qemu-img bench` 10.0 wraps it.
fn next_offset(offset: u64, step: u64, image_size: u64) -> u64 {
    match image_size {
        0 => 0,
        _ => offset.saturating_add(step) % image_size,
    }
}

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `bench`.
    pub(crate) fn bench<'a, const S: usize>(
        &mut self,
        session: &Session<S>,
        words: &[&'a str],
    ) -> Outcome<'a> {
        let plan = parse(words)?;
        if self.env.now_micros().is_none() {
            return Err(Failure::new(
                Error::new(ErrorKind::Unsupported, "unsupported: no clock"),
                "bench",
            ));
        }
        if plan.len as usize > self.scratch.len() {
            return Err(invalid("request size is larger than the scratch memory"));
        }
        if let Some(backend) = session.backend(plan.image) {
            return self.measure(backend, &plan);
        }
        let options = OpenOptions {
            read_only: !plan.write,
            ..plan.opts.read_only()
        };
        self.with_image(plan.image, options, |cx, top| {
            let access = if plan.write {
                Access::READ_WRITE_DEVICE
            } else {
                Access::READ_ONLY_DEVICE
            };
            let backend = cx
                .graph
                .attach_backend(top, access)
                .map_err(|e| Failure::new(e, plan.image))?;
            let result = cx.measure(backend, &plan);
            let detached = cx.graph.detach_backend(backend);
            result.and(detached.map_err(Into::into))
        })
    }

    /// Runs the plan's requests on `backend` one at a time, with the first
    /// `plan.len` bytes of the scratch memory as the buffer, and reports the
    /// time.
    fn measure<'a>(&mut self, backend: BackendId, plan: &Plan<'a>) -> Outcome<'a> {
        let (env, graph, out) = (&mut *self.env, &mut *self.graph, &mut *self.out);
        let buffer = &mut self.scratch[..plan.len as usize];
        let image_size = graph.size(graph.root(backend)?)?;
        let past_end = Failure::new(
            Error::new(
                ErrorKind::InvalidInput,
                "request reaches past the end of the image",
            ),
            plan.image,
        );
        writeln!(
            out,
            "Sending {} {} requests, {} bytes each, 1 in parallel (starting at offset {}, step size {})",
            plan.count,
            if plan.write { "write" } else { "read" },
            plan.len,
            plan.offset,
            plan.step
        )?;
        buffer.fill(plan.pattern);
        let no_clock = || Error::new(ErrorKind::Unsupported, "unsupported: no clock");
        let started = env.now_micros().ok_or_else(no_clock)?;
        let mut offset = plan.offset;
        for _ in 0..plan.count {
            if offset.saturating_add(plan.len) > image_size {
                return Err(past_end);
            }
            let done = if plan.write {
                graph.backend_write(backend, offset, buffer)
            } else {
                graph.backend_read(backend, offset, buffer)
            };
            done.map_err(|e| Failure::new(e, plan.image))?;
            offset = next_offset(offset, plan.step, image_size);
        }
        let ended = env.now_micros().ok_or_else(no_clock)?;
        if plan.write {
            graph
                .backend_flush(backend)
                .map_err(|e| Failure::new(e, plan.image))?;
        }
        let millis = (ended.saturating_sub(started) + 500) / 1000;
        writeln!(
            out,
            "Run completed in {}.{:03} seconds.",
            millis / 1000,
            millis % 1000
        )?;
        Ok(())
    }

    /// `sizes`: the bytes the interpreter's working set takes (the graph as
    /// instantiated, what one more slot of each kind costs, the session and the
    /// scratch memory) against [`MEMORY_BUDGET`], for a session of `S` slots.
    pub(crate) fn sizes<'a, const S: usize>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        if !words.is_empty() {
            return Err(invalid(SIZES_USAGE));
        }
        let graph = size_of::<Graph<E::Device, N, B, C, J>>();
        // The cost of one slot: a graph with two of them minus a graph with one.
        let one = size_of::<Graph<E::Device, 1, 1, 1, 1>>();
        let node = size_of::<Graph<E::Device, 2, 1, 1, 1>>() - one;
        let backend = size_of::<Graph<E::Device, 1, 2, 1, 1>>() - one;
        let cache = size_of::<Graph<E::Device, 1, 1, 2, 1>>() - one;
        let job = size_of::<Graph<E::Device, 1, 1, 1, 2>>() - one;
        let session = size_of::<Session<S>>();
        let total = graph + session + self.scratch.len();
        writeln!(
            self.out,
            "graph: {graph} bytes ({N} nodes, {B} backends, {C} cache slots, {J} jobs)"
        )?;
        writeln!(self.out, "  node slot: {node} bytes (with its device)")?;
        writeln!(self.out, "  backend slot: {backend} bytes")?;
        writeln!(self.out, "  cache slot: {cache} bytes")?;
        writeln!(self.out, "  job slot: {job} bytes")?;
        writeln!(self.out, "session: {session} bytes ({S} slots)")?;
        writeln!(self.out, "scratch: {} bytes", self.scratch.len())?;
        writeln!(
            self.out,
            "total: {total} bytes of a {MEMORY_BUDGET}-byte budget: {}",
            if total <= MEMORY_BUDGET {
                "met"
            } else {
                "exceeded"
            }
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_qemu_img_s() {
        let plan = parse(&["a.qcow2"]).unwrap();
        assert_eq!(
            plan,
            Plan {
                count: 75_000,
                len: 4096,
                offset: 0,
                step: 4096,
                write: false,
                pattern: 0,
                image: "a.qcow2",
                opts: ImageOpts::default(),
            }
        );
        let plan = parse(&[
            "-w",
            "--pattern",
            "0xa5",
            "-c",
            "3",
            "-s",
            "64k",
            "-S",
            "0",
            "x",
        ])
        .unwrap();
        assert_eq!((plan.write, plan.pattern, plan.count), (true, 0xa5, 3));
        assert_eq!((plan.len, plan.step), (65536, 65536));
        assert_eq!(parse(&["-d", "1", "-S", "1M", "x"]).unwrap().step, 1 << 20);
    }

    #[test]
    fn bad_arguments_are_refused() {
        for words in [
            &[][..],
            &["a", "b"],
            &["-c", "0", "a"],
            &["-s", "0", "a"],
            &["-c"],
            &["-d", "4", "a"],
            &["--pattern", "256", "a"],
            &["-S", "4G", "a"],
            &["-x", "a"],
        ] {
            assert!(parse(words).is_err(), "{words:?}");
        }
    }

    #[test]
    fn offsets_wrap_like_qemu_img() {
        // 1 MiB image, 4 KiB requests from 1 MiB - 8 KiB: qemu-img 10.0
        // writes 1M-8k, 1M-4k, 0.
        let size = 1 << 20;
        let mut offset = size - 8192;
        let mut seen = [0; 3];
        for slot in &mut seen {
            *slot = offset;
            offset = next_offset(offset, 4096, size);
        }
        assert_eq!(seen, [size - 8192, size - 4096, 0]);
        // 64 KiB at step 300 KiB: 900k, then 176k.
        assert_eq!(next_offset(900 << 10, 300 << 10, size), 176 << 10);
        assert_eq!(next_offset(0, 8, 0), 0);
    }
}
