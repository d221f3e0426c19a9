//! `convert [-f FMT] [-U] [-O raw|qcow2] [-o OPTIONS] [-B BACKING -F FMT]
//! [-c] [-S SPARSE] [-t CACHE] IMAGE OUTPUT`: the chain's guest view as a new raw
//! image, or as a new qcow2 image (`-o` takes `create`'s qcow2 options:
//! `cluster_size`, `refcount_bits`, `compat`, `lazy_refcounts`,
//! `compression_type`, `extended_l2`). Without a backing file, ranges that
//! read as zeros are left unwritten (the new output already reads zero):
//! ranges the chain knows to be zeros, and runs of zero bytes of at least
//! SPARSE bytes (aligned to SPARSE; default 4 KiB, as qemu-img's `-S`); `-S 0` writes
//! every byte, zeros included (a fully allocated output). With `-c` (qcow2
//! without `-B`, host builds) each cluster is stored compressed where that
//! makes it shorter, as `qemu-img convert -c` does. With `-B` (qcow2
//! only) the output gets BACKING
//! (stored as given, opened relative to OUTPUT like any backing file) and
//! holds only what differs from BACKING's view, zeros included, as
//! `qemu-img convert -B` does. Where the environment has several workers (host threads,
//! [`Environment::copy_in_parallel`]) each copies a part of a raw output
//! with its own graph, as qemu-img keeps several requests in flight. As with
//! qemu-img, the output's cache mode defaults to `unsafe` (no flush at the
//! end); `-t writeback` flushes it before the command succeeds.

use core::ops::Range;

use super::create::{apply_options, MAX_OPTION_WORDS};
use super::{invalid, Ctx, Environment, Failure, ImageOpts, Outcome};
use crate::format::qcow2::create::{create, CreateOptions};
use crate::format::Format;
use crate::graph::{piece_len, Graph, NameBuf, NodeId, OpenOptions, Resolver};
use crate::Device;

const USAGE: &str = "usage: convert [-f FMT] [-U] [-O raw|qcow2] [-o OPTIONS] \
                     [-B BACKING -F FMT] [-c] [-S SPARSE] [-t writeback|unsafe] IMAGE OUTPUT";

/// qemu-img's default `-S`: zero runs of 4 KiB are left unwritten.
const DEFAULT_SPARSE: u64 = 4096;
/// The largest `-S` qemu-img takes.
const MAX_SPARSE: u64 = 16 << 20;

