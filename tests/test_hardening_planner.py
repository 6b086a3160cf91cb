"""Issue #18 item 15: a plan that runs T5 on the CPU accounts for host RAM: checked against the machine's
RAM when it is the machine that runs it, else stated as a requirement in the fit line; the 8 GB cards'
profiles run T5 at INT8 on the CPU (onnxruntime's INT8 QDQ; its CPU provider has no bf16 kernels)."""

import pytest

from osx.errors import OsxError
from osx.models import get_model_config
from osx.profiles import load_profile, plan_that_fits
from osx.profiles.profile import GIB
from osx.profiles.render import render_plan

MODEL = get_model_config("opensora-v1.2")


@pytest.mark.parametrize("name", ["rtx4060", "rtx3080"])
def test_cpu_t5_is_int8_and_fits_a_16_gb_desktop(name):
    plan = plan_that_fits(load_profile(name), MODEL, host_ram_bytes=16 * GIB)
    t5 = plan.components["text_encoder"]
    assert (t5.device, t5.precision) == ("cpu", "int8")
    assert plan.host_peak_bytes < 6 * GIB  # fp32 needed 17.9 GiB
    assert "this machine has 16.00 GiB: fits" in render_plan(plan)


def test_fp32_t5_on_a_16_gb_machine_is_refused_with_the_numbers():
    fp32_t5 = load_profile("rtx4060").with_changes(precision={"text_encoder": "fp32", "denoiser": "fp8", "vae_decoder": "bf16"})
    with pytest.raises(OsxError, match="needs 17.88 GiB of host RAM .*text_encoder at fp32.*this machine has 16.00 GiB") as e:
        plan_that_fits(fp32_t5, MODEL, host_ram_bytes=16 * GIB)
    assert "int8" in e.value.hint
    assert plan_that_fits(fp32_t5, MODEL, host_ram_bytes=32 * GIB).fits


def test_unknown_machine_states_the_need_in_the_fit_line():
    text = render_plan(plan_that_fits(load_profile("rtx4060"), MODEL))
    fit_line = next(line for line in text.splitlines() if line.startswith("GPU peak"))
    assert fit_line.endswith("fits if the machine has 4.94 GiB of RAM for the CPU components")
    assert "host RAM: requires 4.94 GiB" in text
