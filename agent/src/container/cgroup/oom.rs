//! The OOM watcher: inotify on each container's `memory.events`.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::parse::parse_flat_keyed;
use super::{Cgroup, CgroupError};

/// One cgroup the [`OomWatcher`] follows.
#[derive(Debug)]
struct Watched {
    container_id: String,
    memory_events: PathBuf,
    oom_kills: u64,
}

#[derive(Debug, Default)]
struct Watches {
    by_wd: HashMap<WatchDescriptor, Watched>,
}

/// Reports OOM kills: watches the `memory.events` of each registered cgroup with inotify (the
/// kernel signals a change of the file as a modification) and sends the container ID on the
/// channel each time `oom_kill` has grown. One thread, woken only by events.
#[derive(Debug)]
pub struct OomWatcher {
    inotify: Arc<Inotify>,
    watches: Arc<Mutex<Watches>>,
    stop: Option<std::os::fd::OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl OomWatcher {
    /// Starts the watcher thread; container IDs arrive on `events`.
    pub fn start(events: mpsc::Sender<String>) -> Result<Self, CgroupError> {
        let watch_err = |what| {
            move |e: nix::Error| CgroupError::Watch {
                what,
                source: io::Error::from(e),
            }
        };
        let inotify = Arc::new(
            Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
                .map_err(watch_err("inotify_init"))?,
        );
        let (stop_read, stop_write) = nix::unistd::pipe().map_err(watch_err("pipe"))?;
        let watches = Arc::new(Mutex::new(Watches::default()));
        let thread = {
            let inotify = Arc::clone(&inotify);
            let watches = Arc::clone(&watches);
            std::thread::Builder::new()
                .name("oom-watcher".into())
                .spawn(move || watch_loop(&inotify, &stop_read, &watches, &events))
                .map_err(|source| CgroupError::Watch {
                    what: "spawn thread",
                    source,
                })?
        };
        Ok(OomWatcher {
            inotify,
            watches,
            stop: Some(stop_write),
            thread: Some(thread),
        })
    }

    /// Follows `cgroup`'s `memory.events` for `container_id`. OOM kills before this call are
    /// not reported.
    pub fn watch(&self, container_id: &str, cgroup: &Cgroup) -> Result<(), CgroupError> {
        let memory_events = cgroup.path().join("memory.events");
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let wd = self
            .inotify
            .add_watch(&memory_events, AddWatchFlags::IN_MODIFY)
            .map_err(|e| CgroupError::Watch {
                what: "inotify_add_watch on memory.events",
                source: io::Error::from(e),
            })?;
        // Read after the watch is in place: an OOM kill in between is then seen as an event.
        let oom_kills = cgroup.oom_kills()?;
        watches.by_wd.insert(
            wd,
            Watched {
                container_id: container_id.to_string(),
                memory_events,
                oom_kills,
            },
        );
        Ok(())
    }

    /// Stops following `container_id` (a removed cgroup is dropped by itself).
    pub fn unwatch(&self, container_id: &str) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let wds: Vec<WatchDescriptor> = watches
            .by_wd
            .iter()
            .filter(|(_, w)| w.container_id == container_id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            watches.by_wd.remove(&wd);
            if let Err(e) = self.inotify.rm_watch(wd) {
                log::debug!("inotify_rm_watch for {container_id}: {e}");
            }
        }
    }
}

impl Drop for OomWatcher {
    fn drop(&mut self) {
        // Closing the write end wakes the thread's poll with POLLHUP.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch_loop(
    inotify: &Inotify,
    stop: &std::os::fd::OwnedFd,
    watches: &Mutex<Watches>,
    events: &mpsc::Sender<String>,
) {
    loop {
        let mut fds = [
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                log::error!("OOM watcher: poll: {e}; OOM events are no longer reported");
                return;
            }
        }
        if fds[1].any().unwrap_or(true) {
            return;
        }
        let batch = match inotify.read_events() {
            Ok(batch) => batch,
            Err(nix::Error::EAGAIN) => continue,
            Err(e) => {
                log::error!("OOM watcher: read: {e}; OOM events are no longer reported");
                return;
            }
        };
        let mut watches = watches.lock().unwrap_or_else(|p| p.into_inner());
        for event in batch {
            if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                // The cgroup was removed (or unwatched).
                watches.by_wd.remove(&event.wd);
                continue;
            }
            let Some(watched) = watches.by_wd.get_mut(&event.wd) else {
                continue;
            };
            let kills = std::fs::read_to_string(&watched.memory_events)
                .map_err(|e| e.to_string())
                .and_then(|c| parse_flat_keyed(&c).map_err(|e| e.to_string()))
                .map(|m| m.get("oom_kill").copied().unwrap_or(0));
            match kills {
                Ok(kills) if kills > watched.oom_kills => {
                    log::info!(
                        "container {}: OOM kill ({kills} so far)",
                        watched.container_id
                    );
                    watched.oom_kills = kills;
                    if events.send(watched.container_id.clone()).is_err() {
                        log::debug!("OOM watcher: receiver gone; stopping");
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!("OOM watcher: {}: {e}", watched.memory_events.display()),
            }
        }
    }
}
