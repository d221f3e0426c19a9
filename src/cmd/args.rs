//! Splitting command lines and parsing numbers, without allocation.

use crate::error::{fail, ErrorKind, Result};

/// Most words one command may have.
pub const MAX_WORDS: usize = 64;

/// The words of one command, borrowed from the line.
pub type Words<'a> = heapless::Vec<&'a str, MAX_WORDS>;

/// Splits `line` on spaces; double quotes group words (`"write 0 1M"` is one
/// word, without its quotes). A quote must enclose whole words.
///
/// # Errors
/// [`ErrorKind::InvalidInput`] for an unterminated quote, a quote inside a
/// word, or more than [`MAX_WORDS`] words.
pub fn split_words(line: &str) -> Result<Words<'_>> {
    let mut words = Words::new();
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let (start, end, next) = if bytes[i] == b'"' {
            let Some(close) = line[i + 1..].find('"') else {
                return fail(ErrorKind::InvalidInput, "unterminated quote in command");
            };
            let end = i + 1 + close;
            if bytes.get(end + 1).is_some_and(|b| !b.is_ascii_whitespace()) {
                return fail(ErrorKind::InvalidInput, "a quote must enclose whole words");
            }
            (i + 1, end, end + 1)
        } else {
            let end = line[i..]
                .find(|c: char| c.is_ascii_whitespace())
                .map_or(line.len(), |n| i + n);
            if line[i..end].contains('"') {
                return fail(ErrorKind::InvalidInput, "a quote must enclose whole words");
            }
            (i, end, end)
        };
        if words.push(&line[start..end]).is_err() {
            return fail(ErrorKind::InvalidInput, "too many words in one command");
        }
        i = next;
    }
    Ok(words)
}

/// Splits a script into commands at `;` outside quotes.
pub fn split_commands(script: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(script);
    core::iter::from_fn(move || {
        let text = rest?;
        let mut quoted = false;
        for (i, c) in text.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ';' if !quoted => {
                    rest = Some(&text[i + 1..]);
                    return Some(&text[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(text)
    })
    .filter(|command| !command.trim().is_empty())
}

/// Parses a size or offset: decimal or `0x` hex, with an optional binary
/// suffix `k`, `M`, `G`, `T` (case-insensitive, as qemu-io).
///
/// # Errors
/// [`ErrorKind::InvalidInput`] for anything else or an overflow.
pub fn parse_size(text: &str) -> Result<u64> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        Some(b't' | b'T') => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    let value = parse_integer(digits)?;
    match value.checked_mul(1 << shift) {
        Some(v) => Ok(v),
        None => fail(ErrorKind::InvalidInput, "number is too large"),
    }
}

fn parse_integer(text: &str) -> Result<u64> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse::<u64>(),
    };
    parsed.or(fail(ErrorKind::InvalidInput, "invalid number"))
}

/// Parses a byte pattern: decimal or `0x` hex, 0..=255.
///
/// # Errors
/// [`ErrorKind::InvalidInput`] for anything else.
pub fn parse_pattern(text: &str) -> Result<u8> {
    match u8::try_from(parse_integer(text)?) {
        Ok(byte) => Ok(byte),
        Err(_) => fail(
            ErrorKind::InvalidInput,
            "pattern must be a byte value (0..=255)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_quotes() {
        let words = split_words(r#"io s3.qcow2 -c "write -P 0x55 0 1M"  -c flush"#).unwrap();
        assert_eq!(
            words.as_slice(),
            &["io", "s3.qcow2", "-c", "write -P 0x55 0 1M", "-c", "flush"]
        );
        assert!(split_words(r#"io "open"#).is_err());
        assert!(split_words(r#"a"b c""#).is_err());
        assert_eq!(split_words("").unwrap().len(), 0);
    }

    #[test]
    fn commands_split_outside_quotes() {
        let cmds: Vec<&str> = split_commands(r#"io a -c "read 0 1; x"; info a;;"#).collect();
        assert_eq!(cmds, vec![r#"io a -c "read 0 1; x""#, " info a"]);
    }

    #[test]
    fn sizes_and_patterns() {
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("0x10").unwrap(), 16);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_pattern("0xab").unwrap(), 0xab);
        assert_eq!(parse_pattern("17").unwrap(), 17);
        assert!(parse_pattern("256").is_err());
    }
}
