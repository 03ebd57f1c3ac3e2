//! The service against stub tasks, without a VM (runwasi tests its task service the same way):
//! each request is validated, its task looked up, the call delegated to the task's
//! [`Instance`] and the error mapped to a ttrpc code once; no lock is held while an instance
//! works.

#![allow(clippy::unwrap_used)]

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;

use containerd_shim::api::Status;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics::TASK_DELETE_EVENT_TOPIC;
use containerd_shim::protos::ttrpc::{self, Code};
use nutshell_protocol::client::ClientError;

use super::*;
use crate::convert::now;
use crate::events::Event;
use crate::task::{Instance, TaskCore};

/// How long a test waits for what should happen at once; reaching it means a deadlock.
const PATIENCE: Duration = Duration::from_secs(10);

/// The instance calls a stub records, fails or holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Start,
    Kill,
    Pids,
    Stats,
    Update,
    Pause,
    Delete,
}

/// Makes the error a failing call answers.
type MakeError = fn() -> ShimError;

/// A call held inside the stub: it reports entering, then waits to be released.
type Hold = (Call, Sender<()>, Receiver<()>);

/// A task that does nothing in a guest: it records its calls, fails the one it was told to
/// with the error it was given, and can hold one call until the test releases it.
struct Stub {
    core: TaskCore,
    calls: Mutex<Vec<Call>>,
    fail: Mutex<Option<(Call, MakeError)>>,
    hold: Mutex<Option<Hold>>,
}

impl Stub {
    fn new(id: &str) -> Stub {
        Stub {
            core: TaskCore::new(
                id.to_owned(),
                format!("/bundles/{id}"),
                Process::new(StdioPaths::default()),
                None,
            ),
            calls: Mutex::new(Vec::new()),
            fail: Mutex::new(None),
            hold: Mutex::new(None),
        }
    }

    /// How often `call` reached the stub.
    fn count(&self, call: Call) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == call)
            .count()
    }

    /// Makes the next `call` fail with `error()` (and every later one, until cleared).
    fn fail(&self, call: Call, error: MakeError) {
        *self.fail.lock().unwrap() = Some((call, error));
    }

    /// Holds the next `call`: the first receiver hears when it entered the stub, a send on
    /// the second lets it return.
    fn hold(&self, call: Call) -> (Receiver<()>, Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        *self.hold.lock().unwrap() = Some((call, entered_tx, release_rx));
        (entered_rx, release_tx)
    }

    /// What every call does: record, maybe wait to be released (with the stub's own locks
    /// free), then answer.
    fn enter(&self, call: Call) -> Result<()> {
        self.calls.lock().unwrap().push(call);
        let held = {
            let mut hold = self.hold.lock().unwrap();
            match &*hold {
                Some((c, ..)) if *c == call => hold.take(),
                _ => None,
            }
        };
        if let Some((_, entered, release)) = held {
            entered.send(()).unwrap();
            release
                .recv_timeout(PATIENCE)
                .expect("the test releases a held call");
        }
        match *self.fail.lock().unwrap() {
            Some((c, error)) if c == call => Err(error()),
            _ => Ok(()),
        }
    }
}

impl Instance for Stub {
    fn core(&self) -> &TaskCore {
        &self.core
    }

    fn start(&self, _sandbox: &Sandbox) -> Result<()> {
        self.enter(Call::Start)
    }

    fn waits_in_guest(&self) -> bool {
        false
    }

    fn check_exec(&self) -> Result<()> {
        Ok(())
    }

    fn kill(&self, _sandbox: &Sandbox, _exec_id: &str, _signal: u32, _all: bool) -> Result<()> {
        self.enter(Call::Kill)
    }

    fn pids(&self, _sandbox: &Sandbox) -> Result<Vec<u32>> {
        self.enter(Call::Pids).map(|()| vec![42])
    }

    fn stats(&self, _sandbox: &Sandbox) -> Result<StatsResponse> {
        self.enter(Call::Stats).map(|()| StatsResponse::default())
    }

