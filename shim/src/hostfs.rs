//! The host side of a container's file systems: its root filesystem and bind mounts, mounted
//! under the sandbox's shared directory (exported to the guest with virtio-fs), and their
//! removal.

use std::path::Path;

use containerd_shim::api::CreateTaskRequest;
use oci_spec::runtime::Spec;

use crate::error::{Result, ShimError};
use crate::policy::{PodContext, Policy};
use crate::spec::{rewrite_for_guest, shared_mounts};

/// containerd opens `<bundle>/log` of every task for reading (a blocking open in a thread of
/// its own), expecting the task's shim to write its log there. A container that joins its pod's
/// shim has no shim of its own, so that open would stay pending for the container's life; on
/// the development machines a thread blocked there cannot even be killed, and containerd never
/// finishes exiting (seen on a containerd restart). Opening the write end completes it; the
/// shim's log goes to the sandbox's log, so nothing is written here.
pub fn open_bundle_log(bundle: &str) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = Path::new(bundle).join("log");
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            log::debug!("{}: not held open: {e}", path.display());
            None
        }
    }
}

/// Unmounts and removes container `id`'s directory in the shared directory `shared_root`.
pub fn remove_container_dir(shared_root: &Path, id: &str) {
    crate::vm::remove_sandbox_dir(&shared_root.join(id));
}

/// Mounts containerd's rootfs mounts (or, without any, the bundle's rootfs) at `target`.
fn mount_rootfs(req: &CreateTaskRequest, spec: &Spec, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)
        .map_err(ShimError::io(format!("create {}", target.display())))?;
    if req.rootfs.is_empty() {
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| {
                ShimError::InvalidArgument("no rootfs mounts and no root.path".into())
            })?;
        let root = if root.is_absolute() {
            root
        } else {
            Path::new(&req.bundle).join(root)
        };
        return bind(&root, target, false);
    }
    for m in &req.rootfs {
        let typ = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        containerd_shim::mount::mount_rootfs(typ, source, &m.options, target).map_err(|e| {
            ShimError::Internal(format!(
                "mount {} {} at {}: {e}",
                m.type_,
                m.source,
                target.display()
            ))
        })?;
    }
    Ok(())
}

/// Mounts container `req.id`'s root filesystem and shared bind mounts under `shared_root`
/// (the host side of the sandbox's shared directory); returns the spec for the guest as JSON.
/// Bind sources are opened and checked against the node policy before anything is mounted,
/// and bound from those descriptors.
pub fn prepare_fs(
    req: &CreateTaskRequest,
    spec: &Spec,
    shared_root: &Path,
    policy: &Policy,
    pod: PodContext<'_>,
) -> Result<Vec<u8>> {
    let id = &req.id;
    let shared = shared_mounts(spec, id);
    let sources = policy.open_shared_sources(&shared, pod)?;
    mount_rootfs(req, spec, &shared_root.join(id).join("rootfs"))?;
    for (m, source) in shared.iter().zip(&sources) {
        let target = shared_root.join(&m.shared_rel);
        bind(&source.mount_source(), &target, m.readonly).map_err(|e| {
            let e = crate::error::chain(&e);
            ShimError::Internal(format!("{}: {e}", source.resolved.display()))
        })?;
        set_propagation(&target, m.receives_host_mounts)?;
    }
    let guest_spec = rewrite_for_guest(spec.clone(), id, &shared);
    serde_json::to_vec(&guest_spec)
        .map_err(|e| ShimError::Internal(format!("serialize the spec: {e}")))
}

/// Makes the bind at `target` a slave of its source (`receives_host_mounts`: the volume's
/// `rslave`/`rshared`, so host mounts made later under the source appear in the container, as
/// under runc) or private (`rprivate`, the default), recursively. Either way nothing mounted
/// or unmounted under `target` (the shim's teardown) propagates back to the host's source.
fn set_propagation(target: &Path, receives_host_mounts: bool) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let kind = if receives_host_mounts {
        MsFlags::MS_SLAVE
    } else {
        MsFlags::MS_PRIVATE
    };
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REC | kind,
        None::<&str>,
    )
    .map_err(|e| {
        ShimError::io(format!("set the propagation of {}", target.display()))(std::io::Error::from(
            e,
        ))
    })
}

/// Binds `source` (file or directory) at `target`, creating the target.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<()> {
    let meta = std::fs::metadata(source)
        .map_err(ShimError::io(format!("bind source {}", source.display())))?;
    if meta.is_dir() {
        std::fs::create_dir_all(target)
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(ShimError::io(format!("create {}", parent.display())))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map(drop)
    }
    .map_err(ShimError::io(format!("create {}", target.display())))?;
    let mut options = vec!["rbind".to_owned()];
    if readonly {
        options.push("ro".to_owned());
    }
    containerd_shim::mount::mount_rootfs(Some("bind"), source.to_str(), &options, target).map_err(
        |e| {
            ShimError::Internal(format!(
                "bind {} at {}: {e}",
                source.display(),
                target.display()
            ))
        },
    )
}
