//! One way to stop: a [`Shutdown`] is cloned into every long-running task of a service (async
//! tasks and plain threads alike) and triggered once; each task finishes what it holds and
//! returns, and the service's `run(config, shutdown)` awaits them all (the mini-redis pattern).
//! Built with the `runtime` feature (tokio).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A stop signal shared by every task of a service.
#[derive(Clone, Debug)]
pub struct Shutdown(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    flag: Mutex<bool>,
    woken: Condvar,
    tx: tokio::sync::watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal not yet triggered.
    pub fn new() -> Self {
        Shutdown(Arc::new(Inner {
            flag: Mutex::new(false),
            woken: Condvar::new(),
            tx: tokio::sync::watch::channel(false).0,
        }))
    }

    /// Asks every task to stop (idempotent).
    pub fn trigger(&self) {
        *self.0.flag.lock().expect("shutdown flag") = true;
        self.0.woken.notify_all();
        self.0.tx.send_replace(true);
    }

    /// Whether a stop was asked for.
    pub fn is_triggered(&self) -> bool {
        *self.0.flag.lock().expect("shutdown flag")
    }

    /// For threads: waits up to `timeout`, returning early, with `true`, once a stop is asked
    /// for.
    pub fn sleep(&self, timeout: Duration) -> bool {
        let flag = self.0.flag.lock().expect("shutdown flag");
        let (flag, _) = self
            .0
            .woken
            .wait_timeout_while(flag, timeout, |stop| !*stop)
            .expect("shutdown flag");
        *flag
    }

    /// For async tasks: resolves once a stop is asked for (at once if it already was).
    pub async fn wait(&self) {
        let mut rx = self.0.tx.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Triggers this signal when `signal` resolves (Ctrl-C, a test's channel).
    pub async fn trigger_on(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.trigger();
    }
}

/// Resolves on Ctrl-C or SIGTERM: what a daemon's `main` passes as its shutdown.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_sleeping_thread_wakes_as_soon_as_the_stop_is_asked_for() {
        let s = Shutdown::new();
        assert!(!s.is_triggered());
        assert!(!s.sleep(Duration::from_millis(10)), "not triggered: the whole wait");
        let t = {
            let s = s.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                let stopped = s.sleep(Duration::from_secs(60));
                (stopped, start.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        s.trigger();
        let (stopped, waited) = t.join().unwrap();
        assert!(stopped && waited < Duration::from_secs(30), "{waited:?}");
        assert!(s.is_triggered() && s.sleep(Duration::from_secs(60)), "stays triggered");
    }

    #[tokio::test]
    async fn every_clone_and_every_waiter_sees_one_trigger() {
        let s = Shutdown::new();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.wait().await })
            })
            .collect();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let trigger = tokio::spawn(s.clone().trigger_on(async {
            let _ = rx.await;
        }));
        tx.send(()).unwrap();
        trigger.await.unwrap();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(10), w).await.unwrap().unwrap();
        }
        s.wait().await; // already triggered: at once
    }
}