    fn update(&self, _sandbox: &Sandbox, _resources: Option<&[u8]>) -> Result<()> {
        self.enter(Call::Update)
    }

    fn pause(&self, _sandbox: &Sandbox, _pause: bool) -> Result<()> {
        self.enter(Call::Pause)
    }

    fn ends_sandbox(&self) -> bool {
        false
    }

    fn delete(&self, _sandbox: &Sandbox) {
        let _ = self.enter(Call::Delete);
    }
}

/// A service whose events go to a channel, and sandboxes without VMs in a temporary directory.
struct Fixture {
    service: Service,
    events: Receiver<Event>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let (events, rx) = Events::channel();
        let service = Service::with_events(
            "test".into(),
            Err("no configuration in unit tests".into()),
            Arc::new(events),
            Arc::new(ExitSignal::default()),
        );
        Fixture {
            service,
            events: rx,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A stub task `id` in sandbox `sandbox_id` (made on first use), as Create leaves one.
    fn add(&self, sandbox_id: &str, id: &str) -> Arc<Stub> {
        let sandbox = {
            let mut reg = self.service.registry();
            let events = Arc::clone(&self.service.inner.events);
            let dir = self.dir.path().join(sandbox_id);
            Arc::clone(
                reg.sandboxes
                    .entry(sandbox_id.to_owned())
                    .or_insert_with(|| Sandbox::detached(sandbox_id, &dir, events)),
            )
        };
        let stub = Arc::new(Stub::new(id));
        sandbox.insert(Arc::clone(&stub) as TaskRef);
        self.service
            .registry()
            .tasks
            .insert(id.to_owned(), sandbox_id.to_owned());
        stub
    }

    /// A task of its own sandbox, started.
    fn running(&self, sandbox_id: &str, id: &str) -> Arc<Stub> {
        let stub = self.add(sandbox_id, id);
        self.service.do_start(&start(id)).unwrap();
        stub
    }

    /// The topics published so far.
    fn topics(&self) -> Vec<&'static str> {
        self.events.try_iter().map(|(topic, _)| topic).collect()
    }
}

/// The ttrpc code containerd gets for `r`, which must be an error.
fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
    status(r).0
}

/// The ttrpc code and message containerd gets for `r`, which must be an error.
fn status<T: std::fmt::Debug>(r: Result<T>) -> (Code, String) {
    match reply("test", r) {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
        Err(e) => panic!("not a status: {e:?}"),
    }
}

/// Runs `f` on a thread of its own and fails (instead of hanging) if it blocks.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(PATIENCE)
        .unwrap_or_else(|e| panic!("{what}: no answer within {PATIENCE:?} ({e}): a lock held?"))
}

fn start(id: &str) -> StartRequest {
    StartRequest {
        id: id.into(),
        ..Default::default()
    }
}

fn state(id: &str) -> StateRequest {
    StateRequest {
        id: id.into(),
        ..Default::default()
    }
}

fn delete(id: &str) -> DeleteRequest {
    DeleteRequest {
        id: id.into(),
        ..Default::default()
    }
}

fn kill(id: &str) -> KillRequest {
    KillRequest {
        id: id.into(),
        signal: 15,
        ..Default::default()
    }
}

fn pids(id: &str) -> PidsRequest {
    PidsRequest {
        id: id.into(),
        ..Default::default()
    }
}

fn stats(id: &str) -> StatsRequest {
    StatsRequest {
        id: id.into(),
        ..Default::default()
    }
}

fn update(id: &str) -> UpdateTaskRequest {
    UpdateTaskRequest {
        id: id.into(),
        ..Default::default()
    }
}

