//! Privileged end-to-end tests of the live view as a person sees it: vmatrace runs in a real
//! terminal (tmux, driven with `send-keys` and read with `capture-pane`) on a busy
//! multi-threaded process; the screen shows a status line redrawn in place, a bounded number
//! of lines per second, and a summary once Ctrl-C stops it.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use tracer::output::live_view::MAX_LINES_PER_SECOND;

/// A tmux server of this test's own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cols: u32, rows: u32) -> Self {
        assert!(
            std::path::Path::new("/usr/bin/tmux").exists(),
            "tmux is needed for this test: `cargo xtask setup` installs Debian's tmux"
        );
        let t = Tmux {
            socket: format!("vmatrace-test-{}", std::process::id()),
        };
        let o = t
            .cmd()
            .args(["new-session", "-d", "-s", "live", "-x"])
            .arg(cols.to_string())
            .arg("-y")
            .arg(rows.to_string())
            .arg("bash --norc --noprofile")
            .output()
            .expect("tmux runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // A long scrollback, so that the whole run can be read back.
        t.run(&["set-option", "-t", "live", "history-limit", "100000"]);
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let o = self.cmd().args(args).output().expect("tmux runs");
        assert!(
            o.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Types `keys` (tmux key names: `Enter`, `C-c`, or text).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "live"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// What is on the screen now.
    fn screen(&self) -> Vec<String> {
        self.run(&["capture-pane", "-p", "-t", "live"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Everything the pane showed, wrapped lines joined.
    fn history(&self) -> Vec<String> {
        self.run(&["capture-pane", "-p", "-J", "-S", "-", "-t", "live"])
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

/// The status line on a screen: its last non-empty line, when it is one.
fn status_line(screen: &[String]) -> Option<&String> {
    screen
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("[vmatrace tracing]"))
}

/// The time column (`   1.23s`) of a line of the live view.
fn time_of(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?;
    t.strip_suffix('s')?.parse().ok()
}

#[test]
fn the_live_view_of_a_busy_process_is_readable_and_ctrl_c_leaves_a_summary() {
    if !privileged("the_live_view_of_a_busy_process_is_readable_and_ctrl_c_leaves_a_summary") {
        return;
    }
    let w = workload();
    let tmux = Tmux::start(120, 40);
    let command = format!(
        "{} -- {} busy 4 120; echo VMATRACE-DONE $?",
        vmatrace().display(),
        w.display()
    );
    let started = Instant::now();
    tmux.keys(&[&command, "Enter"]);

    // While it runs: the bottom line is the status line, redrawn in place with the time going
    // on (it may be cleared for an instant while lines are written).
    std::thread::sleep(Duration::from_secs(2));
    let mut shown = Vec::new();
    for _ in 0..20 {
        if let Some(l) = status_line(&tmux.screen()) {
            shown.push(l.clone());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        shown.len() >= 10,
        "the status line is on the screen most of the time: {} of 20 looks, screen:\n{}",
        shown.len(),
        tmux.screen().join("\n")
    );
    for l in &shown {
        assert!(
            l.contains("process") && l.contains("events/s") && l.contains("lost"),
            "{l}"
        );
        assert!(l.chars().count() < 120, "fits the terminal: {l}");
    }
    let elapsed: Vec<&str> = shown
        .iter()
        .filter_map(|l| l.split(", ").find(|p| p.ends_with(" elapsed")))
        .collect();
    assert!(
        elapsed.first() != elapsed.last(),
        "the status line is redrawn with the time going on: {shown:?}"
    );

    tmux.keys(&["C-c"]);
    let mut screen = Vec::new();
    wait_for(120, "vmatrace to end after Ctrl-C", || {
        screen = tmux.screen();
        screen.iter().any(|l| l.starts_with("VMATRACE-DONE"))
    });
    let ran = started.elapsed().as_secs_f64();

    // The summary is on the screen, the status line gone from it and from the scrollback:
    // it never went into the output.
    assert!(
        screen.iter().any(|l| l == "=== vmatrace summary ==="),
        "{}",
        screen.join("\n")
    );
    assert!(screen.iter().any(|l| l.starts_with("lost events: ")));
    let history = tmux.history();
    assert!(
        !history.iter().any(|l| l.contains("[vmatrace tracing]")),
        "a status line was left in the output:\n{}",
        history.join("\n")
    );
    // The banner says what is traced and how to stop.
    assert!(
        history
            .iter()
            .any(|l| l.starts_with("vmatrace: tracing `") && l.contains("busy 4 120")),
        "{}",
        history.join("\n")
    );
    assert!(history.iter().any(|l| l.contains("Ctrl-C to stop")));

    // The lines of the run: each second has at most the view's bound, and the whole run no
    // more than that many a second (every event on its own line is thousands a second).
    let lines: Vec<(f64, &String)> = history
        .iter()
        .take_while(|l| *l != "=== vmatrace summary ===")
        .filter_map(|l| time_of(l).map(|t| (t, l)))
        .collect();
    assert!(
        lines.iter().any(|(_, l)| l.contains("faults")),
        "the view shows what happened: {lines:#?}"
    );
    assert!(
        lines.len() as f64 <= MAX_LINES_PER_SECOND as f64 * (ran + 1.0),
        "{} lines in {ran:.1} s",
        lines.len()
    );
    let mut per_second = std::collections::BTreeMap::new();
    for (t, _) in &lines {
        *per_second.entry(*t as u64).or_insert(0usize) += 1;
    }
    // A window is a second of wall time, its lines labelled with the time of its latest event:
    // while the reader is behind (a loaded machine: load 12 on two cores), two or three
    // windows can carry the same second (56 lines seen once). The rate over the run is bounded
    // above by the wall time itself.
    for (second, n) in &per_second {
        assert!(
            *n <= 3 * MAX_LINES_PER_SECOND,
            "{n} lines in second {second}: {lines:#?}"
        );
    }
    eprintln!(
        "{} lines in {ran:.1} s ({:.1} a second); busiest second: {:?}",
        lines.len(),
        lines.len() as f64 / ran,
        per_second.values().max()
    );
}
