//! What the demo shows while it runs: a refreshing table on a terminal, plain lines otherwise.

use std::io::Write as _;
use std::time::{Duration, Instant};

use super::traffic::{ROUTES, Stats};
use crate::cmd::audit::summary::NO_POLICY_PERMITS;

/// How often plain (non-terminal) output prints a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The live view.
#[derive(Debug)]
pub struct Display {
    tty: bool,
    /// Table lines on screen, to move back over.
    drawn: usize,
    svids_shown: usize,
    announced: Vec<bool>,
    last_progress: Instant,
    duration: Duration,
}

impl Display {
    /// A view for a terminal (`tty`) or for a pipe or file.
    pub fn new(tty: bool, duration: Duration) -> Self {
        Display {
            tty,
            drawn: 0,
            svids_shown: 0,
            announced: vec![false; ROUTES.len()],
            last_progress: Instant::now(),
            duration,
        }
    }

    /// Prints one line (above the table on a terminal).
    pub fn line(&mut self, text: &str) {
        self.clear_table();
        out(&format!("{text}\n"));
    }

    /// Shows what changed since the last call.
    pub fn tick(&mut self, stats: &Stats) {
        let elapsed = stats.started.elapsed();
        let mut lines = Vec::new();
        for change in stats.svids.iter().skip(self.svids_shown) {
            let expires = clock(change.expires);
            lines.push(if change.first {
                format!(
                    "[{:>5.1}s] identity: {}-proxy holds its first SVID (spiffe://{}/ns/shop/sa/{}), expires {expires}",
                    change.at.as_secs_f64(),
                    change.service,
                    super::TRUST_DOMAIN,
                    change.service
                )
            } else {
                format!(
                    "[{:>5.1}s] rotation: {}-proxy swapped in a renewed SVID, expires {expires} (no restart, no dropped call)",
                    change.at.as_secs_f64(),
                    change.service
                )
            });
        }
        self.svids_shown = stats.svids.len();
        for ((route, s), announced) in ROUTES.iter().zip(&stats.routes).zip(&mut self.announced) {
            if *announced || s.allowed + s.denied == 0 {
                continue;
            }
            let Some(by) = &s.decided_by else { continue };
            *announced = true;
            let verdict = match (s.denied > 0 && s.allowed == 0, by.as_str()) {
                (true, NO_POLICY_PERMITS) => "denied: no policy permits".to_owned(),
                (true, _) => format!("denied by {by}"),
                (false, _) => format!("allowed by {by}"),
            };
            lines.push(format!(
                "[{:>5.1}s] {} -> {} {} {}: {verdict} ({})",
                elapsed.as_secs_f64(),
                route.caller,
                route.callee,
                route.method,
                route.path,
                s.last
            ));
        }
        if !self.tty && self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            let (calls, allowed, denied, failed) = totals(stats);
            lines.push(format!(
                "[{:>5.1}s] {calls} calls: {allowed} allowed, {denied} denied, {failed} failed",
                elapsed.as_secs_f64()
            ));
        }
        if self.tty {
            self.clear_table();
            let mut text = String::new();
            for line in &lines {
                text.push_str(line);
                text.push('\n');
            }
            let table = table(stats, elapsed, self.duration);
            self.drawn = table.len();
            for line in table {
                text.push_str(&line);
                text.push('\n');
            }
            out(&text);
        } else if !lines.is_empty() {
            out(&(lines.join("\n") + "\n"));
        }
    }

    /// Leaves the last table on screen; later output goes below it.
    pub fn finish(&mut self) {
        self.drawn = 0;
    }

    fn clear_table(&mut self) {
        if self.tty && self.drawn > 0 {
            out(&format!("\x1b[{}A\x1b[J", self.drawn));
            self.drawn = 0;
        }
    }
}

/// Calls, allowed, denied, failed over every route.
pub fn totals(stats: &Stats) -> (u64, u64, u64, u64) {
    stats.routes.iter().fold((0, 0, 0, 0), |(c, a, d, f), s| {
        (
            c + s.allowed + s.denied + s.unanswered,
            a + s.allowed,
            d + s.denied,
            f + s.failed,
        )
    })
}

fn table(stats: &Stats, elapsed: Duration, duration: Duration) -> Vec<String> {
    let (calls, allowed, denied, failed) = totals(stats);
    let mut lines = vec![
        format!(
            "-- meshward demo  {:>4.0}s of {}s  {calls} calls: {allowed} allowed, {denied} denied, {failed} failed  (Ctrl-C stops)",
            elapsed.as_secs_f64(),
            duration.as_secs()
        ),
        format!(
            "   {:<9} {:<9} {:<14} {:>7} {:>7} {:>6}  {:<34} {}",
            "caller", "callee", "request", "allowed", "denied", "failed", "decided by", "last"
        ),
    ];
    for (route, s) in ROUTES.iter().zip(&stats.routes) {
        lines.push(format!(
            "   {:<9} {:<9} {:<14} {:>7} {:>7} {:>6}  {:<34} {}",
            route.caller,
            route.callee,
            format!("{} {}", route.method, route.path),
            s.allowed,
            s.denied,
            s.failed,
            s.decided_by.as_deref().unwrap_or("..."),
            s.last
        ));
    }
    lines
}

/// `HH:MM:SS` UTC of a unix time.
pub fn clock(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!("{:02}:{:02}:{:02} UTC", t.hour(), t.minute(), t.second()),
        Err(_) => format!("unix {unix}"),
    }
}

/// Writes to stdout; a closed stdout only loses the view, never stops the demo.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}
