//! `create [-q] [-f qcow2|raw] [-o OPTIONS] [-b BACKING -F FMT] IMAGE [SIZE]`:
//! a new empty image, shaped like `qemu-img create`.
//!
//! qcow2 options (`-o`, comma separated, repeatable): `cluster_size=N`,
//! `refcount_bits=N`, `compat=0.10|1.1` (or `v2|v3`), `lazy_refcounts=on|off`,
//! `compression_type=zlib|zstd`, `extended_l2=on|off`, `data_file=NAME`
//! (the external data file, created next to the image, or truncated, as
//! qemu-img does), `data_file_raw=on|off` (its clusters then all mapped to
//! the same offsets: the data file is a raw image of the guest view).
//! The backing reference is stored exactly as given and its format (`-F`) is
//! required. The backing image is opened first, through the resolver and
//! relative to IMAGE as its overlay would open it: it must exist, and
//! without SIZE its virtual size is used. SIZE is rounded up to 512 bytes.
//! Every option is checked before IMAGE is created.

use super::args::parse_size;
use super::{invalid, Ctx, Environment, Failure, Outcome};
use crate::device::Device;
use crate::error::{Error, ErrorKind};
use crate::format::qcow2::create::{create, CreateOptions};
use crate::format::qcow2::Compression;
use crate::format::Format;
use crate::graph::{NameBuf, OpenOptions, Resolver};

const USAGE: &str =
    "usage: create [-q] [-f qcow2|raw] [-o OPTIONS] [-b BACKING -F FMT] IMAGE [SIZE]";

/// Most `-o` words one command may have.
pub(super) const MAX_OPTION_WORDS: usize = 8;

fn error<'a>(kind: ErrorKind, message: &'static str, subject: &'a str) -> Failure<'a> {
    Failure::new(Error::new(kind, message), subject)
}

