//! `io [-f FMT] [-r] [-U] IMAGE -c CMD [-c CMD]...`: qemu-io-like guest I/O through a
//! BlockBackend.
//!
//! `read [-P PATTERN] OFF LEN` (with `-P` every byte is verified),
//! `write [-P PATTERN] [-z] OFF LEN`, `discard OFF LEN`, `flush`.

use super::args::{parse_pattern, parse_size, split_words};
use super::{invalid, Ctx, Environment, Failure, ImageOpts, Outcome, Session};
use crate::backend::BackendId;
use crate::error::{Error, ErrorKind};
use crate::graph::{Access, OpenOptions};

const USAGE: &str = "usage: io [-f FMT] [-r] [-U] IMAGE -c CMD [-c CMD]...";
/// qemu-io's default write pattern.
const DEFAULT_PATTERN: u8 = 0xcd;

/// Options and operands of one qemu-io command.
struct Request {
    pattern: Option<u8>,
    zero: bool,
    offset: u64,
    len: u64,
}

fn parse_request<'a>(words: &[&'a str], allow_zero: bool) -> Result<Request, Failure<'a>> {
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
            return commands
                .iter()
                .try_for_each(|command| self.execute(backend, command));
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
            let mut result = Ok(());
            for command in &commands {
                result = cx.execute(backend, command);
                if result.is_err() {
                    break;
                }
            }
            cx.graph.detach_backend(backend)?;
            result
        })
    }

    /// Runs one qemu-io command on `backend`.
    fn execute<'a>(&mut self, backend: BackendId, command: &'a str) -> Outcome<'a> {
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
                    let n = (r.len - done).min(scratch.len() as u64) as usize;
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
                        .write_zeroes(root, r.offset, r.len)
                        .map_err(in_command)?;
                } else {
                    // The whole request is checked before its first piece.
                    graph
                        .backend_check_write(backend, r.offset, r.len)
                        .map_err(in_command)?;
                    let pattern = r.pattern.unwrap_or(DEFAULT_PATTERN);
                    let chunk = (r.len.min(scratch.len() as u64)) as usize;
                    scratch[..chunk].fill(pattern);
                    let mut done = 0;
                    while done < r.len {
                        let n = (r.len - done).min(chunk as u64) as usize;
                        graph
                            .backend_write(backend, r.offset + done, &scratch[..n])
                            .map_err(in_command)?;
                        done += n as u64;
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
                graph.discard(root, r.offset, r.len).map_err(in_command)?;
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
