//! `/proc/<pid>/cgroup` -> the Kubernetes pod UID and container ID of a process.
//!
//! Each line is `hierarchy-id:controllers:path` (cgroup v1 has one line per hierarchy, v2 a single
//! `0::path`). The kubelet names a pod's cgroup after its UID, and the container runtime names the
//! container's cgroup inside it after the container ID:
//!
//! | driver | pod segment | container segment |
//! | --- | --- | --- |
//! | cgroupfs | `/kubepods/[besteffort\|burstable/]pod<uid>` | `<id>` (containerd, docker), `crio-<id>` |
//! | systemd | `kubepods-[besteffort-\|burstable-]pod<uid with _>.slice` | `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` |
//!
//! A pod segment is only believed below a segment naming `kubepods`, so a directory someone called
//! `pod<uid>` elsewhere is not a pod. Every line that names a pod must name the same pod (and the same
//! container): a process cannot be in two pods, and a file claiming so is refused rather than read
//! as either.

/// Where a process runs, as its cgroups say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID, canonical (lower-case, dashed: `8-4-4-4-12`).
    pub pod_uid: String,
    /// The container's runtime ID (hex), when the process is in a container's cgroup rather than
    /// in the pod's own.
    pub container_id: Option<String>,
}

/// Why a cgroup file does not place a process in exactly one pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    /// No line names a Kubernetes pod.
    #[error("the process is not in a kubernetes pod's cgroup")]
    NotInPod,
    /// Two lines name different pods.
    #[error("the process's cgroups name two pods: `{first}` and `{second}`")]
    ConflictingPods {
        /// The first pod UID seen.
        first: String,
        /// A different one.
        second: String,
    },
    /// Two lines name different containers of the pod.
    #[error("the process's cgroups name two containers: `{first}` and `{second}`")]
    ConflictingContainers {
        /// The first container ID seen.
        first: String,
        /// A different one.
        second: String,
    },
    /// A pod segment whose UID is not a UID.
    #[error("cgroup segment `{0}` names a pod but its uid is malformed")]
    BadPodUid(String),
    /// A line that is not `hierarchy-id:controllers:path`.
    #[error("cgroup line `{0}` is not `hierarchy-id:controllers:/path`")]
    MalformedLine(String),
}

/// The pod (and container) that the contents of a `/proc/<pid>/cgroup` file place the process in.
pub fn parse(content: &str) -> Result<PodCgroup, CgroupError> {
    let mut found: Option<PodCgroup> = None;
    for line in content.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = line_path(line)?;
        let Some(here) = parse_path(path)? else {
            continue;
        };
        found = Some(match found {
            None => here,
            Some(seen) => merge(seen, here)?,
        });
    }
    found.ok_or(CgroupError::NotInPod)
}

/// The path of one line, after checking its shape.
fn line_path(line: &str) -> Result<&str, CgroupError> {
    let malformed = || CgroupError::MalformedLine(line.to_owned());
    let mut parts = line.splitn(3, ':');
    let (Some(id), Some(_controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || !path.starts_with('/') {
        return Err(malformed());
    }
    Ok(path)
}

/// The pod of one cgroup path, if it names one.
fn parse_path(path: &str) -> Result<Option<PodCgroup>, CgroupError> {
    let mut under_kubepods = false;
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    while let Some(segment) = segments.next() {
        if let Some(uid) = under_kubepods.then(|| pod_uid(segment)).flatten() {
            let pod_uid = uid?;
            // The container's cgroup is the pod's direct child; anything else (the pod's own
            // cgroup, CRI-O's `crio-conmon-` monitor) is in the pod but in no container.
            let container_id = segments.next().and_then(container_id);
            return Ok(Some(PodCgroup {
                pod_uid,
                container_id,
            }));
        }
        if segment.contains("kubepods") {
            under_kubepods = true;
        }
    }
    Ok(None)
}

/// `Some` when `segment` is a pod's cgroup: with its canonical UID, or the error if malformed.
fn pod_uid(segment: &str) -> Option<Result<String, CgroupError>> {
    let raw = if let Some(slice) = segment.strip_suffix(".slice") {
        // systemd: `kubepods-besteffort-pod<uid_with_underscores>.slice`; the pod part is last.
        let last = slice.rsplit('-').next()?;
        if !slice.contains("kubepods") {
            return None;
        }
        last.strip_prefix("pod")?
    } else {
        segment.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-").to_ascii_lowercase();
    Some(if is_uid(&uid) {
        Ok(uid)
    } else {
        Err(CgroupError::BadPodUid(segment.to_owned()))
    })
}

/// `8-4-4-4-12` hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The container ID in a container's cgroup segment, for every runtime and driver naming.
fn container_id(segment: &str) -> Option<String> {
    let base = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|prefix| base.strip_prefix(prefix))
        .unwrap_or(base);
    let plausible = (12..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    plausible.then(|| id.to_owned())
}

/// Two lines' views of the same process must agree.
fn merge(seen: PodCgroup, here: PodCgroup) -> Result<PodCgroup, CgroupError> {
    if seen.pod_uid != here.pod_uid {
        return Err(CgroupError::ConflictingPods {
            first: seen.pod_uid,
            second: here.pod_uid,
        });
    }
    let container_id = match (seen.container_id, here.container_id) {
        (Some(a), Some(b)) if a != b => {
            return Err(CgroupError::ConflictingContainers {
                first: a,
                second: b,
            });
        }
        (a, b) => a.or(b),
    };
    Ok(PodCgroup {
        pod_uid: seen.pod_uid,
        container_id,
    })
}

#[cfg(test)]
mod tests;
