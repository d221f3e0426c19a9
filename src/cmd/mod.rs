//! The command interpreter shared by the host CLI and the kernel.
//! Unstable: not part of the library's API (hidden from its docs).
//!
//! A command is a list of words shaped like `qemu-img`/`qemu-io` arguments
//! (`info --backing-chain a.qcow2`, `io a.qcow2 -c "read -P 0x55 0 64k"`).
//! [`run`] executes one on a [`Graph`], writing results to a
//! `core::fmt::Write` sink. Only the [`Environment`] differs between front
//! ends: how names become devices and where outputs are created.
//!
//! | command | does |
//! |---|---|
//! | `info [--backing-chain] [--output=json\|human] IMAGE` | header facts, qemu-img field names |
//! | `map [--output=json\|human] IMAGE` | allocation of the chain's guest view |
//! | `convert [-O raw\|qcow2] [-o OPTS] [-B BACKING -F FMT] IMAGE OUTPUT` | the guest view as a new raw or qcow2 image (a delta over BACKING) |
//! | `io [-r] IMAGE -c CMD...` | qemu-io: `read`, `write`, `discard`, `flush` |
//! | `collapse --top TOP [--base BASE] IMAGE` | metadata-only `drop_intermediate` |
//! | `commit [--top TOP] [--base BASE] [-p] IMAGE` | block-commit (active commit when TOP is IMAGE) |
//! | `stream [--base BASE] [-p] IMAGE` | block-stream into IMAGE |
//! | `snapshot IMAGE NEW_OVERLAY` | live external snapshot |
//! | `create [-f qcow2\|raw] [-o OPTS] [-b BACKING -F FMT] IMAGE [SIZE]` | a new empty image (qemu-img create) |
//! | `bench [-c COUNT] [-d DEPTH] [-s SIZE] [-o OFFSET] [-S STEP] [-t none\|writeback] [-w] [--pattern N] IMAGE` | qemu-img bench through a BlockBackend, up to DEPTH (≤ 64) requests in flight through the request engine |
//! | `sizes` | static memory: the graph, one slot of each kind, the session, the scratch |

// A `Failure` carries the name of the backing image at fault (up to 256
// bytes): failures are rare, and without a heap there is nothing to box it
// in, so the size of the `Err` variant is accepted.
#![allow(clippy::result_large_err)]

pub mod args;
mod bench;
mod checksum;
mod collapse;
mod convert;
mod create;
mod info;
mod io;
mod jobs;
mod json;
mod map;
mod session;
mod snapshots;

pub use convert::copy_range;
pub use session::Session;

use core::fmt;

use crate::device::{Device, Queue};
use crate::error::{Error, ErrorKind, Result};
use crate::format::Format;
use crate::graph::{Graph, NameBuf, NodeId, OpenOptions, Resolver};

/// What a front end supplies to the interpreter.
pub trait Environment {
    /// The devices images live on, with split-phase access for the request
    /// engine (`bench -d DEPTH`) on `'static` buffers
    /// ([`Environment::queue_memory`]); a synchronous device takes
    /// [`Queue`]'s defaults.
    type Device: Queue<'static>;
    /// How image names become devices.
    type Resolver: Resolver<Self::Device>;

    /// The resolver for image and backing names.
    fn resolver(&mut self) -> &mut Self::Resolver;

    /// Creates the output image `name` of `size` bytes that reads as zeros.
    ///
    /// # Errors
    /// As the back end reports (no space, not found, ...).
    fn create(&mut self, name: &str, size: u64) -> Result<Self::Device>;

