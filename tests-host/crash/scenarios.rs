//! Scenarios.

use super::*;

/// An image made with qemu-img and qemu-io (or a blank device).
pub(crate) struct ImageSpec {
    pub(crate) name: &'static str,
    /// Virtual size; 0 for a blank device.
    pub(crate) size: u64,
    pub(crate) cluster: u64,
    pub(crate) refcount_bits: u32,
    /// Extended L2 entries (32 subclusters per cluster).
    pub(crate) extended_l2: bool,
    /// The external data file qemu-img creates for it (listed as an image
    /// of its own, made by [`ImageSpec::data_file`]).
    pub(crate) data_file: Option<&'static str>,
    pub(crate) backing: Option<&'static str>,
    pub(crate) cmds: Vec<String>,
    pub(crate) internal_snapshot: Option<&'static str>,
}

impl ImageSpec {
    pub(crate) fn new(name: &'static str, size: u64, cluster: u64) -> Self {
        Self {
            name,
            size,
            cluster,
            refcount_bits: 16,
            extended_l2: false,
            data_file: None,
            backing: None,
            cmds: Vec::new(),
            internal_snapshot: None,
        }
    }

    pub(crate) fn blank(name: &'static str) -> Self {
        Self::new(name, 0, 0)
    }

    pub(crate) fn on(mut self, backing: &'static str) -> Self {
        self.backing = Some(backing);
        self
    }

    pub(crate) fn refcount_bits(mut self, bits: u32) -> Self {
        self.refcount_bits = bits;
        self
    }

    /// An external data file some other spec creates ([`ImageSpec::with_data_file`]):
    /// a device of the scenario, never judged as an image (its bytes are
    /// read through the image that names it).
    pub(crate) fn data_file(name: &'static str) -> Self {
        Self::new(name, 0, 0)
    }

    pub(crate) fn with_data_file(mut self, name: &'static str) -> Self {
        self.data_file = Some(name);
        self
    }

    pub(crate) fn extended_l2(mut self) -> Self {
        self.extended_l2 = true;
        self
    }

    pub(crate) fn io(mut self, cmds: &[&str]) -> Self {
        self.cmds.extend(cmds.iter().map(|c| (*c).to_owned()));
        self
    }

    pub(crate) fn snapshot(mut self, name: &'static str) -> Self {
        self.internal_snapshot = Some(name);
        self
    }
}

/// A guest write issued between two job steps.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GuestWrite {
    /// Issued once this many steps have run.
    pub(crate) after_step: u64,
    pub(crate) off: u64,
    pub(crate) len: u64,
    pub(crate) seed: u64,
}

/// One API call of an operation.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    /// Guest write through the backend, then a backend flush.
    Write { off: u64, len: u64, seed: u64 },
    /// The same as one scatter-gather request of `segments` buffers (cut
    /// at seeded points, some empty).
    WriteV {
        off: u64,
        len: u64,
        seed: u64,
        segments: usize,
    },
    /// Guest writes `(off, len, seed)`, not overlapping, all in flight at
    /// once through the request engine (their device writes completing
    /// out of order; allocating ones too, several of them in flight
    /// together), then a flush.
    Requests(Vec<(u64, u64, u64)>),
    /// `write -z` on the backend's root, then a flush.
    Zero { off: u64, len: u64 },
    /// Discard on the backend's root, then a flush.
    Discard { off: u64, len: u64 },
    /// `write -z` on the backend's root and, with no flush between, a guest
    /// write of `(off, len, seed)` inside the zeroed range; then a flush.
    ZeroThenWrite {
        zero: (u64, u64),
        write: (u64, u64, u64),
    },
    /// `drop_intermediate` on the backend's chain.
    Collapse {
        top: &'static str,
        base: Option<&'static str>,
    },
    /// Commit job (active when `top` is the backend's root), with guest
    /// writes between steps; an active commit is completed (pivot).
    Commit {
        top: &'static str,
        base: &'static str,
        writes: Vec<GuestWrite>,
    },
    /// Stream job into the backend's root.
    Stream { base: Option<&'static str> },
    /// Live snapshot onto the blank image `image`.
    Snapshot { image: &'static str },
    /// Internal snapshot `name` of the backend's root (`snapshot -c`).
    InternalSnapshot { name: &'static str },
    /// Deletes internal snapshot `name` of the backend's root (`snapshot
    /// -d`); a retry after a failure past the commit finds it gone, which
    /// is what the step asks for.
    DeleteInternalSnapshot { name: &'static str },
    /// Reverts the backend's root to internal snapshot `name` (`snapshot
    /// -a`): the guest's view becomes the snapshot's.
    ApplyInternalSnapshot { name: &'static str },
}

pub(crate) fn write(off: u64, len: u64, seed: u64) -> Step {
    Step::Write { off, len, seed }
}

pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) images: Vec<ImageSpec>,
    /// The image the guest's backend is attached to.
    pub(crate) root: &'static str,
    pub(crate) steps: Vec<Step>,
    /// Images whose device operations fail in the fault phase.
    pub(crate) faults: Vec<&'static str>,
    /// `(overlay, new backing)`: the final guest view is the overlay's view
    /// after `qemu-img rebase -u` onto the new backing (collapse).
    pub(crate) rebase: Option<(&'static str, &'static str)>,
    /// `(image, other)`: the image's final view is `other`'s initial view.
    pub(crate) final_equals: Vec<(&'static str, &'static str)>,
    /// Check the reordered states of the replay with qemu-img every this
    /// many new ones (1: all of them; every power cut is always checked).
    pub(crate) qemu_sample: usize,
    /// Extra assertions on the final images (what the scenario must cover).
    pub(crate) covers: Option<Covers>,
}

impl Scenario {
    pub(crate) fn new(name: &'static str, images: Vec<ImageSpec>, root: &'static str) -> Self {
        Self {
            name,
            images,
            root,
            steps: Vec::new(),
            faults: Vec::new(),
            rebase: None,
            final_equals: Vec::new(),
            qemu_sample: 1,
            covers: None,
        }
    }

    pub(crate) fn steps(mut self, steps: Vec<Step>) -> Self {
        self.steps = steps;
        self
    }

    pub(crate) fn faults(mut self, images: &[&'static str]) -> Self {
        self.faults = images.to_vec();
        self
    }

    pub(crate) fn qemu_sample(mut self, every: usize) -> Self {
        self.qemu_sample = every;
        self
    }
}

/// Assertions on the fixture and the final image bytes.
pub(crate) type Covers = fn(&Fixture, &[Vec<u8>]);

/// The scenario's images on disk and in memory.
pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) names: Vec<String>,
    pub(crate) initial: Rc<Vec<Vec<u8>>>,
    pub(crate) blank: Vec<bool>,
    /// Per image: its external data file's index, if it has one.
    pub(crate) data_files: Vec<Option<usize>>,
    pub(crate) root: usize,
    /// Comparison unit: the smallest cluster (or subcluster) size of the
    /// scenario.
    pub(crate) unit: u64,
    pub(crate) max_size: u64,
    /// Guest view expected after the steps (qemu's rebase), if computed.
    pub(crate) expected_final: Option<Vec<u8>>,
    /// `(image, snapshot name, its view)` for internal snapshots.
    pub(crate) snapshots: Vec<(usize, String, Vec<u8>)>,
}

impl Fixture {
    pub(crate) fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no image {name}"))
    }
}

