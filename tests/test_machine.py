"""What a machine or container gives a grid (normtf.machine), on fake /proc and /sys/fs/cgroup trees
written as the kernel writes them (cgroup v2, v1, and v2 beside v1 as this machine has them) and on
fake CUDA_VISIBLE_DEVICES masks; and once on this machine's own files."""

import os

import pytest

from normtf import machine

GiB = 2**30
MEMINFO = f"MemTotal:       25165824 kB\nMemFree:         {GiB // 1024} kB\nMemAvailable:   {8 * GiB // 1024} kB\n"


def tree(root, files: dict):
    """Write each path: text under root; return root."""
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def v2(root, cgroup="/user.slice/job", **files):
    """A cgroup v2 machine (/sys/fs/cgroup is the unified hierarchy) whose process is in `cgroup`;
    files: name -> text in that cgroup's directory, or (directory, name) -> text for another."""
    return tree(root, {"proc/self/cgroup": f"0::{cgroup}\n", "proc/meminfo": MEMINFO,
                       "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
                       f"sys/fs/cgroup{cgroup}/cgroup.procs": "",
                       **{f"sys/fs/cgroup{cgroup}/{name}": text for name, text in files.items()}})


def v1(root, cgroup="/docker/abc", mounted=None, **files):
    """A cgroup v1 machine whose process is in `cgroup` for cpu and memory; `mounted`: the
    directory under each controller's mount that holds the files (the cgroup's own by default;
    "" for the mount's root, as a container without a cgroup namespace sees its own cgroup)."""
    where = cgroup if mounted is None else mounted
    lines = f"12:memory:{cgroup}\n4:cpu,cpuacct:{cgroup}\n1:name=systemd:{cgroup}\n"
    written = {"proc/self/cgroup": lines, "proc/meminfo": MEMINFO}
    for name, text in files.items():
        name = name.replace("__", ".")
        controller = "memory" if name.startswith("memory") else "cpu,cpuacct"
        written[f"sys/fs/cgroup/{controller}{where}/{name}"] = text
    return tree(root, written)


# --- cores ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cpu_max,affinity,expected", [
    ("150000 100000\n", 4, 2),  # docker --cpus 1.5: 2 cores (rounded up, as loky does), not the 4 it may run on
    ("50000 100000\n", 4, 1),   # half a core: still one job
    ("400000 100000\n", 2, 2),  # a quota above the affinity: the affinity
    ("max 100000\n", 3, 3),     # no limit
])
def test_cores_is_the_smaller_of_affinity_and_the_v2_quota(tmp_path, cpu_max, affinity, expected):
    assert machine.cores(v2(tmp_path, **{"cpu.max": cpu_max}), affinity=affinity) == expected


def test_a_quota_set_above_the_process_cgroup_applies(tmp_path):
    """A limit anywhere up the hierarchy binds (a Kubernetes pod's on its containers)."""
    root = v2(tmp_path, "/kubepods/pod1/container", **{"cpu.max": "max 100000\n"})
    tree(root, {"sys/fs/cgroup/kubepods/pod1/cpu.max": "200000 100000\n"})
    assert machine.cpu_quota(root) == 2.0 and machine.cores(root, affinity=8) == 2


@pytest.mark.parametrize("quota,affinity,expected", [("250000", 8, 3), ("-1", 8, 8), ("100000", 1, 1)])
def test_cores_reads_a_v1_quota(tmp_path, quota, affinity, expected):
    root = v1(tmp_path, cpu__cfs_quota_us=quota + "\n", cpu__cfs_period_us="100000\n")
    assert machine.cores(root, affinity=affinity) == expected


def test_a_container_without_a_cgroup_namespace_finds_its_limits_at_the_mount(tmp_path):
    """/proc/self/cgroup names the host's path (/docker/abc), which is not under the container's
    mount: its own cgroup is the mount's root."""
    root = v1(tmp_path, mounted="", cpu__cfs_quota_us="100000\n", cpu__cfs_period_us="100000\n",
              memory__limit_in_bytes=f"{2 * GiB}\n", memory__usage_in_bytes=f"{GiB}\n")
    assert not (root / "sys/fs/cgroup/memory/docker/abc").exists()
    assert machine.cores(root, affinity=4) == 1 and machine.available_memory(root) == GiB


def test_without_cgroup_files_cores_is_the_affinity(tmp_path):
    assert machine.cores(tmp_path, affinity=3) == 3  # no /proc at all (macOS)
    assert machine.cores(v2(tmp_path), affinity=5) == 5  # a cgroup without a cpu controller file


# --- memory -----------------------------------------------------------------------------------

