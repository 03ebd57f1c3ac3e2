//! OCI images built locally from the host's Debian binaries; no registry is reached.
//!
//! An [`ImageSpec`] lists files (a host binary and, with [`ImageSpec::binary`], the shared
//! libraries `ldd` says it needs), symlinks and directories. [`ImageSpec::tarball`] writes a
//! one-layer OCI image archive (`oci-layout`, `index.json`, manifest, config, an uncompressed
//! layer, all addressed by sha256) that `ctr images import` takes, and caches it under a hash of
//! everything that went into it, so an unchanged image is not rebuilt.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, PlatformBuilder,
    RootFsBuilder, Sha256Digest, ANNOTATION_REF_NAME,
};
use sha2::{Digest, Sha256};

/// The version of the archive format below; part of the cache key.
/// (2: the JSON written by `oci-spec`'s image types.)
const FORMAT_VERSION: &str = "nutshell-oci-2";

/// Errors of image building.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A host file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The archive could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `ldd` could not be run or did not resolve a library.
    #[error("ldd {binary}: {reason}")]
    Ldd {
        /// The binary.
        binary: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A binary that the image needs is not installed.
    #[error("{0} is not installed (scripts/setup.sh installs the benchmark packages)")]
    Missing(String),
    /// The image's config, manifest or index could not be made.
    #[error("OCI image metadata")]
    Oci(#[source] oci_spec::OciSpecError),
    /// A path inside the image is not absolute or not normal.
    #[error("invalid path inside the image: {0:?}")]
    BadPath(String),
}

/// The JSON documents of an image archive besides its layer.
#[derive(Debug)]
struct Metadata {
    config: Vec<u8>,
    manifest: Vec<u8>,
    index: Vec<u8>,
}

/// One thing in the image's single layer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    File { source: PathBuf, mode: u32 },
    Symlink { target: String },
    Dir { mode: u32 },
}

/// A one-layer image: files by their path inside the image, and the image config.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    name: String,
    entries: BTreeMap<String, Entry>,
    env: Vec<String>,
    cmd: Vec<String>,
}

