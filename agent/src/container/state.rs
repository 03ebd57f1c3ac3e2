//! A container's lifecycle: an explicit state machine. Every operation that depends on the
//! state goes through [`State::next`]; an illegal one is an error for the caller, never a
//! panic.

use std::fmt;

/// A container's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Init is set up and waits for start.
    Created,
    /// Init was started and has not exited.
    Running,
    /// Frozen (by the cgroup freezer; see [`super::Containers::set_paused`]).
    Paused,
    /// Init has exited.
    Stopped,
}

/// What is asked of a container, checked against its [`State`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Let init exec its process.
    Start,
    /// Run another process in it.
    Exec,
    /// Signal every process of it.
    SignalAll,
    /// Its processes were frozen.
    Pause,
    /// Its processes were thawed.
    Resume,
    /// Init exited (the reaper reports it).
    Exit,
    /// Forget it (after killing what is left).
    Remove,
}

impl Op {
    /// The verb as the error message says it ("cannot {op} container …").
    pub fn verb(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Exec => "exec in",
            Op::SignalAll => "signal",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Exit => "exit",
            Op::Remove => "remove",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.verb())
    }
}

impl State {
    /// The state after `op`, or `None` when `op` is not allowed in this state. Operations
    /// that do not change the state (exec, signalling all, remove) return it unchanged.
    pub fn next(self, op: Op) -> Option<State> {
        use Op as O;
        use State as S;
        match (self, op) {
            (S::Created, O::Start) => Some(S::Running),
            (S::Running, O::Exec | O::SignalAll) => Some(S::Running),
            // Signalling every process of a paused container queues the signal (runc does the
            // same); it acts once the container is thawed.
            (S::Created | S::Paused, O::SignalAll) => Some(self),
            (S::Running, O::Pause) => Some(S::Paused),
            (S::Paused, O::Resume) => Some(S::Running),
            // Init can exit (or be killed) whatever the state.
            (_, O::Exit) => Some(S::Stopped),
            // A paused container must be thawed first, so that SIGKILL can end it.
            (S::Created | S::Running | S::Stopped, O::Remove) => Some(self),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_STATES: [State; 4] = [
        State::Created,
        State::Running,
        State::Paused,
        State::Stopped,
    ];
    const ALL_OPS: [Op; 7] = [
        Op::Start,
        Op::Exec,
        Op::SignalAll,
        Op::Pause,
        Op::Resume,
        Op::Exit,
        Op::Remove,
    ];

    #[test]
    fn the_lifecycle() {
        let mut s = State::Created;
        for (op, want) in [
            (Op::Start, State::Running),
            (Op::Exec, State::Running),
            (Op::Pause, State::Paused),
            (Op::Resume, State::Running),
            (Op::Exit, State::Stopped),
            (Op::Remove, State::Stopped),
        ] {
            s = s.next(op).unwrap_or_else(|| panic!("{op} from {s:?}"));
            assert_eq!(s, want);
        }
    }

    #[test]
    fn illegal_operations_are_refused() {
        let allowed = |s: State, op: Op| s.next(op).is_some();
        assert!(!allowed(State::Running, Op::Start));
        assert!(!allowed(State::Stopped, Op::Start));
        assert!(!allowed(State::Created, Op::Exec));
        assert!(!allowed(State::Paused, Op::Exec));
        assert!(!allowed(State::Stopped, Op::Exec));
        assert!(!allowed(State::Stopped, Op::SignalAll));
        assert!(!allowed(State::Created, Op::Pause));
        assert!(!allowed(State::Paused, Op::Pause));
        assert!(!allowed(State::Running, Op::Resume));
        assert!(!allowed(State::Paused, Op::Remove));
        // Exit always leads to Stopped.
        for s in ALL_STATES {
            assert_eq!(s.next(Op::Exit), Some(State::Stopped));
        }
        // Only start, pause, resume and exit change the state.
        for s in ALL_STATES {
            for op in ALL_OPS {
                if let Some(next) = s.next(op) {
                    if !matches!(op, Op::Start | Op::Pause | Op::Resume | Op::Exit) {
                        assert_eq!(next, s, "{op} from {s:?}");
                    }
                }
            }
        }
    }
}
