//! `checksum [-f FMT] [-U] [-d DEPTH] IMAGE`: FNV-1a 64 over every byte of
//! the guest view, and its size.
//!
//! Without `-d` (or with `-d 1`) the view is read piece by piece through
//! the synchronous path. With `-d DEPTH` (up to [`MAX_DEPTH`]) it is read
//! through a request engine: DEPTH requests in flight, each on its own
//! piece of the environment's memory for requests in flight (as large as
//! the scratch memory, [`Environment::queue_memory`]), hashed in guest
//! order as the oldest one completes, and the next request goes out on the
//! buffer that came back.
//! The digest is the same either way; the kernel's boot tests compare it
//! with the host's to check reads with many virtio requests in flight. An
//! image that is not attached in the session gets a read-only BlockBackend
//! of its own for the run.

use super::args::parse_size;
use super::bench::{lost_buffer, BenchEngine, MAX_DEPTH, SEGMENTS};
use super::session::Session;
use super::{image_command, invalid, Ctx, Environment, Failure, Outcome};
use crate::backend::BackendId;
use crate::device::Queue;
use crate::engine::Ticket;
use crate::error::{fail, ErrorKind, Result};
use crate::graph::{Access, Graph, NodeId};

const USAGE: &str = "usage: checksum [-f FMT] [-U] [-d DEPTH] IMAGE";
/// FNV-1a 64's offset basis and prime.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// `hash` carried over `bytes`.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `checksum`.
    pub(crate) fn checksum<'a, const S: usize>(
        &mut self,
        session: &mut Session<S>,
        words: &[&'a str],
    ) -> Outcome<'a> {
        let mut depth = 1;
        let (image, opts) = image_command(words, USAGE, |word, rest| {
            (word == "-d").then(|| {
                let text = rest.next().ok_or_else(|| invalid(USAGE))?;
                depth = parse_size(text)
                    .ok()
                    .filter(|depth| (1..=MAX_DEPTH as u64).contains(depth))
                    .ok_or_else(|| invalid("queue depth must be between 1 and 64"))?
                    as usize;
                Ok(())
            })
        })?;
        let at = |err| Failure::new(err, image);
        let digest = match session.backend(image) {
            Some(backend) if depth > 1 => self.digest_queued(backend, depth).map_err(at)?,
            Some(backend) => {
                let root = self.graph.root(backend)?;
                self.digest(root).map_err(at)?
            }
            None => self.with_image(image, opts.read_only(), |cx, node| {
                if depth == 1 {
                    return cx.digest(node).map_err(at);
                }
                let backend = cx
                    .graph
                    .attach_backend(node, Access::READ_ONLY_DEVICE)
                    .map_err(at)?;
                let digest = cx.digest_queued(backend, depth);
                let detached = cx.graph.detach_backend(backend);
                detached.and(digest).map_err(at)
            })?,
        };
        writeln!(
            self.out,
            "checksum {image}: {:016x} ({} bytes)",
            digest.0, digest.1
        )?;
        Ok(())
    }

    /// FNV-1a 64 of `node`'s guest view, and its size.
    fn digest(&mut self, node: NodeId) -> Result<(u64, u64)> {
        let size = self.graph.size(node)?;
        let mut hash = FNV_OFFSET;
        let mut offset = 0;
        while offset < size {
            let n = crate::graph::piece_len(offset, size - offset, self.scratch.len() as u64);
            let n = n as usize;
            self.graph.read(node, offset, &mut self.scratch[..n])?;
            hash = fnv1a(hash, &self.scratch[..n]);
            offset += n as u64;
        }
        Ok((hash, size))
    }

    /// FNV-1a 64 of `backend`'s guest view read with `depth` requests in
    /// flight, and its size. Returns with nothing in flight, also on an
    /// error.
    fn digest_queued(&mut self, backend: BackendId, depth: usize) -> Result<(u64, u64)> {
        let size = self.graph.backend_size(backend)?;
        let chunk = self.scratch.len() / depth;
        if chunk == 0 {
            return fail(
                ErrorKind::InvalidInput,
                "queue depth is larger than the scratch memory",
            );
        }
        let Some(memory) = self.env.queue_memory(chunk * depth) else {
            return fail(
                ErrorKind::Unsupported,
                "unsupported: no memory for requests in flight",
            );
        };
        let graph = &mut *self.graph;
        let mut engine = BenchEngine::new();
        let hash = hash_in_order(&mut engine, graph, (backend, size), memory, chunk);
        // An engine is never dropped with device operations in flight.
        engine.drain(graph);
        Ok((hash?, size))
    }
}

/// Reads the `size` bytes of `backend` in requests of `chunk` bytes, one per
/// `chunk` of `memory` in flight, and hashes them in guest order.
fn hash_in_order<'b, D, const N: usize, const B: usize, const C: usize, const J: usize>(
    engine: &mut BenchEngine<'b>,
    graph: &mut Graph<D, N, B, C, J>,
    (backend, size): (BackendId, u64),
    memory: &'b mut [u8],
    chunk: usize,
) -> Result<u64>
where
    D: Queue<'b>,
{
    let mut hash = FNV_OFFSET;
    // Requests in flight, oldest first.
    let mut tickets = heapless::Deque::<Ticket, MAX_DEPTH>::new();
    let mut offset = 0u64;
    let next_len = |offset: u64| (size - offset).min(chunk as u64) as usize;
    for buffer in memory.chunks_exact_mut(chunk) {
        let len = next_len(offset);
        if len == 0 {
            break;
        }
        let ticket = engine.submit_read(backend, offset, [&mut buffer[..len]])?;
        tickets.push_back(ticket).map_err(|_| lost_buffer())?;
        offset += len as u64;
    }
    while let Some(ticket) = tickets.pop_front() {
        let done = engine.wait(graph, ticket)?;
        done.result?;
        // The buffer goes out again, cut to the next request's length.
        let mut room = next_len(offset);
        let mut pieces = heapless::Vec::<&'b mut [u8], SEGMENTS>::new();
        for piece in done.into_buffers() {
            hash = fnv1a(hash, piece);
            let take = piece.len().min(room);
            if take > 0 {
                room -= take;
                pieces.push(&mut piece[..take]).map_err(|_| lost_buffer())?;
            }
        }
        if room > 0 {
            return Err(lost_buffer());
        }
        let len = next_len(offset);
        if len > 0 {
            let ticket = engine.submit_read(backend, offset, pieces)?;
            tickets.push_back(ticket).map_err(|_| lost_buffer())?;
            offset += len as u64;
        }
    }
    Ok(hash)
}
