//! What a program does with a packet, and the counter that says why.

use aya_ebpf::bindings::TC_ACT_SHOT;
use snat_common::Counter;

/// The packet does not go on: dropped (`TC_ACT_SHOT`), or turned into an answer and redirected
/// (`TC_ACT_REDIRECT`, see `reject`). `counter` names the reason either way.
#[derive(Clone, Copy)]
pub struct Stop {
    pub counter: Counter,
    pub action: i32,
}

impl From<Counter> for Stop {
    /// A plain drop.
    #[inline(always)]
    fn from(counter: Counter) -> Self {
        Self {
            counter,
            action: TC_ACT_SHOT,
        }
    }
}

/// `Ok`: the packet goes on (translated or passed), counted as the given result.
pub type Verdict = Result<Counter, Stop>;

/// Counts the verdict and turns it into a TC action: passed and translated packets go on to
/// the next program or the stack (`TC_ACT_UNSPEC`, TCX "next"); the others are shot or, when
/// turned into an answer, redirected.
#[inline(always)]
pub fn action(verdict: Verdict) -> i32 {
    match verdict {
        Ok(c) => {
            crate::maps::count(c);
            aya_ebpf::bindings::TC_ACT_UNSPEC
        }
        Err(stop) => {
            crate::maps::count(stop.counter);
            stop.action
        }
    }
}
