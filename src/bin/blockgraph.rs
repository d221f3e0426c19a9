//! `blockgraph`: the host command-line tool (qemu-img / qemu-io shaped).
//!
//! Every command runs through the library's interpreter ([`blockgraph::cmd`]);
//! this binary only supplies host files. Errors print one line on stderr and
//! exit with status 1.

use std::collections::HashMap;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;

use blockgraph::cmd::{self, Environment};
use blockgraph::device::{DeviceId, FileDevice, DIRECT_ALIGN};
use blockgraph::host::PathResolver;
use blockgraph::{Device, Format, Graph, Result};

/// Data moved per step by convert and io.
const SCRATCH_BYTES: usize = 1 << 20;
/// Most threads `convert` copies with.
const MAX_WORKERS: usize = 4;
/// Smallest image `convert` copies with several threads.
const PARALLEL_FROM: u64 = 64 << 20;

const USAGE: &str = "\
usage: blockgraph [--max-file-size SIZE] COMMAND [ARGS]
  --max-file-size SIZE: image files opened for writing or created may not grow
  past SIZE (like a fixed-size disk: a write needing more space fails with no space)
  Every command that opens an image takes -f qcow2|raw (its format; without it
  the format is probed, and a raw disk's first sector may not be made to look
  like another format) and, where it only reads, -U (--force-share: read an
  image another process is writing).
  info [-f FMT] [-U] [--backing-chain] [--output=json|human] IMAGE
  map [-f FMT] [-U] [--output=json|human] IMAGE
  convert [-f FMT] [-U] [-O raw|qcow2] [-o OPTIONS] [-B BACKING -F FMT]
          [-c] [-S SPARSE] [-t writeback|unsafe] IMAGE OUTPUT
                                       -c: compressed qcow2 clusters (zlib, or zstd by -o);
                                       zero runs of SPARSE bytes (default 4k) left unwritten,
                                       -S 0 allocates every byte;
                                       raw: copies with up to 4 threads (64 MiB and more);
                                       qcow2: -o as create's, -B: a delta over BACKING;
                                       the output is flushed with -t writeback (default unsafe)
  io [-f FMT] [-r] [-U] [-d DEPTH] IMAGE -c CMD [-c CMD]...
                                       CMD: read [-P PAT] OFF LEN | write [-P PAT] [-z] OFF LEN
                                            | discard OFF LEN | flush
                                       -d: up to DEPTH requests in flight (engine)
  collapse [-f FMT] --top TOP [--base BASE] IMAGE
  commit [-f FMT] [--top TOP] [--base BASE] [-p] IMAGE
  stream [-f FMT] [--base BASE] [-p] IMAGE
  snapshot [-f FMT] IMAGE NEW_OVERLAY
  snapshot -l [-f FMT] [-U] IMAGE       internal snapshots, as qemu-img snapshot -l (UTC dates)
  snapshot -c NAME [-f FMT] IMAGE      creates an internal snapshot, as qemu-img snapshot -c
  snapshot -d ID_OR_NAME [-f FMT] IMAGE
                                       deletes an internal snapshot, as qemu-img snapshot -d
  snapshot -a ID_OR_NAME [-f FMT] IMAGE
                                       reverts to an internal snapshot, as qemu-img snapshot -a
  checksum [-f FMT] [-U] [-d DEPTH] IMAGE
  script 'CMD; CMD; ...'               one session: also job-start commit|stream ARGS IMAGE,
                                       job-step IMAGE [N], job-pause|job-resume|job-complete|
                                       job-cancel|job-info|job-wait IMAGE,
                                       image-format NAME FMT (the format of NAME from then on)
  create [-q] [-f qcow2|raw] [-o OPTS] [-b BACKING -F FMT] IMAGE [SIZE]
                                       OPTS: cluster_size=N,refcount_bits=N,compat=0.10|1.1,
                                             lazy_refcounts=on|off,compression_type=zlib|zstd
  bench [-f FMT] [-U] [-c COUNT] [-d DEPTH] [-s SIZE] [-o OFFSET] [-S STEP] [-t none|writeback]
        [-w] [--pattern N] [--with-job] IMAGE
                                       qemu-img bench, DEPTH (1-64) in flight (defaults: 75000
                                       requests of 4k from offset 0, step SIZE, reads;
                                       -w writes pattern N, default 0; -t none: O_DIRECT;
                                       --with-job: a script's job on IMAGE steps between them)
  sizes                                static memory: graph, slots, session, scratch
  serve [-f FMT] [-t none|writeback] IMAGE [--vhost-user-blk SOCKET [--num-queues N]] [--nbd SOCKET]
        [--qmp SOCKET] [--read-only]
                                       exports IMAGE's chain (opened writable unless --read-only)
                                       to a vhost-user-blk frontend (QEMU) and/or NBD clients
                                       until SIGTERM/SIGINT, `quit` on the QMP socket, or the
                                       frontend disconnecting (without --qmp/--nbd)";

struct Host {
    resolver: PathResolver,
    started: std::time::Instant,
    /// Formats recorded by a script's `image-format`.
    formats: HashMap<String, Format>,
    /// Files `create` made (they did not exist before), by name, with the
    /// identity they had: only those may be removed again.
    created: Vec<(String, DeviceId)>,
}

impl Environment for Host {
    type Device = FileDevice;
    type Resolver = PathResolver;

    fn resolver(&mut self) -> &mut PathResolver {
        &mut self.resolver
    }

    fn create(&mut self, name: &str, size: u64) -> Result<FileDevice> {
        let mut device = FileDevice::create(Path::new(name))?;
        if device.created() {
            self.created.push((name.to_owned(), device.identity()));
        }
        if let Some(max) = self.resolver.max_file_size {
            device.limit_size(max);
        }
        if let Err(err) = device.set_len(size) {
            self.remove(name);
            return Err(err);
        }
        Ok(device)
    }

    fn warn(&mut self, message: fmt::Arguments<'_>) {
        eprintln!("{message}");
    }

    fn pinned_format(&mut self, name: &str) -> Option<Format> {
        self.formats.get(name).copied()
    }

    fn pin_format(&mut self, name: &str, format: Format) -> Result<()> {
        self.formats.insert(name.to_owned(), format);
        Ok(())
    }

    fn remove(&mut self, name: &str) {
        let Some(index) = self.created.iter().position(|(n, _)| n == name) else {
            return;
        };
        let (_, identity) = self.created.swap_remove(index);
        // Only while the name still is the file made (not a symbolic link,
        // not a file put there since).
        let made = std::fs::symlink_metadata(name)
            .is_ok_and(|m| m.is_file() && DeviceId(m.dev(), m.ino()) == identity);
        if made {
            // Best effort: the command's own failure is what gets reported.
            let _ = std::fs::remove_file(name);
        }
    }

    /// As large as the scratch memory (`bench -d` has the same limit as in
    /// the kernel), leaked for the process's life: io_uring may write into
    /// a buffer until its operation completes, so it must outlive every
    /// device. Each `bench -d` of a run leaks its own.
    fn queue_memory(&mut self, len: usize) -> Option<&'static mut [u8]> {
        if len > SCRATCH_BYTES {
            return None;
        }
        let memory = Box::leak(vec![0u8; len + DIRECT_ALIGN].into_boxed_slice());
        let skip = memory.as_ptr().align_offset(DIRECT_ALIGN);
        memory.get_mut(skip..skip + len)
    }

    fn set_direct(&mut self, direct: bool) -> Result<()> {
        self.resolver.direct = direct;
        Ok(())
    }

    fn now_micros(&mut self) -> Option<u64> {
        Some(self.started.elapsed().as_micros() as u64)
    }

    fn unix_time(&mut self) -> Option<(u32, u32)> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        Some((u32::try_from(now.as_secs()).ok()?, now.subsec_nanos()))
    }

    fn is_terminal(&self) -> bool {
        std::io::stdout().is_terminal()
    }

    // The interpreter's `Failure` type, as `cmd` accepts its size.
    #[allow(clippy::result_large_err)]
    fn copy_in_parallel<'a>(
        &mut self,
        image: (&'a str, Format),
        output: &'a str,
        size: u64,
        sparse: u64,
    ) -> Option<cmd::Outcome<'a>> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS));
        (workers > 1 && size >= PARALLEL_FROM).then(|| {
            let part = (output, size, sparse);
            blockgraph::host::copy_in_parallel(self.resolver, image, part, workers)
        })
    }
}

