//! A call's deadline counts the CPU time of the thread running it, not the wall clock: a plugin
//! is not charged for time its thread was not running (the machine stalled, another process or
//! thread had the core), which would record an honest plugin's failure and count it towards
//! quarantine. (CPU time itself still varies with the machine: a busy sibling hyperthread or a
//! saturated memory bus slows the same work.) No host call a plugin can make blocks, so its CPU
//! time is its running time; a wall-clock backstop of [`WALL_BACKSTOP`] deadlines, counted from
//! the start of the request's call (including making an instance when none was ready), still
//! bounds every call.
//!
//! The epoch ticker only wakes the check: when a store's epoch deadline passes, wasmtime calls
//! [`CallClock::verdict`] on the running thread, which interrupts the call or extends it by the
//! CPU time it has left.

use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;

/// The wall-clock time a call may take, in deadlines, however little CPU time it used.
pub(crate) const WALL_BACKSTOP: u32 = 10;

/// When the current call started, on the wall clock and on its thread's CPU clock.
pub(crate) struct CallClock {
    wall: Instant,
    cpu: Option<Duration>,
}

impl CallClock {
    /// Starts timing a call on the current thread.
    pub(crate) fn start() -> Self {
        CallClock { wall: Instant::now(), cpu: thread_cpu_time() }
    }

    /// A new CPU budget on the current thread, keeping the wall-clock start: the call that
    /// follows making its instance shares that instantiation's backstop.
    pub(crate) fn restart_cpu(&self) -> Self {
        CallClock { wall: self.wall, cpu: thread_cpu_time() }
    }

    /// CPU time the current thread has used since the clock started; `None` where it cannot
    /// be read.
    pub(crate) fn cpu_used(&self) -> Option<Duration> {
        Some(thread_cpu_time()?.saturating_sub(self.cpu?))
    }

    /// What to do when the epoch deadline of a call with `limit` passes: interrupt it if it used
    /// `limit` of CPU time (the wall clock where the thread's CPU clock is unreadable) or
    /// [`WALL_BACKSTOP`] times `limit` of wall time; otherwise let it run until the first of the
    /// two could be reached, in epoch ticks of `tick`.
    pub(crate) fn verdict(&self, limit: Duration, tick: Duration) -> UpdateDeadline {
        let wall = self.wall.elapsed();
        let used = self.cpu_used().unwrap_or(wall);
        let backstop = limit * WALL_BACKSTOP;
        if used >= limit || wall >= backstop {
            return UpdateDeadline::Interrupt;
        }
        UpdateDeadline::Continue(ticks((limit - used).min(backstop - wall), tick))
    }
}

/// Epoch ticks (of `tick`) covering `d`, at least one.
pub(crate) fn ticks(d: Duration, tick: Duration) -> u64 {
    (d.as_nanos().div_ceil(tick.as_nanos().max(1)) as u64).max(1)
}

/// CPU time (user and system) the calling thread has used; `None` where it cannot be read.
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec that outlives the call; the clock id is a
        // constant every unix libc defines.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_sleeping_on_the_wall_clock_keeps_its_cpu_budget() {
        let clock = CallClock::start();
        std::thread::sleep(Duration::from_millis(30));
        match clock.verdict(Duration::from_millis(20), Duration::from_millis(1)) {
            UpdateDeadline::Continue(t) => assert!((1..=20).contains(&t), "{t}"),
            _ => panic!("a thread that slept used no CPU time: it must continue"),
        }
        // Past the backstop, it stops whatever its CPU time.
        assert!(matches!(clock.verdict(Duration::from_millis(2), Duration::from_millis(1)), UpdateDeadline::Interrupt));
    }

    #[test]
    fn a_call_spinning_is_stopped_at_its_cpu_budget() {
        let clock = CallClock::start();
        let start = thread_cpu_time().expect("this thread's CPU clock");
        let mut x = 0u64;
        while thread_cpu_time().expect("CPU clock").saturating_sub(start) < Duration::from_millis(6) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(matches!(clock.verdict(Duration::from_millis(5), Duration::from_millis(1)), UpdateDeadline::Interrupt));
    }

    #[test]
    fn a_call_near_its_backstop_is_checked_again_at_the_backstop() {
        let clock = CallClock::start();
        std::thread::sleep(Duration::from_millis(30));
        // 30 ms of a 40 ms backstop gone (limit 4 ms, little CPU used): at most 10 more ticks.
        match clock.verdict(Duration::from_millis(4), Duration::from_millis(1)) {
            UpdateDeadline::Continue(t) => assert!(t <= 10, "{t}"),
            _ => panic!("under its backstop and its CPU budget: it must continue"),
        }
        // A restarted CPU budget keeps the wall-clock start.
        let again = clock.restart_cpu();
        assert!(matches!(again.verdict(Duration::from_millis(2), Duration::from_millis(1)), UpdateDeadline::Interrupt));
    }

    #[test]
    fn ticks_round_up_and_never_reach_zero() {
        let ms = Duration::from_millis(1);
        assert_eq!(ticks(Duration::from_micros(1500), ms), 2);
        assert_eq!(ticks(Duration::ZERO, ms), 1);
        assert_eq!(ticks(Duration::from_millis(100), ms), 100);
    }
}
