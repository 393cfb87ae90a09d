//! The model's compute threads: a pool of its own, shared by every engine
//! in the process and sized once (`[model] threads`, or
//! `GANGLION_MODEL_THREADS`, or cores − 1 on more than 2 cores).
//!
//! Why not candle's pool or rayon's: candle's barrier pool has the caller
//! spin, without limit, until every worker has finished its part. When the
//! cores are oversubscribed (plugin calls, the MQTT tasks, another
//! program) a worker that the scheduler has set aside keeps the caller
//! spinning for the rest of its time slice, and a decode step holds
//! hundreds of such waits. Here a job's items are taken from a shared
//! cursor by whoever is running, the caller included, so work that a
//! descheduled worker has not claimed is done by the others; the caller
//! waits only for parts already claimed, and yields its core while it
//! does. Idle workers spin about 50 µs (longer than the gap between the
//! products of one forward pass) and then sleep, leaving the cores to the
//! rest of the gateway.
//!
//! Limits: one job at a time (concurrent callers take turns); a job run
//! from inside a job runs inline on the calling thread.

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker, or a caller waiting on workers, spins before
/// it sleeps or yields.
const SPIN: Duration = Duration::from_micros(50);
/// Parts per thread a job is cut into: small enough that a slow or
/// descheduled thread leaves most of a job to the others.
const PARTS_PER_THREAD: usize = 8;

static POOL: OnceLock<Pool> = OnceLock::new();

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Sizes the process's pool to `threads` (at least 1) unless it exists
/// already, and returns its size.
pub fn configure(threads: usize) -> usize {
    POOL.get_or_init(|| Pool::new(threads)).threads()
}

/// The process's pool: as configured, else `GANGLION_MODEL_THREADS`, else
/// cores − 1 on more than 2 cores and all of them on 1 or 2.
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(default_threads()))
}

/// The default size described at [`pool`].
/// A value of `GANGLION_MODEL_THREADS` that is not a positive whole number
/// is logged and ignored.
pub fn default_threads() -> usize {
    let cores = || {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores > 2 { cores - 1 } else { cores }
    };
    let Ok(set) = std::env::var("GANGLION_MODEL_THREADS") else {
        return cores();
    };
    match set.trim().parse::<usize>() {
        Ok(n) if n > 0 => n,
        _ => {
            let default = cores();
            tracing::warn!(value = %set, threads = default, "GANGLION_MODEL_THREADS is not a positive whole number; using the default");
            default
        }
    }
}

/// Compute threads: `threads − 1` workers and the caller.
pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// One job at a time.
    turn: Mutex<()>,
}

struct Shared {
    /// The job that workers may join; `None` once its caller has taken
    /// it back.
    slot: Mutex<Option<Arc<Job>>>,
    ready: Condvar,
    /// Bumped for each job published (and at shutdown).
    generation: AtomicU64,
    /// Workers inside a job.
    active: AtomicUsize,
    sleeping: AtomicUsize,
    stop: AtomicBool,
}

struct Job {
    task: Task,
    items: usize,
    part: usize,
    next: AtomicUsize,
    panicked: AtomicBool,
}

