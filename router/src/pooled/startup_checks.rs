//! The StartupMessage parameter sets a pool's backends have read for its logins.
//!
//! A pooled client's own startup parameters (`TimeZone`, `DateStyle`, `options`' `-c`...) are
//! read by a backend of its pool, as PostgreSQL reads them at a login ([`super::login`]): the
//! client sees the values as the server shows them, and a value the server refuses refuses the
//! login. A set accepted once is remembered ([`MAX_ACCEPTED`] per pool) and needs no backend
//! again. Logins asking for the same set while it is being read wait for that one reading
//! instead of each taking a backend: an application that opens a hundred connections with a new
//! `application_name` costs its pool one round trip, not a hundred transactions' worth.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

use super::params::Params;

/// The values a server read a StartupMessage's parameters as, in the order of their names.
pub type StartupValues = Rc<[Box<str>]>;

/// Distinct parameter sets a pool remembers as accepted; one more starts the memory afresh.
const MAX_ACCEPTED: usize = 256;

/// The key of a StartupMessage parameter set: names (case-folded, as PostgreSQL's GUC names)
/// and values, in the client's order.
pub fn key(settings: &Params) -> Box<str> {
    let mut key = String::new();
    for (name, value) in settings.iter() {
        key.push_str(&name.to_ascii_lowercase());
        key.push('\0');
        key.push_str(value);
        key.push('\0');
    }
    key.into()
}

/// One pool's parameter sets: accepted, or being read now.
#[derive(Debug, Default)]
pub struct StartupChecks {
    accepted: RefCell<HashMap<Box<str>, StartupValues>>,
    /// Readings under way, by key: at most one per key, so at most one per login in progress.
    running: RefCell<HashMap<Box<str>, Rc<Running>>>,
}

/// What [`StartupChecks::lookup`] found for a parameter set.
pub enum Lookup<'a> {
    /// Accepted before, read as these values.
    Accepted(StartupValues),
    /// Another login is having it read: wait for [`Running::outcome`].
    Running(Rc<Running>),
    /// Nobody is: the caller reads it and tells those who come meanwhile ([`Lead::finish`]).
    Lead(Lead<'a>),
}

/// How a reading of a parameter set ended, for the logins that waited for it.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The server accepted the set and read it as these values.
    Accepted(StartupValues),
    /// The server refused a value: its ErrorResponse (FATAL), whole.
    Refused(Rc<[u8]>),
    /// Not read (the branch paused, its primary unreachable): the login goes on with the
    /// values as given.
    NotChecked,
    /// No answer (no backend in time, a backend failed, the reading login went away): each
    /// waiting login has it read on its own.
    Failed,
}

/// A reading under way, which logins asking for the same set wait for.
#[derive(Debug, Default)]
pub struct Running {
    outcome: RefCell<Option<Outcome>>,
    /// One per waiting login (a re-poll replaces its own).
    wakers: RefCell<Vec<Waker>>,
}

impl Running {
    /// Resolves once the reading ends. Cancel-safe; bounded by the reading login's own waits
    /// (`query_wait_timeout`, the backend's answer), or it ends as [`Outcome::Failed`] when
    /// that login goes away.
    pub async fn outcome(&self) -> Outcome {
        poll_fn(|cx| {
            if let Some(outcome) = self.outcome.borrow().as_ref() {
                return Poll::Ready(outcome.clone());
            }
            let mut wakers = self.wakers.borrow_mut();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// The login reading a parameter set for others: [`Lead::finish`] tells them how it ended;
/// dropped unfinished, it tells them [`Outcome::Failed`].
pub struct Lead<'a> {
    checks: &'a StartupChecks,
    key: Box<str>,
    running: Rc<Running>,
    finished: bool,
}

impl Lead<'_> {
    /// Records how the reading ended (remembering an accepted set) and wakes those waiting.
    pub fn finish(mut self, outcome: Outcome) {
        self.settle(outcome);
    }

    fn settle(&mut self, outcome: Outcome) {
        self.finished = true;
        self.checks.running.borrow_mut().remove(&self.key);
        if let Outcome::Accepted(values) = &outcome {
            self.checks
                .accept(std::mem::take(&mut self.key), values.clone());
        }
        *self.running.outcome.borrow_mut() = Some(outcome);
        for waker in self.running.wakers.take() {
            waker.wake();
        }
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.settle(Outcome::Failed);
        }
    }
}

impl StartupChecks {
    /// What is known of the parameter set `key`; [`Lookup::Lead`] makes the caller the one
    /// reading it.
    pub fn lookup(&self, key: &str) -> Lookup<'_> {
        if let Some(values) = self.accepted.borrow().get(key) {
            return Lookup::Accepted(values.clone());
        }
        let mut running = self.running.borrow_mut();
        if let Some(reading) = running.get(key) {
            return Lookup::Running(reading.clone());
        }
        let reading = Rc::new(Running::default());
        let key: Box<str> = key.into();
        running.insert(key.clone(), reading.clone());
        Lookup::Lead(Lead {
            checks: self,
            key,
            running: reading,
            finished: false,
        })
    }

