"""infra/device.py: the AMP default follows the CPU's bf16 instructions, and host_info records what decides the samples."""
import io

import pytest
import torch

from infra import device
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.mark.parametrize("text,flags,fast", [(EPYC, ["avx2"], False),
                                             (SAPPHIRE, ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], True),
                                             ("flags : avx512_bf16x\n", [], False)])
def test_cpu_flags_and_the_amp_default_follow_proc_cpuinfo(monkeypatch, text, flags, fast):
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: io.StringIO(text))
    assert device.cpu_flags() == flags and device.cpu_has_fast_bf16() is fast
    if text is EPYC:
        assert device.cpu_model() == "AMD EPYC 7B13 64-Core Processor"
    assert device.amp_default("cpu") is fast and device.amp_default("cuda") is True


def test_no_proc_cpuinfo_means_no_flags_and_amp_off(monkeypatch):
    def missing(*a, **k):
        raise OSError("no such file")
    monkeypatch.setattr("builtins.open", missing)
    assert device.cpu_flags() == [] and device.amp_default("cpu") is False and device.cpu_model()


def test_host_info_records_amp_mode_and_torch_version(monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: ["avx2"])
    off, on = device.host_info("cpu", False), device.host_info("cpu", True)
    assert off["amp"] == "off" and on["amp"] == "bfloat16" and off["cpu_flags"] == ["avx2"]
    assert off["torch"] == torch.__version__ and off["threads"] == torch.get_num_threads() and "gpu" not in off


def test_bad_device_names_are_input_errors():
    with pytest.raises(device.InputError, match="--device"):
        device.resolve_device("tpu")
    assert device.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(device.InputError, match="no GPU"):
            device.resolve_device("cuda:0")


@pytest.mark.parametrize("host_default", [False, True])   # an AVX2-only EPYC; an AVX512-BF16 EPYC or an AMX Xeon
@pytest.mark.parametrize("flag,amp", [([], None), (["--amp"], True), (["--no-amp"], False)])
def test_the_amp_flags_pin_the_precision_whatever_the_hosts_default(monkeypatch, tmp_path, host_default, flag, amp):
    """The tests that compare numbers across code paths pass --amp / --no-amp: the run's precision is then the
    flag's on every host, and the host's default only without one."""
    import train
    from test_cli import TINY
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)        # keep pytest's own signal handlers
    monkeypatch.setattr(train, "amp_default", lambda dev: host_default)
    config = train.main([*TINY, "--device", "cpu", "--out", str(tmp_path / "r"), *flag], check_only=True)
    assert config["train"]["amp"] is (host_default if amp is None else amp) and not (tmp_path / "r").exists()
