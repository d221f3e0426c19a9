//! Judging rebuilt images.

use super::*;

/// A mark with the images as the library reads them at that point.
pub(crate) struct MarkView {
    pub(crate) pos: usize,
    pub(crate) images: Vec<Option<Opened>>,
    /// A flush acknowledged its view ([`Mark::acknowledged`]).
    pub(crate) acknowledged: bool,
}

/// Which writes of one image a rebuilt state holds: its first `count`
/// writes, then (after the first one left out) the log indices in `extra`.
pub(crate) type Desc = (usize, usize, Vec<usize>);

/// A judged image: image, window of marks, the mark whose acknowledged
/// view it must hold (as the guest's image), fingerprints of what it reads.
pub(crate) type JudgeKey = (usize, usize, usize, Option<usize>, Vec<Fp>);

/// qemu-img check on image states, each distinct one once.
pub(crate) struct QemuChecker {
    pub(crate) dir: PathBuf,
    pub(crate) seen: HashMap<(usize, Fp), Result<(), String>>,
    pub(crate) runs: usize,
}

impl QemuChecker {
    pub(crate) fn check(
        &mut self,
        fx: &Fixture,
        img: usize,
        bytes: &[u8],
        fp: Fp,
    ) -> Result<(), String> {
        if let Some(result) = self.seen.get(&(img, fp)) {
            return result.clone();
        }
        self.runs += 1;
        let name = format!("check.{}", fx.names[img]);
        std::fs::write(self.dir.join(&name), bytes).expect("write image for qemu-img");
        // The backing file is not needed (and not opened): "backing": null;
        // nor is an external data file's content (a null device stands in).
        let external = bytes.len() >= 80 && be64(bytes, 72) & 4 != 0;
        let data = match external {
            true => r#","data-file":{"driver":"null-co"}"#,
            false => "",
        };
        let spec = format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{name}"}},"backing":null{data}}}"#
        );
        let args = ["check", spec.as_str()];
        let out = run(&self.dir, "qemu-img", &args);
        let benign = || only_missing_copied_flags(&String::from_utf8_lossy(&out.stderr));
        let mut result = match out.status.code() {
            Some(0 | 3) => Ok(()),
            Some(2) if benign() => Ok(()),
            _ => Err(format!(
                "qemu-img check {}: {}",
                fx.names[img],
                render(&self.dir, "qemu-img", &args, &out)
            )),
        };
        for (_, snap, expected) in fx.snapshots.iter().filter(|s| s.0 == img) {
            if result.is_ok() && qemu_view(&self.dir, &name, Some(snap)) != *expected {
                result = Err(format!(
                    "{}: internal snapshot {snap} no longer reads as it was taken",
                    fx.names[img]
                ));
            }
        }
        self.seen.insert((img, fp), result.clone());
        result
    }
}

/// Whether every error `qemu-img check` printed (`stderr`) is a COPIED
/// flag missing on a cluster whose refcount is 1: harmless (a write copies
/// the cluster instead of writing it in place), and unavoidable while an
/// internal snapshot is created (R15: the flags are cleared before the
/// references are counted; no order of two writes to two clusters keeps
/// `qemu-img check`'s "COPIED exactly when refcount is 1" at every cut).
/// A COPIED flag on a shared cluster is never accepted.
pub(crate) fn only_missing_copied_flags(stderr: &str) -> bool {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("ERROR")).collect();
    !errors.is_empty()
        && errors.iter().all(|line| {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .map(str::to_owned)
            };
            let entry = field("l2_entry=").or_else(|| field("l1_entry="));
            let copied = entry
                .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
                .map(|raw| raw >> 63 == 1);
            line.starts_with("ERROR OFLAG_COPIED")
                && field("refcount=").as_deref() == Some("1")
                && copied == Some(false)
        })
}

