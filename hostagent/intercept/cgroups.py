"""The agentgate cgroup v2 tree: where it is, making session cgroups, moving processes.

cgroup v2 is found from /proc/self/mountinfo (e.g. /sys/fs/cgroup on unified hosts,
/sys/fs/cgroup/unified on hybrid ones), never assumed.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

TREE = "agentgate"


class CgroupError(Exception):
    pass


def cgroup2_mount() -> Path:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError as exc:
        raise CgroupError(f"cannot read /proc/self/mountinfo: {exc.strerror}") from None
    for line in lines:
        pre, _, post = line.partition(" - ")
        if post.split(" ", 1)[0] == "cgroup2":
            return Path(pre.split()[4])
    raise CgroupError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")


def _v2_options() -> tuple[Path, set[str]]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fields = post.split(" ")
        if fields[0] == "cgroup2":
            return Path(pre.split()[4]), set(fields[2].split(",")) if len(fields) > 2 else set()
    raise CgroupError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")


def nsdelegate() -> bool:
    """Whether cgroup namespaces are delegation boundaries (the v2 mount's nsdelegate):
    only then does a process in a cgroup namespace, root or not, fail to move into a
    cgroup outside it."""
    return "nsdelegate" in _v2_options()[1]


def ensure_nsdelegate() -> bool:
    """Make cgroup namespaces delegation boundaries (systemd mounts cgroup v2 so on
    unified hosts; hybrid ones often don't): what keeps a root agent in its run's
    cgroup. False if it can't be done (not in the host's namespaces)."""
    mount, options = _v2_options()
    if "nsdelegate" in options:
        return True
    keep = sorted(o for o in options if o in ("memory_recursiveprot", "memory_localevents",
                                              "favordynmods", "memory_hugetlb_accounting"))
    import subprocess
    r = subprocess.run(["mount", "-o", ",".join(["remount", "nsdelegate", *keep]), str(mount)],
                       capture_output=True, text=True)
    return r.returncode == 0 and nsdelegate()


def tree_root(tree: str = TREE) -> Path:
    return cgroup2_mount() / tree


def ensure_tree(tree: str = TREE) -> Path:
    ensure_nsdelegate()
    root = tree_root(tree)
    try:
        root.mkdir(exist_ok=True)
    except OSError as exc:
        raise CgroupError(f"cannot create the agentgate cgroup {root}: {exc.strerror}") from None
    return root


def cgroup_id(path: Path) -> int:
    """The kernel's cgroup id is the cgroup directory's inode number (cgroup v2)."""
    return os.stat(path).st_ino


def make_cgroup(parent: Path, name: str) -> Path:
    path = parent / name
    try:
        path.mkdir()
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}") from None
    return path


def move(pid: int, cgroup: Path) -> None:
    try:
        (cgroup / "cgroup.procs").write_text(f"{pid}\n")
    except OSError as exc:
        raise CgroupError(f"cannot move pid {pid} into {cgroup}: {exc.strerror}") from None


def pids(cgroup: Path) -> list[int]:
    try:
        return [int(x) for x in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _subtree(cgroup: Path) -> list[Path]:
    """The cgroup and every cgroup below it, deepest first."""
    out = [Path(d) for d, _, _ in os.walk(cgroup)]
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


def remove(cgroup: Path, timeout: float = 5.0) -> None:
    """Kill what is left in a session cgroup (and the cgroups its processes made below
    it) and remove them."""
    kill = cgroup / "cgroup.kill"
    deadline = time.monotonic() + timeout
    while cgroup.exists():
        tree = _subtree(cgroup)
        if any(pids(c) for c in tree) and kill.exists():
            try:
                kill.write_text("1\n")   # the whole subtree
            except OSError:
                pass
        try:
            for c in tree:
                c.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise CgroupError(f"cannot remove cgroup {cgroup}: processes remain") from None
            time.sleep(0.02)


def cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of a process, relative to the cgroup2 mount ('/agentgate/x')."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        return None
    return None


_UNIT = re.compile(r"([^/]+\.(?:service|scope))$")
_CONTAINER = re.compile(r"([0-9a-f]{64})")


def unit_of(cgroup_path: str) -> str | None:
    for part in reversed(cgroup_path.split("/")):
        m = _UNIT.match(part)
        if m:
            return m.group(1)
    return None


def container_of(cgroup_path: str) -> str | None:
    m = _CONTAINER.search(cgroup_path or "")
    return m.group(1) if m else None


def unit_cgroup(unit: str) -> Path:
    """A systemd unit's own cgroup (it exists while the unit is loaded)."""
    mount = cgroup2_mount()
    for slice_ in ("system.slice", "user.slice", ""):
        path = mount / slice_ / unit if slice_ else mount / unit
        if path.is_dir():
            return path
    hits = list(mount.glob(f"**/{unit}"))
    if hits:
        return hits[0]
    raise CgroupError(f"no cgroup for unit {unit} (is it loaded?)")
