"""GPU profiles: every shipped TOML validates, the precision policy per compute capability, user TOMLs,
and --gpu auto (GPU detection, nearest profile, and the clear error without a GPU)."""

import pytest

import osx.gpu as detect
from osx.cli import main
from osx.errors import OsxError
from osx.models import get_model_config
from osx.profiles import (
    Bucket, allowed_precisions, check_precision, detect_profile, dry_run, load_profile, make_plan, nearest_profile,
    plan_that_fits, shipped_profiles,
)
from osx.gpu import GpuInfo, parse_nvidia_smi

REQUIRED = {"cpu", "rtx3060", "rtx3080", "rtx3090", "rtx4060", "rtx4060ti-16g", "rtx4070", "rtx4070ti-super", "rtx4080",
            "rtx4090", "rtx5080", "rtx5090", "l4", "l40s", "a10g", "a100-40g", "a100-80g", "h100", "h200"}
GIB = 1 << 30


def test_the_issue_lists_every_shipped_profile():
    assert REQUIRED <= set(shipped_profiles())


@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_profile_validates_and_plans_the_real_model(name):
    p = load_profile(name)
    assert p.name == name
    for comp, precision in p.precision.items():  # the policy respects the compute capability rules
        on = p.with_changes(compute_capability=None) if comp in p.cpu_components else p
        check_precision(comp, precision, on)
    # T5 never fp16 (it overflows); on the CPU, onnxruntime's INT8 QDQ keeps it in 8 GB cards' desktops' RAM
    assert p.precision["text_encoder"] in (("fp32", "int8") if "text_encoder" in p.cpu_components else ("fp32", "bf16"))
    if not p.is_cpu:
        cc = p.compute_capability
        best = "fp8" if cc >= (8, 9) else "int8" if cc >= (7, 5) else "fp16"
        assert p.precision["denoiser"] == best, "the denoiser runs at the fastest precision the card has"
        assert p.buckets and p.reserve_gib > 0
    plan = plan_that_fits(p, get_model_config("opensora-v1.2"))  # raises if a shipped profile does not fit its card
    assert plan.fits


@pytest.mark.parametrize("cc,expected", [
    ((9, 0), {"fp32", "fp16", "bf16", "int8", "fp8"}),
    ((8, 9), {"fp32", "fp16", "bf16", "int8", "fp8"}),
    ((8, 6), {"fp32", "fp16", "bf16", "int8"}),
    ((8, 0), {"fp32", "fp16", "bf16", "int8"}),
    ((7, 5), {"fp32", "fp16", "int8"}),
    ((7, 0), {"fp32", "fp16"}),
    (None, {"fp32", "int8"}),  # the CPU: onnxruntime fp32 or the INT8 QDQ graph
])
def test_precision_policy_per_compute_capability(cc, expected):
    assert set(allowed_precisions("denoiser", cc)) == expected
    # T5 overflows in fp16: everything the denoiser may use except fp16.
    assert set(allowed_precisions("text_encoder", cc)) == expected - {"fp16"}


def test_precision_refusals_say_why():
    rtx3060 = load_profile("rtx3060")
    with pytest.raises(OsxError, match=r"fp8 needs compute capability >= 8.9; rtx3060 has 8.6"):
        check_precision("denoiser", "fp8", rtx3060)
    with pytest.raises(OsxError, match="T5 v1.1 overflows in float16"):
        check_precision("text_encoder", "fp16", rtx3060)
    with pytest.raises(OsxError, match="fp8 needs"):
        make_plan(rtx3060, get_model_config("opensora-v1.2"), "fp8")


