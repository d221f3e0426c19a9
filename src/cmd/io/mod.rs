//! `io [-f FMT] [-r] [-U] [-d DEPTH] IMAGE -c CMD [-c CMD]...`: qemu-io-like
//! guest I/O through a BlockBackend.
//!
//! `read [-P PATTERN] OFF LEN` (with `-P` every byte is verified),
//! `write [-P PATTERN] [-z] OFF LEN`, `discard OFF LEN`, `flush`.
//!
//! A pattern write goes down as one scatter-gather request
//! ([`Graph::writev`](crate::Graph::writev)): the pattern-filled scratch,
//! repeated as segments, so the library cuts it only at cluster boundaries
//! and writes no byte twice. A write needing more than
//! [`MAX_SEGMENTS`] scratch buffers is split into requests at boundaries
//! aligned to the image's cluster size (at least 4 KiB), after the whole
//! range is checked. Reads go through the scratch in pieces whose
//! boundaries lie on multiples of the largest power of two that fits in it.
//!
//! With `-d DEPTH` (2 to 64) writes, zero writes, discards and flushes go
//! through a request engine (module [`queued`]), up to DEPTH in flight: a
//! command waits for those in flight that it overlaps, so the result is
//! the one of running the commands in order, as qemu-io does; a read first
//! waits for everything in flight.

mod queued;

use super::args::{parse_pattern, parse_size, split_words};
use super::{invalid, Ctx, Environment, Failure, ImageOpts, Outcome, Session};
use crate::backend::BackendId;
use crate::error::{Error, ErrorKind};
use crate::graph::{piece_len, Access, OpenOptions, MAX_SEGMENTS};

const USAGE: &str = "usage: io [-f FMT] [-r] [-U] [-d DEPTH] IMAGE -c CMD [-c CMD]...";
/// qemu-io's default write pattern.
const DEFAULT_PATTERN: u8 = 0xcd;

/// Scratch memory a write keeps for the copy-on-write of a partly written
/// new cluster (a 64 KiB cluster is assembled whole in it).
const COW_SCRATCH: usize = 64 * 1024;
/// Least alignment, in guest offsets, of the boundaries a write too long
/// for one request is split at.
const MIN_ALIGN: u64 = 4096;

/// The segments of the first request of a pattern write of `len` bytes at
/// guest `offset`, all views of `pattern` (a filled buffer): cut as
/// [`piece_len`] cuts, so segment boundaries lie on multiples of the
/// largest power of two that fits in `pattern`. When the write needs more
/// than `CAP` segments ([`MAX_SEGMENTS`] for the synchronous path) the
/// request ends at the last segment boundary aligned to `align` (the
/// image's cluster size), or failing that to [`MIN_ALIGN`], where there is
/// one.
fn request_segments<const CAP: usize>(
    pattern: &[u8],
    offset: u64,
    len: u64,
    align: u64,
) -> heapless::Vec<&[u8], CAP> {
    let mut segments = heapless::Vec::<&[u8], CAP>::new();
    let mut n = 0;
    while n < len && !segments.is_full() {
        let k = piece_len(offset + n, len - n, pattern.len() as u64);
        // Cannot fail: the loop stops when the list is full.
        let _ = segments.push(&pattern[..k as usize]);
        n += k;
    }
    if n < len {
        for align in [align, MIN_ALIGN] {
            // The longest prefix of the segments that ends aligned.
            let mut end = n;
            let mut keep = segments.len();
            while keep > 0 && !(offset + end).is_multiple_of(align) {
                keep -= 1;
                end -= segments[keep].len() as u64;
            }
            if keep > 0 {
                segments.truncate(keep);
                break;
            }
        }
    }
    segments
}

/// Options and operands of one qemu-io command.
pub(super) struct Request {
    pattern: Option<u8>,
    zero: bool,
    offset: u64,
    len: u64,
}