/// Adapts stdout to `core::fmt::Write`.
struct Stdout<'a>(std::io::StdoutLock<'a>);

impl fmt::Write for Stdout<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write_all(s.as_bytes()).map_err(|_| fmt::Error)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut words: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut resolver = PathResolver::default();
    if words.first() == Some(&"--max-file-size") {
        let limit = words.get(1).map(|w| (w, cmd::args::parse_size(w)));
        match limit {
            Some((_, Ok(max))) => resolver.max_file_size = Some(max),
            Some((word, Err(err))) => {
                eprintln!("blockgraph: {word}: {err}");
                return ExitCode::FAILURE;
            }
            None => {
                eprintln!("blockgraph: --max-file-size needs a size");
                return ExitCode::FAILURE;
            }
        }
        words.drain(..2);
    }
    if matches!(words.first(), None | Some(&"help" | &"--help" | &"-h")) {
        println!("{USAGE}");
        return if words.is_empty() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    #[cfg(target_os = "linux")]
    if words.first() == Some(&"serve") {
        let served = blockgraph::serve::Options::parse(&words[1..])
            .and_then(|options| blockgraph::serve::run(&options, resolver));
        return match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("blockgraph: serve: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let mut env = Host {
        resolver,
        started: std::time::Instant::now(),
        formats: HashMap::new(),
        created: Vec::new(),
    };
    // Aligned for `O_DIRECT` (`bench -t none`): the aligned part of a
    // slightly larger allocation (unaligned only if the platform cannot say
    // where alignment starts; transfers then take the page cache).
    let mut memory = vec![0u8; SCRATCH_BYTES + DIRECT_ALIGN];
    let skip = memory.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    let scratch = &mut memory[skip..skip + SCRATCH_BYTES];
    // The graph is large (fixed caches): keep it off the stack.
    let mut graph: Box<Graph<FileDevice>> = Box::default();
    let mut out = Stdout(std::io::stdout().lock());
    let result = match words.as_slice() {
        ["script", script] => cmd::run_script(&mut env, &mut graph, script, scratch, &mut out)
            .map(|_| ())
            .map_err(|(_, failure)| failure),
        ["script", ..] => Err(cmd::Failure::new(
            blockgraph::Error::new(
                blockgraph::ErrorKind::InvalidInput,
                "usage: script \"CMD; CMD; ...\"",
            ),
            "script",
        )),
        _ => {
            let mut session: cmd::Session = cmd::Session::new();
            let result = cmd::run(
                &mut env,
                &mut graph,
                &mut session,
                &words,
                scratch,
                &mut out,
            );
            let closed = session.close(&mut env, &mut graph, scratch);
            result.and(closed.map_err(Into::into))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let _ = out.0.flush();
            eprintln!("blockgraph: {failure}");
            ExitCode::FAILURE
        }
    }
}