def _write(tmp_path, text, name="mine.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


MINIMAL = """
name = "mine"
compute_capability = "8.6"
vram_gib = 24
[precision]
text_encoder = "bf16"
denoiser = "int8"
vae_decoder = "bf16"
[shapes]
buckets = ["240x426x51", "480x854x102"]
"""


def test_user_profile_file(tmp_path):
    p = load_profile(_write(tmp_path, MINIMAL))
    assert p.name == "mine" and p.compute_capability == (8, 6)
    assert p.buckets == (Bucket(240, 426, 51), Bucket(480, 854, 102))
    assert p.load_one_at_a_time and p.cfg_batching and not p.dynamic_shapes  # defaults
    plan = make_plan(p, get_model_config("opensora-v1.2"))
    assert [b.name for b in plan.buckets] == ["240x426x51", "480x854x102"]


@pytest.mark.parametrize("edit,field", [
    (('denoiser = "int8"', 'denoiser = "fp8"'), "precision.denoiser"),  # FP8 on an Ampere card
    (('text_encoder = "bf16"', 'text_encoder = "fp16"'), "precision.text_encoder"),
    (('compute_capability = "8.6"', 'compute_capability = "eight"'), "compute_capability"),
    (('vram_gib = 24', 'vram_gib = "24"'), "vram_gib"),
    (('buckets = ["240x426x51", "480x854x102"]', 'buckets = ["240x426"]'), "shapes"),
    (('vae_decoder = "bf16"', 'vae_decoder = "bf16"\nunet = "fp16"'), "precision.unet"),
    (('name = "mine"', 'name = "mine"\ncolour = "red"'), "colour"),
])
def test_invalid_profile_names_file_and_field(tmp_path, edit, field):
    path = _write(tmp_path, MINIMAL.replace(*edit))
    with pytest.raises(OsxError) as e:
        load_profile(path)
    assert path in e.value.message and repr(field) in e.value.message


def test_unknown_name_and_broken_toml(tmp_path):
    with pytest.raises(OsxError) as e:
        load_profile("rtx9999")
    assert "rtx4070" in e.value.hint and "cpu" in e.value.hint
    path = _write(tmp_path, "name = [unclosed")
    with pytest.raises(OsxError, match="not valid TOML") as e:
        load_profile(path)
    assert path in e.value.message


def test_parse_nvidia_smi():
    text = "NVIDIA GeForce RTX 4070, 8.9, 12282, 570.86.15\nNVIDIA A100-SXM4-80GB, 8.0, 81920, 570.86.15\n"
    gpus = parse_nvidia_smi(text)
    assert gpus[0] == GpuInfo("NVIDIA GeForce RTX 4070", (8, 9), 12282 << 20, "570.86.15", source="nvidia-smi")
    assert gpus[1].compute_capability == (8, 0) and gpus[1].memory_bytes == 81920 << 20
    # with the PCI bus id (how CUDA finds the profiled GPU: its index may differ from NVML's)
    (gpu,) = parse_nvidia_smi("NVIDIA GeForce RTX 4070, 8.9, 12282, 570.86.15, 00000000:65:00.0\n")
    assert gpu.pci_bus_id == "00000000:65:00.0"
    from osx.runtime.cuda import normalize_bus_id

    assert normalize_bus_id(gpu.pci_bus_id) == "0000:65:00.0"


@pytest.mark.parametrize("name,cc,mib,expected", [
    ("NVIDIA GeForce RTX 4070", (8, 9), 12282, "rtx4070"),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", (8, 9), 16376, "rtx4070ti-super"),
    ("NVIDIA GeForce RTX 4060 Ti", (8, 9), 16380, "rtx4060ti-16g"),  # same name, 16 GB variant
    ("NVIDIA GeForce RTX 4060 Ti", (8, 9), 8188, "rtx4060"),  # same name, 8 GB variant
    ("NVIDIA H100 80GB HBM3", (9, 0), 81559, "h100"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), 81920, "a100-80g"),
])
def test_nearest_profile_by_name(name, cc, mib, expected):
    profiles = [load_profile(n) for n in shipped_profiles()]
    p, why = nearest_profile(GpuInfo(name, cc, mib << 20), profiles)
    assert p.name == expected and name in why


def test_nearest_profile_for_an_unlisted_gpu_is_one_it_covers():
    profiles = [load_profile(n) for n in shipped_profiles()]
    gpu = GpuInfo("NVIDIA RTX A6000", (8, 6), 48 << 30)
    p, why = nearest_profile(gpu, profiles)
    assert p.compute_capability <= (8, 6) and p.vram_gib <= 48 and "no profile names it" in why
    plan = make_plan(p, get_model_config("opensora-v1.2"))
    assert plan.fits and p.name in why
    with pytest.raises(OsxError, match="no shipped profile fits"):
        nearest_profile(GpuInfo("NVIDIA Tesla K80", (3, 7), 12 << 30), profiles)


@pytest.fixture
def no_gpu(monkeypatch):
    def missing(*_):
        raise FileNotFoundError("not on this test machine")

    monkeypatch.setattr(detect, "_nvml", missing)
    monkeypatch.setattr(detect, "_nvidia_smi", missing)


def test_gpu_auto_without_a_gpu_says_so(no_gpu):
    with pytest.raises(OsxError) as e:
        detect_profile()
    assert "found no NVIDIA GPU" in e.value.message
    assert "--gpu NAME" in e.value.hint and "rtx4070" in e.value.hint and "--gpu cpu" in e.value.hint
    with pytest.raises(OsxError, match="found no NVIDIA GPU"):
        dry_run("auto", "opensora-v1.2")


def test_gpu_auto_with_a_detected_gpu(monkeypatch):
    monkeypatch.setattr(detect, "_nvml", lambda: [GpuInfo("NVIDIA GeForce RTX 4090", (8, 9), 24564 << 20, "570", "12.8", "nvml")])
    profile, why = detect_profile()
    assert profile.name == "rtx4090" and "RTX 4090" in why
    assert why.splitlines()[0] in dry_run("auto", "opensora-v1.2")


def test_cli_build_gpu_auto_without_gpu_exits_cleanly(no_gpu, tmp_path, capsys):
    from osx.bundle import BundleWriter
    from osx.manifest import ComponentEntry, Manifest
    from osx.families import component_specs

    specs = component_specs(get_model_config("opensora-v1.2-tiny"))
    with BundleWriter(tmp_path / "b") as w:
        (w.dir / "denoiser.onnx").write_bytes(b"not really onnx")
        (w.dir / "tokenizer.json").write_text("{}")
        w.commit(Manifest(model={"name": "opensora-v1.2-tiny", "family": "opensora-v1.2",
                                 "config": get_model_config("opensora-v1.2-tiny").to_dict()},
                          components={"denoiser": ComponentEntry(file="denoiser.onnx", precision="fp32", io=specs["denoiser"])},
                          tokenizer={"file": "tokenizer.json", "max_length": 32}, scheduler={}))
    with pytest.raises(SystemExit) as e:
        main(["build", str(tmp_path / "b"), "--gpu", "auto"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "found no NVIDIA GPU" in err and "Traceback" not in err and "--gpu NAME" in err
