//! [`Place`]: an `Option` whose empty state is all zero bytes.
//!
//! An `Option<T>` may mark `None` with a value `T` never takes (a niche: an
//! enum's unused discriminant, a `bool`'s 2), so an array of empty options
//! is not all zeros, and a `static` graph holding one lands in `.data` —
//! hundreds of KiB of initialised bytes in the binary. `Place` has an
//! explicit tag whose empty value is 0 (`#[repr(u8)]`: the tag comes
//! first), so empty tables of them are zero and a `static` graph lives in
//! `.bss`. The kernel checks that its graph does.

/// Empty, or holding a `T`; used like an `Option` where empty tables must
/// be all zeros.
#[repr(u8)]
pub enum Place<T> {
    /// Nothing (tag 0).
    Empty,
    /// A value.
    Held(T),
}

impl<T> Place<T> {
    /// The value, if any.
    pub const fn as_ref(&self) -> Option<&T> {
        match self {
            Place::Empty => None,
            Place::Held(value) => Some(value),
        }
    }

    /// The value, if any, mutably.
    pub fn as_mut(&mut self) -> Option<&mut T> {
        match self {
            Place::Empty => None,
            Place::Held(value) => Some(value),
        }
    }

    /// Whether it holds a value.
    pub const fn is_some(&self) -> bool {
        matches!(self, Place::Held(_))
    }

    /// Whether it is empty.
    pub const fn is_none(&self) -> bool {
        !self.is_some()
    }

    /// The value, first made by `make` when empty.
    pub fn get_or_insert_with(&mut self, make: impl FnOnce() -> T) -> &mut T {
        if self.is_none() {
            *self = Place::Held(make());
        }
        match self {
            Place::Held(value) => value,
            Place::Empty => unreachable!("filled just above"),
        }
    }

    /// Takes the value out, leaving it empty.
    pub fn take(&mut self) -> Option<T> {
        match core::mem::replace(self, Place::Empty) {
            Place::Empty => None,
            Place::Held(value) => Some(value),
        }
    }
}

impl<'a, T> IntoIterator for &'a Place<T> {
    type Item = &'a T;
    type IntoIter = core::option::IntoIter<&'a T>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_ref().into_iter()
    }
}

impl<'a, T> IntoIterator for &'a mut Place<T> {
    type Item = &'a mut T;
    type IntoIter = core::option::IntoIter<&'a mut T>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_mut().into_iter()
    }
}
