"""The hardware probe against output captured on a real H200 server (tests/fixtures/hardware)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from registry.agent import probe
from schemas.models import Accelerator, Capacity, CpuInfo, Status

H200 = Path(__file__).resolve().parents[2] / "fixtures" / "hardware" / "h200-x1"
UUID = "GPU-b6a3fff4-1d8c-3369-288e-1899770b0306"


def fixture(name: str) -> str:
    return (H200 / name).read_text()


def test_query_csv_with_header_and_units() -> None:
    [gpu] = probe.parse_nvidia_csv(fixture("nvidia-smi-query.csv"))
    assert gpu == probe.GpuReading(
        index=0,
        vendor="NVIDIA",
        model="H200",
        memory_total_mib=143771.0,
        memory_used_mib=0.0,
        utilization_pct=0.0,
        power_w=79.81,
        uuid=UUID,
        power_limit_w=700.0,
    )
    assert not gpu.busy


def test_noheader_csv_with_its_column_list() -> None:
    [gpu] = probe.parse_nvidia_csv(
        fixture("nvidia-smi-noheader.csv"), columns="index,name,memory.total,uuid"
    )
    assert (gpu.index, gpu.vendor, gpu.model, gpu.memory_total_mib, gpu.uuid) == (
        0,
        "NVIDIA",
        "H200",
        143771.0,
        UUID,
    )
    assert gpu.memory_used_mib is None and gpu.utilization_pct is None and gpu.power_w is None


def test_host_text_lscpu_and_meminfo() -> None:
    text = fixture("host.txt")
    assert probe.parse_cpuinfo(text) == CpuInfo(model="Intel(R) Xeon(R) Processor", cores=16)
    assert probe.parse_cpuinfo(text, cores=8) == CpuInfo(
        model="Intel(R) Xeon(R) Processor", cores=8
    )
    assert probe.parse_meminfo(text) == pytest.approx(125.9)  # 131981020 kB


def test_proc_cpuinfo_counts_processors() -> None:
    text = "processor\t: 0\nmodel name\t: AMD EPYC 9654\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9654\n"
    assert probe.parse_cpuinfo(text) == CpuInfo(model="AMD EPYC 9654", cores=2)
    assert probe.parse_cpuinfo("") is None


def _eight_gpus(busy: set[int]) -> str:
    """A multi-GPU query CSV built from the captured single row."""
    header, row = fixture("nvidia-smi-query.csv").strip().splitlines()
    rows = [header]
    for i in range(8):
        r = row.replace("0, NVIDIA H200", f"{i}, NVIDIA H200", 1)
        if i in busy:
            r = r.replace(
                ", 0 MiB, 143156 MiB, 0 %, 79.81 W", ", 120000 MiB, 23156 MiB, 97 %, 650.5 W"
            )
        rows.append(r.replace("00000000:00:06.0", f"00000000:00:{6 + i:02x}.0"))
    return "\n".join(rows) + "\n"


def test_multi_gpu_csv_groups_and_capacity() -> None:
    gpus = probe.parse_nvidia_csv(_eight_gpus(busy={1, 5, 6}))
    assert [g.index for g in gpus] == list(range(8))
    assert [g.busy for g in gpus] == [i in {1, 5, 6} for i in range(8)]
    reading = probe.Probe(
        cpu=CpuInfo(model="x", cores=16), memory_gib=125.9, storage_tib=1.0, gpus=tuple(gpus)
    )
    assert reading.attributes().accelerators == [
        Accelerator(vendor="NVIDIA", model="H200", memory_gib=140.4, count=8)
    ]
    assert reading.capacity().accelerators_free == 5
    assert reading.capacity(claimed=2).accelerators_free == 3
    assert reading.capacity(claimed=9).accelerators_free == 0
    metrics = reading.metrics()
    assert metrics["power_w"] == pytest.approx(5 * 79.81 + 3 * 650.5, abs=0.1)
    assert metrics["gpu_util"] == pytest.approx(3 * 97 / 8, abs=0.1)
    assert metrics["gpu_mem_used_mib"] == 3 * 120000
    assert metrics["gpu_mem_total_mib"] == 8 * 143771
    assert metrics["power_limit_w"] == 8 * 700


def test_captured_h200_reading_gives_the_l0_metrics_of_a_valid_status() -> None:
    """The one real capture, end to end: CSV -> metrics -> a status.v1 that validates."""
    gpus = probe.parse_nvidia_csv(fixture("nvidia-smi-query.csv"))
    reading = probe.Probe(cpu=None, memory_gib=None, storage_tib=None, gpus=tuple(gpus))
    metrics = reading.metrics()
    assert metrics == {
        "gpu_util": 0.0,
        "gpu_mem_used_mib": 0.0,
        "gpu_mem_total_mib": 143771.0,
        "power_w": 79.8,
        "power_limit_w": 700.0,
    }
    cpid = "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"
    status = Status(
        cpid=cpid, seq=1, observed_at=1, state="up", capacity=reading.capacity(), metrics=metrics
    )
    assert status.capacity == Capacity(accelerators_free=1)


def test_metrics_of_a_glitching_tool_are_clamped_or_dropped() -> None:
    """A tool that prints 250 % or an absurd wattage must not make the status invalid."""
    gpu = probe.GpuReading(
        index=0, vendor="NVIDIA", model="H200", memory_total_mib=1.0,
        memory_used_mib=5.0, utilization_pct=250.0, power_w=1e12, power_limit_w=float("nan"),
    )  # fmt: skip
    metrics = probe.Probe(None, None, None, (gpu,)).metrics()
    assert metrics["gpu_util"] == 100
    assert metrics["power_w"] == 10_000_000
    assert "power_limit_w" not in metrics
    Status(
        cpid="CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z", seq=1, observed_at=1, state="up",
        capacity=Capacity(accelerators_free=0), metrics=metrics,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("H200", "H200"),
        ("H100 80GB HBM3", "H100"),
        ("A800-SXM4-80GB", "A800"),
        ("Tesla V100-SXM2-32GB", "V100"),
        ("L40S", "L40S"),
        ("H20", "H20"),
        ("GeForce RTX 4090", "GeForce RTX 4090"),
    ],
)
def test_models_are_reported_by_family(name: str, model: str) -> None:
    assert probe.normalise_model(name) == model
    [gpu] = probe.parse_nvidia_csv(
        f"0, NVIDIA {name}, 81559 MiB\n", columns="index,name,memory.total"
    )
    assert gpu.model == model


def test_probe_runs_nvidia_smi_from_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\ncat '{H200 / 'nvidia-smi-query.csv'}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    reading = probe.probe()
    assert [g.model for g in reading.gpus] == ["H200"]
    assert reading.cpu is not None and reading.cpu.cores == os.cpu_count()
    assert reading.memory_gib and reading.memory_gib > 0
    assert reading.storage_tib and reading.storage_tib > 0


def test_probe_without_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert probe.probe().gpus == ()