pub(crate) fn build(sc: &Scenario) -> Fixture {
    let dir = common::shm_tmpdir("crash.");
    let d = dir.path();
    let mut snapshots = Vec::new();
    for (img, spec) in sc.images.iter().enumerate() {
        if spec.size == 0 {
            continue;
        }
        let mut opts = format!(
            "cluster_size={},refcount_bits={},extended_l2={}",
            spec.cluster,
            spec.refcount_bits,
            if spec.extended_l2 { "on" } else { "off" }
        );
        if let Some(data) = spec.data_file {
            opts.push_str(&format!(",data_file={data}"));
        }
        let size = spec.size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
        if let Some(backing) = spec.backing {
            args.extend(["-b", backing, "-F", "qcow2"]);
        }
        args.extend([spec.name, &size]);
        qemu_img(d, &args);
        if !spec.cmds.is_empty() {
            qemu_io(d, "qcow2", spec.name, &spec.cmds);
        }
        if let Some(snap) = spec.internal_snapshot {
            qemu_img(d, &["snapshot", "-c", snap, spec.name]);
            let view = qemu_view(d, spec.name, Some(snap));
            snapshots.push((img, snap.to_owned(), view));
        }
    }
    let names: Vec<String> = sc.images.iter().map(|s| s.name.to_owned()).collect();
    let blank: Vec<bool> = sc.images.iter().map(|s| s.size == 0).collect();
    let initial: Vec<Vec<u8>> = sc
        .images
        .iter()
        .map(|s| {
            let path = d.join(s.name);
            match s.size == 0 && !path.exists() {
                true => Vec::new(),
                false => std::fs::read(path).expect("read image"),
            }
        })
        .collect();
    let expected_final = sc.rebase.map(|(overlay, backing)| {
        let copy = d.join("rebased");
        std::fs::create_dir(&copy).expect("mkdir");
        for name in &names {
            if d.join(name).exists() {
                std::fs::copy(d.join(name), copy.join(name)).expect("copy image");
            }
        }
        qemu_img(
            &copy,
            &[
                "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2", overlay,
            ],
        );
        qemu_view(&copy, overlay, None)
    });
    let unit = sc
        .images
        .iter()
        .filter(|s| s.size > 0)
        .map(|s| {
            if s.extended_l2 {
                s.cluster / 32
            } else {
                s.cluster
            }
        })
        .min()
        .expect("a scenario has images");
    let max_size = sc.images.iter().map(|s| s.size).max().unwrap_or(0);
    let root = names.iter().position(|n| n == sc.root).expect("root image");
    let data_files = sc
        .images
        .iter()
        .map(|s| {
            s.data_file
                .map(|d| names.iter().position(|n| n == d).expect("data file listed"))
        })
        .collect();
    Fixture {
        dir,
        data_files,
        names,
        initial: Rc::new(initial),
        blank,
        root,
        unit,
        max_size,
        expected_final,
        snapshots,
    }
}