    /// Memory for the buffers of requests in flight (`bench -d DEPTH`):
    /// `len` bytes, aligned to 4 KiB. `'static`, because a device that
    /// queues (io_uring, virtio) may hold a buffer until its operation
    /// completes, beyond any borrow ([`Queue`]). The interpreter uses it
    /// for one command, drains its engine and drops every piece before the
    /// command returns. `None` (the default) when the environment has no
    /// memory that large.
    fn queue_memory(&mut self, len: usize) -> Option<&'static mut [u8]> {
        let _ = len;
        None
    }

    /// Undoes [`Environment::create`] of `name` after the command that
    /// created it failed, so that a failed command leaves no new file:
    /// removes it only when `create` made it (it did not exist before). The
    /// default removes nothing (outputs that are not files, like disks).
    fn remove(&mut self, name: &str) {
        let _ = name;
    }

    /// Microseconds from an arbitrary fixed point, for progress rates;
    /// `None` where no clock is available.
    fn now_micros(&mut self) -> Option<u64> {
        None
    }

    /// The wall-clock time, seconds and nanoseconds since the Unix epoch,
    /// for the date of an internal snapshot; `None` (the default) where
    /// there is no calendar clock (the date is then 0).
    fn unix_time(&mut self) -> Option<(u32, u32)> {
        None
    }

    /// Shows `message` to the user apart from the command's output (the
    /// host's stderr, the kernel's console), as qemu-img's warnings.
    fn warn(&mut self, message: fmt::Arguments<'_>);

    /// Called after each command of a script ([`run_script`]) has run,
    /// whether it succeeded or not, and once more after the script's
    /// session closed (the kernel measures the stack each used). The
    /// default does nothing.
    fn command_finished(&mut self) {}

    /// Sets the cache mode of the images opened from now on: `direct`
    /// bypasses the host's page cache (qemu-img's `-t none`), otherwise
    /// `writeback`, the mode every command starts with.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`], the default, for `direct` where the
    /// front end has no such mode (the kernel's disks have no page cache).
    fn set_direct(&mut self, direct: bool) -> Result<()> {
        match direct {
            true => Err(Error::new(
                ErrorKind::Unsupported,
                "unsupported cache mode (only writeback)",
            )),
            false => Ok(()),
        }
    }

    /// The format the front end was told image `name` has (a kernel disk
    /// attached with `format=raw`, or a script's `image-format` command),
    /// used when a command names none. `None`, the default, probes.
    fn pinned_format(&mut self, _name: &str) -> Option<Format> {
        None
    }

    /// Records that image `name` has `format` (the script command
    /// `image-format NAME FMT`).
    ///
    /// # Errors
    /// [`ErrorKind::NoCapacity`] when the front end keeps no more such
    /// records; [`ErrorKind::Unsupported`], the default, when it keeps none.
    fn pin_format(&mut self, _name: &str, _format: Format) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "unsupported: this front end does not record image formats (use -f)",
        ))
    }

    /// Whether the output is a terminal (progress bars are drawn only there).
    fn is_terminal(&self) -> bool {
        false
    }

    /// Copies guest bytes `0..size` of `image` (its chain opened afresh,
    /// read-only, with the format it was found to have) to `output`, which
    /// `create` made, leaving zeros unwritten as `-S sparse` says, with several workers at
    /// once, where the environment has them (host threads, each with its own
    /// graph over a part of the range). `None`, the default, lets the caller
    /// copy alone.
    fn copy_in_parallel<'a>(
        &mut self,
        _image: (&'a str, Format),
        _output: &'a str,
        _size: u64,
        _sparse: u64,
    ) -> Option<Outcome<'a>> {
        None
    }
}

/// Longest name of a backing image a [`Failure`] keeps (longer ones are
/// cut short).
const LAYER_NAME: usize = 256;

/// A failed command: the error, the word of the command it concerned and,
/// when a backing image below it was at fault, that image's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure<'a> {
    /// What went wrong.
    pub error: Error,
    /// What it went wrong with (an image name, an io command), possibly empty.
    pub subject: &'a str,
    layer: heapless::String<LAYER_NAME>,
}

impl<'a> Failure<'a> {
    /// A failure of `error` concerning `subject`.
    pub fn new(error: Error, subject: &'a str) -> Self {
        Self {
            error,
            subject,
            layer: heapless::String::new(),
        }
    }

