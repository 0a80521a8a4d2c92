//! Each target's process CPU time during the target's recorded slices.
//!
//! Targets take turns in the slices of one [`Plan`], so what a process's CPU clock advances
//! between the start and the end of a slice is what serving that slice's target cost it. A
//! thread of its own walks the slices in order, sleeps until each boundary and reads the clock
//! of the slice's target there. The walk itself, [`walk`], takes the waiting and the reading as
//! closures, so it is tested without a clock; [`Sampler`] is the thread around it.

use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::cpu::{open_clocks, CpuClock, CpuError};
use crate::plan::Plan;
use crate::settings::Common;

/// Why CPU times could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// A process could not be read, before or during the run.
    #[error("{0}")]
    Cpu(#[from] CpuError),
    /// The sampling thread could not be started.
    #[error("cannot start the CPU sampling thread: {0}")]
    Start(io::Error),
    /// The sampling thread panicked (a bug: the message went to stderr).
    #[error("the CPU sampling thread panicked")]
    Panicked,
}

/// Per target, (global slice index, CPU time) of each slice sampled, in order.
type Sampled = Vec<Vec<(usize, Duration)>>;

/// What one target's process used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuUse {
    /// The process.
    pub pid: u32,
    /// (global slice index, CPU time) of each of the target's recorded slices sampled, in order.
    pub slices: Vec<(usize, Duration)>,
}

impl CpuUse {
    /// Forgets slices numbered `upto` and later (the target's count ran out before them).
    pub fn truncate(&mut self, upto: usize) {
        self.slices.retain(|&(index, _)| index < upto);
    }

    /// CPU time in all the slices kept.
    pub fn total(&self) -> Duration {
        self.slices.iter().map(|&(_, time)| time).sum()
    }
}

/// Walks `plan`'s recording slices of the targets that have a clock, in order: waits until the
/// slice starts, reads its target's clock, waits until it ends, reads again. Returns, per
/// target, (slice index, CPU time) of each slice sampled. `wait_until` returns false when told to
/// stop before the deadline: a slice that has started then counts up to now, and the walk ends
/// (a counted plan has no end of its own).
pub fn walk<C, E>(
    plan: &Plan,
    clocks: &[Option<C>],
    mut wait_until: impl FnMut(Instant) -> bool,
    mut read: impl FnMut(&C) -> Result<Duration, E>,
) -> Result<Sampled, E> {
    let mut per_target = vec![Vec::new(); clocks.len()];
    if clocks.iter().all(Option::is_none) {
        return Ok(per_target);
    }
    let mut index = 0;
    while let Some(slice) = plan.slice(index) {
        index += 1;
        let Some(Some(clock)) = clocks.get(slice.target) else {
            continue;
        };
        if !slice.recording {
            continue;
        }
        if !wait_until(slice.start) {
            break;
        }
        let before = read(clock)?;
        let went_on = wait_until(slice.end);
        let after = read(clock)?;
        per_target[slice.target].push((slice.index, after.saturating_sub(before)));
        if !went_on {
            break;
        }
    }
    Ok(per_target)
}

/// The sampling thread of one run: started before the run (pid files are read and every
/// process checked then), given the plan once it is known, stopped when the workers are done.
#[derive(Debug)]
pub struct Sampler {
    pids: Vec<Option<u32>>,
    /// Takes the plan; dropping it tells the thread to stop.
    plans: Option<Sender<Plan>>,
    thread: Option<JoinHandle<Result<Sampled, CpuError>>>,
}

impl Sampler {
    /// Opens the clock of every target with a `--pid` and starts the thread (none without).
    pub fn start(common: &Common) -> Result<Sampler, SamplerError> {
        let clocks = open_clocks(common)?;
        let pids = clocks
            .iter()
            .map(|c| c.as_ref().map(CpuClock::pid))
            .collect();
        if clocks.iter().all(Option::is_none) {
            return Ok(Sampler {
                pids,
                plans: None,
                thread: None,
            });
        }
        let (plans, received) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("loadgen-cpu".into())
            .spawn(move || sample(&clocks, &received))
            .map_err(SamplerError::Start)?;
        Ok(Sampler {
            pids,
            plans: Some(plans),
            thread: Some(thread),
        })
    }

    /// Samples the slices of `plan`; call once.
    pub fn begin(&self, plan: Plan) {
        if let Some(plans) = &self.plans {
            // The thread waits for the plan; if it is gone, `finish` reports why.
            let _ = plans.send(plan);
        }
    }

    /// Stops the thread and returns each target's CPU use (`None` without `--pid`).
    pub fn finish(self) -> Result<Vec<Option<CpuUse>>, SamplerError> {
        let Sampler {
            pids,
            plans,
            thread,
        } = self;
        drop(plans);
        let mut per_target = match thread {
            Some(thread) => thread.join().map_err(|_| SamplerError::Panicked)??,
            None => Vec::new(),
        };
        per_target.resize(pids.len(), Vec::new());
        Ok(pids
            .iter()
            .zip(per_target)
            .map(|(pid, slices)| pid.map(|pid| CpuUse { pid, slices }))
            .collect())
    }
}

/// The thread: waits for the plan, then walks it until its end or until told to stop.
fn sample(clocks: &[Option<CpuClock>], plans: &Receiver<Plan>) -> Result<Sampled, CpuError> {
    let Ok(plan) = plans.recv() else {
        return Ok(Vec::new());
    };
    walk(
        &plan,
        clocks,
        |deadline| wait_until(plans, deadline),
        CpuClock::read,
    )
}

