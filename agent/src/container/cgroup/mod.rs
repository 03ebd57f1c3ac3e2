//! A cgroup v2 manager for the containers of the guest.
//!
//! One [`Cgroup`] is one directory of the unified hierarchy (`/sys/fs/cgroup` in the guest;
//! tests pass another root). [`Cgroup::create`] makes it and the missing directories above it,
//! enabling the controllers the container needs in each parent's `cgroup.subtree_control`;
//! [`Cgroup::apply`] writes an OCI [`LinuxResources`]; the rest are the verbs of the agent API
//! (pids, pause/resume, kill, stats, remove). [`OomWatcher`] reports OOM kills.
//!
//! Every cgroup file is parsed by a small pure function ([`parse_flat_keyed`],
//! [`parse_nested_keyed`], [`parse_max`], …). The guest kernel is trusted, but the parsers are
//! strict: a malformed line is an error that names the file, never a silent zero.
//!
//! OCI fields cgroup v2 cannot honour are handled one of two ways, listed in `docs/agent.md`:
//! a limit that would not be enforced is an error ([`CgroupError::Unsupported`]); an obsolete
//! field or a hint without a v2 equivalent is ignored with a log line.

mod manager;
mod oom;
mod parse;
mod resources;
mod stats;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use manager::validate_rel_path;
pub use oom::OomWatcher;
pub use parse::{
    parse_controllers, parse_flat_keyed, parse_max, parse_nested_keyed, parse_procs,
    parse_single_u64, NestedKeyed, ParseError,
};
pub use resources::{cpu_max_value, cpu_shares_to_weight, swap_max_value};
pub use stats::{
    cpu_stats_from, io_stats_from, CgroupStats, CpuStats, IoStats, MemoryStats, PidsStats,
};

/// The controllers a container cgroup gets, where the kernel has them.
pub const WANTED_CONTROLLERS: [&str; 5] = ["cpuset", "cpu", "io", "memory", "pids"];

/// How long [`Cgroup::freeze`] waits for `cgroup.events` to say `frozen 1`.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Cgroup::remove`] retries while the killed processes exit.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The relative cgroup path is not acceptable.
    #[error("invalid cgroup path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// A cgroup file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A value could not be written to a cgroup file.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be made.
    #[error("cannot create cgroup {path}")]
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be removed.
    #[error("cannot remove cgroup {path}")]
    Rmdir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup file has content that does not parse.
    #[error("malformed {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ParseError,
    },
    /// An OCI resource value is out of range or inconsistent.
    #[error("invalid resource {field}: {reason}")]
    Invalid {
        /// The OCI field (`memory.swap`, …).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// An OCI resource that cgroup v2 in this guest cannot enforce.
    #[error("resource {field} is not supported: {reason}")]
    Unsupported {
        /// The OCI field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The controller a resource needs is not enabled for this cgroup.
    #[error("resource {field} needs the {controller} controller, which {path} does not have")]
    NoController {
        /// The OCI field.
        field: &'static str,
        /// The controller.
        controller: &'static str,
        /// The cgroup.
        path: PathBuf,
    },
    /// `cgroup.freeze` was written but `cgroup.events` did not report frozen in time.
    #[error("cgroup {path} did not freeze within {timeout:?}")]
    FreezeTimeout {
        /// The cgroup.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
    /// The cgroup still had processes when [`Cgroup::remove`] gave up.
    #[error("cgroup {path} still has processes after {timeout:?}")]
    Busy {
        /// The cgroup.
        path: PathBuf,
        /// How long we retried.
        timeout: Duration,
    },
    /// The OOM watcher could not be set up or could not watch a cgroup.
    #[error("OOM watcher: {what}")]
    Watch {
        /// What failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}
