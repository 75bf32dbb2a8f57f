//! A counting gate: bounds how many threads do something at once (decode images, for one).

use std::sync::Mutex;

/// A counting gate: at most `n` holders at a time, the others wait.
#[derive(Debug)]
pub struct Gate {
    held: Mutex<usize>,
    freed: std::sync::Condvar,
    n: usize,
}

/// A place in a [`Gate`], given back when dropped.
#[derive(Debug)]
pub struct GateSeat<'a>(&'a Gate);

impl Gate {
    /// A gate of `n` seats (at least one).
    pub fn new(n: usize) -> Self {
        Gate {
            held: Mutex::new(0),
            freed: std::sync::Condvar::new(),
            n: n.max(1),
        }
    }

    /// Waits for a seat.
    pub fn enter(&self) -> GateSeat<'_> {
        let mut held = self.held.lock().expect("gate lock");
        while *held >= self.n {
            held = self.freed.wait(held).expect("gate lock");
        }
        *held += 1;
        GateSeat(self)
    }
}

impl Drop for GateSeat<'_> {
    fn drop(&mut self) {
        *self.0.held.lock().expect("gate lock") -= 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn no_more_than_n_are_inside_at_once_and_everyone_gets_in() {
        let gate = Arc::new(Gate::new(2));
        let (inside, most, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gate, inside, most, done) = (gate.clone(), inside.clone(), most.clone(), done.clone());
                std::thread::spawn(move || {
                    let _seat = gate.enter();
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    inside.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(done.load(Ordering::SeqCst), 8);
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }
}