/// Sleeps until `deadline`; false if told to stop first (the sender dropped).
fn wait_until(stop: &Receiver<Plan>, deadline: Instant) -> bool {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        match stop.recv_timeout(deadline - now) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(_) | Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A walk over `plan` whose waits succeed `waits` times, then are told to stop; each
    /// read of target k's clock returns the next of `script[k]` (in ms). Returns (slice, CPU in
    /// ms) per target and the deadlines waited for.
    fn scripted(
        plan: &Plan,
        clocks: &[Option<usize>],
        script: &[&[u64]],
        waits: usize,
    ) -> (Vec<Vec<(usize, u64)>>, Vec<Instant>) {
        let deadlines = RefCell::new(Vec::new());
        let mut next = vec![0; script.len()];
        let wait = |deadline| {
            let mut deadlines = deadlines.borrow_mut();
            deadlines.push(deadline);
            deadlines.len() <= waits
        };
        let read = |&target: &usize| {
            let value = script[target].get(next[target]).copied();
            next[target] += 1;
            value.map(ms).ok_or("read past the script")
        };
        let per_target = walk(plan, clocks, wait, read).expect("scripted reads suffice");
        let per_target = per_target
            .iter()
            .map(|slices| {
                let ms = |&(i, d): &(usize, Duration)| (i, d.as_millis() as u64);
                slices.iter().map(ms).collect()
            })
            .collect();
        (per_target, deadlines.into_inner())
    }

    #[test]
    fn only_recording_slices_of_measured_targets_count() {
        let t0 = Instant::now();
        // Slices 0 and 1 warm up targets 0 and 1; then 2, 4 are target 0's and 3, 5 target 1's.
        let plan = Plan::timed(t0, 2, ms(100), ms(100), ms(200));
        let slice = |i| plan.slice(i).expect("in plan");
        let script: &[&[u64]] = &[&[], &[10, 15, 15, 40]];
        let (cpu, deadlines) = scripted(&plan, &[None, Some(1)], script, usize::MAX);
        assert_eq!(cpu, [vec![], vec![(3, 5), (5, 25)]]);
        let (s3, s5) = (slice(3), slice(5));
        assert_eq!(deadlines, [s3.start, s3.end, s5.start, s5.end]);

        // Both measured: each slice reads its own target's clock.
        let script: &[&[u64]] = &[&[100, 101, 103, 107], &[0, 20, 20, 60]];
        let (cpu, deadlines) = scripted(&plan, &[Some(0), Some(1)], script, usize::MAX);
        assert_eq!(cpu, [vec![(2, 1), (4, 4)], vec![(3, 20), (5, 40)]]);
        assert_eq!(deadlines.len(), 8);
    }

    #[test]
    fn a_counted_plan_runs_until_told_to_stop() {
        let t0 = Instant::now();
        let plan = Plan::counted(t0, 2, ms(100), ms(0));
        let script: &[&[u64]] = &[&[0, 7], &[50, 52, 53]];
        // Slice 0 completes; slice 1 is stopped while waiting for its end: it counts until then.
        let (cpu, deadlines) = scripted(&plan, &[Some(0), Some(1)], script, 3);
        assert_eq!(cpu, [vec![(0, 7)], vec![(1, 2)]]);
        assert_eq!(deadlines.len(), 4);
        // Stopped while waiting for a start: that slice is not read at all.
        let (cpu, _) = scripted(&plan, &[Some(0), Some(1)], script, 2);
        assert_eq!(cpu, [vec![(0, 7)], vec![]]);
        // Nothing measured: the walk ends at once instead of running forever.
        let (cpu, deadlines) = scripted(&plan, &[None, None], &[&[], &[]], usize::MAX);
        assert_eq!((cpu, deadlines.len()), (vec![vec![], vec![]], 0));
    }

    fn common_with_own_pid() -> Common {
        use clap::Parser;
        let pid = std::process::id().to_string();
        let argv = [
            "lg",
            "connect",
            "--max",
            "--target",
            "a=postgres://u@127.0.0.1",
        ];
        let cli = crate::cli::Cli::try_parse_from(argv.into_iter().chain(["--pid", &pid]))
            .expect("valid");
        let crate::cli::ModeArgs::Connect(args) = cli.mode else {
            panic!("connect")
        };
        Common::from_args(args.common).expect("valid")
    }

    #[test]
    fn the_thread_samples_this_process_until_stopped() {
        let sampler = Sampler::start(&common_with_own_pid()).expect("own clock");
        let start = Instant::now() + ms(10);
        sampler.begin(Plan::counted(start, 1, ms(20), ms(0)));
        let mut n = 0u64;
        while Instant::now() < start + ms(70) {
            n = std::hint::black_box(n.wrapping_add(1));
        }
        let cpu = sampler.finish().expect("sampled");
        let [Some(cpu)] = cpu.as_slice() else {
            panic!("one target with a pid: {cpu:?}")
        };
        assert_eq!(cpu.pid, std::process::id());
        // Three whole slices and the one stopped in.
        assert!((3..=5).contains(&cpu.slices.len()), "{cpu:?}");
        assert!(cpu.total() >= ms(20), "{cpu:?}");
    }

    #[test]
    fn use_in_the_slices_kept() {
        let mut cpu = CpuUse {
            pid: 1,
            slices: vec![(1, ms(3)), (3, ms(4)), (5, ms(5))],
        };
        assert_eq!(cpu.total(), ms(12));
        cpu.truncate(4);
        assert_eq!(cpu.total(), ms(7));
        cpu.truncate(3);
        assert_eq!(cpu.total(), ms(3));
    }
}
