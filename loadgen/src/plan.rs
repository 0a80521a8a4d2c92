//! When each target runs, and when each request is meant to be sent.
//!
//! Targets take turns in short slices (rounds on one clock shared by every thread), so a burst
//! of noise on the machine hits all of them alike and their results stay comparable as ratios.
//! A [`Plan`] maps a point in time to the [`Slice`] in force; nothing needs to be exchanged
//! between threads to agree on it.
//!
//! Each round runs every target once, but not always in the same order: a target's results
//! depend on which one ran just before it (on two cores shared with PostgreSQL, a router's CPU
//! per query was 5-14% lower in the slice after PgBouncer's than after another router's, the
//! same build in both places; BENCHMARKS.md, section 8). The rounds follow a [`Rotation`] in
//! which every target comes right after every other one equally often.
//!
//! [`Pacer`] gives the send times of one sender. Open loop, each request has an intended send
//! time on a constant schedule and its latency is measured from that time, not from when it was
//! actually sent: a stalled server then shows up in the latency of every request that should
//! have gone out during the stall (coordinated omission corrected, as wrk2 does).

use std::time::{Duration, Instant};

/// A stretch of time in which one target runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    /// Global slice number, from 0.
    pub index: usize,
    /// Index of the target that runs.
    pub target: usize,
    /// Start.
    pub start: Instant,
    /// End (exclusive): nothing new starts at or after it.
    pub end: Instant,
    /// False during warmup: results are not recorded.
    pub recording: bool,
}

/// The schedule of targets: warmup rounds, then measured rounds.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    start: Instant,
    slice: Duration,
    targets: usize,
    warmup_rounds: usize,
    /// `None`: measured rounds go on until the caller stops (a count was asked for instead).
    measured_rounds: Option<usize>,
    rotation: Rotation,
}

/// Targets up to which the rounds are balanced (a cycle of 7 rounds of 8); beyond, plain
/// round robin.
pub const MAX_BALANCED_TARGETS: usize = 8;
const MAX_CYCLE: usize = MAX_BALANCED_TARGETS * (MAX_BALANCED_TARGETS - 1);
/// Steps the search for a balanced cycle may take before settling for round robin (it needs
/// a few thousand at 8 targets).
const SEARCH_STEPS: u32 = 1_000_000;

/// The order of the targets in each round, repeating every `rounds` rounds. With `n` targets
/// balanced, the cycle is `n - 1` rounds, each an ordering of all the targets, in which every
/// target is followed by every other exactly once, counting the step from one round to the
/// next and from the cycle's end back to its start, and never by itself.
#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    targets: usize,
    rounds: usize,
    order: [u8; MAX_CYCLE],
}

impl Rotation {
    /// The balanced cycle for `targets`, or round robin if there are too many.
    pub fn new(targets: usize) -> Rotation {
        let targets = targets.max(1);
        let mut rotation = Rotation {
            targets,
            rounds: 1,
            order: [0; MAX_CYCLE],
        };
        for (slot, target) in rotation.order.iter_mut().zip(0..targets.min(MAX_CYCLE)) {
            *slot = target as u8;
        }
        if (3..=MAX_BALANCED_TARGETS).contains(&targets) {
            let mut search = Search {
                n: targets,
                len: targets * (targets - 1),
                order: [0; MAX_CYCLE],
                followed: [[false; MAX_BALANCED_TARGETS]; MAX_BALANCED_TARGETS],
                steps: 0,
            };
            if search.fill(0) {
                rotation.order = search.order;
                rotation.rounds = targets - 1;
            }
        }
        rotation
    }

    /// Rounds before the orders repeat.
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// The target at `position` in round `round`.
    pub fn target(&self, round: usize, position: usize) -> usize {
        if self.targets > MAX_CYCLE {
            return position;
        }
        usize::from(self.order[(round % self.rounds) * self.targets + position])
    }

    /// Where `target` runs in round `round`.
    fn position(&self, round: usize, target: usize) -> usize {
        (0..self.targets)
            .find(|&position| self.target(round, position) == target)
            .unwrap_or(target)
    }
}

/// A depth-first search for [`Rotation`]'s cycle: target 0 first, each round an ordering,
/// each (previous, next) pair used once.
struct Search {
    n: usize,
    len: usize,
    order: [u8; MAX_CYCLE],
    followed: [[bool; MAX_BALANCED_TARGETS]; MAX_BALANCED_TARGETS],
    steps: u32,
}

