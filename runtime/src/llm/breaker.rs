//! The remote engine's circuit breaker: closed until `breaker_failures`
//! requests in a row fail, then open (nothing is sent) for
//! `breaker_cooldown_ms`, then half-open: one request probes the server
//! while the others are refused, and its outcome closes or reopens the
//! circuit.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The circuit's state, as `/metrics` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests go to the server.
    Closed,
    /// Requests are refused until the cooldown ends.
    Open,
    /// One probe request is allowed through.
    HalfOpen,
}

impl BreakerState {
    /// 0 closed, 1 open, 2 half-open: the gauge's value.
    pub fn as_number(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
pub(super) struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
    opened: AtomicU64,
}

/// Leave to send one request; settle it with [`Ticket::success`] or
/// [`Ticket::failure`]. A probe dropped unsettled (its call cancelled)
/// lets the next request probe instead.
pub(super) struct Ticket<'a> {
    breaker: &'a Breaker,
    probe: bool,
    settled: bool,
}

impl Breaker {
    pub(super) fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
            opened: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket to send, or how long the circuit stays open.
    pub(super) fn admit(&self) -> Result<Ticket<'_>, Duration> {
        let mut state = self.lock();
        let probe = match &*state {
            State::Closed { .. } => false,
            State::Open { until } => {
                let now = Instant::now();
                if now < *until {
                    return Err(*until - now);
                }
                *state = State::HalfOpen { probing: true };
                true
            }
            State::HalfOpen { probing: true } => return Err(Duration::ZERO),
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                true
            }
        };
        Ok(Ticket {
            breaker: self,
            probe,
            settled: false,
        })
    }

    /// The state now (an open circuit whose cooldown is over reads
    /// half-open).
    pub(super) fn state(&self) -> BreakerState {
        match &*self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if Instant::now() < *until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// How many times the circuit has opened.
    pub(super) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn open(&self, state: &mut State) {
        *state = State::Open {
            until: Instant::now() + self.cooldown,
        };
        self.opened.fetch_add(1, Ordering::Relaxed);
    }
}

impl Ticket<'_> {
    /// The server answered: the circuit closes.
    pub(super) fn success(mut self) {
        self.settled = true;
        *self.breaker.lock() = State::Closed { failures: 0 };
    }

    /// The server failed this request (after its retries).
    pub(super) fn failure(mut self) {
        self.settled = true;
        let breaker = self.breaker;
        let mut state = breaker.lock();
        match &mut *state {
            State::Closed { failures } => {
                *failures += 1;
                if *failures >= breaker.threshold {
                    breaker.open(&mut state);
                }
            }
            State::HalfOpen { .. } if self.probe => breaker.open(&mut state),
            // A request sent before the circuit opened: it stays open as it is.
            State::HalfOpen { .. } | State::Open { .. } => {}
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let mut state = self.breaker.lock();
            if let State::HalfOpen { probing } = &mut *state {
                *probing = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_probes_once_and_closes_on_success() {
        let b = Breaker::new(2, Duration::ZERO);
        b.admit().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Closed);
        b.admit().unwrap().failure();
        assert_eq!(b.opened(), 1);
        // Cooldown zero: the next request is the probe, and the one after
        // it is refused while the probe is out.
        let probe = b.admit().unwrap();
        assert!(b.admit().is_err());
        probe.failure();
        assert_eq!(b.opened(), 2);
        let probe = b.admit().unwrap();
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        b.admit().unwrap().success();
    }

    #[test]
    fn an_open_circuit_refuses_until_the_cooldown_ends() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        b.admit().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        let wait = b.admit().err().unwrap();
        assert!(wait > Duration::from_secs(3000), "{wait:?}");
    }

    #[test]
    fn a_cancelled_probe_lets_the_next_request_probe() {
        let b = Breaker::new(1, Duration::ZERO);
        b.admit().unwrap().failure();
        drop(b.admit().unwrap());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.admit().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
