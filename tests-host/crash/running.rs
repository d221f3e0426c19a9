//! Running an operation on a live graph.

use super::*;

/// An API call has returned: the log position and what the guest sees.
pub(crate) struct Mark {
    pub(crate) pos: usize,
    /// The backend's root image.
    pub(crate) root: usize,
    /// The backend's chain (names, top first).
    pub(crate) chain: Vec<String>,
    /// The acknowledged guest view.
    pub(crate) shadow: Rc<Vec<u8>>,
    /// A flush acknowledged the view here; else the mark only names a
    /// state the disk may show between two API calls of one step.
    pub(crate) acknowledged: bool,
}

pub(crate) fn writable() -> OpenOptions {
    OpenOptions {
        read_only: false,
        writable_devices: true,
        ..OpenOptions::probing()
    }
}

/// The live side of one run: the graph, the guest's backend and a shadow
/// of everything the guest was told is written.
pub(crate) struct Live<'g, 'a> {
    pub(crate) graph: &'g mut LiveGraph<'a>,
    pub(crate) resolver: &'g mut LiveResolver<'a>,
    pub(crate) names: &'g [String],
    pub(crate) backend: BackendId,
    pub(crate) shadow: Vec<u8>,
    pub(crate) shadow_rc: Rc<Vec<u8>>,
    /// The guest request in flight: offset and the bytes it should leave.
    pub(crate) pending: Option<(u64, Vec<u8>)>,
    pub(crate) marks: Vec<Mark>,
    /// Keep marks (the recording run); fault runs do not need them.
    pub(crate) recording: bool,
    pub(crate) log: Log,
    pub(crate) scratch: Vec<u8>,
    /// The guest's view when each internal snapshot was taken, by name.
    pub(crate) snapshot_views: Vec<(&'static str, Vec<u8>)>,
}

impl<'g, 'a> Live<'g, 'a> {
    /// Opens the scenario's chain and attaches the guest's backend; the
    /// guest's initial view is read unless `known`.
    pub(crate) fn open(
        graph: &'g mut LiveGraph<'a>,
        resolver: &'g mut LiveResolver<'a>,
        fx: &'g Fixture,
        known: Option<&[u8]>,
    ) -> Self {
        let log = Rc::clone(&resolver.0.log);
        let node = graph
            .open_image(resolver, &fx.names[fx.root], writable())
            .expect("open the scenario's chain");
        let backend = graph
            .attach_backend(node, Access::READ_WRITE_DEVICE)
            .expect("attach the guest's backend");
        graph.unref(node).expect("the backend holds the root");
        let mut live = Self {
            graph,
            resolver,
            names: &fx.names,
            backend,
            shadow: Vec::new(),
            shadow_rc: Rc::default(),
            pending: None,
            marks: Vec::new(),
            recording: true,
            log,
            scratch: vec![0u8; SCRATCH],
            snapshot_views: Vec::new(),
        };
        live.shadow = match known {
            Some(view) => view.to_vec(),
            None => live.live_view().expect("read the initial view"),
        };
        live.mark();
        live
    }

    pub(crate) fn root(&self) -> blockgraph::Result<NodeId> {
        self.graph.root(self.backend)
    }

    pub(crate) fn chain(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut node = self.root().ok();
        while let Some(n) = node {
            names.push(self.graph.name(n).expect("live node").to_owned());
            node = self.graph.backing(n).expect("live node");
        }
        names
    }

    /// The node of image `name` in the backend's chain.
    pub(crate) fn node(&self, name: &str) -> blockgraph::Result<NodeId> {
        let mut node = Some(self.root()?);
        while let Some(n) = node {
            if self.graph.name(n)? == name {
                return Ok(n);
            }
            node = self.graph.backing(n)?;
        }
        Err(Error::new(ErrorKind::NotFound, "image not in the chain"))
    }

    pub(crate) fn live_view(&mut self) -> blockgraph::Result<Vec<u8>> {
        let root = self.root()?;
        let mut view = vec![0u8; self.graph.size(root)? as usize];
        self.graph.backend_read(self.backend, 0, &mut view)?;
        Ok(view)
    }

    pub(crate) fn mark(&mut self) {
        self.push_mark(true);
    }

    /// A mark between two API calls of one step whose first is not
    /// acknowledged yet (no flush): a view the disk may show, not one it
    /// must keep.
    pub(crate) fn intermediate_mark(&mut self) {
        if let Some((off, new)) = self.pending.take() {
            let off = off as usize;
            self.shadow[off..off + new.len()].copy_from_slice(&new);
        }
        self.push_mark(false);
    }