impl Search {
    fn fill(&mut self, at: usize) -> bool {
        if at == self.len {
            let (last, first) = (usize::from(self.order[at - 1]), usize::from(self.order[0]));
            return last != first && !self.followed[last][first];
        }
        self.steps += 1;
        if self.steps > SEARCH_STEPS {
            return false;
        }
        if at == 0 {
            self.order[0] = 0;
            return self.fill(1);
        }
        let round_start = at - at % self.n;
        let previous = usize::from(self.order[at - 1]);
        for next in 0..self.n {
            let in_round = self.order[round_start..at]
                .iter()
                .any(|&t| usize::from(t) == next);
            if in_round || next == previous || self.followed[previous][next] {
                continue;
            }
            self.followed[previous][next] = true;
            self.order[at] = next as u8;
            if self.fill(at + 1) {
                return true;
            }
            self.followed[previous][next] = false;
        }
        false
    }
}

impl Plan {
    /// Each target runs for `duration` in total (plus `warmup` not recorded), in slices of about
    /// `slice`, shortened so that `duration` is a whole number of slices.
    pub fn timed(
        start: Instant,
        targets: usize,
        slice: Duration,
        warmup: Duration,
        duration: Duration,
    ) -> Plan {
        let rounds = div_ceil(duration, slice).max(1);
        let slice = duration.checked_div(rounds as u32).unwrap_or(slice);
        Plan {
            start,
            slice: slice.max(Duration::from_millis(1)),
            targets: targets.max(1),
            warmup_rounds: div_ceil(warmup, slice),
            measured_rounds: Some(rounds),
            rotation: Rotation::new(targets),
        }
    }

    /// Slices of `slice` after `warmup`, with no end: the caller stops once its counts are met.
    pub fn counted(start: Instant, targets: usize, slice: Duration, warmup: Duration) -> Plan {
        let slice = slice.max(Duration::from_millis(1));
        Plan {
            start,
            slice,
            targets: targets.max(1),
            warmup_rounds: div_ceil(warmup, slice),
            measured_rounds: None,
            rotation: Rotation::new(targets),
        }
    }

    /// When the first slice starts.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Length of one slice.
    pub fn slice_len(&self) -> Duration {
        self.slice
    }

    /// Number of slices, if the plan has an end.
    pub fn slice_count(&self) -> Option<usize> {
        self.measured_rounds
            .map(|rounds| (self.warmup_rounds + rounds) * self.targets)
    }

    /// When the last slice ends, if the plan has an end.
    pub fn end(&self) -> Option<Instant> {
        let count = u32::try_from(self.slice_count()?).ok()?;
        Some(self.start + self.slice * count)
    }

    /// Slice number `index`, if the plan has one.
    pub fn slice(&self, index: usize) -> Option<Slice> {
        if self.slice_count().is_some_and(|count| index >= count) {
            return None;
        }
        let start = self.start + self.slice.checked_mul(u32::try_from(index).ok()?)?;
        Some(Slice {
            index,
            target: self
                .rotation
                .target(index / self.targets, index % self.targets),
            start,
            end: start + self.slice,
            recording: index / self.targets >= self.warmup_rounds,
        })
    }

    /// The slice in force at `now` (the first one before the start), or `None` after the end.
    pub fn slice_at(&self, now: Instant) -> Option<Slice> {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let index = usize::try_from(elapsed / self.slice.as_nanos().max(1)).ok()?;
        self.slice(index)
    }

    /// The first slice of `target` numbered `from` or later.
    pub fn next_slice_of(&self, target: usize, from: usize) -> Option<Slice> {
        let round = from / self.targets;
        let index = round * self.targets + self.rotation.position(round, target);
        if index >= from {
            return self.slice(index);
        }
        let next = round + 1;
        self.slice(next * self.targets + self.rotation.position(next, target))
    }
}

impl Plan {
    /// The recording slices of `target` numbered below `upto` (and below the end, if any).
    pub fn recorded_slices_of(&self, target: usize, upto: usize) -> Vec<usize> {
        let upto = self.slice_count().map_or(upto, |count| count.min(upto));
        (0..upto)
            .filter_map(|i| self.slice(i))
            .filter(|s| s.target == target && s.recording)
            .map(|s| s.index)
            .collect()
    }
}

fn div_ceil(a: Duration, b: Duration) -> usize {
    let b = b.as_nanos().max(1);
    usize::try_from(a.as_nanos().div_ceil(b)).unwrap_or(usize::MAX)
}