def test_available_memory_is_memavailable_not_free_pages(tmp_path):
    assert machine.available_memory(v2(tmp_path)) == 8 * GiB  # MemFree is 1 GiB


def test_a_v2_memory_max_below_memavailable_is_what_is_left_of_it(tmp_path):
    """memory.max 3 GiB, 2.5 GiB used of which 0.5 GiB inactive page cache: 1 GiB left, not the
    machine's 8."""
    root = v2(tmp_path, **{"memory.max": f"{3 * GiB}\n", "memory.current": f"{5 * GiB // 2}\n",
                           "memory.stat": f"anon {2 * GiB}\nfile {GiB // 2}\ninactive_file {GiB // 2}\nactive_file 0\n"})
    assert machine.cgroup_memory_left(root) == GiB and machine.available_memory(root) == GiB


def test_a_v2_memory_max_of_max_or_above_memavailable_leaves_memavailable(tmp_path):
    assert machine.available_memory(v2(tmp_path, **{"memory.max": "max\n", "memory.current": f"{GiB}\n"})) == 8 * GiB
    assert machine.available_memory(v2(tmp_path / "big", **{"memory.max": f"{64 * GiB}\n",
                                                            "memory.current": f"{GiB}\n"})) == 8 * GiB


def test_a_v1_memory_limit_and_v1s_no_limit(tmp_path):
    limited = v1(tmp_path / "a", memory__limit_in_bytes=f"{4 * GiB}\n", memory__usage_in_bytes=f"{3 * GiB}\n",
                 memory__stat=f"cache {GiB}\ntotal_inactive_file {GiB // 2}\n")
    assert machine.available_memory(limited) == GiB + GiB // 2
    unlimited = v1(tmp_path / "b", memory__limit_in_bytes="9223372036854771712\n", memory__usage_in_bytes=f"{GiB}\n")
    assert machine.cgroup_memory_left(unlimited) is None and machine.available_memory(unlimited) == 8 * GiB


def test_v2_beside_v1_reads_both(tmp_path):
    """Hybrid mode (this machine's): the unified hierarchy at /sys/fs/cgroup/unified holds no
    controller, v1's hold the limits."""
    root = v1(tmp_path, memory__limit_in_bytes=f"{2 * GiB}\n", memory__usage_in_bytes="0\n")
    tree(root, {"proc/self/cgroup": (root / "proc/self/cgroup").read_text() + "0::/\n",
                "sys/fs/cgroup/unified/cgroup.controllers": ""})
    assert machine.available_memory(root) == 2 * GiB


def test_memory_unknown_is_none(tmp_path):
    assert machine.available_memory(tmp_path) is None
    assert machine.available_memory(tree(tmp_path, {"proc/meminfo": "MemTotal: 1024 kB\n"})) is None  # kernel < 3.14


def test_this_machines_own_counts():
    """The defaults read this machine's /proc and /sys/fs/cgroup."""
    assert 1 <= machine.cores() <= os.cpu_count()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < machine.available_memory() <= total


# --- GPUs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask,gpu_count,slots", [
    (None, 2, ["0", "1", "0", "1", "0"]),               # unset: every card
    ("2,3", 2, ["2", "3", "2", "3", "2"]),              # the user's cards, never 0 and 1
    ("3", 1, ["3", "3", "3", "3", "3"]),
    (" 1 , 0", 2, ["1", "0", "1", "0", "1"]),           # CUDA's order, spaces as CUDA takes them
    ("GPU-8f6c2a1e-aaaa,GPU-1b2c3d4e-bbbb", 2, ["GPU-8f6c2a1e-aaaa", "GPU-1b2c3d4e-bbbb"] * 2 + ["GPU-8f6c2a1e-aaaa"]),
    ("1,-1,0", 1, ["1"] * 5),                           # CUDA stops at the first entry it cannot use
])
def test_each_slot_gets_one_of_the_visible_gpus_in_turn(mask, gpu_count, slots):
    environ = {} if mask is None else {"CUDA_VISIBLE_DEVICES": mask}
    assert [machine.device_for_slot(slot, environ, gpu_count) for slot in range(5)] == slots


@pytest.mark.parametrize("mask", [None, "", "-1"])
def test_no_visible_gpu_leaves_the_jobs_environment_alone(mask):
    environ = {} if mask is None else {"CUDA_VISIBLE_DEVICES": mask}
    assert machine.visible_devices(environ, 0) == [] and machine.device_for_slot(0, environ, 0) is None
    assert machine.visible_devices(environ, 2) == ([] if mask is not None else ["0", "1"])