pub(super) fn parse_request<'a>(
    words: &[&'a str],
    allow_zero: bool,
) -> Result<Request, Failure<'a>> {
    let mut request = Request {
        pattern: None,
        zero: false,
        offset: 0,
        len: 0,
    };
    let mut operands = heapless::Vec::<u64, 2>::new();
    let mut words = words.iter().copied();
    while let Some(word) = words.next() {
        match word {
            "-P" => {
                let value = words.next().ok_or_else(|| invalid("-P needs a pattern"))?;
                request.pattern = Some(parse_pattern(value).map_err(|e| Failure::new(e, value))?);
            }
            "-z" if allow_zero => request.zero = true,
            "-q" => {}
            _ if word.starts_with('-') => {
                return Err(Failure::new(
                    Error::new(ErrorKind::InvalidInput, "unknown option"),
                    word,
                ))
            }
            _ => {
                let value = parse_size(word).map_err(|e| Failure::new(e, word))?;
                operands
                    .push(value)
                    .map_err(|_| invalid("too many operands"))?;
            }
        }
    }
    let [offset, len] = operands.as_slice() else {
        return Err(invalid("expected OFFSET and LENGTH"));
    };
    (request.offset, request.len) = (*offset, *len);
    Ok(request)
}

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `io`.
    pub(crate) fn io<'a, const S: usize>(
        &mut self,
        session: &Session<S>,
        words: &[&'a str],
    ) -> Outcome<'a> {
        let mut read_only = false;
        let mut depth = 1;
        let mut opts = ImageOpts::default();
        let mut image = None;
        let mut commands = heapless::Vec::<&'a str, 512>::new();
        let mut words = words.iter().copied();
        while let Some(word) = words.next() {
            if let Some(taken) = opts.take(word, &mut words) {
                taken?;
                continue;
            }
            match word {
                "-r" => read_only = true,
                "-d" => {
                    let text = words.next().ok_or_else(|| invalid(USAGE))?;
                    depth = parse_size(text)
                        .ok()
                        .filter(|d| (1..=queued::MAX_DEPTH as u64).contains(d))
                        .ok_or_else(|| invalid("queue depth must be between 1 and 64"))?
                        as usize;
                }
                "-c" => {
                    let command = words.next().ok_or_else(|| invalid(USAGE))?;
                    commands
                        .push(command)
                        .map_err(|_| invalid("too many -c commands"))?;
                }
                _ if word.starts_with('-') || image.is_some() => return Err(invalid(USAGE)),
                _ => image = Some(word),
            }
        }
        let image = image.ok_or_else(|| invalid(USAGE))?;
        if let Some(backend) = session.backend(image) {
            // Attached in the session: the guest's device.
            return self.run_commands(backend, &commands, depth);
        }
        let options = OpenOptions {
            read_only,
            ..opts.read_only()
        };
        self.with_image(image, options, |cx, top| {
            let access = if read_only {
                Access::READ_ONLY_DEVICE
            } else {
                Access::READ_WRITE_DEVICE
            };
            let backend = cx.graph.attach_backend(top, access)?;
            let result = cx.run_commands(backend, &commands, depth);
            cx.graph.detach_backend(backend)?;
            result
        })
    }

    /// Runs `commands` in order on `backend`: one at a time, or up to
    /// `depth` in flight.
    fn run_commands<'a>(
        &mut self,
        backend: BackendId,
        commands: &[&'a str],
        depth: usize,
    ) -> Outcome<'a> {
        if depth > 1 {
            return self.run_queued(backend, commands, depth);
        }
        commands
            .iter()
            .try_for_each(|command| self.execute(backend, command))
    }

    /// Runs one qemu-io command on `backend`.
    pub(super) fn execute<'a>(&mut self, backend: BackendId, command: &'a str) -> Outcome<'a> {
        let (graph, scratch, out) = (&mut *self.graph, &mut *self.scratch, &mut *self.out);
        let words = split_words(command).map_err(|e| Failure::new(e, command))?;
        let Some((&verb, rest)) = words.split_first() else {
            return Err(invalid("empty io command"));
        };
        let root = graph.root(backend)?;
        let in_command = |err: Error| Failure::new(err, command);
        match verb {
            "read" => {
                let r = parse_request(rest, false)?;
                let mut done = 0;
                while done < r.len {
                    let n = piece_len(r.offset + done, r.len - done, scratch.len() as u64);
                    let n = n as usize;
                    graph
                        .backend_read(backend, r.offset + done, &mut scratch[..n])
                        .map_err(in_command)?;
                    if let Some(pattern) = r.pattern {
                        if let Some(bad) = scratch[..n].iter().position(|&b| b != pattern) {
                            writeln!(
                                out,
                                "Pattern verification failed at offset {}, {} bytes",
                                r.offset + done + bad as u64,
                                r.len
                            )?;
                            return Err(in_command(Error::new(
                                ErrorKind::Mismatch,
                                "pattern verification failed",
                            )));
                        }
                    }
                    done += n as u64;
                }
                writeln!(out, "read {}/{} bytes at offset {}", r.len, r.len, r.offset)?;
            }
            "write" => {
                let r = parse_request(rest, true)?;
                if r.zero {
                    if r.pattern.is_some() {
                        return Err(invalid("write -z takes no pattern"));
                    }
                    graph
                        .backend_write_zeroes(backend, r.offset, r.len)
                        .map_err(in_command)?;
                } else {
                    let pattern = r.pattern.unwrap_or(DEFAULT_PATTERN);
                    // The end of the scratch memory is the copy-on-write
                    // buffer of partly written new clusters.
                    let cow_len = (scratch.len() / 2).min(COW_SCRATCH);
                    let (data, cow) = scratch.split_at_mut(scratch.len() - cow_len);
                    let filled = (r.len.min(data.len() as u64)) as usize;
                    data[..filled].fill(pattern);
                    let align = graph.cluster_size(root).unwrap_or(1).max(MIN_ALIGN);
                    let mut done = 0;
                    while done < r.len {
                        let segments = request_segments::<MAX_SEGMENTS>(
                            &data[..filled],
                            r.offset + done,
                            r.len - done,
                            align,
                        );
                        let n: u64 = segments.iter().map(|s| s.len() as u64).sum();
                        if done == 0 && n < r.len {
                            // Several requests: the whole is checked first.
                            graph
                                .backend_check_write(backend, r.offset, r.len)
                                .map_err(in_command)?;
                        }
                        graph
                            .backend_writev_with_scratch(backend, r.offset + done, &segments, cow)
                            .map_err(in_command)?;
                        done += n;
                    }
                }
                writeln!(
                    out,
                    "wrote {}/{} bytes at offset {}",
                    r.len, r.len, r.offset
                )?;
            }
            "discard" => {
                let r = parse_request(rest, false)?;
                graph
                    .backend_discard(backend, r.offset, r.len)
                    .map_err(in_command)?;
                writeln!(
                    out,
                    "discard {}/{} bytes at offset {}",
                    r.len, r.len, r.offset
                )?;
            }
            "flush" => graph.backend_flush(backend).map_err(in_command)?,
            _ => {
                return Err(Failure::new(
                    Error::new(ErrorKind::InvalidInput, "unknown io command"),
                    verb,
                ))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(pattern: &[u8], offset: u64, len: u64, align: u64) -> Vec<u64> {
        let mut at = offset;
        let mut ends = Vec::new();
        while at < offset + len {
            let segments = request_segments::<MAX_SEGMENTS>(pattern, at, offset + len - at, align);
            at += segments.iter().map(|s| s.len() as u64).sum::<u64>();
            ends.push(at);
        }
        ends
    }

    #[test]
    fn one_request_when_the_segments_suffice() {
        let pattern = [0x55u8; 1 << 20];
        let segments = request_segments::<MAX_SEGMENTS>(&pattern, 12345, 6 << 20, 1 << 16);
        let lens: Vec<usize> = segments.iter().map(|s| s.len()).collect();
        let first = (1 << 20) - 12345;
        assert_eq!(
            lens,
            [first, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 12345]
        );
    }

    #[test]
    fn long_writes_split_at_cluster_boundaries() {
        let pattern = [0x55u8; 4096];
        let (offset, len) = (12345, 6 << 20);
        let ends = ends(&pattern, offset, len, 64 << 10);
        assert!(ends.len() > 1);
        for end in &ends[..ends.len() - 1] {
            assert_eq!(end % (64 << 10), 0, "{ends:?}");
        }
        assert_eq!(ends.last(), Some(&(offset + len)));
        // A cluster larger than a request: 4 KiB boundaries.
        let ends = self::ends(&pattern, offset, len, 2 << 20);
        for end in &ends[..ends.len() - 1] {
            assert_eq!(end % 4096, 0, "{ends:?}");
        }
    }
}
