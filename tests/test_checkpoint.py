"""Checkpoint reading/writing/loading and seeded init."""

import json
import pickle

import pytest
import torch

from osx.errors import CheckpointError
from osx.models import OPENSORA_V1_2_TINY
from osx.export.checkpoint import load_into, read_state_dict, save_safetensors
from osx.export.init import seeded_init_
from osx.export.stdit3 import STDiT3
from osx.export.t5 import T5TextEncoder

CFG = OPENSORA_V1_2_TINY.denoiser
L = CFG.model_max_length


@pytest.fixture(scope="module")
def source():
    return seeded_init_(STDiT3(CFG), seed=1).eval()


def fresh():
    return seeded_init_(STDiT3(CFG), seed=2).eval()


def forward(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(
            torch.randn(1, 4, 2, 6, 5, generator=g), torch.tensor([700.0]), torch.randn(1, L, CFG.caption_channels, generator=g),
            torch.ones(1, L, dtype=torch.long), torch.tensor([24.0]), torch.tensor([48.0]), torch.tensor([40.0]),
        )


def assert_same_model(loaded, source):
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(forward(loaded), forward(source))


# --- round trips -------------------------------------------------------------------------------------


def test_single_safetensors_round_trip(source, tmp_path):
    written = save_safetensors(source.state_dict(), tmp_path / "model.safetensors")
    assert written == tmp_path / "model.safetensors"
    model = fresh()
    assert not torch.equal(forward(model), forward(source))
    load_into(model, read_state_dict(written), source=str(written))
    assert_same_model(model, source)


def test_sharded_safetensors_round_trip(source, tmp_path):
    state = source.state_dict()
    biggest = max(t.numel() * t.element_size() for t in state.values())
    index = save_safetensors(state, tmp_path / "model.safetensors", max_shard_bytes=biggest)
    assert index.name == "model.safetensors.index.json" and not (tmp_path / "model.safetensors").exists()
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(weight_map.values()) == {p.name for p in shards}
    assert set(weight_map) == set(state)
    for path in (index, tmp_path):  # the index or the folder holding it
        model = fresh()
        load_into(model, read_state_dict(path), source=str(path))
        assert_same_model(model, source)

    # saving again unsharded replaces the layout instead of leaving stale shards that would shadow it
    save_safetensors(state, tmp_path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("wrap", ["plain", "ema", "state_dict", "model", "module_prefix"])
def test_pth_round_trip(source, tmp_path, wrap):
    state = source.state_dict()
    obj = {
        "plain": state,
        "ema": {"ema": state, "step": 100},
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {"lr": 1e-4}},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = fresh()
    load_into(model, read_state_dict(path), source=str(path))
    assert_same_model(model, source)


def test_ema_weights_are_preferred(source, tmp_path):
    state = source.state_dict()
    other = fresh().state_dict()
    path = tmp_path / "train.pt"
    torch.save({"model": other, "ema": state}, path)
    assert all(torch.equal(read_state_dict(path)[k], v) for k, v in state.items())


def test_rope_freqs_may_be_absent(source, tmp_path):
    state = {k: v for k, v in source.state_dict().items() if k != "rope.freqs"}
    for sd in (state, source.state_dict()):
        model = fresh()
        load_into(model, sd, source="mem")
        assert_same_model(model, source)


def test_tied_t5_embedding_saved_once_and_restored(tmp_path):
    te = OPENSORA_V1_2_TINY.text_encoder
    enc = seeded_init_(T5TextEncoder(te), seed=5)
    path = save_safetensors(enc.state_dict(), tmp_path / "t5.safetensors")
    state = read_state_dict(path)
    assert ("shared.weight" in state) != ("encoder.embed_tokens.weight" in state)
    other = T5TextEncoder(te)
    load_into(other, state, source=str(path))
    assert torch.equal(other.encoder.embed_tokens.weight, enc.shared.weight)


# --- refusals ----------------------------------------------------------------------------------------


def test_mismatches_are_listed_with_the_file(source, tmp_path):
    state = dict(source.state_dict())
    missing = [k for k in state if k.startswith("spatial_blocks.0.")][:7]
    for k in missing:
        del state[k]
    state["extra.weight"] = torch.zeros(3)
    state["t_block.1.bias"] = torch.zeros(5)
    path = tmp_path / "bad.safetensors"
    save_safetensors(state, path)
    with pytest.raises(CheckpointError) as err:
        load_into(fresh(), read_state_dict(path), source=str(path))
    msg = str(err.value)
    assert str(path) in msg
    assert "7 missing keys" in msg and all(k in msg for k in missing[:5]) and missing[6] not in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "t_block.1.bias (checkpoint [5], model [384])" in msg


def _plant(marker):
    with open(marker, "w") as f:
        f.write("code ran")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_plant, (self.marker,))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"w": torch.zeros(2), "payload": Payload(str(marker))}, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        read_state_dict(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        read_state_dict(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_state_dict(tmp_path / "weights.npz")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        read_state_dict(tmp_path / "broken.safetensors")
    (tmp_path / "notes.pth").write_bytes(pickle.dumps(["just", "a", "list"], protocol=2))
    with pytest.raises(CheckpointError, match="notes.pth"):
        read_state_dict(tmp_path / "notes.pth")


def test_missing_shard_is_named(source, tmp_path):
    state = source.state_dict()
    index = save_safetensors(state, tmp_path / "model.safetensors", max_shard_bytes=max(t.nbytes for t in state.values()))
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        read_state_dict(index)


# --- seeded init -------------------------------------------------------------------------------------


def test_seeded_init_depends_only_on_seed_and_names():
    torch.manual_seed(123)
    a = seeded_init_(STDiT3(CFG), seed=7)
    torch.manual_seed(456)
    torch.randn(1000)  # disturb the global RNG
    b = seeded_init_(STDiT3(CFG), seed=7)
    c = seeded_init_(STDiT3(CFG), seed=8)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.t_block[1].weight, c.t_block[1].weight)

    # construction order does not matter, only names
    class Pair(torch.nn.Module):
        def __init__(self, first):
            super().__init__()
            order = ("p", "q") if first == "p" else ("q", "p")
            for name in order:
                setattr(self, name, torch.nn.Linear(4, 4))

    x, y = seeded_init_(Pair("p"), seed=1), seeded_init_(Pair("q"), seed=1)
    assert torch.equal(x.p.weight, y.p.weight) and torch.equal(x.q.bias, y.q.bias)


def test_seeded_init_scales():
    model = seeded_init_(STDiT3(CFG), seed=0)
    freqs = 1.0 / (10000 ** (torch.arange(0, CFG.head_dim, 2).float() / CFG.head_dim))
    torch.testing.assert_close(model.rope.freqs.detach(), freqs)  # a constant: untouched
    y_emb = model.y_embedder.y_embedding  # a learned buffer: initialised, N(0, 1/sqrt(fan_in))
    assert abs(y_emb.std() - CFG.caption_channels**-0.5) < 0.02
    q_norm = model.spatial_blocks[0].attn.q_norm.weight
    assert (q_norm - 1).abs().max() < 0.1 and (q_norm != 1).any()
    w = model.spatial_blocks[1].mlp.fc1.weight  # fan_in = hidden_size
    assert abs(w.mean()) < 0.01 and abs(w.std() - CFG.hidden_size**-0.5) < 0.01
    assert model.spatial_blocks[1].mlp.fc1.bias.abs().max() < 0.1
    fixed = seeded_init_(STDiT3(CFG), seed=0, std=0.05).spatial_blocks[1].mlp.fc1.weight
    assert abs(fixed.std() - 0.05) < 0.005
