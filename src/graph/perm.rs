//! Permissions on graph edges (QEMU's replacement for op blockers).
//!
//! Every user of a node — a parent's `file` or `backing` edge, or a
//! BlockBackend — states what it needs (`perm`) and what it lets others do
//! (`shared`). Two users conflict unless each one's needs are shared by the
//! other.

bitflags::bitflags! {
    /// What a user of a node may do with it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Perm: u8 {
        /// Reads return consistent data.
        const CONSISTENT_READ = 1 << 0;
        /// Writes that change the guest-visible content.
        const WRITE = 1 << 1;
        /// Writes that do not change guest-visible content.
        const WRITE_UNCHANGED = 1 << 2;
        /// Changing the size.
        const RESIZE = 1 << 3;
    }
}

/// A user's permission pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// What this user needs.
    pub perm: Perm,
    /// What this user lets other users do.
    pub shared: Perm,
}

impl Access {
    /// A backing edge: reads only, and no one may change what it reads.
    pub const BACKING: Access = Access {
        perm: Perm::CONSISTENT_READ,
        shared: Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED),
    };

    /// A device that only reads and tolerates anything.
    pub const READ_ONLY_DEVICE: Access = Access {
        perm: Perm::CONSISTENT_READ,
        shared: Perm::all(),
    };

    /// A device that reads and writes and tolerates anything.
    pub const READ_WRITE_DEVICE: Access = Access {
        perm: Perm::CONSISTENT_READ.union(Perm::WRITE),
        shared: Perm::all(),
    };

    /// Nothing needed, everything shared: a node without users.
    pub const UNUSED: Access = Access {
        perm: Perm::empty(),
        shared: Perm::all(),
    };

    /// A format node's edge to its file when opened with force-share
    /// (`qemu-img -U`): it reads and lets others do anything, even write.
    pub const FORCE_SHARE: Access = Access::READ_ONLY_DEVICE;

    /// A format node's edge to its file: it owns the bytes, so nobody else
    /// may write them.
    pub const fn file(writable: bool) -> Access {
        let perm = if writable {
            Perm::CONSISTENT_READ.union(Perm::WRITE).union(Perm::RESIZE)
        } else {
            Perm::CONSISTENT_READ
        };
        Access {
            perm,
            shared: Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED),
        }
    }

    /// What two users of one node hold together: the needs of either, what
    /// both share.
    pub const fn combine(self, other: Access) -> Access {
        Access {
            perm: self.perm.union(other.perm),
            shared: self.shared.intersection(other.shared),
        }
    }

    /// Whether two users of one node cannot coexist.
    pub const fn conflicts_with(self, other: Access) -> bool {
        !other.shared.contains(self.perm) || !self.shared.contains(other.perm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_share_and_writers_do_not_share_backing() {
        assert!(!Access::BACKING.conflicts_with(Access::BACKING));
        assert!(Access::BACKING.conflicts_with(Access::READ_WRITE_DEVICE));
        assert!(!Access::BACKING.conflicts_with(Access::READ_ONLY_DEVICE));
        assert!(Access::file(false).conflicts_with(Access::READ_WRITE_DEVICE));
        assert!(!Access::READ_WRITE_DEVICE.conflicts_with(Access::READ_WRITE_DEVICE));
    }

    #[test]
    fn combined_users_conflict_as_any_pair_of_them() {
        let writer = Access::UNUSED.combine(Access::file(true));
        assert_eq!(writer, Access::file(true));
        let readers = Access::file(false).combine(Access::FORCE_SHARE);
        assert_eq!(readers, Access::file(false));
        assert!(readers.conflicts_with(writer));
        assert!(!Access::FORCE_SHARE.conflicts_with(writer));
        assert!(!Access::UNUSED.conflicts_with(writer));
    }
}
