//! Overlapping jobs (030 TestParallelOps overlapping cases).

use super::*;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Req {
    /// stream(active = node a, base = node b or none)
    Stream(usize, Option<usize>),
    /// commit(active = node4, top, base)
    Commit(usize, usize),
}

impl Req {
    /// Node indices whose backing links the job freezes: from its start node
    /// (the stream's node; the commit top's overlay, or the active layer for
    /// an active commit) down to, not including, base.
    pub(crate) fn links(self, active: usize) -> Vec<usize> {
        let (from, base) = match self {
            Req::Stream(a, b) => (a, b),
            Req::Commit(top, base) => (if top == active { top } else { top + 1 }, Some(base)),
        };
        let stop = base.map_or(0, |b| b + 1);
        (stop..=from).rev().collect()
    }

    pub(crate) fn start<D: Device>(
        self,
        graph: &mut Graph<D>,
        n: &[NodeId],
        active: usize,
    ) -> blockgraph::Result<JobId> {
        match self {
            Req::Stream(a, b) => graph.start_stream(StreamRequest {
                active: n[a],
                base: b.map(|b| n[b]),
                on_error: OnError::Report,
            }),
            Req::Commit(top, base) => graph.start_commit(CommitRequest {
                active: n[active],
                top: n[top],
                base: n[base],
                on_error: OnError::Report,
            }),
        }
    }
}

/// Cancels a freshly started job and removes it.
pub(crate) fn cancel_and_dismiss<D: Device, R: Resolver<D>>(
    graph: &mut Graph<D>,
    resolver: &mut R,
    job: JobId,
    scratch: &mut [u8],
) {
    graph.job_cancel(job).unwrap();
    let last = finish(graph, resolver, job, scratch);
    assert!(last.cancelled);
    graph.job_dismiss(job).unwrap();
}

#[test]
fn overlapping_jobs_are_refused() {
    let dir = scratch_dir();
    let d = dir.path();
    let mut rng = Rng::new(71);
    let names: Vec<String> = (0..5).map(|i| format!("node{i}.qcow2")).collect();
    for (i, name) in names.iter().enumerate() {
        let backing = i.checked_sub(1).map(|b| names[b].as_str());
        make_layer(d, name, MIB, 64 * KIB, backing, &mut rng, 4);
    }
    let view = guest_view(d, "node4.qcow2");
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "node4.qcow2"));
    let before = chain(&graph, active);
    let n: Vec<NodeId> = before.iter().rev().copied().collect(); // n[i] is node i
    let mut scratch = vec![0u8; SCRATCH];

    let running = Req::Stream(4, Some(2));
    let job = running.start(&mut graph, &n, 4).unwrap();
    graph.job_step(job, &mut resolver, &mut scratch).unwrap();
    let held = running.links(4);
    let cases = [
        Req::Stream(4, None),
        Req::Stream(4, Some(0)),
        Req::Stream(4, Some(3)),
        Req::Stream(3, Some(1)),
        Req::Stream(3, Some(2)),
        Req::Stream(2, Some(0)),
        Req::Stream(2, None),
        Req::Stream(1, None),
        Req::Commit(4, 0),
        Req::Commit(4, 3),
        Req::Commit(3, 2),
        Req::Commit(3, 1),
        Req::Commit(2, 1),
        Req::Commit(2, 0),
        Req::Commit(1, 0),
    ];
    let mut table = format!("with {running:?} running (links {held:?} frozen):\n");
    let mut wrong = 0;
    for req in cases {
        let busy = req.links(4).iter().any(|l| held.contains(l));
        let got = req.start(&mut graph, &n, 4);
        let got_text = match &got {
            Ok(_) => "accepted".to_owned(),
            Err(e) => format!("{:?}", e.kind()),
        };
        let ok = match &got {
            Ok(_) => !busy,
            Err(e) => busy && e.kind() == ErrorKind::Busy,
        };
        wrong += usize::from(!ok);
        table += &format!(
            "  {:<22} needs links {:<16} expected {:<9} got {got_text}{}\n",
            format!("{req:?}"),
            format!("{:?}", req.links(4)),
            if busy { "Busy" } else { "accepted" },
            if ok { "" } else { "   <-- WRONG" }
        );
        if let Ok(other) = got {
            graph.job_step(other, &mut resolver, &mut scratch).unwrap();
            cancel_and_dismiss(&mut graph, &mut resolver, other, &mut scratch);
        }
    }
    println!("{table}");
    assert_eq!(wrong, 0, "{table}");
    assert_eq!(chain(&graph, active), before);

    // The accepted commit runs beside the stream; both finish.
    let commit = Req::Commit(1, 0).start(&mut graph, &n, 4).unwrap();
    // With that commit running, node2's link is held too.
    assert_eq!(
        Req::Stream(2, Some(0))
            .start(&mut graph, &n, 4)
            .map(|_| ())
            .map_err(|e| e.kind()),
        Err(ErrorKind::Busy)
    );
    let mut done = [false; 2];
    for _ in 0..STEP_LIMIT {
        for (i, &job) in [job, commit].iter().enumerate() {
            if !done[i] {
                done[i] = graph.job_step(job, &mut resolver, &mut scratch).unwrap()
                    == JobStatus::Concluded;
            }
        }
        if done == [true; 2] {
            break;
        }
    }
    assert_eq!(done, [true; 2]);
    for job in [job, commit] {
        assert_eq!(info(&graph, job).error, None);
        graph.job_dismiss(job).unwrap();
    }
    assert_eq!(
        chain(&graph, active),
        vec![n[4], n[2], n[0]],
        "chain: {:?}",
        chain_names(&graph, active)
    );
    assert_same("view", &read_backend(&mut graph, backend), &view);
    graph.detach_backend(backend).unwrap();
    drop(graph);
    for name in &names {
        check(d, name);
    }
    assert_same("qemu-img's view", &guest_view(d, "node4.qcow2"), &view);
}