/// The switch `value` spells (`on`, `yes`, `true` or the opposites).
fn on_off(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" => Some(true),
        "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// Applies one `-o` word (`key=value[,key=value]...`) to `options`.
pub(super) fn apply_options<'a>(
    word: &'a str,
    options: &mut CreateOptions<'a>,
) -> Result<(), Failure<'a>> {
    for item in word.split(',').filter(|item| !item.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(error(
                ErrorKind::InvalidInput,
                "-o options take the form key=value",
                item,
            ));
        };
        let bad = |message| error(ErrorKind::InvalidInput, message, item);
        match key {
            "cluster_size" => {
                let size = parse_size(value).map_err(|e| Failure::new(e, item))?;
                if !size.is_power_of_two() {
                    return Err(bad(
                        "cluster size must be a power of two between 512 and 2M",
                    ));
                }
                options.cluster_bits = size.trailing_zeros();
            }
            "refcount_bits" => {
                let bits = parse_size(value).map_err(|e| Failure::new(e, item))?;
                if !bits.is_power_of_two() || bits > 64 {
                    return Err(bad("refcount width must be a power of two up to 64 bits"));
                }
                options.refcount_order = bits.trailing_zeros();
            }
            "compat" => {
                options.version = match value {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(bad("compat takes 0.10 or 1.1")),
                }
            }
            "compression_type" => {
                options.compression = match value {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => return Err(bad("compression_type takes zlib or zstd")),
                }
            }
            "lazy_refcounts" => {
                options.lazy_refcounts =
                    on_off(value).ok_or(bad("lazy_refcounts takes on or off"))?
            }
            "extended_l2" => {
                options.extended_l2 = on_off(value).ok_or(bad("extended_l2 takes on or off"))?
            }
            "data_file" => options.data_file = Some(value),
            "data_file_raw" => {
                options.data_file_raw = on_off(value).ok_or(bad("data_file_raw takes on or off"))?
            }
            _ => {
                return Err(error(
                    ErrorKind::Unsupported,
                    "unsupported create option",
                    item,
                ))
            }
        }
    }
    Ok(())
}

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Opens the backing image `backing` of format `format` as the overlay
    /// `image` will open it and returns its virtual size.
    fn backing_size<'a>(
        &mut self,
        image: &str,
        (backing, format): (&'a str, Format),
    ) -> Result<u64, Failure<'a>> {
        let at = |err| Failure::new(err, backing);
        let mut resolved = NameBuf::new();
        let device = self
            .env
            .resolver()
            .open_backing(image, backing, false, &mut resolved)
            .map_err(at)?;
        let backing_id = device.identity();
        // IMAGE is about to be truncated: it must not be the backing file.
        if let Ok(existing) = self.env.resolver().open(image, false) {
            if existing.identity() == backing_id {
                return Err(error(
                    ErrorKind::InvalidInput,
                    "the backing file is the image being created",
                    backing,
                ));
            }
        }
        let file = self.graph.add_device(device, &resolved).map_err(at)?;
        let node = self.graph.open_format(file, format, true);
        self.graph.unref(file).map_err(at)?;
        let node = node.map_err(at)?;
        let size = self.graph.size(node);
        self.graph.unref(node).map_err(at)?;
        size.map_err(at)
    }

    /// Runs `create`.
    pub(crate) fn create<'a>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        let mut format = Format::Raw;
        let mut quiet = false;
        let mut option_words = heapless::Vec::<&str, MAX_OPTION_WORDS>::new();
        let mut backing_name: Option<&str> = None;
        let mut backing_format: Option<&str> = None;
        let mut positional = heapless::Vec::<&str, 2>::new();
        let mut words = words.iter().copied();
        while let Some(word) = words.next() {
            let mut value = || words.next().ok_or_else(|| invalid(USAGE));
            match word {
                "-q" => quiet = true,
                "-f" => {
                    let name = value()?;
                    format = Format::from_name(name).map_err(|e| Failure::new(e, name))?;
                }
                "-o" => option_words
                    .push(value()?)
                    .map_err(|_| invalid("too many -o options"))?,
                "-b" => backing_name = Some(value()?),
                "-F" => backing_format = Some(value()?),
                _ if word.starts_with('-') => return Err(invalid(USAGE)),
                _ => positional.push(word).map_err(|_| invalid(USAGE))?,
            }
        }
        let (image, size_word) = match positional.as_slice() {
            [image] => (*image, None),
            [image, size] => (*image, Some(*size)),
            _ => return Err(invalid(USAGE)),
        };

        let backing = match (backing_name, backing_format) {
            (Some(name), Some(fmt)) => {
                let parsed = Format::from_name(fmt).map_err(|e| Failure::new(e, fmt))?;
                Some((name, fmt, parsed))
            }
            (Some(_), None) => {
                return Err(error(
                    ErrorKind::InvalidInput,
                    "a backing file needs its format (-F)",
                    image,
                ))
            }
            (None, Some(_)) => {
                return Err(error(
                    ErrorKind::InvalidInput,
                    "a backing format (-F) needs a backing file (-b)",
                    image,
                ))
            }
            (None, None) => None,
        };
        if format == Format::Raw && (backing.is_some() || !option_words.is_empty()) {
            return Err(error(
                ErrorKind::Unsupported,
                "raw images take no backing file and no -o options",
                image,
            ));
        }

        let mut options = CreateOptions::new(0);
        for word in &option_words {
            apply_options(word, &mut options)?;
        }
        if let Some((name, fmt, _)) = backing {
            options.backing = Some((name, fmt));
        }
        // Checked once before the backing image is opened and again with the
        // size, before anything is created.
        options.validate().map_err(|e| Failure::new(e, image))?;

        let size = match size_word {
            Some(word) => Some(parse_size(word).map_err(|e| Failure::new(e, word))?),
            None => None,
        };
        let size = match (size, backing) {
            (size, Some((name, _, parsed))) => {
                let backing_size = self.backing_size(image, (name, parsed))?;
                size.unwrap_or(backing_size)
            }
            (Some(size), None) => size,
            (None, None) => {
                return Err(error(
                    ErrorKind::InvalidInput,
                    "image creation needs a size",
                    image,
                ))
            }
        };
        let Some(size) = size.checked_next_multiple_of(512) else {
            return Err(error(
                ErrorKind::InvalidInput,
                "image size is too large",
                image,
            ));
        };
        options.size = size;
        options.validate().map_err(|e| Failure::new(e, image))?;

        if !quiet {
            write!(self.out, "Formatting '{image}', fmt={format}")?;
            if format == Format::Qcow2 {
                let extended = if options.extended_l2 { "on" } else { "off" };
                write!(
                    self.out,
                    " cluster_size={} extended_l2={extended} compression_type={}",
                    options.cluster_size(),
                    options.compression.name()
                )?;
            }
            write!(self.out, " size={size}")?;
            if let Some((name, fmt)) = options.backing {
                write!(self.out, " backing_file={name} backing_fmt={fmt}")?;
            }
            if format == Format::Qcow2 {
                let compat = if options.version == 2 { "0.10" } else { "1.1" };
                write!(self.out, " compat={compat}")?;
                if let Some(name) = options.data_file {
                    write!(self.out, " data_file={name}")?;
                    if options.data_file_raw {
                        self.out.write_str(" data_file_raw=on")?;
                    }
                }
                let lazy = if options.lazy_refcounts { "on" } else { "off" };
                write!(
                    self.out,
                    " lazy_refcounts={lazy} refcount_bits={}",
                    options.refcount_bits()
                )?;
            }
            self.out.write_str("\n")?;
        }

        let at = |err| Failure::new(err, image);
        let mut data_path = NameBuf::new();
        if let Some(name) = options.data_file {
            // Resolved as it will be opened: next to the image.
            self.env
                .resolver()
                .resolve_backing(image, name, &mut data_path)
                .map_err(|e| Failure::new(e, name))?;
            if data_path.as_str() == image {
                return Err(error(
                    ErrorKind::InvalidInput,
                    "the data file is the image being created",
                    name,
                ));
            }
            // R13: the data file (empty, the image's size) before the image.
            let mut data = self.env.create(&data_path, size).map_err(at)?;
            data.flush().map_err(at)?;
        }
        let initial = if format == Format::Raw { size } else { 0 };
        let mut device = self.env.create(image, initial).map_err(at)?;
        let formatted = match format {
            Format::Raw => device.flush(),
            Format::Qcow2 => create(&mut device, &options),
        };
        drop(device);
        let formatted = formatted.and_then(|()| match options.data_file_raw {
            true => self.map_raw_data_file(image),
            false => Ok(()),
        });
        if formatted.is_err() {
            self.env.remove(image);
            if !data_path.is_empty() {
                self.env.remove(&data_path);
            }
        }
        formatted.map_err(at)
    }

    /// Maps every cluster of the new qcow2 image `image` to the same
    /// offset of its raw external data file, as QEMU's `data_file_raw`
    /// creation does: the data file is the guest view from the start.
    fn map_raw_data_file(&mut self, image: &str) -> crate::Result<()> {
        let options = OpenOptions::new(Format::Qcow2).writable();
        let node = self.graph.open_image(self.env.resolver(), image, options)?;
        let mapped = self
            .graph
            .map_raw_data_file(node)
            .and_then(|()| self.graph.flush(node));
        self.graph.unref(node)?;
        mapped
    }
}