/// Per-scenario verdicts and counters.
pub(crate) struct Judge<'f> {
    pub(crate) sc: &'f Scenario,
    pub(crate) fx: &'f Fixture,
    pub(crate) rec: &'f Recording,
    pub(crate) marks: Vec<MarkView>,
    /// Images each image's view may depend on (its chains at all marks).
    pub(crate) relevant: Vec<Vec<usize>>,
    pub(crate) qemu: QemuChecker,
    pub(crate) fps: HashMap<Desc, Fp>,
    pub(crate) passed: HashSet<JudgeKey>,
    /// New reordered states seen by the replay (for qemu-img sampling).
    pub(crate) new_states: usize,
    pub(crate) units: Units,
    pub(crate) failures: Vec<String>,
}

impl<'f> Judge<'f> {
    pub(crate) fn new(sc: &'f Scenario, fx: &'f Fixture, rec: &'f Recording) -> Self {
        let n = fx.names.len();
        let mut marks = Vec::new();
        let mut failures = Vec::new();
        let mut state: Vec<Vec<u8>> = fx.initial.to_vec();
        let mut applied = 0;
        let mut previous: Vec<Option<Opened>> = vec![None; n];
        for (m, mark) in rec.marks.iter().enumerate() {
            for ev in &rec.events[applied..mark.pos] {
                if let Ev::Write { img, offset, data } = ev {
                    apply(&mut state[*img], *offset, data);
                }
            }
            applied = mark.pos;
            let mut images = Vec::new();
            for (img, previous) in previous.iter_mut().enumerate() {
                let opened = match open_fresh(&fx.names, &state, &fx.blank, img) {
                    Ok(opened) => opened,
                    Err(err) => {
                        failures.push(format!("mark {m} (after an API call returned): {err}"));
                        None
                    }
                };
                // Share equal views between marks.
                let opened = opened.map(|mut o| {
                    if let Some(p) = previous.as_ref() {
                        if *p.view == *o.view {
                            o.view = Rc::clone(&p.view);
                        }
                    }
                    o
                });
                previous.clone_from(&opened);
                images.push(opened);
            }
            // Between two calls of one step nothing is acknowledged yet.
            let holds = |root: &Opened| !mark.acknowledged || *root.view == *mark.shadow;
            match &images[mark.root] {
                Some(root) if root.chain == mark.chain && holds(root) => {}
                Some(root) => failures.push(format!(
                    "mark {m}: on disk, {} has chain {:?} and {} the acknowledged guest view; \
                     in memory the chain is {:?}",
                    fx.names[mark.root],
                    root.chain,
                    if *root.view == *mark.shadow {
                        "holds"
                    } else {
                        "does NOT hold"
                    },
                    mark.chain
                )),
                None => failures.push(format!(
                    "mark {m}: the guest's image {} is not on disk",
                    fx.names[mark.root]
                )),
            }
            marks.push(MarkView {
                pos: mark.pos,
                images,
                acknowledged: mark.acknowledged,
            });
        }
        let relevant = (0..n)
            .map(|img| {
                let mut set = vec![img];
                for mark in &marks {
                    for name in mark.images[img].iter().flat_map(|o| &o.chain) {
                        let i = fx.index(name);
                        // A layer's view depends on its data file too.
                        for i in [Some(i), fx.data_files[i]].into_iter().flatten() {
                            if !set.contains(&i) {
                                set.push(i);
                            }
                        }
                    }
                }
                set
            })
            .collect();
        let check_dir = fx.dir.path().join("check");
        std::fs::create_dir_all(&check_dir).expect("mkdir");
        Self {
            sc,
            fx,
            rec,
            marks,
            relevant,
            qemu: QemuChecker {
                dir: check_dir,
                seen: HashMap::new(),
                runs: 0,
            },
            fps: HashMap::new(),
            passed: HashSet::new(),
            new_states: 0,
            units: Units { size: fx.unit },
            failures,
        }
    }