    /// The same failure, blaming backing image `layer` of `subject`.
    pub fn in_backing_file(mut self, layer: &str) -> Self {
        self.layer.clear();
        let mut end = layer.len().min(LAYER_NAME);
        while !layer.is_char_boundary(end) {
            end -= 1;
        }
        // Fits: at most LAYER_NAME bytes.
        let _ = self.layer.push_str(&layer[..end]);
        self
    }

    /// The backing image at fault, or `""` when the subject itself is.
    pub fn backing_file(&self) -> &str {
        &self.layer
    }
}

impl From<Error> for Failure<'_> {
    fn from(error: Error) -> Self {
        Self::new(error, "")
    }
}

impl From<fmt::Error> for Failure<'_> {
    fn from(_: fmt::Error) -> Self {
        Error::new(ErrorKind::Io, "could not write output").into()
    }
}

impl fmt::Display for Failure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.subject.is_empty() {
            write!(f, "{}: ", self.subject)?;
        }
        if !self.layer.is_empty() {
            write!(f, "backing file '{}': ", self.layer)?;
        }
        write!(f, "{}", self.error)
    }
}

/// The interpreter's result.
pub type Outcome<'a> = core::result::Result<(), Failure<'a>>;

pub(crate) fn invalid(message: &'static str) -> Failure<'static> {
    Error::new(ErrorKind::InvalidInput, message).into()
}

/// Runs one command (`words[0]` is its name) in `session` (images attached
/// by earlier commands of a script). `scratch` is working memory for data
/// transfers (larger is faster; 64 KiB or more is good).
///
/// # Errors
/// A [`Failure`] for wrong arguments or any failed operation; the graph holds
/// no more nodes afterwards than before.
pub fn run<
    'a,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
    const S: usize,
>(
    env: &mut E,
    graph: &mut Graph<E::Device, N, B, C, J>,
    session: &mut Session<S>,
    words: &[&'a str],
    scratch: &mut [u8],
    out: &mut dyn fmt::Write,
) -> Outcome<'a> {
    if scratch.is_empty() {
        return Err(invalid("scratch memory must not be empty"));
    }
    let (&name, rest) = words
        .split_first()
        .ok_or_else(|| invalid("no command given"))?;
    let mut cx = Ctx {
        env,
        graph,
        scratch,
        out,
    };
    if let Some(outcome) = cx.session_command(session, name, rest) {
        return outcome;
    }
    match name {
        "info" => cx.info(rest),
        "io" => cx.io(session, rest),
        "map" => cx.map(rest),
        "convert" => cx.convert(rest),
        "collapse" => cx.collapse(rest),
        "commit" => cx.commit_or_stream(rest, true),
        "stream" => cx.commit_or_stream(rest, false),
        "snapshot" if rest.iter().any(|w| matches!(*w, "-l" | "-c" | "-a" | "-d")) => {
            cx.internal_snapshots(rest)
        }
        "snapshot" => cx.snapshot(rest),
        "create" => cx.create(rest),
        "bench" => cx.bench(session, rest),
        "sizes" => cx.sizes::<S>(rest),
        _ => Err(Failure::new(
            Error::new(ErrorKind::InvalidInput, "unknown command"),
            name,
        )),
    }
}

/// Runs `script` — commands separated by `;`, each split into words (double
/// quotes group words) — in one session, echoing each command as `> ...`.
/// Stops at the first failing command and returns its index with the
/// failure; the session is closed either way.
///
/// # Errors
/// The index (0-based) and [`Failure`] of the first command that failed.
pub fn run_script<
    'a,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    env: &mut E,
    graph: &mut Graph<E::Device, N, B, C, J>,
    script: &'a str,
    scratch: &mut [u8],
    out: &mut dyn fmt::Write,
) -> core::result::Result<usize, (usize, Failure<'a>)> {
    let mut session: Session = Session::new();
    let mut done = 0;
    let mut failed = None;
    for (index, command) in args::split_commands(script).enumerate() {
        let result = writeln!(out, "> {}", command.trim())
            .map_err(Failure::from)
            .and_then(|()| args::split_words(command).map_err(|e| Failure::new(e, command)))
            .and_then(|words| run(env, graph, &mut session, &words, scratch, out));
        env.command_finished();
        if let Err(failure) = result {
            failed = Some((index, failure));
            break;
        }
        done += 1;
    }
    let closed = session.close(env, graph, scratch);
    env.command_finished();
    match (failed, closed) {
        (Some(failure), _) => Err(failure),
        (None, Err(err)) => Err((done, err.into())),
        (None, Ok(())) => Ok(done),
    }
}

