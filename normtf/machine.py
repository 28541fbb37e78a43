"""What this machine, or the container normtf runs in, gives a grid: the cores it may keep busy, the
memory new processes can still take, and the GPUs the user left visible. grid.py asks here how
many runs `--jobs auto` trains at once and which GPU each job sees.

A container is where many users run, and it limits a process in ways the machine's own counts do
not show: a CPU quota (`docker --cpus 2`, a Kubernetes CPU limit) leaves every core in the affinity
mask but allows only a share of their time, and a memory limit (`docker --memory 4g`) has the
kernel kill a process long before the machine's memory runs out. Linux says both in the process's
control group (cgroup, v2 or v1), and each count here is the smaller of the machine's and the
cgroup's. Where a count cannot be known (no such files: macOS, Windows), it is the machine's alone,
or None.

Why not a library: loky's cpu_count (joblib's) takes the affinity and a CPU quota, but reads only
the quota at the hierarchy's root, by fixed paths; psutil's available memory is MemAvailable, but
knows no cgroup; neither reads a memory limit. So these few reads of the kernel's files are ours,
and round as loky does.

Every function reads its inputs from `root` (the directory that holds proc/ and sys/fs/cgroup/,
"/" by default) or an `environ` mapping, never from anything else, so that tests give it fake ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

# cgroup v1 writes "no limit" as the largest page-aligned 64-bit count (9223372036854771712)
V1_UNLIMITED = 2**62


def cores(root: Path | str = "/", affinity: int | None = None) -> int:
    """The cores a grid may keep busy, at least 1: the CPUs this process may run on (`affinity`, by
    default len(os.sched_getaffinity(0)): taskset, a cpuset; os.cpu_count() where there is no
    affinity) or, if fewer, the cgroup's CPU quota rounded up (1.5 CPUs' worth of time is 2 cores,
    as loky, joblib's process pool, counts them: a job on the half core is slowed, not stopped)."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, affinity if quota is None else min(affinity, math.ceil(quota)))


def cpu_quota(root: Path | str = "/") -> float | None:
    """The CPUs' worth of time per period that this process's cgroup may use (cgroup v2's cpu.max
    "150000 100000" is 1.5; v1's cpu.cfs_quota_us over cpu.cfs_period_us), the smallest set on its
    cgroup or any above it; None where none is set ("max", v1's -1) or known."""
    quotas = []
    for directory in _cgroups(Path(root), "cpu"):
        try:
            if (directory / "cpu.max").exists():
                quota, period = (directory / "cpu.max").read_text().split()
            elif (directory / "cpu.cfs_quota_us").exists():
                quota = (directory / "cpu.cfs_quota_us").read_text().strip()
                period = (directory / "cpu.cfs_period_us").read_text().strip()
            else:
                continue
            if quota != "max" and int(quota) > 0 and int(period) > 0:
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue  # unreadable or not what the kernel writes: no limit known there
    return min(quotas, default=None)


def available_memory(root: Path | str = "/") -> int | None:
    """Bytes that new processes can still take without swapping or being killed: the smaller of
    the machine's MemAvailable (/proc/meminfo: free memory plus the page cache and other memory the
    kernel can reclaim, not MemFree, which counts none of it) and what this process's cgroup has
    left (`cgroup_memory_left`). None where neither is known (no /proc: macOS, Windows)."""
    known = [room for room in (_mem_available(Path(root)), cgroup_memory_left(root)) if room is not None]
    return min(known, default=None)


