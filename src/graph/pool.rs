//! A fixed-capacity slot pool with generation-checked handles.
//!
//! Freeing a slot bumps its generation, so an old [`Handle`] to it is
//! detected ([`ErrorKind::StaleHandle`]) instead of reaching whatever lives
//! there next.

use core::fmt;
use core::hash::{Hash, Hasher};
use core::marker::PhantomData;

use super::place::Place;
use crate::error::{fail, ErrorKind, Result};

/// A typed, `Copy` reference to a slot of a `Pool`: index plus generation.
pub struct Handle<T> {
    index: u16,
    generation: u32,
    _kind: PhantomData<fn() -> T>,
}

impl<T> Handle<T> {
    const fn new(index: u16, generation: u32) -> Self {
        Self {
            index,
            generation,
            _kind: PhantomData,
        }
    }

    /// The slot index (stable while the handle is live).
    pub const fn index(self) -> usize {
        self.index as usize
    }

    /// A number unique to this slot occupation, for cache keys.
    pub const fn key(self) -> u64 {
        ((self.generation as u64) << 16) | self.index as u64
    }
}

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Handle<T> {}
impl<T> PartialEq for Handle<T> {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index && self.generation == other.generation
    }
}
impl<T> Eq for Handle<T> {}
impl<T> Hash for Handle<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}
impl<T> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}v{}", self.index, self.generation)
    }
}

struct Slot<T> {
    generation: u32,
    /// Empty slots are zero bytes (a `static` graph stays in `.bss`).
    value: Place<T>,
}

/// `N` slots of `T`.
pub struct Pool<T, const N: usize> {
    slots: [Slot<T>; N],
}

impl<T, const N: usize> Default for Pool<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> Pool<T, N> {
    const FITS: () = assert!(
        N > 0 && N <= u16::MAX as usize,
        "pool capacity must be 1..=65535"
    );

    /// An empty pool.
    pub const fn new() -> Self {
        let () = Self::FITS;
        Self {
            slots: [const {
                Slot {
                    generation: 0,
                    value: Place::Empty,
                }
            }; N],
        }
    }

    /// Stores `value` in a free slot.
    ///
    /// # Errors
    /// [`ErrorKind::NoCapacity`] when every slot is taken; `value` is handed
    /// back with the error.
    pub fn insert(&mut self, value: T) -> core::result::Result<Handle<T>, (crate::Error, T)> {
        match self.slots.iter().position(|s| s.value.is_none()) {
            Some(index) => {
                let slot = &mut self.slots[index];
                slot.value = Place::Held(value);
                Ok(Handle::new(index as u16, slot.generation))
            }
            None => Err((
                crate::Error::new(ErrorKind::NoCapacity, "pool is full"),
                value,
            )),
        }
    }

    /// The value `handle` refers to.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] when the slot was freed since.
    pub fn get(&self, handle: Handle<T>) -> Result<&T> {
        match self.slots.get(handle.index()) {
            Some(Slot {
                generation,
                value: Place::Held(value),
            }) if *generation == handle.generation => Ok(value),
            _ => fail(ErrorKind::StaleHandle, "stale or invalid handle"),
        }
    }

    /// The value `handle` refers to, mutably.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] when the slot was freed since.
    pub fn get_mut(&mut self, handle: Handle<T>) -> Result<&mut T> {
        match self.slots.get_mut(handle.index()) {
            Some(Slot {
                generation,
                value: Place::Held(value),
            }) if *generation == handle.generation => Ok(value),
            _ => fail(ErrorKind::StaleHandle, "stale or invalid handle"),
        }
    }

    /// Frees the slot and returns its value; the handle becomes stale.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] when the slot was freed already.
    pub fn remove(&mut self, handle: Handle<T>) -> Result<T> {
        self.get(handle)?;
        let slot = &mut self.slots[handle.index()];
        slot.generation = slot.generation.wrapping_add(1);
        slot.value.take().ok_or(crate::Error::new(
            ErrorKind::StaleHandle,
            "stale or invalid handle",
        ))
    }

    /// Every live handle with its value.
    pub fn iter(&self) -> impl Iterator<Item = (Handle<T>, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.value
                .as_ref()
                .map(|v| (Handle::new(i as u16, s.generation), v))
        })
    }

    /// Every live handle with its value, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Handle<T>, &mut T)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, s)| {
            let generation = s.generation;
            s.value
                .as_mut()
                .map(|v| (Handle::new(i as u16, generation), v))
        })
    }

    /// Number of occupied slots.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.value.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_handles_are_rejected_and_full_pool_gives_value_back() {
        let mut pool = Pool::<u32, 2>::new();
        let a = pool.insert(1).unwrap();
        let b = pool.insert(2).unwrap();
        let (err, value) = pool.insert(3).unwrap_err();
        assert_eq!((err.kind(), value), (ErrorKind::NoCapacity, 3));
        assert_eq!(pool.remove(a).unwrap(), 1);
        assert_eq!(pool.get(a).unwrap_err().kind(), ErrorKind::StaleHandle);
        let c = pool.insert(4).unwrap();
        assert_eq!(c.index(), a.index());
        assert_ne!(c, a);
        assert_eq!(*pool.get(c).unwrap(), 4);
        assert_eq!(*pool.get(b).unwrap(), 2);
        assert_eq!(pool.len(), 2);
    }
}