/// What a command works with: the front end's environment, the graph, the
/// scratch memory and the output sink. [`run`] lends them for one command;
/// each command module adds its commands as methods.
pub(crate) struct Ctx<
    'x,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
> {
    /// The front end's environment.
    pub(crate) env: &'x mut E,
    /// The graph the command works on.
    pub(crate) graph: &'x mut Graph<E::Device, N, B, C, J>,
    /// Working memory for data transfers (not empty).
    pub(crate) scratch: &'x mut [u8],
    /// Where results are written.
    pub(crate) out: &'x mut dyn fmt::Write,
}

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Opens `name`'s chain, runs `body` on it and releases it again.
    pub(crate) fn with_image<'a, T>(
        &mut self,
        name: &'a str,
        options: OpenOptions,
        body: impl FnOnce(&mut Self, NodeId) -> core::result::Result<T, Failure<'a>>,
    ) -> core::result::Result<T, Failure<'a>> {
        let node = self.open(name, options)?;
        let result = body(self, node);
        if self.graph.contains(node) {
            self.graph.unref(node)?;
        }
        result
    }

    /// Opens `name`'s chain, naming the image in the failure. Without a
    /// named format, the environment's pinned format for `name` is used
    /// ([`Environment::pinned_format`]); without one, the format is probed
    /// and a raw result is warned about, as qemu-img does. A read-only
    /// open of an image the graph holds already (attached in a script)
    /// takes another reference to that node instead: a second node over the
    /// file would conflict with an attached writer, as QEMU's image locking
    /// refuses a second user of an image in use. Every L2 table of the
    /// chain is checked at open ([`OpenOptions::check_tables`]): a command
    /// refuses a hostile image before it starts, as it always has.
    pub(crate) fn open<'a>(
        &mut self,
        name: &'a str,
        mut options: OpenOptions,
    ) -> core::result::Result<NodeId, Failure<'a>> {
        let at = |err| Failure::new(err, name);
        options.check_tables = true;
        if options.format.is_none() {
            options.format = self.env.pinned_format(name);
        }
        if let Some(node) = self.open_already(name, options) {
            // What was written through it becomes visible to other readers
            // of the file (a convert's workers), as an open would do.
            self.graph.write_back_all().map_err(at)?;
            self.graph.ref_node(node).map_err(at)?;
            return Ok(node);
        }
        let mut at_fault = NameBuf::new();
        let top = self
            .graph
            .open_image_naming(self.env.resolver(), name, options, &mut at_fault)
            .map_err(|err| at(err).in_backing_file(&at_fault))?;
        if self.graph.is_probed(top)? {
            self.env.warn(format_args!(
                "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
            ));
        }
        Ok(top)
    }

    /// The format node over the storage `name` names, when the graph has
    /// one and the open is read-only.
    fn open_already(&mut self, name: &str, options: OpenOptions) -> Option<NodeId> {
        if self.graph.node_count() == 0 || !options.read_only || options.writable_devices {
            return None;
        }
        let identity = self.env.resolver().open(name, false).ok()?.identity();
        let node = self.graph.image_on(identity)?;
        let format = self.graph.format(node).ok()?;
        (options.format.is_none() || options.format == format).then_some(node)
    }

    /// Opens `name`'s chain (of `format`, probed when `None`) with every
    /// device writable (headers may be rewritten) and attaches a
    /// BlockBackend with `access` standing for the guest's device: from
    /// then on the backend is the only holder of the active layer, so
    /// dropping or pivoting it works as under a VMM. The caller detaches
    /// the backend.
    pub(crate) fn open_as_device<'a>(
        &mut self,
        name: &'a str,
        format: Option<Format>,
        access: crate::graph::Access,
    ) -> core::result::Result<(NodeId, crate::BackendId), Failure<'a>> {
        let options = OpenOptions {
            format,
            read_only: !access.perm.contains(crate::graph::Perm::WRITE),
            writable_devices: true,
            ..OpenOptions::probing()
        };
        let active = self.open(name, options)?;
        let backend = self.graph.attach_backend(active, access);
        self.graph.unref(active)?;
        Ok((active, backend.map_err(|e| Failure::new(e, name))?))
    }
}