    fn push_mark(&mut self, acknowledged: bool) {
        if !self.recording {
            return;
        }
        if *self.shadow_rc != self.shadow {
            self.shadow_rc = Rc::new(self.shadow.clone());
        }
        let root = self.root().expect("backend root");
        let name = self.graph.name(root).expect("live root");
        let root = self
            .names
            .iter()
            .position(|n| n == name)
            .expect("root is a scenario image");
        let chain = self.chain();
        self.marks.push(Mark {
            pos: self.log.borrow().len(),
            root,
            chain,
            shadow: Rc::clone(&self.shadow_rc),
            acknowledged,
        });
    }

    /// Records the guest request in flight; it becomes acknowledged with
    /// [`Live::acknowledge`].
    pub(crate) fn begin(&mut self, off: u64, new: Vec<u8>) {
        self.pending = Some((off, new));
    }

    pub(crate) fn acknowledge(&mut self) {
        if let Some((off, new)) = self.pending.take() {
            let off = off as usize;
            self.shadow[off..off + new.len()].copy_from_slice(&new);
        }
        self.mark();
    }

    /// [`Step::Requests`]: the writes and a flush through a request
    /// engine, drained before returning (also on failure: nothing stays in
    /// flight); the first failure is returned.
    pub(crate) fn requests_in_flight(
        &mut self,
        writes: &[(u64, u64, u64)],
    ) -> blockgraph::Result<()> {
        let data: Vec<Vec<u8>> = writes
            .iter()
            .map(|&(_, len, seed)| pattern(seed, len))
            .collect();
        let mut new = self.shadow.clone();
        for (&(off, ..), bytes) in writes.iter().zip(&data) {
            new[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        }
        self.begin(0, new);
        // Lent metadata buffers: the flush writes the table updates back
        // split-phase (R3's order as device operations).
        let mut metadata = vec![0u8; 2 * 4096];
        // And copy buffers: the copy-on-write of allocating writes goes to
        // the device as operations of its own.
        let mut copies = vec![0u8; 4 * 65536];
        let mut engine: Engine<'_> = Engine::new();
        for buf in metadata.chunks_mut(4096) {
            engine.lend_metadata_buffer(buf).unwrap();
        }
        for buf in copies.chunks_mut(65536) {
            engine.lend_copy_buffer(buf).unwrap();
        }
        for (&(off, ..), bytes) in writes.iter().zip(&data) {
            engine.submit_write(self.backend, off, [&bytes[..]])?;
        }
        let flush = engine.submit_flush(self.backend)?;
        let (mut most, mut most_allocations) = (0, 0);
        let flushed = loop {
            engine.poll(self.graph);
            most = most.max(engine.operations());
            most_allocations = most_allocations.max(engine.allocations_in_flight());
            if let Some(done) = engine.take(flush)? {
                break done.result;
            }
        };
        // The guest learns its writes are durable when the flush completes.
        let mut result = flushed;
        engine.drain(self.graph);
        while let Some((_, done)) = engine.complete() {
            result = result.and(done.result);
        }
        result?;
        assert!(
            most > 1,
            "the requests never had device writes in flight together"
        );
        // (A retry after a fault may find the clusters mapped already.)
        assert!(
            !self.recording || most_allocations > 1,
            "allocating writes never had their data in flight together"
        );
        self.acknowledge();
        Ok(())
    }

    pub(crate) fn guest_write(&mut self, off: u64, len: u64, seed: u64) -> blockgraph::Result<()> {
        let data = pattern(seed, len);
        self.begin(off, data.clone());
        self.graph.backend_write(self.backend, off, &data)?;
        self.graph.backend_flush(self.backend)?;
        self.acknowledge();
        Ok(())
    }

    pub(crate) fn do_step(&mut self, step: &Step) -> blockgraph::Result<()> {
        self.pending = None;
        match step {
            Step::Write { off, len, seed } => self.guest_write(*off, *len, *seed),
            Step::WriteV {
                off,
                len,
                seed,
                segments,
            } => {
                let data = pattern(*seed, *len);
                let mut rng = Rng::new(*seed);
                let mut cuts: Vec<usize> = (1..*segments)
                    .map(|_| (rng.next() % (*len + 1)) as usize)
                    .collect();
                cuts.sort_unstable();
                let mut list: Vec<&[u8]> = Vec::new();
                let mut at = 0;
                for cut in cuts {
                    list.push(&data[at..cut]);
                    at = cut;
                }
                list.push(&data[at..]);
                self.begin(*off, data.clone());
                self.graph.backend_writev(self.backend, *off, &list)?;
                self.graph.backend_flush(self.backend)?;
                self.acknowledge();
                Ok(())
            }
            Step::Requests(writes) => self.requests_in_flight(writes),
            Step::Zero { off, len } => {
                self.begin(*off, vec![0u8; *len as usize]);
                let root = self.root()?;
                self.graph.write_zeroes(root, *off, *len)?;
                self.graph.flush(root)?;
                self.acknowledge();
                Ok(())
            }
            Step::ZeroThenWrite {
                zero: (zoff, zlen),
                write: (woff, wlen, seed),
            } => {
                let data = pattern(*seed, *wlen);
                self.begin(*zoff, vec![0u8; *zlen as usize]);
                let root = self.root()?;
                self.graph.write_zeroes(root, *zoff, *zlen)?;
                // The zeros alone: a view the disk may show until the write.
                self.intermediate_mark();
                self.begin(*woff, data.clone());
                self.graph.backend_write(self.backend, *woff, &data)?;
                self.graph.flush(root)?;
                self.acknowledge();
                Ok(())
            }
            Step::Discard { off, len } => {
                // Whole clusters read zeros afterwards (v3: the zero flag
                // over a backing file, unallocated without one); partial
                // clusters are left alone.
                let root = self.root()?;
                let cs = self.graph.qcow2(root)?.cluster_size();
                let size = self.graph.size(root)?;
                let mut new = self.shadow[*off as usize..(*off + *len) as usize].to_vec();
                let mut cluster = off.div_ceil(cs) * cs;
                while cluster < off + len {
                    let end = (cluster + cs).min(size);
                    if end <= off + len {
                        new[(cluster - off) as usize..(end - off) as usize].fill(0);
                    }
                    cluster += cs;
                }
                self.begin(*off, new);
                self.graph.discard(root, *off, *len)?;
                self.graph.flush(root)?;
                self.acknowledge();
                Ok(())
            }
            Step::Collapse { top, base } => {
                let root = self.root()?;
                let top = self.node(top)?;
                let base = match base {
                    Some(base) => Some(self.node(base)?),
                    None => None,
                };
                self.graph
                    .drop_intermediate(&mut *self.resolver, root, top, base)?;
                // The dropped layers' data is gone from the guest's view: what
                // it reads now is the new acknowledged state.
                self.shadow = self.live_view()?;
                self.mark();
                Ok(())
            }
            Step::Commit { top, base, writes } => {
                let request = CommitRequest {
                    active: self.root()?,
                    top: self.node(top)?,
                    base: self.node(base)?,
                    on_error: OnError::Report,
                };
                let job = self.graph.start_commit(request)?;
                self.mark();
                let result = self.drive(job, writes);
                if result.is_err() {
                    self.abandon(job);
                }
                result
            }
            Step::Stream { base } => {
                let base = match base {
                    Some(base) => Some(self.node(base)?),
                    None => None,
                };
                let request = StreamRequest {
                    active: self.root()?,
                    base,
                    on_error: OnError::Report,
                };
                let job = self.graph.start_stream(request)?;
                self.mark();
                let result = self.drive(job, &[]);
                if result.is_err() {
                    self.abandon(job);
                }
                result
            }
            Step::Snapshot { image } => {
                let device = self.resolver.0.take(image, true)?;
                let root = self.root()?;
                let overlay = self
                    .graph
                    .snapshot(&mut *self.resolver, root, device, image)?;
                self.graph.unref(overlay)?;
                self.mark();
                Ok(())
            }
            Step::InternalSnapshot { name } => {
                let root = self.root()?;
                self.graph.create_internal_snapshot(root, name, (0, 0))?;
                self.snapshot_views.push((*name, self.shadow.clone()));
                self.mark();
                Ok(())
            }
            Step::ApplyInternalSnapshot { name } => {
                let root = self.root()?;
                let applied = self.graph.apply_internal_snapshot(root, name);
                // Past its commit the snapshot's data is the guest's, also
                // when a later part of the call failed (R17).
                let taken = self.snapshot_views.iter().find(|(n, _)| *n == *name);
                let view = taken.map(|(_, view)| view.clone());
                // (On a failure the one fault is spent: the view reads.)
                let now_snapshot = match (&applied, &view) {
                    (Ok(()), _) => true,
                    (Err(_), Some(view)) => self.live_view().is_ok_and(|live| live == *view),
                    (Err(_), None) => false,
                };
                if now_snapshot {
                    self.shadow = match view {
                        Some(view) => view,
                        None => self.live_view()?,
                    };
                }
                applied?;
                self.mark();
                Ok(())
            }
            Step::DeleteInternalSnapshot { name } => {
                let root = self.root()?;
                let mut present = false;
                self.graph.visit_snapshots(root, |info| {
                    present |= info.name == *name;
                    Ok(())
                })?;
                if present {
                    self.graph.delete_internal_snapshot(root, name)?;
                }
                self.mark();
                Ok(())
            }
        }
    }

    /// Steps `job` to its end with `writes` in between; an active commit is
    /// completed once ready and every write is done.
    pub(crate) fn drive(&mut self, job: JobId, writes: &[GuestWrite]) -> blockgraph::Result<()> {
        let mut done = 0;
        let mut completed = false;
        for steps in 1..=STEP_LIMIT {
            let status = self
                .graph
                .job_step(job, &mut *self.resolver, &mut self.scratch)?;
            self.mark();
            match status {
                JobStatus::Concluded => {
                    let info = self.graph.job_info(job)?;
                    self.graph.job_dismiss(job)?;
                    return info.error.map_or(Ok(()), Err);
                }
                JobStatus::Paused => {
                    return Err(Error::new(ErrorKind::Io, "job paused on an error"));
                }
                _ => {}
            }
            while done < writes.len() && writes[done].after_step <= steps {
                let w = writes[done];
                self.guest_write(w.off, w.len, w.seed)?;
                done += 1;
            }
            if status == JobStatus::Ready && done == writes.len() && !completed {
                self.graph.job_complete(job)?;
                completed = true;
            }
        }
        panic!("job did not conclude in {STEP_LIMIT} steps");
    }

    /// Ends a job after a failure: cancel, step it out, dismiss.
    pub(crate) fn abandon(&mut self, job: JobId) {
        let Ok(info) = self.graph.job_info(job) else {
            return;
        };
        if info.status != JobStatus::Concluded {
            let _ = self.graph.job_cancel(job);
            for _ in 0..STEP_LIMIT {
                match self
                    .graph
                    .job_step(job, &mut *self.resolver, &mut self.scratch)
                {
                    Ok(JobStatus::Concluded) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        let _ = self.graph.job_dismiss(job);
    }
}

/// What a fault-free run of the operation did.
pub(crate) struct Recording {
    pub(crate) events: Vec<Ev>,
    pub(crate) marks: Vec<Mark>,
    /// The backend's chain after each step.
    pub(crate) step_chains: Vec<Vec<String>>,
    /// The guest's view after each step.
    pub(crate) step_shadows: Vec<Vec<u8>>,
    pub(crate) final_shadow: Vec<u8>,
}

pub(crate) fn record(sc: &Scenario, fx: &Fixture) -> Recording {
    let mut storage = Storage::new(fx);
    let log = Rc::clone(&storage.log);
    let (marks, step_chains, step_shadows, final_shadow) = {
        let mut resolver = ByName(LiveImages::new(&mut storage, fx));
        let mut graph: Box<LiveGraph<'_>> = Box::default();
        let mut live = Live::open(&mut graph, &mut resolver, fx, None);
        let mut step_chains = Vec::new();
        let mut step_shadows = Vec::new();
        for (i, step) in sc.steps.iter().enumerate() {
            live.do_step(step)
                .unwrap_or_else(|e| panic!("{}: step {i} {step:?} failed: {e}", sc.name));
            step_chains.push(live.chain());
            step_shadows.push(live.shadow.clone());
        }
        let view = live.live_view().expect("read the final view");
        assert!(
            view == live.shadow,
            "{}: the guest's view differs from what it wrote",
            sc.name
        );
        (
            std::mem::take(&mut live.marks),
            step_chains,
            step_shadows,
            live.shadow,
        )
    };
    let events = std::mem::take(&mut *log.borrow_mut());
    Recording {
        events,
        marks,
        step_chains,
        step_shadows,
        final_shadow,
    }
}
