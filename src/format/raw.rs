//! The raw format: guest offset `x` is device offset `x`.

use super::Mapping;

/// A raw image: everything is data, mapped one to one.
pub fn map(offset: u64, len: u64) -> (Mapping, u64) {
    (Mapping::Data(offset), len)
}
