//! `blockgraph`: the host command-line tool (qemu-img / qemu-io shaped).
//!
//! Every command runs through the library's interpreter ([`blockgraph::cmd`]);
//! this binary only supplies host files. Errors print one line on stderr and
//! exit with status 1.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use blockgraph::cmd::{self, Environment};
use blockgraph::device::FileDevice;
use blockgraph::host::PathResolver;
use blockgraph::{Graph, Result};

/// Data moved per step by convert and io.
const SCRATCH_BYTES: usize = 1 << 20;

const USAGE: &str = "\
usage: blockgraph [--max-file-size SIZE] COMMAND [ARGS]
  --max-file-size SIZE: image files opened for writing may not grow past SIZE
  (like a fixed-size disk: a write needing more space fails with no space)
  info [--backing-chain] [--output=json|human] IMAGE
  map [--output=json|human] IMAGE
  convert [-O raw] IMAGE OUTPUT
  io [-r] IMAGE -c CMD [-c CMD]...     CMD: read [-P PAT] OFF LEN | write [-P PAT] [-z] OFF LEN
                                            | discard OFF LEN | flush
  collapse --top TOP [--base BASE] IMAGE
  create [-q] [-f qcow2|raw] [-o OPTS] [-b BACKING -F FMT] IMAGE [SIZE]
                                       OPTS: cluster_size=N,refcount_bits=N,compat=0.10|1.1,
                                             lazy_refcounts=on|off";

struct Host {
    resolver: PathResolver,
}

impl Environment for Host {
    type Device = FileDevice;
    type Resolver = PathResolver;

    fn resolver(&mut self) -> &mut PathResolver {
        &mut self.resolver
    }

    fn create(&mut self, name: &str, size: u64) -> Result<FileDevice> {
        let mut device = FileDevice::create(Path::new(name))?;
        device.set_len(size)?;
        Ok(device)
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
    let mut env = Host { resolver };
    // The graph is large (fixed caches): keep it off the stack.
    let mut graph: Box<Graph<FileDevice>> = Box::default();
    let mut scratch = vec![0u8; SCRATCH_BYTES];
    let mut out = Stdout(std::io::stdout().lock());
    match cmd::run(&mut env, &mut graph, &words, &mut scratch, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let _ = out.0.flush();
            eprintln!("blockgraph: {failure}");
            ExitCode::FAILURE
        }
    }
}
