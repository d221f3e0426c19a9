//! The fault phase.

use super::*;

#[derive(Default)]
pub(crate) struct FaultStats {
    pub(crate) runs: u64,
    pub(crate) hit: u64,
    pub(crate) failed_calls: u64,
    pub(crate) absorbed: u64,
    pub(crate) advanced: u64,
}

/// The graph's root after a failure: name, chain, and the guest view the
/// disk must show (`None`: not compared).
pub(crate) type LiveRoot<'v> = (&'v str, &'v [String], Option<&'v [u8]>);

impl<'f> Judge<'f> {
    /// Checks every image on disk after a fault (or at the end of a run).
    /// `exact` holds the views the images must have (the recording's final
    /// ones); otherwise each unit must read as at some mark.
    pub(crate) fn disk_after(
        &mut self,
        events: &[Ev],
        live_root: Option<LiveRoot<'_>>,
        exact: bool,
        what: &str,
    ) {
        let fx = self.fx;
        let n = fx.names.len();
        let states: Vec<Vec<u8>> = (0..n)
            .map(|img| replay_image(&fx.initial[img], events, img))
            .collect();
        let last = self.marks.len() - 1;
        for img in 0..n {
            let opened = match open_fresh(&fx.names, &states, &fx.blank, img) {
                Ok(opened) => opened,
                Err(err) => {
                    self.failures.push(format!("{what}: {err}"));
                    continue;
                }
            };
            if let Some((root, chain, view)) = live_root {
                if fx.names[img] == root {
                    match &opened {
                        Some(o) if o.chain == chain && view.is_none_or(|v| *o.view == v) => {}
                        Some(o) => self.failures.push(format!(
                            "{what}: {root} on disk (chain {:?}) disagrees with the graph \
                             (chain {chain:?}){}",
                            o.chain,
                            if view.is_none_or(|v| *o.view == v) {
                                ""
                            } else {
                                ", and its view differs"
                            }
                        )),
                        None => self.failures.push(format!("{what}: {root} is not on disk")),
                    }
                }
            }
            let expected: Vec<&Option<Opened>> = if exact {
                vec![&self.marks[last].images[img]]
            } else {
                self.marks.iter().map(|m| &m.images[img]).collect()
            };
            match &opened {
                None if expected.iter().any(|e| e.is_none()) => {}
                None => self
                    .failures
                    .push(format!("{what}: {} has no qcow2 header", fx.names[img])),
                Some(o) => {
                    let known: Vec<&Opened> = expected.iter().filter_map(|e| e.as_ref()).collect();
                    let mut views: Vec<Rc<Vec<u8>>> =
                        known.iter().map(|k| Rc::clone(&k.view)).collect();
                    // What the first call of a step did, before the next
                    // one (judging.rs: unacknowledged marks).
                    let between = self.rec.marks.iter().filter(|m| !m.acknowledged);
                    views.extend(
                        between
                            .filter(|m| !exact && m.root == img)
                            .map(|m| Rc::clone(&m.shadow)),
                    );
                    if !known.iter().any(|k| k.chain == o.chain) {
                        self.failures.push(format!(
                            "{what}: {} has chain {:?}, which no fault-free run showed",
                            fx.names[img], o.chain
                        ));
                    } else if let Err(unit) = compare_units(&o.view, &views, self.units) {
                        self.failures.push(format!(
                            "{what}: {} reads wrong data at {:#x} ({})",
                            fx.names[img],
                            unit as u64 * fx.unit,
                            if exact {
                                "not the fault-free result"
                            } else {
                                "neither old nor new"
                            }
                        ));
                    }
                }
            }
            if has_magic(&states[img]) {
                let fp = fingerprint(&states[img]);
                if let Err(err) = self.qemu.check(fx, img, &states[img], fp) {
                    self.failures.push(format!("{what}: {err}"));
                }
            }
        }
    }

