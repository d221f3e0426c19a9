//! `snapshot -l [-f FMT] [-U] IMAGE`: the internal snapshots of a qcow2
//! image, listed as `qemu-img snapshot -l` lists them (its columns and
//! widths; dates in UTC, where qemu-img uses the local time zone). Only the
//! image is opened, not its backing chain, as qemu-img does; a raw image
//! lists nothing. `snapshot -c NAME [-f FMT] IMAGE` creates one
//! ([`Graph::create_internal_snapshot`](crate::Graph::create_internal_snapshot));
//! `snapshot -d ID_OR_NAME [-f FMT] IMAGE` deletes one
//! ([`Graph::delete_internal_snapshot`](crate::Graph::delete_internal_snapshot));
//! `snapshot -a ID_OR_NAME [-f FMT] IMAGE` reverts the image to one
//! ([`Graph::apply_internal_snapshot`](crate::Graph::apply_internal_snapshot)).

use core::fmt::Write;

use super::{image_command, invalid, Ctx, Environment, Outcome};
use crate::error::{Error, ErrorKind};
use crate::format::qcow2::SnapshotInfo;
use crate::graph::OpenOptions;

const USAGE: &str = "usage: snapshot -l|-c NAME|-a ID_OR_NAME|-d ID_OR_NAME [-f FMT] [-U] IMAGE";

/// What `snapshot` does with the image's internal snapshots.
#[derive(Clone, Copy)]
enum Verb<'a> {
    /// `-l`: list them.
    List,
    /// `-c NAME`: create one.
    Create(&'a str),
    /// `-d ID_OR_NAME`: delete one.
    Delete(&'a str),
    /// `-a ID_OR_NAME`: revert the image to one.
    Apply(&'a str),
}

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `snapshot -l|-c|-a|-d ...` (`words` after `snapshot`).
    pub(crate) fn internal_snapshots<'a>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        let mut verb = None;
        let (image, opts) = image_command(words, USAGE, |word, rest| {
            let mut value = || rest.next().ok_or_else(|| invalid(USAGE));
            let chosen = match word {
                "-l" => Ok(Verb::List),
                "-c" => value().map(Verb::Create),
                "-d" => value().map(Verb::Delete),
                "-a" => value().map(Verb::Apply),
                _ => return None,
            };
            Some(chosen.and_then(|chosen| match verb.replace(chosen) {
                Some(_) => Err(invalid(USAGE)),
                None => Ok(()),
            }))
        })?;
        let Some(verb) = verb else {
            return Err(invalid(USAGE));
        };
        if !matches!(verb, Verb::List) {
            if opts.force_share {
                return Err(invalid("-U is for reading only"));
            }
            let date = self.env.unix_time().unwrap_or((0, 0));
            let options = OpenOptions {
                read_only: false,
                ..opts.read_only()
            };
            return self.with_image(image, options, |cx, node| {
                let changed = match verb {
                    Verb::Create(name) => cx.graph.create_internal_snapshot(node, name, date),
                    Verb::Delete(key) => cx.graph.delete_internal_snapshot(node, key),
                    Verb::Apply(key) => cx.graph.apply_internal_snapshot(node, key),
                    Verb::List => Ok(()),
                };
                changed.map_err(|e| super::Failure::new(e, image))
            });
        }
        let options = OpenOptions {
            no_backing: true,
            ..opts.read_only()
        };
        self.with_image(image, options, |cx, node| {
            let at = |err| super::Failure::new(err, image);
            // A raw image has no snapshots to list, as with qemu-img.
            let count = cx.graph.qcow2(node).map_or(0, |q| q.header().nb_snapshots);
            if count == 0 {
                return Ok(());
            }
            let mut lines = heapless::String::<256>::new();
            let (graph, out) = (&mut *cx.graph, &mut *cx.out);
            out.write_str("Snapshot list:\n")?;
            writeln!(
                out,
                "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
                "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
            )?;
            graph
                .visit_snapshots(node, |info| {
                    lines.clear();
                    row(&mut lines, info)
                        .map_err(|_| Error::new(ErrorKind::Io, "output failed"))?;
                    out.write_str(&lines)
                        .map_err(|_| Error::new(ErrorKind::Io, "output failed"))
                })
                .map_err(at)
        })
    }
}

/// One snapshot's line, as QEMU's `bdrv_snapshot_dump` prints it.
fn row(out: &mut impl Write, info: &SnapshotInfo<'_>) -> core::fmt::Result {
    let mut size = heapless::String::<16>::new();
    size_to_str(&mut size, info.vm_state_size)?;
    let mut date = heapless::String::<24>::new();
    utc_date(&mut date, info.date.0)?;
    let secs = info.vm_clock_nsec / 1_000_000_000;
    let mut clock = heapless::String::<24>::new();
    write!(
        clock,
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (info.vm_clock_nsec / 1_000_000) % 1000
    )?;
    let mut icount = heapless::String::<24>::new();
    if let Some(n) = info.icount {
        write!(icount, "{n}")?;
    }
    writeln!(
        out,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        info.id, info.name, size, date, clock, icount
    )
}

/// `bytes` as QEMU's `size_to_str`: three significant digits and a binary
/// unit (`0 B`, `1.5 KiB`, `12 MiB`).
fn size_to_str(out: &mut impl Write, bytes: u64) -> core::fmt::Result {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // The unit: the largest power of 1024 with `bytes * 1.024` at least it.
    let scaled = bytes as f64 * 1.024;
    let mut unit = 0;
    while unit + 1 < UNITS.len() && scaled >= (1u64 << (10 * (unit + 1))) as f64 {
        unit += 1;
    }
    let value = bytes as f64 / (1u64 << (10 * unit)) as f64;
    let mut text = heapless::String::<16>::new();
    match value {
        v if v >= 100.0 => write!(text, "{v:.0}")?,
        v if v >= 10.0 => write!(text, "{v:.1}")?,
        v => write!(text, "{v:.2}")?,
    }
    let trimmed = match text.contains('.') {
        true => text.trim_end_matches('0').trim_end_matches('.'),
        false => &text,
    };
    write!(out, "{trimmed} {}B", UNITS[unit])
}

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM:SS` in UTC.
fn utc_date(out: &mut impl Write, secs: u32) -> core::fmt::Result {
    let (days, rest) = (i64::from(secs) / 86_400, i64::from(secs) % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    write!(
        out,
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        (rest / 60) % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(
        f: impl FnOnce(&mut heapless::String<64>) -> core::fmt::Result,
    ) -> heapless::String<64> {
        let mut s = heapless::String::new();
        f(&mut s).unwrap();
        s
    }

    #[test]
    fn sizes_and_dates_print_as_qemu_prints_them() {
        assert_eq!(text(|s| size_to_str(s, 0)), "0 B");
        assert_eq!(text(|s| size_to_str(s, 1536)), "1.5 KiB");
        assert_eq!(text(|s| size_to_str(s, 12 << 20)), "12 MiB");
        assert_eq!(text(|s| size_to_str(s, 999)), "999 B");
        assert_eq!(text(|s| utc_date(s, 0)), "1970-01-01 00:00:00");
        assert_eq!(text(|s| utc_date(s, 1_796_613_458)), "2026-12-07 03:17:38");
        assert_eq!(text(|s| utc_date(s, 951_782_400)), "2000-02-29 00:00:00");
    }
}
