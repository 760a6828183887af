use super::*;

const UID: &str = "0f8a6c2e-1b3d-4e5f-8a9b-0c1d2e3f4a5b";
const UID_US: &str = "0f8a6c2e_1b3d_4e5f_8a9b_0c1d2e3f4a5b";
const OTHER_UID: &str = "11111111-2222-3333-4444-555555555555";
const CID: &str = "3c1e4b8f0a9d2e7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29181706f5e4d3c2b1a0";
const OTHER_CID: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn in_pod(container: Option<&str>) -> PodCgroup {
    PodCgroup {
        pod_uid: UID.to_owned(),
        container_id: container.map(str::to_owned),
    }
}

/// A cgroup v1 file with every controller at `path` (as a kubelet leaves a container).
fn v1(path: &str) -> String {
    [
        "12:pids",
        "11:memory",
        "10:cpu,cpuacct",
        "9:devices",
        "8:freezer",
        "7:blkio",
        "1:name=systemd",
    ]
    .iter()
    .map(|c| format!("{c}:{path}\n"))
    .collect::<String>()
        + "0::/\n"
}

#[test]
fn cgroup_v2_systemd_containerd_besteffort() {
    let file = format!(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{CID}.scope\n"
    );
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn cgroup_v2_systemd_crio_burstable() {
    let file = format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/crio-{CID}.scope\n"
    );
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn cgroup_v2_systemd_docker_guaranteed() {
    let file = format!("0::/kubepods.slice/kubepods-pod{UID_US}.slice/docker-{CID}.scope\n");
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn cgroup_v2_kind_node_nested_kubelet_slice() {
    // kind and other kubelets-in-containers nest the hierarchy under `kubelet.slice`.
    let file = format!(
        "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{CID}.scope\n"
    );
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn cgroup_v2_cgroupfs_containerd() {
    let file = format!("0::/kubepods/besteffort/pod{UID}/{CID}\n");
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn cgroup_v1_cgroupfs_besteffort_burstable_guaranteed() {
    for path in [
        format!("/kubepods/besteffort/pod{UID}/{CID}"),
        format!("/kubepods/burstable/pod{UID}/{CID}"),
        format!("/kubepods/pod{UID}/{CID}"),
    ] {
        assert_eq!(parse(&v1(&path)), Ok(in_pod(Some(CID))), "{path}");
    }
}

#[test]
fn cgroup_v1_cgroupfs_crio_prefix() {
    let file = v1(&format!("/kubepods/burstable/pod{UID}/crio-{CID}"));
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn cgroup_v1_systemd_containerd() {
    let file = v1(&format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{CID}.scope"
    ));
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn cgroup_v1_only_one_controller_moved_is_enough() {
    // What the root-only test builds: the pid is moved in the `pids` hierarchy only.
    let file = format!(
        "9:name=systemd:/\n8:pids:/kubepods/besteffort/pod{UID}/{CID}\n4:memory:/process_api/da1ae2469e3f\n0::/\n"
    );
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn docker_in_docker_prefix_before_kubepods() {
    let file = format!("0::/docker/{OTHER_CID}/kubepods/besteffort/pod{UID}/{CID}\n");
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn pod_level_cgroup_and_crio_conmon_have_no_container() {
    assert_eq!(
        parse(&format!("0::/kubepods/besteffort/pod{UID}\n")),
        Ok(in_pod(None))
    );
    let conmon = format!(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/crio-conmon-{CID}.scope\n"
    );
    assert_eq!(parse(&conmon), Ok(in_pod(None)));
}

#[test]
fn upper_case_uid_is_canonicalised() {
    let file = format!("0::/kubepods/pod{}/{CID}\n", UID.to_ascii_uppercase());
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn a_line_without_a_container_agrees_with_one_with() {
    let file = format!("8:pids:/kubepods/pod{UID}\n0::/kubepods/pod{UID}/{CID}\n");
    assert_eq!(parse(&file), Ok(in_pod(Some(CID))));
}

#[test]
fn not_in_a_pod_is_refused() {
    for file in [
        "0::/\n",
        "0::/user.slice/user-1000.slice/session-2.scope\n",
        "0::/system.slice/containerd.service\n",
        "",
        // A `pod<uid>` directory outside any `kubepods` hierarchy is not a pod.
        &format!("0::/mine/pod{UID}/{CID}\n"),
        "0::/kubepods.slice/kubepods-besteffort.slice\n",
    ] {
        assert_eq!(parse(file), Err(CgroupError::NotInPod), "{file:?}");
    }
}

#[test]
fn two_different_pods_are_refused() {
    let file = format!("8:pids:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{OTHER_UID}/{CID}\n");
    assert_eq!(
        parse(&file),
        Err(CgroupError::ConflictingPods {
            first: UID.to_owned(),
            second: OTHER_UID.to_owned(),
        })
    );
}

#[test]
fn two_different_containers_are_refused() {
    let file = format!("8:pids:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{UID}/{OTHER_CID}\n");
    assert_eq!(
        parse(&file),
        Err(CgroupError::ConflictingContainers {
            first: CID.to_owned(),
            second: OTHER_CID.to_owned(),
        })
    );
}

#[test]
fn malformed_uids_are_refused() {
    for (file, segment) in [
        (
            "0::/kubepods/podnot-a-uid/abc\n".to_owned(),
            "podnot-a-uid".to_owned(),
        ),
        (
            format!("0::/kubepods/pod{}/{CID}\n", &UID[..35]),
            format!("pod{}", &UID[..35]),
        ),
        (
            format!("0::/kubepods/pod{}/{CID}\n", UID.replace('0', "g")),
            format!("pod{}", UID.replace('0', "g")),
        ),
        (
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice\n"
                .to_owned(),
            "kubepods-besteffort-pod1234.slice".to_owned(),
        ),
    ] {
        assert_eq!(parse(&file), Err(CgroupError::BadPodUid(segment)), "{file}");
    }
}

#[test]
fn garbage_is_refused() {
    for line in [
        "garbage",
        "x::/kubepods/pod",
        "0:/kubepods",
        "0::kubepods/besteffort",
        ":cpu:/",
    ] {
        assert_eq!(
            parse(&format!("{line}\n")),
            Err(CgroupError::MalformedLine(line.to_owned())),
            "{line}"
        );
    }
}

#[test]
fn container_ids_must_be_hex() {
    // An unrecognisable child of the pod is no container (the pod itself is still known).
    let file = format!("0::/kubepods/pod{UID}/not-a-container\n");
    assert_eq!(parse(&file), Ok(in_pod(None)));
    let short = format!("0::/kubepods/pod{UID}/abc\n");
    assert_eq!(parse(&short), Ok(in_pod(None)));
}