/// The caller's closure, its lifetime erased: valid while the caller waits
/// in [`Pool::run`], which returns only when no worker is inside the job
/// and none can join it.
struct Task(*const (dyn Fn(Range<usize>) + Sync + 'static));
// SAFETY: the closure is `Sync`, and outlives every use (see above).
unsafe impl Send for Task {}
// SAFETY: as above.
unsafe impl Sync for Task {}

impl Job {
    /// Takes parts from the cursor until none is left.
    fn work(&self) {
        loop {
            let start = self.next.fetch_add(self.part, Ordering::Relaxed);
            if start >= self.items {
                return;
            }
            // SAFETY: see `Task`.
            let task = unsafe { &*self.task.0 };
            task(start..self.items.min(start + self.part));
        }
    }
}

impl Pool {
    /// A pool of `threads` (at least 1) compute threads, the caller among
    /// them.
    pub fn new(threads: usize) -> Pool {
        let workers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            slot: Mutex::new(None),
            ready: Condvar::new(),
            generation: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let mut started = 0;
        for i in 0..workers {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ganglion-model-{i}"))
                .spawn(move || worker(&shared));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "a model compute thread could not start; running with fewer");
                    break;
                }
            }
        }
        Pool {
            shared,
            workers: started,
            turn: Mutex::new(()),
        }
    }

    /// Compute threads, the caller included.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Calls `task` on disjoint ranges covering `0..items`, on the pool's
    /// threads and this one, and returns when all have returned. A panic
    /// in `task` is raised here once every thread has left the job.
    pub fn run(&self, items: usize, task: impl Fn(Range<usize>) + Sync) {
        if items == 0 {
            return;
        }
        let part = items.div_ceil(self.threads() * PARTS_PER_THREAD).max(1);
        if self.workers == 0 || items <= part || INSIDE.with(Cell::get) {
            task(0..items);
            return;
        }
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let task: &(dyn Fn(Range<usize>) + Sync) = &task;
        // SAFETY: only the lifetime is erased; `Retire` below keeps `task`
        // alive until no worker can reach it.
        let task = unsafe {
            std::mem::transmute::<
                *const (dyn Fn(Range<usize>) + Sync + '_),
                *const (dyn Fn(Range<usize>) + Sync + 'static),
            >(task)
        };
        let job = Arc::new(Job {
            task: Task(task),
            items,
            part,
            next: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        });
        {
            let mut slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(job.clone());
            self.shared.generation.fetch_add(1, Ordering::Release);
            if self.shared.sleeping.load(Ordering::Relaxed) > 0 {
                self.shared.ready.notify_all();
            }
        }
        // Taken back on every exit, unwinding included.
        let retire = Retire(&self.shared);
        INSIDE.with(|c| c.set(true));
        job.work();
        INSIDE.with(|c| c.set(false));
        drop(retire);
        if job.panicked.load(Ordering::Relaxed) {
            panic!("a model compute thread panicked");
        }
    }
}

/// Takes the job back from the workers and waits until none is inside it.
struct Retire<'a>(&'a Shared);

impl Drop for Retire<'_> {
    fn drop(&mut self) {
        INSIDE.with(|c| c.set(false));
        *self.0.slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let start = Instant::now();
        while self.0.active.load(Ordering::Acquire) > 0 {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.generation.fetch_add(1, Ordering::Release);
        self.shared.ready.notify_all();
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while shared.generation.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut slot = shared.slot.lock().unwrap_or_else(|e| e.into_inner());
                shared.sleeping.fetch_add(1, Ordering::Relaxed);
                while shared.generation.load(Ordering::Acquire) == seen {
                    slot = shared.ready.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
                shared.sleeping.fetch_sub(1, Ordering::Relaxed);
                break;
            }
        }
        let job = {
            let slot = shared.slot.lock().unwrap_or_else(|e| e.into_inner());
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            seen = shared.generation.load(Ordering::Acquire);
            match slot.as_ref() {
                Some(job) => {
                    shared.active.fetch_add(1, Ordering::AcqRel);
                    job.clone()
                }
                None => continue,
            }
        };
        INSIDE.with(|c| c.set(true));
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.work())).is_err() {
            job.panicked.store(true, Ordering::Relaxed);
        }
        INSIDE.with(|c| c.set(false));
        drop(job);
        shared.active.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_done_once_whatever_the_threads() {
        for threads in [1, 2, 3, 8] {
            let pool = Pool::new(threads);
            for items in [0usize, 1, 7, 64, 1000] {
                let hits: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
                pool.run(items, |range| {
                    for i in range {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "{threads} threads, {items} items"
                );
            }
        }
    }

    #[test]
    fn workers_share_the_job() {
        let pool = Pool::new(3);
        let names = Mutex::new(std::collections::HashSet::new());
        // Long enough parts that the workers wake before the caller is done.
        for _ in 0..50 {
            pool.run(24, |_| {
                names
                    .lock()
                    .unwrap()
                    .insert(std::thread::current().name().map(str::to_owned));
                std::thread::sleep(Duration::from_millis(1));
            });
        }
        assert!(names.lock().unwrap().len() > 1);
    }

    #[test]
    fn concurrent_callers_and_nested_jobs_complete() {
        let pool = Arc::new(Pool::new(2));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    let total = AtomicUsize::new(0);
                    for _ in 0..200 {
                        pool.run(16, |range| {
                            for _ in range {
                                pool.run(4, |inner| {
                                    total.fetch_add(inner.len(), Ordering::Relaxed);
                                });
                            }
                        });
                    }
                    total.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 200 * 16 * 4);
        }
    }

    #[test]
    fn a_panic_in_a_part_reaches_the_caller_and_the_pool_goes_on() {
        let pool = Pool::new(2);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, |range| {
                if range.contains(&40) {
                    panic!("part 40");
                }
            })
        }));
        assert!(caught.is_err());
        let done = AtomicUsize::new(0);
        pool.run(64, |range| {
            done.fetch_add(range.len(), Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 64);
    }
}
