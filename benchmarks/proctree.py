"""Runs a command and measures it as a whole process tree: wall, CPU and peak RSS.

Peak RSS is the largest sum of the resident sizes of the command and all its
descendants, sampled every ``interval`` seconds from /proc (workers of a multi-process
runner count too; GNU time's %M would report only the largest single process).
"""
import os
import resource
import subprocess
import threading
import time
from typing import List, NamedTuple, Optional


class Measured(NamedTuple):
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    returncode: int
    stdout: str
    stderr: str
    killed_over_limit: bool


def _children() -> dict:
    """{parent pid: [child pids]} of every process (from /proc)."""
    children: dict = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(name))
    return children


def _rss_bytes(pid: int) -> int:
    try:
        with open("/proc/%d/statm" % pid) as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int) -> int:
    """Sum of the resident sizes of ``root`` and its descendants (bytes)."""
    return sum(_rss_bytes(pid) for pid in tree_pids(root))


def tree_pids(root: int) -> list:
    """``root`` and its descendants, parents first."""
    children = _children()
    tree, frontier = [root], [root]
    while frontier:
        kids = children.get(frontier.pop(), [])
        tree.extend(kids)
        frontier.extend(kids)
    return tree


def run(argv: List[str], cwd: Optional[str] = None, env: Optional[dict] = None,
        interval: float = 0.2, timeout: Optional[float] = None,
        rss_limit: Optional[int] = None) -> Measured:
    """Runs ``argv`` to its end; CPU time is user + system of the whole tree. With
    ``rss_limit`` (bytes) the tree is killed once it holds more (a run that would take
    the machine's memory from everything else), and ``killed_over_limit`` says so."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak, killed = 0, False
    out: dict = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"),
                                                            proc.communicate(timeout=timeout))))
    reader.start()
    while reader.is_alive():
        peak = max(peak, tree_rss(proc.pid))
        if rss_limit is not None and peak > rss_limit and not killed:
            killed = True
            _kill_tree(proc.pid)
        reader.join(interval)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measured(wall, cpu, peak, proc.returncode, out.get("stdout", ""),
                    out.get("stderr", ""), killed)


def _kill_tree(root: int) -> None:
    for pid in reversed(tree_pids(root)):
        try:
            os.kill(pid, 9)
        except OSError:
            pass