/// How `convert` writes its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputMode {
    /// Flush the output before succeeding (`-t writeback`).
    pub flush: bool,
    /// `-S`: runs of zero bytes of at least this many bytes, aligned to it,
    /// are left unwritten; 0 writes every byte.
    pub sparse: u64,
    /// `-c`: the qcow2 output's clusters are compressed where that makes
    /// them shorter (host builds).
    pub compress: bool,
}

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `convert`.
    pub(crate) fn convert<'a>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        let mut names = heapless::Vec::<&str, 2>::new();
        let mut mode = OutputMode {
            flush: false,
            sparse: DEFAULT_SPARSE,
            compress: false,
        };
        let mut output_format = Format::Raw;
        let mut option_words = heapless::Vec::<&str, MAX_OPTION_WORDS>::new();
        let (mut backing, mut backing_format) = (None, None);
        let mut opts = ImageOpts::default();
        let mut words = words.iter().copied();
        while let Some(word) = words.next() {
            if let Some(taken) = opts.take(word, &mut words) {
                taken?;
                continue;
            }
            match word {
                "-c" => mode.compress = true,
                "-S" => {
                    let text = words.next().ok_or_else(|| invalid(USAGE))?;
                    let sparse =
                        super::args::parse_size(text).map_err(|e| Failure::new(e, text))?;
                    if !sparse.is_multiple_of(512) || sparse > MAX_SPARSE {
                        return Err(invalid(
                            "invalid sparse size: valid sizes are multiples of 512 up to 16777216 (0 fully allocates the output)",
                        ));
                    }
                    mode.sparse = sparse;
                }
                "-t" => {
                    mode.flush = match words.next() {
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
                    output_format = Format::from_name(name).map_err(|e| Failure::new(e, name))?;
                }
                "-o" => option_words
                    .push(words.next().ok_or_else(|| invalid(USAGE))?)
                    .map_err(|_| invalid("too many -o options"))?,
                "-B" => backing = Some(words.next().ok_or_else(|| invalid(USAGE))?),
                "-F" => backing_format = Some(words.next().ok_or_else(|| invalid(USAGE))?),
                _ if word.starts_with('-') => return Err(invalid(USAGE)),
                _ => names.push(word).map_err(|_| invalid(USAGE))?,
            }
        }
        let [image, output] = names.as_slice() else {
            return Err(invalid(USAGE));
        };
        // The output's options, all checked before anything is created.
        let mut options = CreateOptions::new(0);
        if output_format == Format::Raw && !option_words.is_empty() {
            return Err(Failure::new(
                crate::Error::new(
                    crate::ErrorKind::Unsupported,
                    "raw images take no -o options",
                ),
                output,
            ));
        }
        for word in &option_words {
            apply_options(word, &mut options)?;
        }
        let unsupported = |message, subject| {
            Err(Failure::new(
                crate::Error::new(crate::ErrorKind::Unsupported, message),
                subject,
            ))
        };
        if let Some(name) = options.data_file {
            // `create -o data_file=...` makes such an image; convert then
            // copies into it only through a script (not yet here).
            return unsupported(
                "unsupported: convert to an image with an external data file",
                name,
            );
        }
        if mode.compress && output_format == Format::Raw {
            return unsupported("unsupported: raw images cannot be compressed (-c)", output);
        }
        if mode.compress && backing.is_some() {
            return unsupported("unsupported: -c with -B", "-c");
        }
        if mode.compress && cfg!(not(feature = "std")) {
            return unsupported("unsupported: compressed output (-c) is host only", "-c");
        }
        let backing = match (backing, backing_format) {
            (Some(name), _) if output_format == Format::Raw => {
                return unsupported("raw images take no backing file", name)
            }
            (Some(name), Some(format)) => {
                options.backing = Some((name, format));
                Some((
                    name,
                    Format::from_name(format).map_err(|e| Failure::new(e, format))?,
                ))
            }
            (Some(name), None) => return unsupported("a backing file needs its format (-F)", name),
            (None, Some(format)) => {
                return unsupported("a backing format (-F) needs a backing file (-B)", format)
            }
            (None, None) => None,
        };
        options.validate().map_err(|e| Failure::new(e, output))?;
        self.with_image(image, opts.read_only(), |cx, top| {
            if output_format == Format::Qcow2 {
                return to_qcow2(cx, top, output, (options, backing, mode));
            }
            let size = cx.graph.size(top)?;
            let format = cx.graph.format(top)?.unwrap_or(Format::Raw);
            let mut target = cx
                .env
                .create(output, size)
                .map_err(|e| Failure::new(e, output))?;
            let parallel = cx
                .env
                .copy_in_parallel((image, format), output, size, mode.sparse);
            let copied = match parallel {
                Some(copied) => copied,
                None => {
                    let target = (&mut target, *output);
                    copy_range(cx.graph, top, 0..size, target, (cx.scratch, mode.sparse))
                }
            };
            let done = copied.and_then(|()| {
                if mode.flush {
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

/// Writes `top`'s guest view into a new qcow2 image `output` made with
/// `options` (its size set here; its backing file, when given, opened as
/// `(name, format)` to compare against), through the graph; flushed with
/// `flush`, written back and closed in any case. A failure removes it.
fn to_qcow2<'a, E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>(
    cx: &mut Ctx<'_, E, N, B, C, J>,
    top: NodeId,
    output: &'a str,
    (options, backing, mode): (CreateOptions<'_>, Option<(&'a str, Format)>, OutputMode),
) -> Outcome<'a> {
    let Some((name, format)) = backing else {
        return write_qcow2(cx, top, output, (options, None, mode));
    };
    let mut resolved = NameBuf::new();
    let opened = cx
        .env
        .resolver()
        .resolve_backing(output, name, &mut resolved)
        .and_then(|()| {
            let options = OpenOptions::new(format);
            cx.graph.open_image(cx.env.resolver(), &resolved, options)
        })
        .map_err(|e| Failure::new(e, name))?;
    let written = write_qcow2(cx, top, output, (options, Some(opened), mode));
    let closed = cx.graph.unref(opened).map_err(|e| Failure::new(e, name));
    written.and(closed)
}

/// [`to_qcow2`] once the backing image, if any, is open as `base`.
fn write_qcow2<
    'a,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    cx: &mut Ctx<'_, E, N, B, C, J>,
    top: NodeId,
    output: &'a str,
    (mut options, base, mode): (CreateOptions<'_>, Option<NodeId>, OutputMode),
) -> Outcome<'a> {
    let at = |err| Failure::new(err, output);
    let size = cx.graph.size(top)?;
    let unit = options.cluster_size() as usize;
    options.size = size.checked_next_multiple_of(512).ok_or_else(|| {
        at(crate::Error::new(
            crate::ErrorKind::InvalidInput,
            "image size is too large",
        ))
    })?;
    options.validate().map_err(at)?;
    let mut device = cx.env.create(output, 0).map_err(at)?;
    let done = create(&mut device, &options)
        .and_then(|()| cx.graph.add_device(device, output))
        .map_err(at)
        .and_then(|file| {
            let image = cx.graph.open_format(file, Format::Qcow2, false);
            cx.graph.unref(file)?;
            let image = image.map_err(at)?;
            // The new image's view includes its backing file, so that a
            // partly written cluster copies the rest from it.
            let linked = match base {
                Some(base) => cx.graph.set_backing(image, Some(base)).map_err(at),
                None => Ok(()),
            };
            let copied = linked
                .and_then(|()| match base {
                    #[cfg(feature = "std")]
                    None if mode.compress => {
                        let format = (size, options.compression);
                        copy_compressed(cx.graph, (top, image), format, mode.sparse)
                            .map_err(|e| Failure::new(e, output))
                    }
                    None => copy_view(
                        cx.graph,
                        top,
                        0..size,
                        (cx.scratch, mode.sparse),
                        |graph, at_byte, bytes| {
                            graph
                                .write(image, at_byte, bytes)
                                .map_err(|e| Failure::new(e, output))
                        },
                    ),
                    Some(base) => {
                        copy_difference(cx.graph, (top, base, image), (size, unit), cx.scratch)
                            .map_err(|e| Failure::new(e, output))
                    }
                })
                .and_then(|()| match mode.flush {
                    true => cx.graph.flush(image).map_err(at),
                    false => Ok(()),
                });
            // Closing writes the cached tables back.
            let closed = cx.graph.unref(image).map_err(at);
            copied.and(closed)
        });
    if done.is_err() {
        cx.env.remove(output);
    }
    done
}

/// Copies guest bytes `range` of `top`'s chain to the same offsets of
/// `target` (named `output` in errors) through `scratch`, leaving unwritten
/// what reads as zeros (with `sparse` as `-S`: ranges known to be zero, and aligned `sparse`-byte blocks of zero bytes; 0 writes every byte): the target
/// must read zeros there already. A run is cut
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
    (scratch, sparse): (&mut [u8], u64),
) -> Outcome<'a> {
    copy_view(graph, top, range, (scratch, sparse), |_, at, bytes| {
        target
            .write_at(at, bytes)
            .map_err(|e| Failure::new(e, output))
    })
}

