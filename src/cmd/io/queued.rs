//! `io -d DEPTH`: the commands through a request engine, up to DEPTH
//! requests in flight.
//!
//! Writes, zero writes, discards and flushes are submitted without waiting;
//! a command first waits for the requests in flight that it overlaps (and
//! for the oldest when DEPTH are in flight), so the image ends up as running
//! the commands one after the other leaves it — what qemu-io does — while
//! commands that do not overlap are in flight together. A read waits for
//! everything in flight, then runs as without `-d`. A command's line
//! (`wrote ...`, `discard ...`) is printed when its last request completes.
//!
//! The write buffers are the environment's memory for requests in flight
//! ([`Environment::queue_memory`], `'static`: devices that queue hold them
//! until they complete): one 4 KiB block per byte value, filled once, so a
//! pattern write's segments are views of its pattern's block and no buffer
//! is ever written while a device may read it. A write longer than
//! [`SEGMENTS`] blocks goes as several requests cut where the synchronous
//! path cuts them (cluster-aligned, else 4 KiB-aligned guest offsets), the
//! whole range checked first.

use super::{parse_request, request_segments, DEFAULT_PATTERN, MIN_ALIGN};
use crate::backend::BackendId;
use crate::cmd::{invalid, Ctx, Environment, Failure, Outcome};
use crate::engine::{Engine, Ticket, DEFAULT_SLOTS};
use crate::error::{Error, ErrorKind};

/// The deepest queue: the engine's slots.
pub(super) const MAX_DEPTH: usize = DEFAULT_SLOTS;
/// A pattern block.
const BLOCK: usize = 4096;
/// Segments of one write request.
const SEGMENTS: usize = 16;

/// The engine `io -d` runs its requests through.
type IoEngine = Engine<'static, MAX_DEPTH, SEGMENTS, SEGMENTS>;

/// A request in flight: its ticket, the guest range its command covers,
/// the line to print when it completes (for the command's last request).
struct InFlight<'a> {
    ticket: Ticket,
    start: u64,
    end: u64,
    command: &'a str,
    report: Option<(&'static str, u64, u64)>,
}

