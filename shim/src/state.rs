//! The lifecycle of a task (a container's init process) or an exec: an explicit state machine.
//! An illegal transition is an error for the caller, never a panic.

use std::fmt;

use containerd_shim::api::Status;

use crate::error::{Result, ShimError};

/// Where a task or exec is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Created (the container exists in the guest, its process not started), or an exec
    /// registered but not started.
    Created,
    /// Its process runs.
    Running,
    /// Frozen.
    Paused,
    /// Its process exited (or the VM went away).
    Stopped,
    /// Deleted: the record is about to go.
    Deleted,
}

/// What is asked of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Start its process.
    Start,
    /// Freeze it.
    Pause,
    /// Thaw it.
    Resume,
    /// Its process exited.
    Exit,
    /// Remove it.
    Delete,
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskState::Created => "created",
            TaskState::Running => "running",
            TaskState::Paused => "paused",
            TaskState::Stopped => "stopped",
            TaskState::Deleted => "deleted",
        })
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transition::Start => "start",
            Transition::Pause => "pause",
            Transition::Resume => "resume",
            Transition::Exit => "exit",
            Transition::Delete => "delete",
        })
    }
}

impl TaskState {
    /// The state after `t`, or an error naming the task when `t` is not allowed now.
    pub fn next(self, t: Transition, id: &str) -> Result<TaskState> {
        use TaskState as S;
        use Transition as T;
        let next = match (self, t) {
            (S::Created, T::Start) => S::Running,
            (S::Running, T::Pause) => S::Paused,
            (S::Paused, T::Resume) => S::Running,
            // A process can exit (or its VM die) whenever it exists; a created one whose VM
            // died is stopped too.
            (S::Created | S::Running | S::Paused, T::Exit) => S::Stopped,
            (S::Created | S::Stopped, T::Delete) => S::Deleted,
            (from, transition) => {
                return Err(ShimError::IllegalTransition {
                    id: id.to_owned(),
                    from,
                    transition,
                })
            }
        };
        Ok(next)
    }

    /// Applies `t` in place.
    pub fn apply(&mut self, t: Transition, id: &str) -> Result<()> {
        *self = self.next(t, id)?;
        Ok(())
    }

    /// containerd's status of this state.
    pub fn status(self) -> Status {
        match self {
            TaskState::Created => Status::CREATED,
            TaskState::Running => Status::RUNNING,
            TaskState::Paused => Status::PAUSED,
            TaskState::Stopped | TaskState::Deleted => Status::STOPPED,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const ALL_STATES: [TaskState; 5] = [
        TaskState::Created,
        TaskState::Running,
        TaskState::Paused,
        TaskState::Stopped,
        TaskState::Deleted,
    ];
    const ALL_TRANSITIONS: [Transition; 5] = [
        Transition::Start,
        Transition::Pause,
        Transition::Resume,
        Transition::Exit,
        Transition::Delete,
    ];

    #[test]
    fn a_normal_life() {
        let mut s = TaskState::Created;
        for (t, want) in [
            (Transition::Start, TaskState::Running),
            (Transition::Pause, TaskState::Paused),
            (Transition::Resume, TaskState::Running),
            (Transition::Exit, TaskState::Stopped),
            (Transition::Delete, TaskState::Deleted),
        ] {
            s.apply(t, "c").unwrap();
            assert_eq!(s, want);
        }
    }

    #[test]
    fn exactly_the_legal_transitions_succeed() {
        let legal = [
            (TaskState::Created, Transition::Start),
            (TaskState::Created, Transition::Exit),
            (TaskState::Created, Transition::Delete),
            (TaskState::Running, Transition::Pause),
            (TaskState::Running, Transition::Exit),
            (TaskState::Paused, Transition::Resume),
            (TaskState::Paused, Transition::Exit),
            (TaskState::Stopped, Transition::Delete),
        ];
        for s in ALL_STATES {
            for t in ALL_TRANSITIONS {
                let r = s.next(t, "c1");
                if legal.contains(&(s, t)) {
                    assert!(r.is_ok(), "{s} {t}");
                } else {
                    let e = r.unwrap_err();
                    assert!(
                        matches!(e, ShimError::IllegalTransition { from, transition, .. } if from == s && transition == t),
                        "{s} {t}: {e:?}"
                    );
                    assert_eq!(
                        e.code(),
                        containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION
                    );
                }
            }
        }
    }

    #[test]
    fn a_failed_transition_leaves_the_state() {
        let mut s = TaskState::Running;
        assert!(s.apply(Transition::Delete, "c").is_err());
        assert_eq!(s, TaskState::Running);
        let e = TaskState::Stopped
            .next(Transition::Start, "web")
            .unwrap_err();
        assert_eq!(e.to_string(), "task web: cannot start when stopped");
    }

    #[test]
    fn statuses() {
        assert_eq!(TaskState::Created.status(), Status::CREATED);
        assert_eq!(TaskState::Running.status(), Status::RUNNING);
        assert_eq!(TaskState::Paused.status(), Status::PAUSED);
        assert_eq!(TaskState::Stopped.status(), Status::STOPPED);
    }
}