/// What a sender does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing is due before this time.
    Wait(Instant),
    /// Send now; the latency counts from `intended`.
    Send {
        /// The scheduled send time (in the past if the sender is behind).
        intended: Instant,
    },
    /// The schedule is over.
    Done,
}

/// Send times of one sender until `end`: a constant schedule (open loop) or as soon as the
/// previous reply is in (closed loop).
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    first: Instant,
    /// Nanoseconds between intended send times; 0 for closed loop.
    interval_ns: f64,
    end: Instant,
    sent: u64,
}

impl Pacer {
    /// Open loop: request k is due at `first + k * interval`.
    pub fn open(first: Instant, interval: Duration, end: Instant) -> Pacer {
        Pacer {
            first,
            interval_ns: interval.as_nanos() as f64,
            end,
            sent: 0,
        }
    }

    /// Closed loop: the next request goes out as soon as it is asked for.
    pub fn closed(end: Instant) -> Pacer {
        Pacer {
            first: end,
            interval_ns: 0.0,
            end,
            sent: 0,
        }
    }

    /// What to do at `now`; call again after waiting or after the reply is in.
    pub fn step(&mut self, now: Instant) -> Step {
        if self.interval_ns == 0.0 {
            return if now < self.end {
                Step::Send { intended: now }
            } else {
                Step::Done
            };
        }
        let offset = Duration::from_nanos((self.sent as f64 * self.interval_ns) as u64);
        let intended = self.first + offset;
        if intended >= self.end {
            Step::Done
        } else if intended > now {
            Step::Wait(intended)
        } else {
            self.sent += 1;
            Step::Send { intended }
        }
    }
}