    /// The marks a state may show for image `img`: from the last mark all of
    /// whose writes (of the images the view depends on) are on the disk, to
    /// the first mark at or after the cut.
    pub(crate) fn window(&self, img: usize, k: usize, first_missing: &[usize]) -> (usize, usize) {
        let stable = self.relevant[img]
            .iter()
            .map(|&r| first_missing[r])
            .min()
            .unwrap_or(k);
        let lo = self
            .marks
            .iter()
            .rposition(|m| m.pos <= stable)
            .unwrap_or(0);
        let hi = self
            .marks
            .iter()
            .position(|m| m.pos >= k)
            .unwrap_or(self.marks.len() - 1);
        (lo.min(hi), lo.max(hi))
    }

    pub(crate) fn fp(&mut self, desc: &Desc, bytes: &[u8]) -> Fp {
        if let Some(fp) = self.fps.get(desc) {
            return *fp;
        }
        let fp = fingerprint(bytes);
        self.fps.insert(desc.clone(), fp);
        fp
    }

    /// Judges one rebuilt state; `what` names it in failures. Returns
    /// whether every image passed.
    pub(crate) fn judge(
        &mut self,
        states: &[Vec<u8>],
        descs: &[Desc],
        (k, first_missing): (usize, &[usize]),
        reordered: bool,
        what: &dyn Fn() -> String,
    ) -> bool {
        let n = states.len();
        let fps: Vec<Fp> = (0..n).map(|i| self.fp(&descs[i], &states[i])).collect();
        let mut ok = true;
        let mut qemu_due = false;
        // The last API call that returned before the cut: whatever it
        // acknowledged was flushed, so no reordering may lose it from the
        // guest's image.
        let acked = self
            .marks
            .iter()
            .rposition(|m| m.pos <= k && m.acknowledged)
            .unwrap_or(0);
        for img in 0..n {
            let (lo, hi) = self.window(img, k, first_missing);
            let ack = (self.rec.marks[acked].root == img).then_some(acked);
            let key: JudgeKey = (
                img,
                lo,
                hi,
                ack,
                self.relevant[img].iter().map(|&r| fps[r]).collect(),
            );
            if self.passed.contains(&key) {
                continue;
            }
            qemu_due = true;
            match self.judge_image(states, img, (lo, hi), ack) {
                Ok(()) => {
                    self.passed.insert(key);
                }
                Err(err) => {
                    ok = false;
                    self.fail(format!("{}: {err}", what()), k);
                }
            }
        }
        // Every new power-cut state, and every `qemu_sample`-th new
        // reordered one, goes through qemu-img check.
        let sampled = !reordered || {
            self.new_states += usize::from(qemu_due);
            self.new_states % self.sc.qemu_sample == 1 % self.sc.qemu_sample
        };
        if qemu_due && sampled {
            for img in 0..n {
                if !has_magic(&states[img]) {
                    continue;
                }
                if let Err(err) = self.qemu.check(self.fx, img, &states[img], fps[img]) {
                    ok = false;
                    self.fail(format!("{}: {err}", what()), k);
                }
            }
        }
        ok
    }

