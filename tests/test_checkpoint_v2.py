"""Open-Sora v2.0 checkpoints in the released layout (written here from seeded tiny weights, bf16 as
released): parts found by tensor names, strict success, and every failure class refused with the key named."""

import shutil

import pytest
import torch

from osx.errors import CheckpointError
from osx.export.checkpoint import save_safetensors
from osx.export.checkpoint_v2 import find_parts, identify, load_part, resolve_parts
from osx.export.mmdit import MMDiT
from osx.export.pipeline_v2 import build_reference_v2, reference_generate_v2
from osx.models_v2 import OPENSORA_V2_0_TINY as TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BF16 = torch.bfloat16


def _bf16(state):
    return {k: v.to(BF16) if v.is_floating_point() else v for k, v in state.items()}


def _spiece(path):
    spm = pytest.importorskip("sentencepiece")
    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(f"a {c} {a} runs in the {p}" for c in ("red", "old", "small") for a in ("fox", "dog", "car")
                                for p in ("snow", "city", "rain")))
    spm.SentencePieceTrainer.train(  # T5's layout: pad 0, eos 1, unk 2, no bos
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=40, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False,
        minloglevel=2)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released file names: Open_Sora_v2.safetensors, hunyuan_vae.safetensors, google/t5-v1_1-xxl/ (the
    whole T5 model: decoder and LM head included), openai/clip-vit-large-patch14/ (the whole CLIP model)."""
    root = tmp_path_factory.mktemp("ckpts")
    src = build_reference_v2(TINY, seed=3, dtype=torch.float32)
    save_safetensors(_bf16(src.mmdit.state_dict()), root / "Open_Sora_v2.safetensors")
    save_safetensors(_bf16(src.vae.state_dict()), root / "hunyuan_vae.safetensors")
    t5 = _bf16(src.t5.state_dict())
    t5["decoder.final_layer_norm.weight"] = torch.ones(TINY.t5.d_model, dtype=BF16)
    t5["lm_head.weight"] = torch.zeros(TINY.t5.vocab_size, TINY.t5.d_model, dtype=BF16)
    t5_dir = root / "google" / "t5-v1_1-xxl"
    save_safetensors(t5, t5_dir / "model.safetensors")
    _spiece(t5_dir / "spiece.model")
    clip = _bf16(src.clip.state_dict())
    clip.update({"vision_model.post_layernorm.weight": torch.ones(8, dtype=BF16), "logit_scale": torch.ones((), dtype=BF16),
                 "text_projection.weight": torch.zeros(8, TINY.clip.hidden_size, dtype=BF16),
                 "visual_projection.weight": torch.zeros(8, 8, dtype=BF16),
                 "text_model.embeddings.position_ids": torch.arange(TINY.clip.max_position_embeddings)[None]})
    clip_dir = root / "openai" / "clip-vit-large-patch14"
    save_safetensors(clip, clip_dir / "model.safetensors")
    src.clip_tokenizer.save(str(clip_dir / "tokenizer.json"))
    return root, src


def test_parts_found_by_tensor_names(released, tmp_path):
    root, _ = released
    parts = find_parts(root)
    assert parts == {"mmdit": root / "Open_Sora_v2.safetensors", "vae": root / "hunyuan_vae.safetensors",
                     "t5": root / "google" / "t5-v1_1-xxl", "clip": root / "openai" / "clip-vit-large-patch14"}
    # renamed files are still recognised by what they hold; Flux.1-dev next to them is not taken for the MMDiT
    renamed = tmp_path / "renamed"
    shutil.copytree(root, renamed)
    (renamed / "Open_Sora_v2.safetensors").rename(renamed / "weights_a.safetensors")
    (renamed / "hunyuan_vae.safetensors").rename(renamed / "weights_b.safetensors")
    save_safetensors({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, renamed / "flux1-dev.safetensors")
    found = find_parts(renamed)
    assert found["mmdit"].name == "weights_a.safetensors" and found["vae"].name == "weights_b.safetensors"
    assert found["flux"].name == "flux1-dev.safetensors"  # the optional t2i2v part
    assert resolve_parts(renamed)["flux"] == found["flux"]


def test_identify():
    assert identify(["double_blocks.0.img_attn.q_proj.weight", "cond_in.weight"]) == "mmdit"
    assert identify(["double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.weight"]) == "flux"
    assert identify(["encoder.down_blocks.0.resnets.0.norm1.weight", "decoder.up_blocks.0.resnets.0.norm1.weight"]) == "vae"
    assert identify(["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"]) == "t5"
    assert identify(["text_model.encoder.layers.0.mlp.fc1.weight", "vision_model.embeddings.class_embedding"]) == "clip"
    assert identify(["spatial_blocks.0.attn.qkv.weight"]) is None  # v1.2's STDiT3 is not a v2.0 part


@pytest.mark.filterwarnings("ignore::osx.runtime.tokenizer.PromptTruncatedWarning")  # 32 tokens in the tiny T5
def test_strict_success_loads_every_tensor(released):
    root, src = released
    model = build_reference_v2(TINY, checkpoint=root)
    for part in ("mmdit", "vae", "t5", "clip"):
        got, want = getattr(model, part).state_dict(), getattr(src, part).state_dict()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k].to(got[k].dtype)), (part, k)
    result = reference_generate_v2(model, "a red fox runs in the snow", num_steps=2)
    assert result.frames.shape == (9, 64, 64, 3)
    # the empty negative prompt through the converted sentencepiece tokenizer: </s>, then pads
    assert result.t5_ids[1, 0] == 1 and (result.t5_ids[1, 1:] == 0).all()


def _refused(module, path, part, *needles):
    with pytest.raises(CheckpointError) as e:
        load_part(module, path, part)
    assert e.value.exit_code == 2
    for needle in needles:
        assert needle in e.value.message, e.value.message


def test_each_failure_class_is_refused_with_the_key(released, tmp_path):
    root, src = released
    good = src.mmdit.state_dict()
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "cond_in.bias"}, ("1 missing keys", "cond_in.bias")),
        "unexpected": ({**good, "double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)},
                       ("1 unexpected keys", "double_blocks.0.img_attn.qkv.weight")),
        "shape": ({**good, "cond_in.weight": torch.zeros(TINY.mmdit.hidden_size, 64)},
                  ("1 wrong-shape keys", "cond_in.weight (checkpoint [64, 64], model [64, 68])")),
        "renamed": ({("single_blocks.0.v_proj.weight" if k == "single_blocks.0.v_mlp.weight" else k): v for k, v in good.items()},
                    ("missing keys: single_blocks.0.v_mlp.weight", "unexpected keys: single_blocks.0.v_proj.weight")),
    }
    for name, (state, needles) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_safetensors(state, path)
        _refused(MMDiT(TINY.mmdit), path, "mmdit", str(path), *needles)


def test_known_extras_only(released, tmp_path):
    """The T5 decoder / LM head and CLIP's vision half are expected in the released folders; anything else is not."""
    root, src = released
    clip = dict(src.clip.state_dict())
    clip["text_model.encoder.layers.0.mlp.fc3.weight"] = torch.zeros(2, 2)
    save_safetensors(clip, tmp_path / "clip" / "model.safetensors")
    _refused(type(src.clip)(TINY.clip), tmp_path / "clip", "clip", "text_model.encoder.layers.0.mlp.fc3.weight")
    t5 = {k: v for k, v in src.t5.state_dict().items() if k != "encoder.final_layer_norm.weight"}
    save_safetensors(t5, tmp_path / "t5" / "model.safetensors")
    _refused(type(src.t5)(TINY.t5), tmp_path / "t5", "t5", "encoder.final_layer_norm.weight")
    vae = {k: v for k, v in src.vae.state_dict().items() if k != "post_quant_conv.bias"}
    save_safetensors(vae, tmp_path / "vae.safetensors")
    _refused(type(src.vae)(TINY.vae), tmp_path / "vae.safetensors", "vae", "post_quant_conv.bias")