impl ImageSpec {
    /// An empty image to be imported as `name` (a full reference, e.g.
    /// `docker.io/nutshell/busybox:latest`).
    pub fn new(name: &str) -> Self {
        ImageSpec {
            name: name.to_owned(),
            entries: BTreeMap::new(),
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_owned()],
            cmd: vec!["/bin/sh".to_owned()],
        }
    }

    /// The image reference.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The default command.
    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = cmd.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Adds the host file `source` at `path` (its content; symlinks on the host are followed).
    pub fn file(mut self, source: &Path, path: &str, mode: u32) -> Result<Self, ImageError> {
        let path = normalize(path)?;
        self.add_parents(&path);
        self.entries.insert(
            path,
            Entry::File {
                source: source.to_owned(),
                mode,
            },
        );
        Ok(self)
    }

    /// Adds a host binary at `path` with every shared library `ldd` lists for it, each at the
    /// path `ldd` resolved (so the dynamic loader finds them as on the host).
    pub fn binary(self, source: &Path, path: &str) -> Result<Self, ImageError> {
        let libs = ldd(source)?;
        let mut spec = self.file(source, path, 0o755)?;
        for lib in libs {
            let inside = lib.to_string_lossy().into_owned();
            spec = spec.file(&lib, &inside, 0o755)?;
        }
        Ok(spec)
    }

    /// Adds a symlink at `path` pointing to `target`.
    pub fn symlink(mut self, path: &str, target: &str) -> Result<Self, ImageError> {
        let path = normalize(path)?;
        self.add_parents(&path);
        self.entries.insert(
            path,
            Entry::Symlink {
                target: target.to_owned(),
            },
        );
        Ok(self)
    }

    /// Adds a directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Result<Self, ImageError> {
        let path = normalize(path)?;
        self.add_parents(&path);
        self.entries.insert(path, Entry::Dir { mode });
        Ok(self)
    }

    fn add_parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries
                .entry(prefix.clone())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
    }

    /// A hash of everything the archive is made of: the format, the name, the config, every
    /// path, mode, link target and file content.
    pub fn input_hash(&self) -> Result<String, ImageError> {
        let mut h = Sha256::new();
        h.update(FORMAT_VERSION);
        h.update([0]);
        h.update(&self.name);
        h.update([0]);
        for s in self.env.iter().chain(&self.cmd) {
            h.update(s);
            h.update([0]);
        }
        for (path, entry) in &self.entries {
            h.update(path);
            h.update([0]);
            match entry {
                Entry::File { source, mode } => {
                    h.update(format!("f{mode:o}"));
                    let data = read(source)?;
                    h.update(Sha256::digest(&data));
                }
                Entry::Symlink { target } => h.update(format!("l{target}")),
                Entry::Dir { mode } => h.update(format!("d{mode:o}")),
            }
            h.update([0]);
        }
        Ok(hex(&h.finalize()))
    }

    /// The layer: a deterministic tar (sorted, owner root, mtime 0).
    pub fn layer(&self) -> Result<Vec<u8>, ImageError> {
        let mut builder = tar::Builder::new(Vec::new());
        let write_err = |source| ImageError::Write {
            path: PathBuf::from("<layer>"),
            source,
        };
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            match entry {
                Entry::File { source, mode } => {
                    let data = read(source)?;
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(data.len() as u64);
                    builder
                        .append_data(&mut header, path, data.as_slice())
                        .map_err(write_err)?;
                }
                Entry::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    builder
                        .append_link(&mut header, path, target)
                        .map_err(write_err)?;
                }
                Entry::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_size(0);
                    builder
                        .append_data(&mut header, format!("{path}/"), io::empty())
                        .map_err(write_err)?;
                }
            }
        }
        builder.into_inner().map_err(write_err)
    }

    /// Writes the OCI image archive to `out`.
    pub fn write_archive(&self, out: &Path) -> Result<(), ImageError> {
        let layer = self.layer()?;
        let layer_digest = hex(&Sha256::digest(&layer));
        let Metadata {
            config,
            manifest,
            index,
        } = self.metadata(&layer_digest, layer.len())?;
        let config_digest = hex(&Sha256::digest(&config));
        let manifest_digest = hex(&Sha256::digest(&manifest));
        let layout = OciLayoutBuilder::default()
            .image_layout_version("1.0.0")
            .build()
            .and_then(|l| l.to_string())
            .map_err(ImageError::Oci)?;

        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_size(data.len() as u64);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, path, data)
        };
        let write_err = |source| ImageError::Write {
            path: out.to_owned(),
            source,
        };
        add("oci-layout", layout.as_bytes()).map_err(write_err)?;
        add(&format!("blobs/sha256/{layer_digest}"), &layer).map_err(write_err)?;
        add(&format!("blobs/sha256/{config_digest}"), &config).map_err(write_err)?;
        add(&format!("blobs/sha256/{manifest_digest}"), &manifest).map_err(write_err)?;
        add("index.json", &index).map_err(write_err)?;
        let archive = builder.into_inner().map_err(write_err)?;
        fs::write(out, archive).map_err(write_err)
    }

    /// The image's config, manifest and index (JSON), for a layer of `layer_len` bytes whose
    /// sha256 is `layer_digest` (hex).
    fn metadata(&self, layer_digest: &str, layer_len: usize) -> Result<Metadata, ImageError> {
        let sha256 = |hex: &str| Sha256Digest::from_str(hex).map_err(ImageError::Oci);
        let config = ImageConfigurationBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .config(
                ConfigBuilder::default()
                    .env(self.env.clone())
                    .cmd(self.cmd.clone())
                    .working_dir("/")
                    .build()
                    .map_err(ImageError::Oci)?,
            )
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![format!("sha256:{layer_digest}")])
                    .build()
                    .map_err(ImageError::Oci)?,
            )
            .build()
            .and_then(|c| c.to_string())
            .map_err(ImageError::Oci)?
            .into_bytes();
        let config_digest = hex(&Sha256::digest(&config));
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config.len() as u64,
                sha256(&config_digest)?,
            ))
            .layers(vec![Descriptor::new(
                MediaType::ImageLayer,
                layer_len as u64,
                sha256(layer_digest)?,
            )])
            .build()
            .and_then(|m| m.to_string())
            .map_err(ImageError::Oci)?
            .into_bytes();
        let manifest_digest = hex(&Sha256::digest(&manifest));
        let tag = self.name.rsplit_once(':').map_or("latest", |(_, t)| t);
        let platform = PlatformBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .build()
            .map_err(ImageError::Oci)?;
        let annotations = HashMap::from([
            ("io.containerd.image.name".to_owned(), self.name.clone()),
            (ANNOTATION_REF_NAME.to_owned(), tag.to_owned()),
        ]);
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![DescriptorBuilder::default()
                .media_type(MediaType::ImageManifest)
                .digest(sha256(&manifest_digest)?)
                .size(manifest.len() as u64)
                .platform(platform)
                .annotations(annotations)
                .build()
                .map_err(ImageError::Oci)?])
            .build()
            .and_then(|i| i.to_string())
            .map_err(ImageError::Oci)?
            .into_bytes();
        Ok(Metadata {
            config,
            manifest,
            index,
        })
    }

    /// The archive in `cache_dir`, built unless an archive of the same inputs is there.
    pub fn tarball(&self, cache_dir: &Path) -> Result<PathBuf, ImageError> {
        fs::create_dir_all(cache_dir).map_err(|source| ImageError::Write {
            path: cache_dir.to_owned(),
            source,
        })?;
        let hash = self.input_hash()?;
        let stem: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = cache_dir.join(format!("{stem}-{}.tar", &hash[..16]));
        if path.is_file() {
            log::debug!("image {} cached at {}", self.name, path.display());
            return Ok(path);
        }
        let partial = path.with_extension(format!("tmp{}", std::process::id()));
        self.write_archive(&partial)?;
        fs::rename(&partial, &path).map_err(|source| ImageError::Write {
            path: path.clone(),
            source,
        })?;
        log::info!("built image {} at {}", self.name, path.display());
        Ok(path)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    fs::read(path).map_err(|source| ImageError::Read {
        path: path.to_owned(),
        source,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `/usr/bin/x` → `usr/bin/x`; rejects relative paths, `..`, `.` and empty components.
fn normalize(path: &str) -> Result<String, ImageError> {
    let rel = path
        .strip_prefix('/')
        .ok_or_else(|| ImageError::BadPath(path.to_owned()))?;
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(ImageError::BadPath(path.to_owned()));
    }
    Ok(rel.to_owned())
}

/// The libraries in `ldd`'s output: resolved `=>` targets and the absolute loader path.
pub fn parse_ldd(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not a dynamic executable") || line.contains("statically linked") {
            return Ok(Vec::new());
        }
        if line.contains("=> not found") {
            return Err(format!("unresolved library: {line}"));
        }
        let path = match line.split_once("=>") {
            Some((_, right)) => right.trim().split(' ').next().unwrap_or(""),
            None => line.split(' ').next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// The shared libraries a host binary needs (empty for a static binary).
pub fn ldd(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| ImageError::Ldd {
            binary: binary.to_owned(),
            reason: e.to_string(),
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_ldd(&text).map_err(|reason| ImageError::Ldd {
        binary: binary.to_owned(),
        reason,
    })
}

/// A binary of the host that an image needs.
pub fn host_binary(name: &str, candidates: &[&str]) -> Result<PathBuf, ImageError> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::Missing(name.to_owned()))
}

/// Adds Debian's busybox-static as `/bin/busybox` with a `/bin/<applet>` link for each applet.
pub fn with_busybox(spec: ImageSpec) -> Result<ImageSpec, ImageError> {
    let busybox = host_binary(
        "busybox (busybox-static)",
        &["/bin/busybox", "/usr/bin/busybox"],
    )?;
    let out = Command::new(&busybox)
        .arg("--list")
        .output()
        .map_err(|source| ImageError::Read {
            path: busybox.clone(),
            source,
        })?;
    let mut spec = spec.binary(&busybox, "/bin/busybox")?;
    for applet in String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
    {
        spec = spec.symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    spec.dir("/tmp", 0o1777)
}

/// The busybox image: a static busybox with its applets, `/bin/sh` as the command.
pub fn busybox_image(name: &str) -> Result<ImageSpec, ImageError> {
    with_busybox(ImageSpec::new(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibaio.so.1 => /lib/x86_64-linux-gnu/libaio.so.1 (0x00007f25)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f58)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libaio.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n")
            .unwrap()
            .is_empty());
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn paths_inside_the_image_are_checked() {
        assert_eq!(normalize("/usr/bin/x").unwrap(), "usr/bin/x");
        for bad in ["usr/bin", "/", "/a/../b", "/a//b", "/./a"] {
            assert!(normalize(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn archive_is_a_valid_oci_layout_with_matching_digests() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("hello");
        fs::write(&src, b"hello").unwrap();
        let spec = ImageSpec::new("docker.io/nutshell/test:1")
            .file(&src, "/usr/share/hello", 0o644)
            .unwrap()
            .symlink("/hello", "usr/share/hello")
            .unwrap();
        let out = dir.path().join("image.tar");
        spec.write_archive(&out).unwrap();

        let mut blobs = BTreeMap::new();
        let mut archive = tar::Archive::new(fs::File::open(&out).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            io::Read::read_to_end(&mut entry, &mut data).unwrap();
            blobs.insert(path, data);
        }
        for (path, data) in &blobs {
            if let Some(d) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(d, hex(&Sha256::digest(data)), "{path}");
            }
        }
        let index: serde_json::Value = serde_json::from_slice(&blobs["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "docker.io/nutshell/test:1"
        );
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "1");
        let mdigest = m["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&blobs[&format!("blobs/sha256/{mdigest}")]).unwrap();
        let ldigest = manifest["layers"][0]["digest"].as_str().unwrap();
        let cdigest = manifest["config"]["digest"].as_str().unwrap();
        let config: serde_json::Value = serde_json::from_slice(
            &blobs[&format!("blobs/sha256/{}", cdigest.strip_prefix("sha256:").unwrap())],
        )
        .unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], ldigest);

        // The layer has the parents, the file and the link, owned by root.
        let layer = &blobs[&format!("blobs/sha256/{}", ldigest.strip_prefix("sha256:").unwrap())];
        let mut names = Vec::new();
        for entry in tar::Archive::new(layer.as_slice()).entries().unwrap() {
            let entry = entry.unwrap();
            assert_eq!(entry.header().uid().unwrap(), 0);
            names.push(entry.path().unwrap().to_string_lossy().into_owned());
        }
        assert_eq!(names, ["hello", "usr/", "usr/share/", "usr/share/hello"]);
    }

    #[test]
    fn cache_key_follows_content() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("f");
        fs::write(&src, b"one").unwrap();
        let spec = ImageSpec::new("x/y:z").file(&src, "/f", 0o644).unwrap();
        let a = spec.tarball(dir.path()).unwrap();
        assert_eq!(spec.tarball(dir.path()).unwrap(), a);
        fs::write(&src, b"two").unwrap();
        let b = spec.tarball(dir.path()).unwrap();
        assert_ne!(a, b);
        assert!(a.is_file() && b.is_file());
    }
}
