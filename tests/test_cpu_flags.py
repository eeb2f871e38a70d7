"""cpu_flags() parses a real /proc/cpuinfo text (not a monkeypatched set), and this machine's own file."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

import tl_lightning.precision as precision

# two logical CPUs of a Sapphire Rapids host, verbatim layout (tabs before the colon), trimmed
CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass
bogomips\t: 5399.99
vmx flags\t: vnmi preemption_timer posted_intr

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""

AVX2_ONLY = CPUINFO.replace(" avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8", "")


def _serve(monkeypatch, text: str | None):
    def fake_open(path, *args, **kwargs):
        assert path == "/proc/cpuinfo"
        if text is None:
            raise FileNotFoundError(path)
        return io.StringIO(text)

    monkeypatch.setattr(precision, "open", fake_open, raising=False)


def test_flags_line_is_split_into_the_flag_names(monkeypatch):
    _serve(monkeypatch, CPUINFO)
    flags = precision.cpu_flags()
    assert flags == {
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep",
        "avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8",
    }  # fmt: skip
    assert "vnmi" not in flags and "spectre_v1" not in flags  # other lines are not flags
    assert precision.cpu_has_fast_bf16()
    assert precision.mixed_precision_for("cpu") == "bf16-mixed"


def test_avx2_only_cpu_keeps_fp32(monkeypatch):
    _serve(monkeypatch, AVX2_ONLY)
    assert "avx2" in precision.cpu_flags() and not precision.cpu_has_fast_bf16()
    assert precision.mixed_precision_for("cpu") == "32-true"


def test_no_cpuinfo_means_no_flags(monkeypatch):
    _serve(monkeypatch, None)
    assert precision.cpu_flags() == set()
    assert precision.mixed_precision_for("cpu") == "32-true"


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="a platform without /proc")
def test_this_machines_cpuinfo():
    text = Path("/proc/cpuinfo").read_text()
    match = re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)
    expected = set(match.group(1).split()) if match else set()
    assert precision.cpu_flags() == expected
