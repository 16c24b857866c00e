"""Shared by the benchmark scripts: the machine's description and BENCHMARKS.md sections.

Each script owns one ``## Section`` of BENCHMARKS.md and replaces only that section,
so the scripts can be re-run in any order.
"""
import datetime as dt
import os
import platform
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
_HEADER = ("# Benchmarks\n\nEvery table is written by the script named in its section; "
           "re-run the script to refresh it.\n")


def machine() -> str:
    """CPU model, cores, memory, Python and library versions, date."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            names = [l.split(":", 1)[1].strip() for l in handle if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            kb = int(handle.readline().split()[1])
        memory = ", %.0f GiB RAM" % (kb / 2 ** 20)
    except (OSError, ValueError, IndexError):
        pass
    versions = []
    for module in ("apache_beam", "torch", "onnxruntime", "numpy"):
        try:
            versions.append("%s %s" % (module, __import__(module).__version__))
        except ImportError:
            pass
    return "%s, %d cores%s, Python %s, %s; %s" % (
        cpu, os.cpu_count() or 0, memory, platform.python_version(), ", ".join(versions),
        dt.date.today().isoformat())


def record_section(title: str, body: str) -> None:
    """Replaces (or appends) ``## title`` in BENCHMARKS.md with ``body``."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else _HEADER
    section = "## %s\n\n%s\n" % (title, body.strip())
    pattern = re.compile(r"^## %s\n.*?(?=^## |\Z)" % re.escape(title), re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    BENCHMARKS.write_text(text)