fn exec(id: &str, exec_id: &str) -> ExecProcessRequest {
    ExecProcessRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        spec: MessageField::some(Any {
            value: br#"{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn an_unknown_task_answers_not_found_and_a_bad_request_invalid_argument() {
    let f = Fixture::new();
    let s = &f.service;
    let id = "nope";
    assert_eq!(code(s.do_state(&state(id))), Code::NOT_FOUND);
    assert_eq!(code(s.do_start(&start(id))), Code::NOT_FOUND);
    assert_eq!(code(s.do_kill(&kill(id))), Code::NOT_FOUND);
    assert_eq!(code(s.do_delete(&delete(id))), Code::NOT_FOUND);
    assert_eq!(code(s.do_pids(&pids(id))), Code::NOT_FOUND);
    assert_eq!(code(s.do_stats(&stats(id))), Code::NOT_FOUND);
    assert_eq!(code(s.do_update(&update(id))), Code::NOT_FOUND);
    assert_eq!(code(s.do_pause_resume(id, true)), Code::NOT_FOUND);
    assert_eq!(code(s.do_exec(&exec(id, "e1"))), Code::NOT_FOUND);
    let wait = WaitRequest {
        id: id.into(),
        ..Default::default()
    };
    assert_eq!(code(s.do_wait(&wait)), Code::NOT_FOUND);
    // Validation comes before the look-up: a bad exec is refused as such, even for a task
    // that does not exist.
    assert_eq!(code(s.do_exec(&exec(id, "../e1"))), Code::INVALID_ARGUMENT);
    let no_spec = ExecProcessRequest {
        id: id.into(),
        exec_id: "e1".into(),
        ..Default::default()
    };
    assert_eq!(code(s.do_exec(&no_spec)), Code::INVALID_ARGUMENT);
    // A known task's unknown exec is NOT_FOUND too.
    let stub = f.running("pod", "c");
    let exec_state = StateRequest {
        id: "c".into(),
        exec_id: "e9".into(),
        ..Default::default()
    };
    assert_eq!(code(s.do_state(&exec_state)), Code::NOT_FOUND);
    assert_eq!(stub.count(Call::Start), 1);
}

#[test]
fn an_instance_error_reaches_containerd_with_its_code() {
    let f = Fixture::new();
    let s = &f.service;
    let stub = f.running("pod", "c");
    let cases: [(Call, MakeError, Code); 5] = [
        (
            Call::Kill,
            || ShimError::Agent {
                method: "SignalProcess",
                source: ClientError::Status {
                    code: nutshell_protocol::ttrpc::Code::NOT_FOUND,
                    message: "container c not found".into(),
                },
            },
            Code::NOT_FOUND,
        ),
        (
            Call::Pids,
            || ShimError::Agent {
                method: "ListPids",
                source: ClientError::Transport(nutshell_protocol::ttrpc::Error::LocalClosed),
            },
            Code::UNAVAILABLE,
        ),
        (
            Call::Stats,
            || ShimError::Unimplemented("stats"),
            Code::UNIMPLEMENTED,
        ),
        (
            Call::Update,
            || ShimError::InvalidArgument("resources".into()),
            Code::INVALID_ARGUMENT,
        ),
        (
            Call::Pause,
            || ShimError::FailedPrecondition("frozen already".into()),
            Code::FAILED_PRECONDITION,
        ),
    ];
    for (call, error, expected) in cases {
        stub.fail(call, error);
        let (got, message) = match call {
            Call::Kill => status(s.do_kill(&kill("c"))),
            Call::Pids => status(s.do_pids(&pids("c"))),
            Call::Stats => status(s.do_stats(&stats("c"))),
            Call::Update => status(s.do_update(&update("c"))),
            Call::Pause => status(s.do_pause_resume("c", true)),
            Call::Start | Call::Delete => unreachable!(),
        };
        assert_eq!(got, expected, "{call:?}: {message}");
        assert!(
            message.starts_with(&error().to_string()),
            "{call:?}: {message}"
        );
        assert_eq!(stub.count(call), 1, "{call:?} reached the instance once");
    }
    // A failed Pause leaves the task running; once the instance succeeds, it is paused.
    let status_of = |s: &Service| s.do_state(&state("c")).unwrap().status;
    assert_eq!(status_of(s), Status::RUNNING.into());
    *stub.fail.lock().unwrap() = None;
    s.do_pause_resume("c", true).unwrap();
    assert_eq!(status_of(s), Status::PAUSED.into());
    s.do_pause_resume("c", false).unwrap();
    assert_eq!(s.do_pids(&pids("c")).unwrap().processes[0].pid, 42);
    // What the task's state forbids never reaches the instance: a second Resume, a Kill of an
    // exited process.
    assert_eq!(
        code(s.do_pause_resume("c", false)),
        Code::FAILED_PRECONDITION
    );
    stub.core.lock().init.exited("c", 0, now());
    assert_eq!(code(s.do_kill(&kill("c"))), Code::NOT_FOUND);
    assert_eq!(stub.count(Call::Pause), 3);
    assert_eq!(stub.count(Call::Kill), 1);
}

#[test]
fn a_delete_while_another_is_in_the_instance_answers_not_found() {
    let f = Fixture::new();
    let stub = f.add("pod", "c");
    let (entered, release) = stub.hold(Call::Delete);
    let first = {
        let s = f.service.clone();
        thread::spawn(move || s.do_delete(&delete("c")).map(|r| r.exit_status))
    };
    entered
        .recv_timeout(PATIENCE)
        .expect("the first Delete reaches the instance");
    let (second, during) = {
        let s = f.service.clone();
        within("a second Delete", move || {
            (code(s.do_delete(&delete("c"))), s.do_state(&state("c")))
        })
    };
    release.send(()).unwrap();
    let first = first.join().unwrap();
    assert_eq!(second, Code::NOT_FOUND);
    // Meanwhile the task still answers State: it is being deleted, not gone.
    assert_eq!(during.unwrap().status, Status::CREATED.into());
    // Created and never started: it ends as if SIGKILLed.
    assert_eq!(first.unwrap(), 128 + 9);
    assert_eq!(stub.count(Call::Delete), 1, "the instance deletes once");
    // Gone now: every call answers NOT_FOUND, a Wait included.
    assert_eq!(code(f.service.do_delete(&delete("c"))), Code::NOT_FOUND);
    assert_eq!(code(f.service.do_state(&state("c"))), Code::NOT_FOUND);
    assert!(matches!(
        stub.core.wait(""),
        Err(ShimError::NotFound { kind: "task", .. })
    ));
    let deletes = f
        .topics()
        .into_iter()
        .filter(|t| *t == TASK_DELETE_EVENT_TOPIC)
        .count();
    assert_eq!(deletes, 1, "one TaskDelete event");
}

#[test]
fn no_lock_is_held_across_an_instance_call() {
    let f = Fixture::new();
    let a = f.running("pod", "a");
    let b = f.running("pod", "b");
    let c = f.running("other", "c");
    let (entered, release) = a.hold(Call::Kill);
    let first = {
        let s = f.service.clone();
        thread::spawn(move || s.do_kill(&kill("a")))
    };
    entered
        .recv_timeout(PATIENCE)
        .expect("Kill a reaches the instance");
    // While a's Kill is inside its instance: calls for a task of the same sandbox, of another
    // sandbox and for a itself go through, and an exec can be added.
    let s = f.service.clone();
    let answers = within("calls during a held Kill", move || {
        (
            s.do_state(&state("a")).map(|r| r.status),
            s.do_kill(&kill("b")),
            s.do_pids(&pids("b")).map(|r| r.processes.len()),
            s.do_stats(&stats("c")).map(|_| ()),
            s.do_exec(&exec("b", "e1")),
        )
    });
    release.send(()).unwrap();
    first.join().unwrap().unwrap();
    let (state_a, kill_b, pids_b, stats_c, exec_b) = answers;
    assert_eq!(state_a.unwrap(), Status::RUNNING.into());
    kill_b.unwrap();
    assert_eq!(pids_b.unwrap(), 1);
    stats_c.unwrap();
    exec_b.unwrap();
    assert_eq!((a.count(Call::Kill), b.count(Call::Kill)), (1, 1));
    assert_eq!(c.count(Call::Stats), 1);
}