/// The requests in flight, oldest first.
type Flight<'a> = heapless::Vec<InFlight<'a>, MAX_DEPTH>;

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `commands` on `backend` with up to `depth` requests in flight.
    /// Returns with nothing in flight, also on an error.
    pub(super) fn run_queued<'a>(
        &mut self,
        backend: BackendId,
        commands: &[&'a str],
        depth: usize,
    ) -> Outcome<'a> {
        let memory = self.env.queue_memory(256 * BLOCK).ok_or_else(|| {
            Failure::new(
                Error::new(
                    ErrorKind::Unsupported,
                    "unsupported: no memory for requests in flight",
                ),
                "-d",
            )
        })?;
        for (value, block) in memory.chunks_exact_mut(BLOCK).enumerate() {
            block.fill(value as u8);
        }
        let blocks: &'static [u8] = memory;
        let mut engine = IoEngine::new();
        let mut flight = Flight::new();
        let mut result = Ok(());
        for command in commands {
            result =
                self.queue_command(&mut engine, &mut flight, (backend, blocks), command, depth);
            if result.is_err() {
                break;
            }
        }
        let settled = self.settle(&mut engine, &mut flight, 0, u64::MAX, usize::MAX);
        result = result.and(settled);
        // An engine is never dropped with device operations in flight.
        engine.drain(self.graph);
        while engine.complete().is_some() {}
        result
    }

    /// Submits one command (or, for a read, waits for everything and runs
    /// it), after waiting for what it overlaps.
    fn queue_command<'a>(
        &mut self,
        engine: &mut IoEngine,
        flight: &mut Flight<'a>,
        (backend, blocks): (BackendId, &'static [u8]),
        command: &'a str,
        depth: usize,
    ) -> Outcome<'a> {
        let words = super::split_words(command).map_err(|e| Failure::new(e, command))?;
        let Some((&verb, rest)) = words.split_first() else {
            return Err(invalid("empty io command"));
        };
        let in_command = |err: Error| Failure::new(err, command);
        let request = match verb {
            "write" | "discard" => Some(parse_request(rest, verb == "write")?),
            _ => None,
        };
        let (start, end) = match &request {
            Some(r) => (r.offset, r.offset.saturating_add(r.len)),
            // Reads and flushes wait for everything in flight (a flush
            // waits for every earlier request in the engine anyway).
            None => (0, u64::MAX),
        };
        self.settle(engine, flight, start, end, depth.saturating_sub(1))?;
        let track = |flight: &mut Flight<'a>, ticket, report| {
            let entry = InFlight {
                ticket,
                start,
                end,
                command,
                report,
            };
            flight
                .push(entry)
                .map_err(|_| invalid("more requests in flight than the queue depth"))
        };
        let Some(r) = request else {
            if verb != "flush" {
                return self.execute(backend, command);
            }
            let ticket = engine.submit_flush(backend).map_err(in_command)?;
            return track(flight, ticket, None);
        };
        let report = |what| Some((what, r.offset, r.len));
        if verb == "discard" || r.zero {
            if r.zero && r.pattern.is_some() {
                return Err(invalid("write -z takes no pattern"));
            }
            let (submitted, what) = match verb {
                "discard" => (engine.submit_discard(backend, r.offset, r.len), "discard"),
                _ => (
                    engine.submit_write_zeroes(backend, r.offset, r.len),
                    "wrote",
                ),
            };
            return track(flight, submitted.map_err(in_command)?, report(what));
        }
        let value = usize::from(r.pattern.unwrap_or(DEFAULT_PATTERN));
        let block = &blocks[value * BLOCK..(value + 1) * BLOCK];
        let align = self
            .graph
            .cluster_size(self.graph.root(backend)?)
            .unwrap_or(1)
            .max(MIN_ALIGN);
        let mut done = 0;
        while done < r.len {
            let segments =
                request_segments::<SEGMENTS>(block, r.offset + done, r.len - done, align);
            let n: u64 = segments.iter().map(|s| s.len() as u64).sum();
            if done == 0 && n < r.len {
                // Several requests: the whole is checked first.
                self.graph
                    .backend_check_write(backend, r.offset, r.len)
                    .map_err(in_command)?;
            }
            self.settle(engine, flight, start, start, depth.saturating_sub(1))?;
            let ticket = engine
                .submit_write(backend, r.offset + done, segments)
                .map_err(in_command)?;
            done += n;
            let last = (done == r.len).then_some(()).and(report("wrote"));
            track(flight, ticket, last)?;
        }
        Ok(())
    }

    /// Waits for the requests in flight that overlap `start..end`, and for
    /// the oldest ones while more than `room` are in flight; prints the
    /// lines of the commands they complete. The first failure is returned
    /// (every one waited for is still collected).
    fn settle<'a>(
        &mut self,
        engine: &mut IoEngine,
        flight: &mut Flight<'a>,
        start: u64,
        end: u64,
        room: usize,
    ) -> Outcome<'a> {
        let mut result = Ok(());
        let mut i = 0;
        while i < flight.len() {
            let entry = &flight[i];
            let overlaps = start < entry.end && entry.start < end;
            if !overlaps && flight.len() <= room {
                i += 1;
                continue;
            }
            let entry = flight.remove(i);
            let done = engine.wait(self.graph, entry.ticket);
            let finished = done
                .map_err(|e| Failure::new(e, entry.command))
                .and_then(|done| done.result.map_err(|e| Failure::new(e, entry.command)));
            match (finished, entry.report) {
                (Err(err), _) => result = result.and(Err(err)),
                (Ok(()), Some((what, offset, len))) => {
                    writeln!(self.out, "{what} {len}/{len} bytes at offset {offset}")?;
                }
                (Ok(()), None) => {}
            }
        }
        result
    }
}