/// The latency of a request that was due at `intended` and completed at `done`.
pub fn latency(intended: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(intended)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn timed_plan_rounds_robin_after_warmup() {
        let t0 = Instant::now();
        // 2.5 s per target in slices of about 1 s: three slices of 833 ms each.
        let plan = Plan::timed(t0, 2, ms(1000), ms(500), ms(2500));
        let slice = plan.slice_len();
        assert_eq!(slice, Duration::from_nanos(833_333_333));
        assert_eq!(plan.slice_count(), Some(8));
        let targets: Vec<(usize, bool)> = (0..8)
            .map(|i| {
                plan.slice(i)
                    .map(|s| (s.target, s.recording))
                    .expect("in plan")
            })
            .collect();
        let order: Vec<usize> = targets.iter().map(|t| t.0).collect();
        assert_eq!(order, [0, 1, 0, 1, 0, 1, 0, 1]);
        assert_eq!(targets.iter().filter(|t| t.1).count(), 6);
        assert!(!targets[0].1 && !targets[1].1 && targets[2].1);
        assert_eq!(plan.slice(8), None);
        assert_eq!(plan.end(), Some(t0 + slice * 8));

        let at = plan.slice_at(t0 + slice * 3 + ms(1)).expect("in plan");
        assert_eq!((at.index, at.target), (3, 1));
        assert_eq!(at.start, t0 + slice * 3);
        assert_eq!(plan.slice_at(t0 - ms(5)).map(|s| s.index), Some(0));
        assert_eq!(plan.slice_at(t0 + slice * 8), None);
    }

    #[test]
    fn next_slice_of_a_target() {
        let plan = Plan::timed(Instant::now(), 3, ms(100), ms(0), ms(300));
        let next = |target, from| plan.next_slice_of(target, from).map(|s| s.index);
        assert_eq!(next(0, 0), Some(0));
        assert_eq!(next(2, 0), Some(2));
        assert_eq!(next(0, 1), Some(3));
        assert_eq!(next(1, 1), Some(1));
        // The second round runs them as 0, 2, 1.
        assert_eq!(next(1, 2), Some(5));
        assert_eq!(next(2, 4), Some(4));
        assert_eq!(next(2, 8), Some(8));
        assert_eq!(next(0, 7), None);
        let warm = Plan::timed(Instant::now(), 2, ms(100), ms(100), ms(200));
        assert_eq!(warm.recorded_slices_of(1, usize::MAX), [3, 5]);
        assert_eq!(warm.recorded_slices_of(0, 4), [2]);
    }

    /// Every target runs once per round, and over the cycle (and across its end) each one is
    /// followed by every other exactly once, never by itself.
    #[test]
    fn rotations_are_balanced_up_to_eight_targets() {
        for n in 1..=MAX_BALANCED_TARGETS {
            let rotation = Rotation::new(n);
            assert_eq!(rotation.rounds(), (n - 1).max(1), "{n} targets");
            let mut sequence = Vec::new();
            for round in 0..rotation.rounds() {
                let mut order: Vec<usize> = (0..n).map(|p| rotation.target(round, p)).collect();
                sequence.extend_from_slice(&order);
                order.sort_unstable();
                assert_eq!(
                    order,
                    (0..n).collect::<Vec<_>>(),
                    "{n} targets, round {round}"
                );
            }
            let mut pairs = vec![vec![0; n]; n];
            for (i, &target) in sequence.iter().enumerate() {
                let next = sequence[(i + 1) % sequence.len()];
                pairs[target][next] += 1;
            }
            for (a, row) in pairs.iter().enumerate() {
                for (b, &count) in row.iter().enumerate() {
                    let want = usize::from(a != b || n == 1);
                    assert_eq!(count, want, "{n} targets: {a} then {b} in {sequence:?}");
                }
            }
        }
        let many = Rotation::new(12);
        assert_eq!(many.rounds(), 1);
        assert_eq!(
            (0..12).map(|p| many.target(5, p)).collect::<Vec<_>>(),
            (0..12).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_plan_follows_its_rotation() {
        let plan = Plan::timed(Instant::now(), 3, ms(100), ms(0), ms(400));
        let order: Vec<usize> = (0..12)
            .map(|i| plan.slice(i).expect("in plan").target)
            .collect();
        assert_eq!(order, [0, 1, 2, 0, 2, 1, 0, 1, 2, 0, 2, 1]);
        for target in 0..3 {
            assert_eq!(plan.recorded_slices_of(target, usize::MAX).len(), 4);
        }
    }

    #[test]
    fn counted_plan_never_ends() {
        let plan = Plan::counted(Instant::now(), 2, ms(50), ms(100));
        assert_eq!(plan.end(), None);
        let far = plan.slice(1001).expect("no end");
        assert_eq!((far.target, far.recording), (1, true));
        assert!(!plan.slice(3).expect("warmup").recording);
        assert!(plan.slice(4).expect("measured").recording);
    }

    /// Runs `pacer` against a server with the given service times on a simulated clock.
    fn simulate(mut pacer: Pacer, t0: Instant, service: impl Fn(usize) -> Duration) -> Vec<u64> {
        let (mut now, mut latencies) = (t0, Vec::new());
        loop {
            match pacer.step(now) {
                Step::Wait(until) => now = until,
                Step::Send { intended } => {
                    now += service(latencies.len());
                    latencies.push(latency(intended, now).as_millis() as u64);
                }
                Step::Done => return latencies,
            }
        }
    }

    #[test]
    fn open_loop_charges_a_stall_to_every_request_it_delayed() {
        let t0 = Instant::now();
        let pacer = Pacer::open(t0, ms(10), t0 + ms(200));
        // 1 ms replies, except that request 2 takes 55 ms.
        let service = |k| if k == 2 { ms(55) } else { ms(1) };
        let latencies = simulate(pacer, t0, service);
        assert_eq!(latencies.len(), 20);
        assert_eq!(&latencies[..10], &[1, 1, 55, 46, 37, 28, 19, 10, 1, 1]);

        // Closed loop sees the stall once: the coordinated-omission mistake.
        let closed = simulate(Pacer::closed(t0 + ms(200)), t0, service);
        assert_eq!(closed.iter().filter(|&&l| l > 1).count(), 1);
        assert_eq!(closed.len(), 146);
    }

    #[test]
    fn open_loop_waits_for_the_schedule_and_stops_at_the_end() {
        let t0 = Instant::now();
        let mut pacer = Pacer::open(t0 + ms(5), ms(10), t0 + ms(20));
        assert_eq!(pacer.step(t0), Step::Wait(t0 + ms(5)));
        assert_eq!(
            pacer.step(t0 + ms(5)),
            Step::Send {
                intended: t0 + ms(5)
            }
        );
        assert_eq!(pacer.step(t0 + ms(6)), Step::Wait(t0 + ms(15)));
        // Late: the request is sent at once but keeps its intended time.
        assert_eq!(
            pacer.step(t0 + ms(19)),
            Step::Send {
                intended: t0 + ms(15)
            }
        );
        assert_eq!(pacer.step(t0 + ms(19)), Step::Done);
    }
}
