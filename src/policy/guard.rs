//! What bounds an evaluation where the engine does not look: inside one builtin call.
//!
//! regorus checks its timer and an evaluation's memory budget between instructions, but a
//! single builtin call (`numbers.range(1, 100000000)`, `net.cidr_expand("10.0.0.0/8")`, a
//! `sort` of a huge array) runs to its end between two such checks. What such a call does
//! check inside its loops is the process-wide allocator ceiling
//! (`regorus::set_global_memory_limit`), which Coral leaves unset otherwise. The guard is a
//! watchdog thread that looks at every running evaluation each tick: one past its time limit,
//! or one during which the process grew by more than the budgets of all the evaluations
//! running at the time, is marked, and the ceiling is lowered to zero so that the call fails
//! at its next check and the evaluation with it. The ceiling is lifted as soon as no marked
//! evaluation runs. Another evaluation that fails on the ceiling meanwhile was caught in
//! passing: it is not marked, and [`Guard::unaffected`] runs it again.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How often the watchdog looks while evaluations run.
const TICK: Duration = Duration::from_millis(2);

/// How long a compile or a data load caught in passing by the lowered ceiling keeps running
/// again: long enough for several runaway evaluations in a row to be stopped (each within
/// twice its time limit), bounded so that nothing waits forever on a ceiling that keeps being
/// lowered.
const PATIENCE: Duration = Duration::from_secs(10);

thread_local! {
    /// How many of this thread's evaluations ended stopped for a bound (marked by the
    /// watchdog, or out of time being run again): an operation whose own evaluation was
    /// stopped has the answer it deserves.
    static MARKED_HERE: Cell<u64> = const { Cell::new(0) };
}

/// Which bound a marked evaluation broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breach {
    Time,
    Memory,
    /// The process grew past the budgets of several evaluations running together: any of
    /// them may be the one. Each runs again; one that breaks it alone is [`Breach::Memory`].
    Crowd,
}

/// The bounds of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub time: Duration,
    /// Bytes the evaluation may allocate; 0: no bound.
    pub memory: u64,
}

struct Running {
    id: u64,
    started: Instant,
    /// Process-wide live bytes when the evaluation began.
    allocated_at_start: u64,
    bounds: Bounds,
    breach: Option<Breach>,
}

#[derive(Default)]
struct State {
    running: Vec<Running>,
    next_id: u64,
    /// Whether the allocator ceiling is lowered.
    engaged: bool,
    /// Incremented every time the ceiling is lowered.
    engagements: u64,
    watchdog: bool,
}

/// The watchdog of every evaluation in the process (the allocator ceiling is process-wide).
pub struct Guard {
    state: Mutex<State>,
    /// Wakes the watchdog when the first evaluation starts, and waiters when the ceiling lifts.
    wake: Condvar,
}

/// One running evaluation; it leaves the guard when dropped.
struct Ticket<'a> {
    guard: &'a Guard,
    id: u64,
    engagements: u64,
    left: bool,
}