def test_wrong_part_and_flux_are_named(released, tmp_path):
    root, src = released
    _refused(MMDiT(TINY.mmdit), root / "hunyuan_vae.safetensors", "mmdit", "HunyuanVideo VAE weights, not MMDiT weights")
    save_safetensors({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "flux1-dev.safetensors")
    _refused(MMDiT(TINY.mmdit), tmp_path / "flux1-dev.safetensors", "mmdit", "Flux.1-dev")


def test_missing_part_lists_released_names(released, tmp_path):
    root, _ = released
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(root / "Open_Sora_v2.safetensors", partial)
    with pytest.raises(CheckpointError, match="hunyuan_vae.safetensors") as e:
        resolve_parts(partial)
    assert "no HunyuanVideo VAE weights, T5 folder, CLIP folder" in e.value.message
    # an explicit path fills the gap
    parts = resolve_parts(partial, vae=root / "hunyuan_vae.safetensors", t5=root / "google" / "t5-v1_1-xxl",
                          clip=root / "openai" / "clip-vit-large-patch14")
    assert set(parts) == {"mmdit", "vae", "t5", "clip"}


def test_t5_as_a_float32_pickle(released, tmp_path):
    """google/t5-v1_1-xxl ships pytorch_model.bin (float32, whole model): found by its folder name (a pickle's
    names need the whole file), read with weights_only one tensor at a time, cast to bf16 on the way."""
    root, src = released
    ckpt = tmp_path / "ckpts"
    shutil.copytree(root, ckpt)
    t5_dir = ckpt / "google" / "t5-v1_1-xxl"
    (t5_dir / "model.safetensors").unlink()
    state = {k: v.float() for k, v in src.t5.state_dict().items()}
    state["decoder.final_layer_norm.weight"] = torch.ones(TINY.t5.d_model)
    torch.save(state, t5_dir / "pytorch_model.bin")
    assert find_parts(ckpt)["t5"] == t5_dir
    model = build_reference_v2(TINY, checkpoint=ckpt)
    for k, want in src.t5.state_dict().items():
        got = model.t5.state_dict()[k]
        assert got.dtype == BF16 and torch.equal(got, want.to(BF16)), k
