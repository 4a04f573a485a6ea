//! The compute threads: one rayon pool that the model's steps run on, apart from rayon's global
//! pool (which other work in the process, such as compiling plugins, shares), so a step's
//! parallel loops neither wait behind that work nor pick it up while they wait.

use std::sync::OnceLock;

use rayon::{ThreadPool, ThreadPoolBuilder};

/// The pool, built on first use with rayon's default size (`RAYON_NUM_THREADS`, else one
/// thread per logical CPU); `None` if its threads could not be started.
fn pool() -> Option<&'static ThreadPool> {
    static POOL: OnceLock<Option<ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| ThreadPoolBuilder::new().thread_name(|i| format!("openlora-compute-{i}")).build().ok()).as_ref()
}

/// Runs `op` on one of the compute threads, so every parallel loop inside it runs on that
/// pool and starts there at once (rather than being handed to a pool from outside and waited
/// for). Where the pool could not be started, `op` runs on rayon's global pool.
pub fn run<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(p) => p.install(op),
        None => rayon::scope(|_| op()),
    }
}

/// Threads a step's parallel loops are split between.
pub fn threads() -> usize {
    pool().map_or_else(rayon::current_num_threads, ThreadPool::current_num_threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_the_compute_threads() {
        let name = run(|| std::thread::current().name().map(str::to_owned));
        assert!(name.is_some_and(|n| n.starts_with("openlora-compute-")), "not on a compute thread");
        assert!(threads() >= 1);
        // Nested parallel loops stay on the pool.
        let names: Vec<bool> = run(|| {
            use rayon::prelude::*;
            (0..8)
                .into_par_iter()
                .map(|_| std::thread::current().name().is_some_and(|n| n.starts_with("openlora-compute-")))
                .collect()
        });
        assert!(names.into_iter().all(|b| b));
    }
}
