//! Failed logins slow down whoever keeps failing: after a few failures for one user name, or
//! from one address, further tries wait, longer after each failure (up to a quarter of an hour).
//! A success clears the count.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed before tries wait.
pub const FREE_FAILURES: u32 = 5;
/// The longest wait.
pub const MAX_WAIT: Duration = Duration::from_secs(15 * 60);
/// Names and addresses remembered at most (the least recent forgotten first).
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    until: Option<Instant>,
}

/// Failed logins per key (`user:<name>`, `addr:<ip>`).
#[derive(Debug, Default)]
pub struct Throttle(Mutex<HashMap<String, Failures>>);

impl Throttle {
    /// How long `key` must still wait before a try, if at all.
    pub fn wait(&self, key: &str, now: Instant) -> Option<Duration> {
        let map = self.0.lock().expect("throttle");
        map.get(key)
            .and_then(|f| f.until)
            .and_then(|u| u.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Counts a failure of `key`.
    pub fn failed(&self, key: &str, now: Instant) {
        let mut map = self.0.lock().expect("throttle");
        if map.len() >= MAX_KEYS
            && !map.contains_key(key)
            && let Some(oldest) = map.iter().min_by_key(|(_, f)| f.last).map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        let f = map.entry(key.to_string()).or_insert(Failures {
            count: 0,
            last: now,
            until: None,
        });
        f.count += 1;
        f.last = now;
        if f.count >= FREE_FAILURES {
            let doubling = (f.count - FREE_FAILURES).min(10);
            f.until = Some(now + (Duration::from_secs(2) * 2u32.pow(doubling)).min(MAX_WAIT));
        }
    }

    /// A success of `key`: its failures are forgotten.
    pub fn succeeded(&self, key: &str) {
        self.0.lock().expect("throttle").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_wait_after_a_few_failures_longer_each_time_and_a_success_clears_them() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for i in 0..FREE_FAILURES - 1 {
            t.failed("user:tech", t0);
            assert_eq!(t.wait("user:tech", t0), None, "failure {}", i + 1);
        }
        t.failed("user:tech", t0);
        assert_eq!(t.wait("user:tech", t0), Some(Duration::from_secs(2)));
        t.failed("user:tech", t0);
        assert_eq!(t.wait("user:tech", t0), Some(Duration::from_secs(4)));
        for _ in 0..30 {
            t.failed("user:tech", t0);
        }
        assert_eq!(t.wait("user:tech", t0), Some(MAX_WAIT));
        assert_eq!(t.wait("user:tech", t0 + MAX_WAIT), None, "the wait ends");
        assert_eq!(t.wait("addr:10.0.0.9", t0), None, "other keys are not slowed");
        t.succeeded("user:tech");
        assert_eq!(t.wait("user:tech", t0), None);
    }
}