/// Writes into `image` each cluster (`unit` bytes, aligned) of `top`'s view
/// (`size` bytes) that differs from `base`'s (read as zeros past its end):
/// data as data, zeros as a zero write (which hides `base` there).
/// `scratch` is split in two.
///
/// # Errors
/// Read and write errors.
fn copy_difference<D: Device, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
    (top, base, image): (NodeId, NodeId, NodeId),
    (size, unit): (u64, usize),
    scratch: &mut [u8],
) -> crate::Result<()> {
    let (ours, theirs) = scratch.split_at_mut(scratch.len() / 2);
    let base_size = graph.size(base)?;
    let mut offset = 0;
    while offset < size {
        let n = piece_len(offset, size - offset, ours.len() as u64) as usize;
        let (ours, theirs) = (&mut ours[..n], &mut theirs[..n]);
        graph.read(top, offset, ours)?;
        let from_base = base_size.saturating_sub(offset).min(n as u64) as usize;
        theirs.fill(0);
        if from_base > 0 {
            graph.read(base, offset, &mut theirs[..from_base])?;
        }
        // Compared and written a cluster of the output at a time.
        let mut at = 0;
        for (mine, other) in ours.chunks(unit).zip(theirs.chunks(unit)) {
            let pos = offset + at as u64;
            if mine != other {
                match mine.iter().all(|&b| b == 0) {
                    true => graph.write_zeroes(image, pos, mine.len() as u64)?,
                    false => graph.write(image, pos, mine)?,
                }
            }
            at += mine.len();
        }
        offset += n as u64;
    }
    Ok(())
}

