//! The agent API and the VMM control API of Nutshell.
//!
//! The `.proto` files under `protos/` are the source of truth; `build.rs` generates their Rust
//! code (rust-protobuf messages and ttrpc stubs) into `OUT_DIR` at build time. The rest of the
//! code uses the hand-written domain types in [`types`] and the host-side [`client`]; the raw
//! generated modules are exposed under [`generated`] for the agent's server and for the
//! conversions here.

pub mod client;
pub mod exit_cell;
pub mod mountinfo;
#[cfg(feature = "netlink")]
pub mod netlink;
pub mod portforward;
pub mod procfs;
pub mod ratelimit;
pub mod types;
pub mod vmm_client;

/// Generated code: rust-protobuf messages and ttrpc clients/servers. Not committed.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::undocumented_unsafe_blocks
)]
pub mod generated {
    // Modules `agent` and `agent_ttrpc` (agent API), `vmm` and `vmm_ttrpc` (VMM control API).
    include!(concat!(env!("OUT_DIR"), "/generated.rs"));
}

pub use ttrpc;

/// The vsock port the agent serves its ttrpc API on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The vsock port the agent takes forwarded TCP connections on (`kubectl port-forward`); the
/// stream's contract is in [`portforward`].
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1025;

/// Version of the agent API; the agent reports it in `Version`. Bump on an incompatible change.
pub const AGENT_API_VERSION: u32 = 1;

/// The virtio-fs tag of a sandbox's shared directory (container root file systems, volumes).
pub const SHARED_FS_TAG: &str = "nutshell";

/// Where the agent mounts the shared directory in the guest; a container's rootfs is
/// `<GUEST_SHARED_DIR>/<container-id>/rootfs`.
pub const GUEST_SHARED_DIR: &str = "/run/shared";

/// Where the agent publishes the pod's own namespaces in the guest (`pid`, `ipc`, `uts`): the
/// shim rewrites a container spec's path to the pod's namespace (the pause container's
/// `/proc/<pid>/ns/<kind>` on the host) to [`pod_namespace_path`].
pub const GUEST_POD_NS_DIR: &str = "/run/pod-ns";

/// The guest path of the pod's namespace of `kind` (`pid`, `ipc`, `uts`).
pub fn pod_namespace_path(kind: &str) -> String {
    format!("{GUEST_POD_NS_DIR}/{kind}")
}

/// An error and its causes in one line, `error: cause: cause`, each printed once: a cause
/// whose text the message already holds is not repeated. Binaries print errors with it, and
/// RPC services put it in their statuses.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod error_chain_tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);
    #[derive(Debug, thiserror::Error)]
    #[error("middle: inner")]
    struct Middle(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn every_cause_is_printed_once() {
        assert_eq!(
            super::error_chain(&Outer(Middle(Inner))),
            "outer: middle: inner"
        );
        assert_eq!(super::error_chain(&Inner), "inner");
    }
}
