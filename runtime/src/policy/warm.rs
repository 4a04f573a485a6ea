//! The server-wide budget of warm plugin instances: however many plugins are installed, at most
//! `policy.warm_instances_total` configured instances wait ready at once. Pools of plugins that
//! go unused shrink to nothing, and when the budget is short the least recently used pools give
//! theirs up first. An instance a call needs beyond the budget is created on demand.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

/// How long a plugin may go uncalled before its warm pool is emptied.
pub(crate) const WARM_IDLE: Duration = Duration::from_secs(30);

/// How often the background thread looks for idle pools.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// A pool of warm instances the budget can shrink.
pub(crate) trait WarmPool: Send + Sync {
    /// Milliseconds (on the budget's clock) of the pool's last call.
    fn last_used_ms(&self) -> u64;
    /// How many instances it holds.
    fn warm_len(&self) -> usize;
    /// Drops every instance it holds, returning them to the budget.
    fn empty_pool(&self);
}

/// Counts warm instances across every plugin and shrinks pools to keep within the budget.
pub(crate) struct WarmBudget {
    /// Most warm instances at once, all plugins together.
    limit: usize,
    /// Warm instances held now.
    held: AtomicUsize,
    /// Set when a pool could not grow: the next sweep frees the least recently used pools.
    short: AtomicBool,
    /// Every plugin version loaded (dropped ones are pruned by the sweep).
    pools: Mutex<Vec<Weak<dyn WarmPool>>>,
    started: Instant,
    last_sweep_ms: AtomicU64,
}

impl WarmBudget {
    /// A budget of `limit` warm instances.
    pub(crate) fn new(limit: usize) -> Self {
        WarmBudget {
            limit,
            held: AtomicUsize::new(0),
            short: AtomicBool::new(false),
            pools: Mutex::new(Vec::new()),
            started: Instant::now(),
            last_sweep_ms: AtomicU64::new(0),
        }
    }

    /// Milliseconds since the budget was made: the clock pools stamp their last call with.
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Warm instances held now, all plugins together.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes room for one more warm instance; `false` (and a note to free some) when full.
    pub(crate) fn reserve(&self) -> bool {
        let taken =
            self.held.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < self.limit).then_some(n + 1)).is_ok();
        if !taken {
            self.short.store(true, Ordering::Relaxed);
        }
        taken
    }

    /// Gives back room for `n` warm instances (taken for a call, or dropped).
    pub(crate) fn release(&self, n: usize) {
        if n > 0 {
            self.held.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Registers a pool for sweeping.
    pub(crate) fn track(&self, pool: Weak<dyn WarmPool>) {
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).push(pool);
    }

    /// Sweeps if [`SWEEP_EVERY`] has passed since the last sweep.
    pub(crate) fn sweep_if_due(&self) {
        let now = self.now_ms();
        let last = self.last_sweep_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= SWEEP_EVERY.as_millis() as u64
            && self.last_sweep_ms.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            self.sweep(now);
        }
    }

    /// Empties the pools of plugins idle for [`WARM_IDLE`]; when a pool could not grow since the
    /// last sweep, also the least recently used pools until a quarter of the budget is free.
    pub(crate) fn sweep(&self, now: u64) {
        let live: Vec<_> = {
            let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            pools.retain(|p| p.strong_count() > 0);
            pools.iter().filter_map(Weak::upgrade).collect()
        };
        let idle_ms = WARM_IDLE.as_millis() as u64;
        let mut holding = Vec::new();
        for pool in live.into_iter().filter(|p| p.warm_len() > 0) {
            let last = pool.last_used_ms();
            if now.saturating_sub(last) >= idle_ms {
                pool.empty_pool();
            } else {
                holding.push((last, pool));
            }
        }
        if self.short.swap(false, Ordering::Relaxed) {
            holding.sort_by_key(|(last, _)| *last);
            let target = self.limit - self.limit / 4;
            for (_, pool) in holding {
                if self.held() <= target {
                    break;
                }
                pool.empty_pool();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Pool {
        budget: Arc<WarmBudget>,
        last: u64,
        held: AtomicUsize,
    }

    impl WarmPool for Pool {
        fn last_used_ms(&self) -> u64 {
            self.last
        }
        fn warm_len(&self) -> usize {
            self.held.load(Ordering::Relaxed)
        }
        fn empty_pool(&self) {
            self.budget.release(self.held.swap(0, Ordering::Relaxed));
        }
    }

    fn pool(budget: &Arc<WarmBudget>, last: u64, fill: usize) -> Arc<Pool> {
        let p = Arc::new(Pool { budget: budget.clone(), last, held: AtomicUsize::new(0) });
        for _ in 0..fill {
            if budget.reserve() {
                p.held.fetch_add(1, Ordering::Relaxed);
            }
        }
        let weak: Weak<dyn WarmPool> = Arc::downgrade(&(p.clone() as Arc<dyn WarmPool>));
        budget.track(weak);
        p
    }

    #[test]
    fn the_budget_caps_warm_instances_and_idle_pools_give_theirs_back() {
        let budget = Arc::new(WarmBudget::new(8));
        let old = pool(&budget, 0, 4);
        let recent = pool(&budget, 40_000, 4);
        let late = pool(&budget, 40_000, 4);
        assert_eq!((budget.held(), late.warm_len()), (8, 0), "the budget is a hard cap");
        budget.sweep(40_000);
        assert_eq!((old.warm_len(), recent.warm_len()), (0, 4), "the idle pool was emptied");
        assert!(!budget.short.load(Ordering::Relaxed));
    }

    #[test]
    fn when_short_the_least_recently_used_pools_are_emptied_first() {
        let budget = Arc::new(WarmBudget::new(8));
        let older = pool(&budget, 100, 4);
        let newer = pool(&budget, 200, 4);
        assert!(!budget.reserve(), "full");
        budget.sweep(300);
        assert_eq!((older.warm_len(), newer.warm_len()), (0, 4));
        drop(older);
        budget.sweep(300);
        assert_eq!(budget.pools.lock().unwrap().len(), 2 - 1, "dropped plugins are pruned");
    }
}