/// [`copy_range`] into any sink: `write(graph, offset, bytes)` for each
/// piece to write. With `sparse` > 0, ranges the chain knows to be zeros
/// and, in the rest, aligned `sparse`-byte blocks of zero bytes are left
/// out (neighbouring blocks that are written go out together); with 0
/// every byte is written, zeros included.
fn copy_view<'a, D: Device, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
    top: NodeId,
    range: Range<u64>,
    (scratch, sparse): (&mut [u8], u64),
    mut write: impl FnMut(&mut Graph<D, N, B, C, J>, u64, &[u8]) -> Outcome<'a>,
) -> Outcome<'a> {
    let mut offset = range.start;
    while offset < range.end {
        let (status, run) = graph.block_status(top, offset, range.end - offset)?;
        if !(status.zero && sparse > 0) {
            let mut done = 0;
            while done < run {
                let at = offset + done;
                let n = piece_len(at, run - done, scratch.len() as u64) as usize;
                let piece = &mut scratch[..n];
                match status.zero {
                    true => piece.fill(0),
                    false => graph.read(top, at, piece)?,
                }
                for (start, len) in written_runs(at, piece, sparse) {
                    write(graph, at + start as u64, &piece[start..start + len])?;
                }
                done += n as u64;
            }
        }
        offset += run;
    }
    Ok(())
}

/// The runs of `piece` (at guest offset `at`) to write: all of it for a
/// `sparse` of 0, else the maximal runs of aligned `sparse`-byte blocks
/// that hold a non-zero byte (as start and length within `piece`).
fn written_runs(at: u64, piece: &[u8], sparse: u64) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut pos = 0usize;
    core::iter::from_fn(move || {
        if sparse == 0 {
            let whole = (pos < piece.len()).then_some((0, piece.len()));
            pos = piece.len();
            return whole;
        }
        let block_end = |pos: usize| {
            let next = ((at + pos as u64) / sparse + 1) * sparse - at;
            (next as usize).min(piece.len())
        };
        let zero = |from: usize, to: usize| piece[from..to].iter().all(|&b| b == 0);
        while pos < piece.len() && zero(pos, block_end(pos)) {
            pos = block_end(pos);
        }
        if pos >= piece.len() {
            return None;
        }
        let start = pos;
        while pos < piece.len() && !zero(pos, block_end(pos)) {
            pos = block_end(pos);
        }
        Some((start, pos - start))
    })
}

/// Writes `top`'s view (`size` bytes) into the new qcow2 `image` a cluster
/// at a time, each compressed as `compression` says where that makes it
/// shorter than a cluster and written plainly otherwise, as `qemu-img
/// convert -c` does; clusters of zeros are left out unless `sparse` is 0.
/// A last, partial cluster is compressed padded with zeros.
///
/// # Errors
/// Read and write errors.
#[cfg(feature = "std")]
fn copy_compressed<D: Device, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
    (top, image): (NodeId, NodeId),
    (size, compression): (u64, crate::format::qcow2::Compression),
    sparse: u64,
) -> crate::Result<()> {
    use crate::format::qcow2::Compression;
    let cs = graph.cluster_size(image)?;
    let mut cluster = std::vec![0u8; cs as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(cs);
        let (status, run) = graph.block_status(top, pos, n)?;
        if status.zero && run == n && sparse > 0 {
            pos += n;
            continue;
        }
        cluster.fill(0);
        graph.read(top, pos, &mut cluster[..n as usize])?;
        if sparse > 0 && cluster.iter().all(|&b| b == 0) {
            pos += n;
            continue;
        }
        let stream = match compression {
            Compression::Zlib => miniz_oxide::deflate::compress_to_vec(&cluster, 6),
            Compression::Zstd => ruzstd::encoding::compress_to_vec(
                &cluster[..],
                ruzstd::encoding::CompressionLevel::Fastest,
            ),
        };
        match stream.len() < cs as usize {
            true => graph.write_compressed(image, pos, &stream)?,
            false => graph.write(image, pos, &cluster[..n as usize])?,
        }
        pos += n;
    }
    Ok(())
}
