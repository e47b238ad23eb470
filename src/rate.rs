//! Event rates over the last second, as HAProxy's `freq_ctr` counts them: the events of the
//! current second plus the previous second's, weighted by how much of the current second is
//! still to come. Lock-free: one atomic word per second's count, a rotation when a new second
//! starts. Used for `show stat`'s `rate`, `rate_max`, `conn_rate` and `show info`'s ConnRate.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// Milliseconds since the process's first rate event (a monotonic clock).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Events per second, and the highest rate seen.
#[derive(Debug, Default)]
pub struct Rate {
    /// The second `curr` counts (seconds since the epoch above, +1 so that 0 means "never").
    sec: AtomicU64,
    curr: AtomicU64,
    prev: AtomicU64,
    max: AtomicU64,
}

impl Rate {
    /// Counts one event now.
    pub fn hit(&self) {
        let now = now_ms();
        self.rotate(now / 1000 + 1);
        self.curr.fetch_add(1, Relaxed);
        self.max.fetch_max(self.read_at(now), Relaxed);
    }

    /// Starts a new second if `sec` is past the counted one. Racing threads may lose an
    /// event or two at the boundary: these are statistics.
    fn rotate(&self, sec: u64) {
        let old = self.sec.load(Relaxed);
        if old == sec
            || self
                .sec
                .compare_exchange(old, sec, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        let curr = self.curr.swap(0, Relaxed);
        self.prev
            .store(if sec == old + 1 { curr } else { 0 }, Relaxed);
    }

    fn read_at(&self, now: u64) -> u64 {
        let sec = now / 1000 + 1;
        let counted = self.sec.load(Relaxed);
        let (curr, prev) = if counted == sec {
            (self.curr.load(Relaxed), self.prev.load(Relaxed))
        } else if counted + 1 == sec {
            (0, self.curr.load(Relaxed))
        } else {
            (0, 0)
        };
        let left = 1000 - now % 1000;
        curr + (prev * left).div_ceil(1000)
    }

    /// Events over the last second.
    pub fn read(&self) -> u64 {
        self.read_at(now_ms())
    }

    /// The highest [`Rate::read`] seen since start or [`Rate::clear_max`].
    pub fn max(&self) -> u64 {
        self.max.load(Relaxed)
    }

    /// `clear counters`: the max starts again from the current rate.
    pub fn clear_max(&self) {
        self.max.store(self.read(), Relaxed);
    }
}

/// How many samples an [`Average`] spans, as HAProxy's time averages ("last 1024 successful
/// connections").
const AVERAGE_SAMPLES: u64 = 1024;

/// A sliding average over the last [`AVERAGE_SAMPLES`] values (HAProxy's `swrate`), and the
/// highest value seen: `qtime`, `ctime`, `ttime` and their `_max` columns, in milliseconds.
#[derive(Debug, Default)]
pub struct Average {
    sum: AtomicU64,
    count: AtomicU64,
    max: AtomicU64,
}

impl Average {
    pub fn add(&self, v: u64) {
        let n = self.count.fetch_add(1, Relaxed) + 1;
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |sum| {
            Some(if n <= AVERAGE_SAMPLES {
                sum + v
            } else {
                sum - sum / AVERAGE_SAMPLES + v
            })
        });
        self.max.fetch_max(v, Relaxed);
    }

    /// The average of the last samples; 0 before the first.
    pub fn average(&self) -> u64 {
        let n = self.count.load(Relaxed).min(AVERAGE_SAMPLES);
        self.sum.load(Relaxed).checked_div(n).unwrap_or(0)
    }

    pub fn max(&self) -> u64 {
        self.max.load(Relaxed)
    }

    /// `clear counters`: the max starts again.
    pub fn clear_max(&self) {
        self.max.store(0, Relaxed);
    }
}

/// Client connections accepted by the whole process (`show info`'s ConnRate and SessRate).
pub static PROCESS_CONNS: Rate = Rate {
    sec: AtomicU64::new(0),
    curr: AtomicU64::new(0),
    prev: AtomicU64::new(0),
    max: AtomicU64::new(0),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_its_rate_and_the_max_remembers_it() {
        let r = Rate::default();
        assert_eq!(r.read(), 0);
        for _ in 0..5 {
            r.hit();
        }
        assert!((5..=10).contains(&r.read()), "{}", r.read());
        assert!(r.max() >= 5);
    }

    #[test]
    fn an_average_spans_the_last_samples() {
        let a = Average::default();
        assert_eq!(a.average(), 0);
        a.add(10);
        a.add(30);
        assert_eq!((a.average(), a.max()), (20, 30));
        for _ in 0..10 * AVERAGE_SAMPLES {
            a.add(5);
        }
        assert!((5..=6).contains(&a.average()), "{}", a.average());
        assert_eq!(a.max(), 30);
    }

    #[test]
    fn the_previous_second_fades_out() {
        let r = Rate::default();
        // 10 events in second 1, read at three points of second 2.
        r.rotate(2);
        r.curr.store(10, Relaxed);
        assert_eq!(r.read_at(2000), 10);
        assert_eq!(r.read_at(2500), 5);
        assert_eq!(r.read_at(2999), 1);
        // Two seconds later nothing is left.
        assert_eq!(r.read_at(3000), 0);
    }
}