    /// Judges image `img` of a rebuilt state against the marks `lo..=hi`;
    /// with `ack`, it is the guest's image at mark `ack` and must also hold
    /// the guest view acknowledged there (or a later one up to `hi`).
    pub(crate) fn judge_image(
        &self,
        states: &[Vec<u8>],
        img: usize,
        (lo, hi): (usize, usize),
        ack: Option<usize>,
    ) -> Result<(), String> {
        let fx = self.fx;
        let window = &self.marks[lo..=hi];
        let opened = open_fresh(&fx.names, states, &fx.blank, img)?;
        let Some(opened) = opened else {
            if ack.is_none() && window.iter().any(|m| m.images[img].is_none()) {
                return Ok(());
            }
            return Err(format!("{} lost its qcow2 header", fx.names[img]));
        };
        if let Some(ack) = ack {
            let last = hi.max(ack);
            let mut shadows: Vec<Rc<Vec<u8>>> = Vec::new();
            for mark in &self.rec.marks[ack..=last] {
                if !shadows.iter().any(|s| Rc::ptr_eq(s, &mark.shadow)) {
                    shadows.push(Rc::clone(&mark.shadow));
                }
            }
            if let Err(unit) = compare_units(&opened.view, &shadows, self.units) {
                return Err(format!(
                    "{}: acknowledged data lost: guest bytes {:#x}..{:#x} of the guest's image \
                     do not read as acknowledged at mark {ack}",
                    fx.names[img],
                    unit as u64 * fx.unit,
                    (unit as u64 + 1) * fx.unit
                ));
            }
        }
        let known: Vec<&Opened> = window
            .iter()
            .filter_map(|m| m.images[img].as_ref())
            .collect();
        if !known.iter().any(|o| o.chain == opened.chain) {
            let chains: Vec<&Vec<String>> = known.iter().map(|o| &o.chain).collect();
            return Err(format!(
                "{}: chain {:?} is neither the old nor the new one ({chains:?}, marks {lo}..={hi})",
                fx.names[img], opened.chain
            ));
        }
        let mut candidates: Vec<Rc<Vec<u8>>> = Vec::new();
        for o in &known {
            if !candidates.iter().any(|c| Rc::ptr_eq(c, &o.view)) {
                candidates.push(Rc::clone(&o.view));
            }
        }
        // Between two calls of one step the guest's image may also show
        // what the first call did, durable or not yet (the view the guest
        // was told of, not acknowledged).
        for mark in &self.rec.marks[lo..=hi] {
            if !mark.acknowledged && mark.root == img {
                candidates.push(Rc::clone(&mark.shadow));
            }
        }
        compare_units(&opened.view, &candidates, self.units).map_err(|unit| {
            format!(
                "{}: guest bytes {:#x}..{:#x} read as neither the old nor the new content \
                 (marks {lo}..={hi}: {} candidate views)",
                fx.names[img],
                unit as u64 * fx.unit,
                (unit as u64 + 1) * fx.unit,
                candidates.len()
            )
        })
    }

    pub(crate) fn fail(&mut self, message: String, k: usize) {
        if self.failures.len() < SHOWN_FAILURES {
            let context = describe_events(&self.rec.events, k, &self.fx.names);
            self.failures.push(format!("{message}\n{context}"));
        } else {
            self.failures.push(message);
        }
    }