impl Guard {
    /// The process's guard; its watchdog starts with the first evaluation.
    pub fn global() -> &'static Self {
        static GUARD: OnceLock<Guard> = OnceLock::new();
        GUARD.get_or_init(|| Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers an evaluation that begins now.
    fn enter(&'static self, bounds: Bounds) -> Ticket<'static> {
        let allocated_at_start = allocated();
        let mut state = self.lock();
        if !state.watchdog {
            let spawned = std::thread::Builder::new()
                .name("coral-eval-guard".to_string())
                .spawn(move || self.watch());
            state.watchdog = spawned.is_ok();
        }
        let id = state.next_id;
        state.next_id += 1;
        let engagements = state.engagements;
        let first = state.running.is_empty();
        state.running.push(Running {
            id,
            started: Instant::now(),
            allocated_at_start,
            bounds,
            breach: None,
        });
        drop(state);
        if first {
            self.wake.notify_all();
        }
        Ticket {
            guard: self,
            id,
            engagements,
            left: false,
        }
    }

    fn watch(&self) {
        let mut state = self.lock();
        loop {
            while state.running.is_empty() {
                state = self
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            drop(state);
            std::thread::sleep(TICK);
            let now = Instant::now();
            let allocated = allocated();
            state = self.lock();
            let together = state.running.len() as u64;
            let mut marked = false;
            for running in &mut state.running {
                if running.breach.is_some() {
                    continue;
                }
                let grown = allocated.saturating_sub(running.allocated_at_start);
                running.breach = breach(running, now, grown, together);
                marked |= running.breach.is_some();
            }
            if marked && !state.engaged {
                state.engaged = true;
                state.engagements += 1;
                regorus::set_global_memory_limit(Some(0));
            }
        }
    }

    /// Waits until the ceiling is lifted, at most `limit`.
    fn wait_lifted(&self, limit: Duration) {
        let state = self.lock();
        let _ = self
            .wake
            .wait_timeout_while(state, limit, |state| state.engaged)
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// Runs one evaluation (`run`, the engine's answer) under the watchdog: `Err` with the
    /// bound it broke, or the answer of a run the lowered ceiling did not catch in passing.
    /// A run caught in passing (its answer, even a success, may be an effect of the ceiling:
    /// a builtin stopped in passing can leave a rule undefined rather than fail it) or marked
    /// with others in a crowd runs again within its own time limit, so that it too is
    /// answered within twice that; past it, it is out of time.
    pub fn evaluate<T>(
        &'static self,
        bounds: Bounds,
        mut run: impl FnMut() -> anyhow::Result<T>,
    ) -> Result<anyhow::Result<T>, Breach> {
        let started = Instant::now();
        loop {
            let ticket = self.enter(bounds);
            let answer = run();
            let (breach, lowered) = ticket.finish();
            let left = bounds.time.saturating_sub(started.elapsed());
            let stopped = match breach {
                None if !lowered && !answer.as_ref().is_err_and(on_ceiling) => return Ok(answer),
                Some(Breach::Time | Breach::Memory) => breach,
                // Caught in passing, or in a crowd: again, if it has time left.
                _ if left.is_zero() => Some(Breach::Time),
                _ => None,
            };
            if let Some(breach) = stopped {
                // An operation running this evaluation has its answer (see `unaffected`).
                MARKED_HERE.set(MARKED_HERE.get() + 1);
                return Err(breach);
            }
            self.wait_lifted(left);
        }
    }

    /// Runs `operation` (a compile, an evaluator's preparation), again when the ceiling was
    /// lowered for another evaluation while it ran. regorus fails on the ceiling in some
    /// places and quietly gives up in others (a value that does not convert becomes undefined,
    /// a policy that does not compile for the virtual machine falls back to the interpreter),
    /// so it runs again whatever it answered, unless one of its own evaluations was stopped
    /// (its answer says so: a policy set over its bounds is judged by that) and it did not
    /// itself fail on the ceiling. The ceiling is
    /// lifted once the evaluation it was lowered for ends, so the next run is clean. No run
    /// begins after [`PATIENCE`].
    pub fn unaffected<T, E: std::fmt::Display>(
        &self,
        mut operation: impl FnMut() -> Result<T, E>,
    ) -> Result<T, E> {
        let started = Instant::now();
        loop {
            let before = self.lock().engagements;
            let marked_before = MARKED_HERE.get();
            let result = operation();
            let lowered = {
                let state = self.lock();
                state.engaged || state.engagements != before
            };
            let on_the_ceiling = result
                .as_ref()
                .is_err_and(|error| error.to_string().contains(CEILING_MESSAGE));
            let own = MARKED_HERE.get() != marked_before;
            let left = PATIENCE.saturating_sub(started.elapsed());
            if left.is_zero() || !lowered || (own && !on_the_ceiling) {
                return result;
            }
            self.wait_lifted(left);
            if started.elapsed() >= PATIENCE {
                return result;
            }
        }
    }
}

/// Whether an evaluation running since `running.started` broke a bound, the process having
/// grown by `grown` bytes since then with `together` evaluations running.
fn breach(running: &Running, now: Instant, grown: u64, together: u64) -> Option<Breach> {
    if now.duration_since(running.started) > running.bounds.time {
        return Some(Breach::Time);
    }
    if running.bounds.memory == 0 {
        return None;
    }
    // Every evaluation running may take its budget; a quarter more leaves room for the rest
    // of the process (requests being read, a snapshot being built).
    let allowed = running
        .bounds
        .memory
        .saturating_mul(together)
        .saturating_add(running.bounds.memory / 4);
    (grown > allowed).then_some(if together == 1 {
        Breach::Memory
    } else {
        Breach::Crowd
    })
}

impl Ticket<'_> {
    /// Leaves the guard: which bound the watchdog found broken, if any, and whether the
    /// ceiling was lowered while the evaluation ran. Then even a result without an error is
    /// suspect: a builtin stopped by the ceiling may have made a rule undefined rather than
    /// failed it.
    fn finish(mut self) -> (Option<Breach>, bool) {
        self.leave()
    }

    fn leave(&mut self) -> (Option<Breach>, bool) {
        self.left = true;
        let mut state = self.guard.lock();
        let breach = state
            .running
            .iter()
            .position(|running| running.id == self.id)
            .and_then(|at| state.running.swap_remove(at).breach);
        let lowered = state.engaged || state.engagements != self.engagements;
        if state.engaged && state.running.iter().all(|r| r.breach.is_none()) {
            regorus::set_global_memory_limit(None);
            state.engaged = false;
            drop(state);
            self.guard.wake.notify_all();
        }
        (breach, lowered)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // An evaluation that unwinds leaves too.
        if !self.left {
            self.leave();
        }
    }
}

/// regorus reports "execution exceeded memory limit (usage=…, limit=…)" when it meets the
/// allocator ceiling.
pub fn on_ceiling(error: &anyhow::Error) -> bool {
    error.to_string().contains(CEILING_MESSAGE)
}

/// What regorus' errors on the allocator ceiling say.
const CEILING_MESSAGE: &str = "exceeded memory limit";

/// Live bytes of the whole process, as the allocator counts them.
fn allocated() -> u64 {
    regorus_mimalloc::limits::global_allocation_stats_snapshot().allocated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(time_ms: u64, memory: u64) -> Running {
        Running {
            id: 0,
            started: Instant::now(),
            allocated_at_start: 0,
            bounds: Bounds {
                time: Duration::from_millis(time_ms),
                memory,
            },
            breach: None,
        }
    }

    #[test]
    fn an_evaluation_past_its_time_is_marked() {
        let running = running(10, 1 << 20);
        let now = running.started + Duration::from_millis(11);
        assert_eq!(breach(&running, now, 0, 1), Some(Breach::Time));
        let now = running.started + Duration::from_millis(9);
        assert_eq!(breach(&running, now, 0, 1), None);
    }

    #[test]
    fn growth_beyond_the_budgets_of_the_evaluations_running_is_marked() {
        let running = running(1_000, 64);
        let now = running.started;
        assert_eq!(breach(&running, now, 80, 1), None, "a quarter for the rest");
        assert_eq!(breach(&running, now, 81, 1), Some(Breach::Memory));
        assert_eq!(
            breach(&running, now, 140, 2),
            None,
            "two evaluations, two budgets"
        );
        assert_eq!(
            breach(&running, now, 145, 2),
            Some(Breach::Crowd),
            "either may be the cause"
        );
    }
}