/// How a command opens the image named on its command line: `-f FMT`
/// names its format (never probed then), `-U`/`--force-share` opens it
/// read-only next to writers, as qemu-img.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ImageOpts {
    /// `-f FMT`; `None` probes.
    pub(crate) format: Option<Format>,
    /// `-U` / `--force-share`.
    pub(crate) force_share: bool,
}

impl ImageOpts {
    /// Takes `word` (and `-f`'s value from `rest`) when it is one of these
    /// options; `None` for any other word.
    pub(crate) fn take<'a>(
        &mut self,
        word: &'a str,
        rest: &mut impl Iterator<Item = &'a str>,
    ) -> Option<Outcome<'a>> {
        match word {
            "-f" => Some(match rest.next() {
                Some(name) => Format::from_name(name)
                    .map(|format| self.format = Some(format))
                    .map_err(|e| Failure::new(e, name)),
                None => Err(invalid("-f needs a format (qcow2 or raw)")),
            }),
            "-U" | "--force-share" => {
                self.force_share = true;
                Some(Ok(()))
            }
            _ => None,
        }
    }

    /// Options to open the image read-only with (force-sharing with `-U`;
    /// a caller that makes them writable gets the graph's refusal of `-U`
    /// for writes, as qemu-img refuses it).
    pub(crate) fn read_only(self) -> OpenOptions {
        OpenOptions {
            format: self.format,
            force_share: self.force_share,
            ..OpenOptions::probing()
        }
    }
}

/// `--output=json|human` or `--output json|human`: true for JSON.
pub(crate) fn output_option<'a>(
    word: &str,
    rest: &mut impl Iterator<Item = &'a str>,
) -> Option<Result<bool>> {
    let value = match word.strip_prefix("--output") {
        Some("") => rest.next(),
        Some(v) => v.strip_prefix('='),
        None => return None,
    };
    Some(match value {
        Some("json") => Ok(true),
        Some("human") => Ok(false),
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            "--output takes json or human",
        )),
    })
}

/// The words of a command, as [`image_command`] hands them on.
pub(crate) type WordIter<'w, 'a> = core::iter::Copied<core::slice::Iter<'w, &'a str>>;

/// Parses the words of a command on one image: `-f FMT` and `-U`
/// ([`ImageOpts`]), the command's own options through `option` (`None` for
/// a word it does not know; it may take a value from the words) and exactly
/// one IMAGE.
pub(crate) fn image_command<'a>(
    words: &[&'a str],
    usage: &'static str,
    mut option: impl FnMut(&'a str, &mut WordIter<'_, 'a>) -> Option<Outcome<'a>>,
) -> core::result::Result<(&'a str, ImageOpts), Failure<'a>> {
    let mut opts = ImageOpts::default();
    let mut image = None;
    let mut words = words.iter().copied();
    while let Some(word) = words.next() {
        let taken = match opts.take(word, &mut words) {
            Some(taken) => Some(taken),
            None => option(word, &mut words),
        };
        if let Some(taken) = taken {
            taken?;
        } else if word.starts_with('-') || image.replace(word).is_some() {
            return Err(invalid(usage));
        }
    }
    Ok((image.ok_or_else(|| invalid(usage))?, opts))
}

/// `--output=json|human` as an [`image_command`] option: sets `as_json`.
pub(crate) fn json_option<'a>(
    word: &str,
    rest: &mut WordIter<'_, 'a>,
    as_json: &mut bool,
) -> Option<Outcome<'a>> {
    output_option(word, rest).map(|choice| {
        *as_json = choice?;
        Ok(())
    })
}