def cgroup_memory_left(root: Path | str = "/") -> int | None:
    """Bytes this process's cgroup may still use before the kernel reclaims from it or kills in it:
    its limit less its usage (v2: memory.max less memory.current; v1: memory.limit_in_bytes less
    memory.usage_in_bytes), the smallest over its cgroup and those above it; None where no limit is
    set ("max"; v1's largest count) or known. Usage here leaves out the inactive page cache
    (memory.stat's inactive_file, v1's total_inactive_file), which the kernel drops first when the
    limit is near, as `docker stats` and Kubernetes count a container's memory: a container that
    has read a few gigabytes of files has its limit nearly filled with cache, yet the room is there."""
    left = []
    for directory in _cgroups(Path(root), "memory"):
        try:
            if (directory / "memory.max").exists():
                limit, usage, inactive = "memory.max", "memory.current", "inactive_file"
            elif (directory / "memory.limit_in_bytes").exists():
                limit, usage, inactive = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
            else:
                continue
            limit = (directory / limit).read_text().strip()
            if limit == "max" or int(limit) >= V1_UNLIMITED:
                continue
            used = int((directory / usage).read_text()) - _stat(directory / "memory.stat", inactive)
            left.append(max(0, int(limit) - used))
        except (OSError, ValueError):
            continue
    return min(left, default=None)


def visible_devices(environ: Mapping[str, str] | None = None, gpu_count: int = 0) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices such as "2", or
    UUIDs such as "GPU-8f6c..." or "MIG-..."), `gpu_count` of them: the count TensorFlow found in
    this same environment. Unset, CUDA shows every GPU: "0" to str(gpu_count - 1). Set, CUDA shows
    the ones listed, in that order, up to the first it cannot use: so "" and "-1" show none, and
    "2,3" two, the machine's cards 2 and 3 (CUDA_DEVICE_ORDER, which a job inherits, says which
    card an index is)."""
    environ = os.environ if environ is None else environ
    mask = environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return [str(index) for index in range(gpu_count)]
    listed = []
    for entry in (entry.strip() for entry in mask.split(",")):
        if not entry or entry.startswith("-"):
            break
        listed.append(entry)
    return listed[:gpu_count]


def device_for_slot(slot: int, environ: Mapping[str, str] | None = None, gpu_count: int = 0) -> str | None:
    """What job slot `slot` (0, 1, ...) puts in its CUDA_VISIBLE_DEVICES: one of the GPUs the user
    left visible (`visible_devices`), slot k the (k mod their count)-th, so that the slots share
    them out evenly and never reach a card the user hid (with CUDA_VISIBLE_DEVICES=2,3 the jobs
    train on cards 2 and 3, never on 0 and 1). A job's value replaces its parent's mask and is read
    against the machine's cards, as any CUDA_VISIBLE_DEVICES is. None where no GPU is visible: the
    job keeps the environment it inherits (and sees no GPU either)."""
    devices = visible_devices(environ, gpu_count)
    return devices[slot % len(devices)] if devices else None


def _cgroups(root: Path, controller: str) -> list[Path]:
    """The cgroup directories whose `controller` ("cpu", "memory") limits apply to this process:
    its own (from /proc/self/cgroup) and every one above it up to the hierarchy's root, in cgroup
    v2's hierarchy (mounted at /sys/fs/cgroup, or at /sys/fs/cgroup/unified beside v1's) and in
    v1's for that controller (/sys/fs/cgroup/cpu, /sys/fs/cgroup/memory). Where its own is not
    there (a container without a cgroup namespace has its cgroup mounted as the root), the root."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    base = root / "sys/fs/cgroup"
    directories = []
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and not controllers:
            mount = next((m for m in (base, base / "unified") if (m / "cgroup.controllers").exists()), None)
        elif controller in controllers.split(","):
            mount = next((m for m in (base / controller, base / controllers) if m.is_dir()), None)
        else:
            continue
        if mount is not None:
            directories += _up_from(mount, path)
    return directories


def _up_from(mount: Path, path: str) -> list[Path]:
    """mount/path and each directory above it up to mount; mount alone where mount/path is not a
    directory or path leaves mount ("/.." where the cgroup is outside the process's namespace)."""
    parts = [part for part in path.split("/") if part]
    if ".." in parts or not mount.joinpath(*parts).is_dir():
        return [mount]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _mem_available(root: Path) -> int | None:
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                return int(value.split()[0]) * 1024  # the kernel writes kB, meaning KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _stat(path: Path, key: str) -> int:
    """The value of `key` in a memory.stat file, 0 where it is absent."""
    for line in path.read_text().splitlines() if path.exists() else ():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0
