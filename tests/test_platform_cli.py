import pytest
import torch

from flashport import cli
from flashport import platform as fp_platform
from flashport.errors import FlashportError
from flashport.platform import (
    arch_for_capability,
    detect_platform,
    fp8_dtype_for_arch,
    triton_target_for,
)


@pytest.mark.parametrize(
    "arch, dtype",
    [
        ("gfx942", torch.float8_e4m3fnuz),
        ("gfx940", torch.float8_e4m3fnuz),
        ("gfx942:sramecc+:xnack-", torch.float8_e4m3fnuz),
        ("gfx950", torch.float8_e4m3fn),
        ("sm_90", torch.float8_e4m3fn),
        ("sm_100", torch.float8_e4m3fn),
        ("cpu", torch.float8_e4m3fn),
    ],
)
def test_fp8_dtype_for_arch(arch, dtype):
    assert fp8_dtype_for_arch(arch) is dtype


def test_arch_and_triton_target():
    assert arch_for_capability(9, 0) == "sm_90"
    assert arch_for_capability(10, 0) == "sm_100"
    assert triton_target_for("cuda", "sm_90") == "cuda:90"
    assert triton_target_for("cuda", "sm_100") == "cuda:100"
    assert triton_target_for("rocm", "gfx942") == "hip:gfx942"
    assert triton_target_for("cpu", "cpu") is None


def test_detect_platform_cpu():
    p = detect_platform("cpu")
    assert p.backend == "cpu"
    assert p.arch == "cpu"
    assert p.triton_target is None
    assert p.fp8_dtype is torch.float8_e4m3fn
    assert p.fp8_flavour == "e4m3fn"
    assert p.total_memory_bytes > 0
    assert 0 < p.free_memory_bytes <= p.total_memory_bytes
    assert p.torch_version == torch.__version__
    with pytest.raises(Exception):
        p.backend = "cuda"  # frozen


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_detect_platform_cuda_without_gpu_is_a_user_error():
    with pytest.raises(FlashportError, match="no CUDA/ROCm GPU"):
        detect_platform("cuda")


@pytest.mark.gpu
def test_detect_platform_gpu():
    p = detect_platform("cuda")
    assert p.backend in ("cuda", "rocm")
    assert p.triton_target is not None
    assert p.fp8_dtype is fp8_dtype_for_arch(p.arch)
    assert 0 < p.free_memory_bytes <= p.total_memory_bytes


def test_env_command(capsys):
    assert cli.main(["env", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "backend:" in out and "cpu" in out
    assert "fp8:" in out and "e4m3fn" in out
    assert "GiB" in out


def test_env_command_default_device(capsys):
    assert cli.main(["env"]) == 0
    assert "backend:" in capsys.readouterr().out


def test_flashport_error_is_one_line_exit_2(monkeypatch, capsys):
    def boom(device=None):
        raise FlashportError("config.json: field 'hidden_size'\nis missing")

    monkeypatch.setattr(fp_platform, "detect_platform", boom)
    assert cli.main(["env"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: config.json: field 'hidden_size' is missing\n"
    assert "Traceback" not in captured.err + captured.out


def test_keyboard_interrupt_exits_130(monkeypatch):
    def interrupted(device=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(fp_platform, "detect_platform", interrupted)
    assert cli.main(["env"]) == 130


def test_other_exceptions_keep_their_traceback(monkeypatch):
    def bug(device=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(fp_platform, "detect_platform", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["env"])


def test_generate_thinking_needs_chat(capsys):
    assert cli.main(["generate", "models/none", "--prompt", "hi", "--thinking"]) == 2
    assert capsys.readouterr().err.startswith("error: --thinking needs --chat")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_env_cuda_without_gpu_exit_2(capsys):
    assert cli.main(["env", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate"])
    assert exc.value.code == 2