    /// A backend accepted the parameter set `key`, reading its values as `values`.
    pub fn accept(&self, key: Box<str>, values: StartupValues) {
        let mut accepted = self.accepted.borrow_mut();
        if accepted.len() >= MAX_ACCEPTED {
            accepted.clear();
        }
        accepted.insert(key, values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll};

    fn values(v: &[&str]) -> StartupValues {
        v.iter().map(|s| Box::<str>::from(*s)).collect()
    }

    fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn logins_asking_for_a_set_being_read_wait_for_that_reading() {
        let checks = StartupChecks::default();
        let Lookup::Lead(lead) = checks.lookup("timezone\0utc\0") else {
            panic!("the first login reads the set");
        };
        let Lookup::Running(running) = checks.lookup("timezone\0utc\0") else {
            panic!("the second waits for the first's reading");
        };
        assert!(matches!(checks.lookup("timezone\0gmt\0"), Lookup::Lead(_)));
        let mut waiting = pin!(running.outcome());
        assert!(poll_once(waiting.as_mut()).is_pending());
        lead.finish(Outcome::Accepted(values(&["UTC"])));
        let Poll::Ready(Outcome::Accepted(read)) = poll_once(waiting.as_mut()) else {
            panic!("the reading's values reach the waiting login");
        };
        assert_eq!(&*read, &*values(&["UTC"]));
        assert!(matches!(
            checks.lookup("timezone\0utc\0"),
            Lookup::Accepted(_)
        ));
    }

    #[test]
    fn a_refusal_reaches_the_waiting_logins_and_is_not_remembered() {
        let checks = StartupChecks::default();
        let Lookup::Lead(lead) = checks.lookup("k") else {
            panic!("lead");
        };
        let Lookup::Running(running) = checks.lookup("k") else {
            panic!("wait");
        };
        lead.finish(Outcome::Refused(Rc::from(&b"E..."[..])));
        let mut waiting = pin!(running.outcome());
        assert!(matches!(
            poll_once(waiting.as_mut()),
            Poll::Ready(Outcome::Refused(_))
        ));
        assert!(matches!(checks.lookup("k"), Lookup::Lead(_)));
    }

    #[test]
    fn a_reading_login_that_goes_away_fails_its_waiters_and_frees_the_key() {
        let checks = StartupChecks::default();
        let Lookup::Lead(lead) = checks.lookup("k") else {
            panic!("lead");
        };
        let Lookup::Running(running) = checks.lookup("k") else {
            panic!("wait");
        };
        drop(lead);
        let mut waiting = pin!(running.outcome());
        assert!(matches!(
            poll_once(waiting.as_mut()),
            Poll::Ready(Outcome::Failed)
        ));
        assert!(checks.running.borrow().is_empty());
        assert!(matches!(checks.lookup("k"), Lookup::Lead(_)));
    }

    #[test]
    fn accepted_sets_are_bounded() {
        let checks = StartupChecks::default();
        for i in 0..=MAX_ACCEPTED {
            checks.accept(i.to_string().into(), values(&[]));
        }
        assert!(checks.accepted.borrow().len() <= MAX_ACCEPTED);
    }
}
