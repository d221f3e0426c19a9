//! The driver.

use super::*;

/// Which halves of the proof a test runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phases {
    All,
    PowerCuts,
    Faults,
}

pub(crate) fn prove(sc: Scenario) {
    prove_phases(sc, Phases::All);
}

pub(crate) fn prove_phases(sc: Scenario, phases: Phases) {
    let started = Instant::now();
    let fx = build(&sc);
    let rec = record(&sc, &fx);
    let writes = rec
        .events
        .iter()
        .filter(|e| matches!(e, Ev::Write { .. }))
        .count();
    let mut judge = Judge::new(&sc, &fx, &rec);

    // The library reads what qemu-img reads, before and after.
    let first = &judge.marks[0].images[fx.root];
    let qemu_first = qemu_view(fx.dir.path(), &fx.names[fx.root], None);
    assert!(
        first.as_ref().is_some_and(|o| *o.view == qemu_first),
        "{}: the library and qemu-img disagree on the initial view",
        sc.name
    );
    let final_states: Vec<Vec<u8>> = (0..fx.names.len())
        .map(|img| replay_image(&fx.initial[img], &rec.events, img))
        .collect();
    let final_dir = fx.dir.path().join("final");
    std::fs::create_dir_all(&final_dir).expect("mkdir");
    for (name, bytes) in fx.names.iter().zip(&final_states) {
        if !bytes.is_empty() {
            std::fs::write(final_dir.join(name), bytes).expect("write final image");
        }
    }
    let last_root = rec.marks.last().expect("marks").root;
    let qemu_last = qemu_view(&final_dir, &fx.names[last_root], None);
    assert!(
        qemu_last == rec.final_shadow,
        "{}: qemu-img reads the final images differently from the guest's writes",
        sc.name
    );
    if let Some(expected) = &fx.expected_final {
        assert!(
            *expected == rec.final_shadow,
            "{}: the final guest view is not what qemu-img rebase -u gives",
            sc.name
        );
    }
    let last = judge.marks.len() - 1;
    for (image, other) in &sc.final_equals {
        let (a, b) = (fx.index(image), fx.index(other));
        let got = judge.marks[last].images[a]
            .as_ref()
            .map(|o| Rc::clone(&o.view));
        let want = judge.marks[0].images[b]
            .as_ref()
            .map(|o| Rc::clone(&o.view));
        assert!(
            got.is_some() && got == want,
            "{}: {image} does not end with {other}'s old view",
            sc.name
        );
    }
    if let Some(covers) = sc.covers {
        covers(&fx, &final_states);
    }

    let mut lines = Vec::new();
    if phases != Phases::Faults {
        let (cuts, cuts_ok, reordered, reordered_ok) = judge.replay();
        lines.push(format!(
            "power cuts: {cuts} cut points tried, {cuts_ok} passed; {reordered} reordered \
             states tried, {reordered_ok} passed; qemu-img check on {} distinct images \
             ({:.1?})",
            judge.qemu.runs,
            started.elapsed()
        ));
    }
    if phases != Phases::PowerCuts {
        lines.extend(judge.fault_phase());
    }
    println!(
        "crash/{}: {} events ({writes} writes) on {} images, {} marks\n  {}\n  \
         qemu-img check runs in all: {}; total {:.1?}",
        sc.name,
        rec.events.len(),
        fx.names.len(),
        rec.marks.len(),
        lines.join("\n  "),
        judge.qemu.runs,
        started.elapsed()
    );
    if !judge.failures.is_empty() {
        let shown: Vec<&String> = judge.failures.iter().take(SHOWN_FAILURES).collect();
        panic!(
            "{}: {} failures; the first ones:\n{}",
            sc.name,
            judge.failures.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