    /// One run with operation `n` of image `target` failing.
    pub(crate) fn fault_run(
        &mut self,
        storage: &mut Storage,
        (target, n): (usize, u64),
        stats: &mut FaultStats,
    ) -> bool {
        let (sc, fx, rec) = (self.sc, self.fx, self.rec);
        storage.reset(fx);
        let log = Rc::clone(&storage.log);
        let disk = Rc::clone(&storage.disks[target]);
        let label = format!(
            "{}: fault at operation {n} of {}",
            sc.name, fx.names[target]
        );
        let mut problems: Vec<String> = Vec::new();
        // What the graph showed after the failure: root, chain, guest view.
        let mut after_failure: Option<(String, Vec<String>, Vec<u8>)> = None;
        let mut failures = 0;
        let hit;
        {
            let mut resolver = ByName(LiveImages::new(storage, fx));
            let mut graph: Box<LiveGraph<'_>> = Box::default();
            let known = Rc::clone(&rec.marks[0].shadow);
            let mut live = Live::open(&mut graph, &mut resolver, fx, Some(&known));
            live.recording = false;
            disk.arm.set(Some(Some(n)));
            for (si, step) in sc.steps.iter().enumerate() {
                let before_chain = live.chain();
                let err = match live.do_step(step) {
                    Ok(()) => continue,
                    Err(err) => err,
                };
                stats.failed_calls += 1;
                failures += 1;
                let at = format!("{label}: step {si} ({step:?}) failed with \"{err}\"");
                if !disk.hit.get() {
                    problems.push(format!("{at}, but the fault was not reached"));
                    break;
                }
                if err.kind() != ErrorKind::Io {
                    problems.push(format!(
                        "{at}: reported as {:?}, not as the device's I/O error",
                        err.kind()
                    ));
                }
                // The graph: unchanged, or (rarely) advanced to the step's
                // result, and in memory what it is on disk.
                let chain = live.chain();
                let advanced = chain != before_chain && chain == rec.step_chains[si];
                if chain != before_chain && !advanced {
                    problems.push(format!(
                        "{at}: the chain became {chain:?} (before: {before_chain:?})"
                    ));
                }
                // Nothing acknowledged is lost; the failed request's units
                // read old or new.
                match live.live_view() {
                    Ok(view) => {
                        let mut candidates = vec![Rc::new(live.shadow.clone())];
                        if let Some((off, data)) = &live.pending {
                            let mut new = live.shadow.clone();
                            let off = *off as usize;
                            new[off..off + data.len()].copy_from_slice(data);
                            candidates.push(Rc::new(new));
                        }
                        if advanced {
                            candidates = vec![Rc::new(rec.step_shadows[si].clone())];
                        }
                        if let Err(unit) = compare_units(&view, &candidates, self.units) {
                            problems.push(format!(
                                "{at}: the guest reads wrong data at {:#x} after the failure",
                                unit as u64 * fx.unit
                            ));
                        }
                        if advanced {
                            live.shadow = view.clone();
                        }
                        let root = live.root().expect("backend root");
                        let root = live.graph.name(root).expect("live root").to_owned();
                        after_failure = Some((root, chain, view));
                    }
                    Err(e) => problems.push(format!("{at}: the guest cannot read: {e}")),
                }
                // Disk state right after the failure: the graph's chain, and
                // every unit old or new.
                let live_root = after_failure
                    .as_ref()
                    .map(|(root, chain, _)| (root.as_str(), chain.as_slice(), None));
                self.disk_after(&log.borrow(), live_root, false, &at);
                // With the fault gone, one flush writes back what the
                // failure left cached: then disk and graph agree exactly.
                disk.arm.set(Some(None));
                let flushed = live.root().and_then(|root| live.graph.flush(root));
                if let Err(e) = flushed {
                    problems.push(format!("{at}: the flush after the failure failed: {e}"));
                    break;
                }
                let live_root = after_failure.as_ref().map(|(root, chain, view)| {
                    (root.as_str(), chain.as_slice(), Some(view.as_slice()))
                });
                let flushed_at = format!("{at}, then a flush");
                self.disk_after(&log.borrow(), live_root, false, &flushed_at);
                // Repeat the failed call.
                live.pending = None;
                if advanced {
                    stats.advanced += 1;
                    continue;
                }
                if let Err(e) = live.do_step(step) {
                    problems.push(format!("{at}: the retry failed too: {e}"));
                    break;
                }
            }
            hit = disk.hit.get();
            if hit && problems.is_empty() {
                if failures == 0 {
                    stats.absorbed += 1;
                }
                match live.live_view() {
                    Ok(view) if view == rec.final_shadow && view == live.shadow => {}
                    Ok(_) => problems.push(format!(
                        "{label}: after the retry the guest does not read what a fault-free run reads"
                    )),
                    Err(e) => problems.push(format!("{label}: the guest cannot read: {e}")),
                }
                let chain = live.chain();
                let final_chain = rec.step_chains.last().cloned().unwrap_or_default();
                if chain != final_chain {
                    problems.push(format!(
                        "{label}: final chain {chain:?}, a fault-free run ends with {final_chain:?}"
                    ));
                }
            }
        }
        stats.runs += 1;
        if hit {
            stats.hit += 1;
            let what = format!("{label}: after the retry");
            self.disk_after(&log.borrow(), None, true, &what);
        }
        self.failures.extend(problems);
        hit
    }

    pub(crate) fn fault_phase(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        for &target in &self.sc.faults {
            let img = self.fx.index(target);
            let mut stats = FaultStats::default();
            let before = self.failures.len();
            let mut n = 0;
            let mut panics = 0;
            let mut storage = Storage::new(self.fx);
            loop {
                let result = catch_unwind(AssertUnwindSafe(|| {
                    self.fault_run(&mut storage, (img, n), &mut stats)
                }));
                match result {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(_) => {
                        self.failures.push(format!(
                            "{}: fault at operation {n} of {target}: PANIC (see the message above)",
                            self.sc.name
                        ));
                        panics += 1;
                        if panics > 20 {
                            break;
                        }
                    }
                }
                n += 1;
                assert!(
                    n < FAULT_LIMIT,
                    "{}: fault phase does not end",
                    self.sc.name
                );
            }
            lines.push(format!(
                "faults on {target}: N = 0..{n}: {} runs reached the fault, {} calls failed \
                 and were retried, {} faults absorbed, {} advanced; {} problems",
                stats.hit,
                stats.failed_calls,
                stats.absorbed,
                stats.advanced,
                self.failures.len() - before
            ));
        }
        lines
    }
}
