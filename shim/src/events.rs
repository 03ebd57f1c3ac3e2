//! Task events for containerd, published in order by one thread so that no handler waits on
//! containerd.

use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;

use containerd_shim::api::CreateTaskRequest;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;

/// An event for containerd.
pub type Event = (&'static str, Box<dyn MessageDyn>);

/// The sending end of the publishing thread.
pub struct Events {
    tx: Mutex<Sender<Event>>,
}

impl Events {
    /// Starts the thread publishing through `publisher` in `namespace`.
    pub fn start(publisher: RemotePublisher, namespace: String) -> Events {
        let (tx, rx) = mpsc::channel::<Event>();
        let _ = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                for (topic, event) in rx {
                    if let Err(e) = publisher.publish(Context::default(), topic, &namespace, event)
                    {
                        log::warn!("publish {topic}: {e}");
                    }
                }
            });
        Events { tx: Mutex::new(tx) }
    }

    /// Events that go to `rx` instead of containerd, for unit tests.
    #[cfg(test)]
    pub fn channel() -> (Events, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel::<Event>();
        (Events { tx: Mutex::new(tx) }, rx)
    }

    /// Queues `event` for containerd.
    pub fn publish(&self, (topic, event): Event) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if tx.send((topic, event)).is_err() {
            log::warn!("event {topic} dropped: the publisher is gone");
        }
    }
}

/// A process exited.
pub fn exit(container_id: &str, id: &str, status: u32, at: &Timestamp) -> Event {
    (
        topics::TASK_EXIT_EVENT_TOPIC,
        Box::new(TaskExit {
            container_id: container_id.to_owned(),
            id: id.to_owned(),
            exit_status: status,
            exited_at: MessageField::some(at.clone()),
            ..Default::default()
        }),
    )
}

/// A task was created.
pub fn create(req: &CreateTaskRequest, pid: u32) -> Event {
    (
        topics::TASK_CREATE_EVENT_TOPIC,
        Box::new(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        }),
    )
}

/// A task's init process (empty `exec_id`) or an exec started.
pub fn start(id: &str, exec_id: &str, pid: u32) -> Event {
    if exec_id.is_empty() {
        (
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: id.to_owned(),
                pid,
                ..Default::default()
            }),
        )
    } else {
        (
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid,
                ..Default::default()
            }),
        )
    }
}

/// An exec was added to a task.
pub fn exec_added(id: &str, exec_id: &str) -> Event {
    (
        topics::TASK_EXEC_ADDED_EVENT_TOPIC,
        Box::new(TaskExecAdded {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        }),
    )
}

/// A task was deleted.
pub fn delete(id: &str, pid: u32, status: u32, at: &Timestamp) -> Event {
    (
        topics::TASK_DELETE_EVENT_TOPIC,
        Box::new(TaskDelete {
            container_id: id.to_owned(),
            id: id.to_owned(),
            pid,
            exit_status: status,
            exited_at: MessageField::some(at.clone()),
            ..Default::default()
        }),
    )
}

/// A task was paused (`paused`) or resumed.
pub fn paused(id: &str, paused: bool) -> Event {
    if paused {
        (
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: id.to_owned(),
                ..Default::default()
            }),
        )
    } else {
        (
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: id.to_owned(),
                ..Default::default()
            }),
        )
    }
}

/// The guest's OOM killer acted in a container.
pub fn oom(container_id: String) -> Event {
    (
        topics::TASK_OOM_EVENT_TOPIC,
        Box::new(TaskOOM {
            container_id,
            ..Default::default()
        }),
    )
}
