"""Hardware probe for the node agent: CPU, memory, disks, GPUs (nvidia-smi).

The parsers are pure functions over the text the tools print, tested against output
captured on a real H200 server (tests/fixtures/hardware); :func:`probe` runs them on
this machine.  An NPU probe can be added as another ``_probe_*`` function once real
``npu-smi`` output is available to test it against.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from schemas.models import METRICS, Accelerator, Attributes, Capacity, CpuInfo

__all__ = [
    "GPU_QUERY",
    "GpuReading",
    "Probe",
    "normalise_model",
    "parse_cpuinfo",
    "parse_meminfo",
    "parse_nvidia_csv",
    "probe",
]

GPU_QUERY = (
    "index,name,memory.total,memory.used,memory.free,utilization.gpu,power.draw,power.limit,uuid"
)
_MIB_PER_GIB = 1024.0


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    vendor: str
    model: str
    memory_total_mib: float
    memory_used_mib: float | None = None
    utilization_pct: float | None = None
    power_w: float | None = None
    uuid: str = ""
    power_limit_w: float | None = None

    @property
    def busy(self) -> bool:
        """A GPU counts as taken when a process holds memory or it is doing work."""
        return bool((self.memory_used_mib or 0) > 1024 or (self.utilization_pct or 0) > 5)


@dataclass(frozen=True, slots=True)
class Probe:
    cpu: CpuInfo | None
    memory_gib: float | None
    storage_tib: float | None
    gpus: tuple[GpuReading, ...] = field(default_factory=tuple)

    def attributes(self) -> Attributes:
        groups: dict[tuple[str, str, float], int] = {}
        for g in self.gpus:
            k = (g.vendor, g.model, round(g.memory_total_mib / _MIB_PER_GIB, 1))
            groups[k] = groups.get(k, 0) + 1
        return Attributes(
            cpu=self.cpu,
            memory_gib=self.memory_gib,
            storage_tib=self.storage_tib,
            accelerators=[
                Accelerator(vendor=v, model=m, memory_gib=mem, count=n)
                for (v, m, mem), n in groups.items()
            ],
        )

    def capacity(self, *, claimed: int = 0) -> Capacity:
        free = sum(1 for g in self.gpus if not g.busy)
        return Capacity(
            accelerators_free=max(0, free - claimed), cpu_free=self.cpu.cores if self.cpu else None
        )

    def metrics(self) -> dict[str, float]:
        """The L0 metrics of a ``status.v1`` (names, units and bounds: docs/protocol.md
        §4, ``schemas.models.METRICS``): mean utilisation, memory used and installed,
        power drawn and its limit, over the GPUs that report each.  A value outside its
        bounds (a tool's glitch) is clamped, so the status stays valid."""
        out: dict[str, float] = {}
        util = [g.utilization_pct for g in self.gpus if g.utilization_pct is not None]
        if util:
            out["gpu_util"] = round(sum(util) / len(util), 1)
        sums = {
            "gpu_mem_used_mib": [g.memory_used_mib for g in self.gpus],
            "gpu_mem_total_mib": [g.memory_total_mib or None for g in self.gpus],
            "power_w": [g.power_w for g in self.gpus],
            "power_limit_w": [g.power_limit_w for g in self.gpus],
        }
        for name, values in sums.items():
            present = [v for v in values if v is not None]
            if present:
                out[name] = round(sum(present), 1)
        for name, value in list(out.items()):
            spec = METRICS[name]
            if not math.isfinite(value):
                del out[name]
            else:
                out[name] = min(spec.high, max(spec.low, value))
        return out


def _number(text: str) -> float | None:
    """'143771 MiB' -> 143771.0; '[N/A]' / 'N/A' / '[Not Supported]' -> None."""
    m = re.search(r"-?\d+(?:\.\d+)?", text)
    return float(m.group()) if m and "N/A" not in text and "Not Supported" not in text else None


_HEADER_CELL = re.compile(r"^[a-z][a-z0-9_.]*(?: \[[^\]]*\])?$")
_DATACENTER_MODEL = re.compile(r"^(?:Tesla\s+)?([A-Z]{1,2}\d{1,4}[A-Z]?)(?=[\s-]|$)")


def normalise_model(name: str) -> str:
    """The family name of a GPU as discovery matches it: ``H100 80GB HBM3`` -> ``H100``.

    Data-centre parts (``H100 80GB HBM3``, ``A800-SXM4-80GB``, ``Tesla V100-SXM2-32GB``,
    ``L40S``) keep their family only; other names (``GeForce RTX 4090``) are kept whole.
    """
    m = _DATACENTER_MODEL.match(name.strip())
    return m.group(1) if m else name.strip()


def _is_header(line: str) -> bool:
    cells = [c.strip() for c in line.split(",")]
    return all(_HEADER_CELL.match(c) for c in cells) and any(
        c.split(" ")[0] in ("index", "name", "memory.total", "uuid") for c in cells
    )


def parse_nvidia_csv(text: str, columns: str = GPU_QUERY) -> list[GpuReading]:
    """Parse ``nvidia-smi --query-gpu=...`` CSV, with or without header and units.

    Columns are matched by the header when there is one; without a header (``noheader``)
    pass the ``--query-gpu`` list that produced the text.  Models are reported by family
    (:func:`normalise_model`).
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    names = [c.strip() for c in columns.split(",")]
    if _is_header(lines[0]):
        names = [c.strip().split(" ")[0] for c in lines[0].split(",")]
        lines = lines[1:]
    out: list[GpuReading] = []
    for line in lines:
        row = dict(zip(names, (c.strip() for c in line.split(",")), strict=False))
        name = row.get("name", "")
        vendor, _, model = name.partition(" ")
        if vendor.upper() != "NVIDIA" or not model:
            vendor, model = "NVIDIA", name
        out.append(
            GpuReading(
                index=int(row.get("index", len(out))),
                vendor=vendor,
                model=normalise_model(model),
                memory_total_mib=_number(row.get("memory.total", "")) or 0.0,
                memory_used_mib=_number(row.get("memory.used", "N/A")),
                utilization_pct=_number(row.get("utilization.gpu", "N/A")),
                power_w=_number(row.get("power.draw", "N/A")),
                uuid=row.get("uuid", ""),
                power_limit_w=_number(row.get("power.limit", "N/A")),
            )
        )
    return out


def parse_cpuinfo(text: str, cores: int | None = None) -> CpuInfo | None:
    """CPU model and logical cores from /proc/cpuinfo or ``lscpu`` text.

    ``cores`` (e.g. ``os.cpu_count()``) wins; otherwise the ``CPU(s):`` line of lscpu or
    the number of ``processor`` entries of /proc/cpuinfo is used.
    """
    m = re.search(r"^(?:model name|Model name)\s*:\s*(.+)$", text, re.MULTILINE)
    if not cores:
        n = re.search(r"^CPU\(s\):\s*(\d+)\s*$", text, re.MULTILINE)
        cores = int(n.group(1)) if n else len(re.findall(r"^processor\s*:", text, re.MULTILINE))
    if not cores:
        return None
    return CpuInfo(model=(m.group(1).strip() if m else "unknown")[:256], cores=cores)


def parse_meminfo(text: str) -> float | None:
    """Total memory in GiB from /proc/meminfo."""
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.MULTILINE)
    return round(int(m.group(1)) / (1024 * 1024), 1) if m else None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _probe_gpus(timeout: float = 10.0) -> list[GpuReading]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = subprocess.run(
            [exe, f"--query-gpu={GPU_QUERY}", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_csv(done.stdout)


def probe(root: str = "/") -> Probe:
    """Probe this machine."""
    usage = shutil.disk_usage(root)
    return Probe(
        cpu=parse_cpuinfo(_read("/proc/cpuinfo"), os.cpu_count()),
        memory_gib=parse_meminfo(_read("/proc/meminfo")),
        storage_tib=round(usage.total / 1024**4, 3),
        gpus=tuple(_probe_gpus()),
    )