    /// Power cuts at every point, and reordered unflushed writes.
    pub(crate) fn replay(&mut self) -> (usize, usize, usize, usize) {
        let events = &self.rec.events;
        let n = self.fx.names.len();
        let mut rng = Rng::new(0xc0ffee ^ events.len() as u64);
        let mut cur: Vec<Vec<u8>> = self.fx.initial.to_vec();
        let mut counts = vec![0usize; n];
        let mut unflushed: Vec<Vec<usize>> = vec![Vec::new(); n];
        let (mut cuts, mut cuts_ok, mut reordered, mut reordered_ok) = (0, 0, 0, 0);
        let mut seen_variants: HashSet<Vec<Desc>> = HashSet::new();
        // One set of buffers for every reordered state (allocating fresh
        // megabytes each time costs more than the checks).
        let mut state: Vec<Vec<u8>> = self.fx.initial.to_vec();
        for k in 0..=events.len() {
            if k > 0 {
                match &events[k - 1] {
                    Ev::Write { img, offset, data } => {
                        apply(&mut cur[*img], *offset, data);
                        counts[*img] += 1;
                        unflushed[*img].push(k - 1);
                    }
                    Ev::Flush { img } => unflushed[*img].clear(),
                }
            }
            let descs: Vec<Desc> = (0..n).map(|i| (i, counts[i], Vec::new())).collect();
            let first_missing = vec![k; n];
            cuts += 1;
            let what = || format!("power cut after event #{k} of {}", events.len());
            if self.judge(&cur, &descs, (k, &first_missing), false, &what) {
                cuts_ok += 1;
            }
            // A disk may reorder the writes issued since each image's last
            // flush: some of them may be lost while later ones are not.
            let mut pending: Vec<usize> = unflushed.iter().flatten().copied().collect();
            pending.sort_unstable();
            if pending.len() < 2 {
                continue;
            }
            for keep in subsets(&pending, &mut rng) {
                let dropped: Vec<usize> = pending
                    .iter()
                    .zip(&keep)
                    .filter(|(_, &kept)| !kept)
                    .map(|(&ev, _)| ev)
                    .collect();
                let mut descs = Vec::new();
                let mut first_missing = vec![k; n];
                for (img, pending) in unflushed.iter().enumerate() {
                    let mut count = counts[img] - pending.len();
                    let mut extra = Vec::new();
                    for &ev in pending {
                        if dropped.contains(&ev) {
                            first_missing[img] = first_missing[img].min(ev);
                        } else if first_missing[img] == k {
                            count += 1;
                        } else {
                            extra.push(ev);
                        }
                    }
                    descs.push((img, count, extra));
                }
                if !seen_variants.insert(descs.clone()) {
                    continue;
                }
                for (buf, initial) in state.iter_mut().zip(self.fx.initial.iter()) {
                    buf.clone_from(initial);
                }
                for (i, ev) in events[..k].iter().enumerate() {
                    if let Ev::Write { img, offset, data } = ev {
                        if !dropped.contains(&i) {
                            apply(&mut state[*img], *offset, data);
                        }
                    }
                }
                reordered += 1;
                let what = || {
                    let lost: Vec<String> = dropped.iter().map(|e| format!("#{}", e + 1)).collect();
                    format!(
                        "power cut after event #{k} of {}, unflushed writes {} lost",
                        events.len(),
                        lost.join(" ")
                    )
                };
                if self.judge(&state, &descs, (k, &first_missing), true, &what) {
                    reordered_ok += 1;
                }
            }
        }
        (cuts, cuts_ok, reordered, reordered_ok)
    }
}

/// Which of the `pending` (unflushed) writes reach the disk, as keep
/// masks, never all of them: every subset of up to 3 writes; otherwise the
/// newest write alone (it overtook every write it may depend on) and
/// [`REORDERINGS`] random subsets.
pub(crate) fn subsets(pending: &[usize], rng: &mut Rng) -> Vec<Vec<bool>> {
    let u = pending.len();
    if u <= 3 {
        return (0..(1u32 << u) - 1)
            .map(|bits| (0..u).map(|i| bits & (1 << i) != 0).collect())
            .collect();
    }
    let mut masks = vec![(0..u).map(|i| i == u - 1).collect::<Vec<bool>>()];
    for _ in 0..REORDERINGS {
        masks.push((0..u).map(|_| rng.next() & 1 == 0).collect());
    }
    masks.retain(|m| m.iter().any(|&kept| !kept));
    masks
}

/// The events just before cut `k`, for failure reports.
pub(crate) fn describe_events(events: &[Ev], k: usize, names: &[String]) -> String {
    let start = k.saturating_sub(24);
    let mut out = format!(
        "  events {}..={k} (the cut falls after event #{k}):\n",
        start + 1
    );
    for (i, ev) in events.iter().enumerate().take(k).skip(start) {
        let line = match ev {
            Ev::Write { img, offset, data } => format!(
                "    #{} write {} @{:#x} +{:#x}\n",
                i + 1,
                names[*img],
                offset,
                data.len()
            ),
            Ev::Flush { img } => format!("    #{} flush {}\n", i + 1, names[*img]),
        };
        out.push_str(&line);
    }
    out
}
