"""thin_pretrained: a Hugging Face checkpoint thinned tensor by tensor loads with stock from_pretrained, and its
logits equal the dense model's with the same channels zeroed (masked here, independently of the library)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxcondensa
from fxcondensa.compression import checkpoint_layout
from fxcondensa.errors import ThinningCheckError

transformers.logging.set_verbosity_error()

CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}


def build(model_type="llama", dtype=torch.float32, *, hidden=48, heads=8, kv=4, head_dim=8, inter=96,
          layers=2, tie=False, seed=0, **extra):
    torch.manual_seed(seed)
    config = CONFIGS[model_type](vocab_size=96, hidden_size=hidden, intermediate_size=inter,
                                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                 head_dim=head_dim, tie_word_embeddings=tie, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # norm weights must matter: the fold scales them
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.to(dtype)


def save(model, folder, shard=None):
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


def mask_dense(model, result):
    d = result.dense.head_dim
    with torch.no_grad():
        gone = torch.ones(result.dense.hidden, dtype=torch.bool)
        gone[result.layers[0].stream] = False
        model.model.embed_tokens.weight[:, gone] = 0
        model.model.norm.weight[gone] = 0
        for layer, keep in zip(model.model.layers, result.layers, strict=True):
            layer.input_layernorm.weight[gone] = 0
            layer.post_attention_layernorm.weight[gone] = 0
            attn, mlp = layer.self_attn, layer.mlp
            attn.o_proj.weight[gone] = 0
            mlp.down_proj.weight[gone] = 0
            q_gone = torch.ones(result.dense.heads, dtype=torch.bool)
            q_gone[keep.q_heads] = False
            kv_gone = torch.ones(result.dense.kv_heads, dtype=torch.bool)
            kv_gone[keep.kv_heads] = False
            q_rows, kv_rows = q_gone.repeat_interleave(d), kv_gone.repeat_interleave(d)
            attn.q_proj.weight[q_rows] = 0
            attn.o_proj.weight[:, q_rows] = 0
            for proj in (attn.k_proj, attn.v_proj):
                proj.weight[kv_rows] = 0
            for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
                if proj.bias is not None:
                    proj.bias[rows] = 0
            m_gone = torch.ones(result.dense.intermediate, dtype=torch.bool)
            m_gone[keep.mlp] = False
            mlp.gate_proj.weight[m_gone] = 0
            mlp.up_proj.weight[m_gone] = 0
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def folder_hash(folder):
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def check_equal(model, dst, result, *, rtol=1e-4, atol=1e-5, compute=torch.float32):
    small = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype="auto").eval()
    assert type(small) is type(model) and small.dtype == model.dtype
    reference = mask_dense(model, result)
    got, want = logits(small.to(compute), IDS), logits(reference.to(compute), IDS)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return small


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_cut_sharded_in_and_out_equals_masked_dense(tmp_path, dtype):
    model = build("llama", dtype)
    src = save(model, tmp_path / "src", shard="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    before = folder_hash(src)
    result = fxcondensa.thin_pretrained(src, tmp_path / "dst", hidden_size=40, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, max_shard_size=40_000)
    assert folder_hash(src) == before, "the source directory was written to"
    assert (tmp_path / "dst" / "model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (40, 64, 4, 2, 8)
    assert config["rms_norm_eps"] == pytest.approx(model.config.rms_norm_eps * 48 / 40)
    assert [u for u, _ in result.checked] == ["model.embed_tokens.weight", "model.layers.0", "model.layers.1",
                                              "model.norm", "lm_head"]
    # bf16: the folded norm weights are rounded to bf16 once (2**-9 relative): bf16's tolerance
    tol = {} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    small = check_equal(model, tmp_path / "dst", result, **tol)
    assert small.model.layers[1].self_attn.k_proj.weight.shape == (16, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_cut_by_four_is_exact_in_bf16_too(tmp_path, dtype):
    # C / C' = 4: the norm weights are multiplied by 2, which rounds nothing, so bf16 compares at rtol 1e-4
    model = build("mistral", dtype, hidden=64, heads=4, kv=2, head_dim=16, inter=64)
    src = save(model, tmp_path / "src")
    result = fxcondensa.thin_pretrained(src, tmp_path / "dst", hidden_size=16)
    assert (tmp_path / "dst" / "model.safetensors").is_file()
    check_equal(model, tmp_path / "dst", result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_a_stream_cut_qwen2_with_biases(tmp_path, dtype):
    model = build("qwen2", dtype, heads=6, kv=2, head_dim=8)
    src = save(model, tmp_path / "src", shard="30KB")
    result = fxcondensa.thin_pretrained(src, tmp_path / "dst", intermediate_size=40, num_attention_heads=2,
                                        num_key_value_heads=1)
    small = check_equal(model, tmp_path / "dst", result)
    assert small.model.layers[0].self_attn.q_proj.bias.shape == (16,)
    assert small.config.hidden_size == 48


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_with_every_bias(tmp_path, dtype):
    # o_proj's and down_proj's biases live on the stream, gate/up's on the MLP units, q/k/v's on the heads
    model = build("llama", dtype, attention_bias=True, mlp_bias=True)
    src = save(model, tmp_path / "src")
    result = fxcondensa.thin_pretrained(src, tmp_path / "dst", hidden_size=12, intermediate_size=48,
                                        num_key_value_heads=2)
    with torch.no_grad():  # the masked reference also zeroes the pruned channels' biases
        gone = torch.ones(48, dtype=torch.bool)
        gone[result.layers[0].stream] = False
        for layer, keep in zip(model.model.layers, result.layers, strict=True):
            layer.self_attn.o_proj.bias[gone] = 0
            layer.mlp.down_proj.bias[gone] = 0
            m_gone = torch.ones(96, dtype=torch.bool)
            m_gone[keep.mlp] = False
            layer.mlp.gate_proj.bias[m_gone] = 0
            layer.mlp.up_proj.bias[m_gone] = 0
    small = check_equal(model, tmp_path / "dst", result)
    assert small.model.layers[0].self_attn.o_proj.bias.shape == (12,)


def test_tied_embeddings_stay_tied_and_side_files_are_copied(tmp_path):
    model = build("llama", tie=True)
    src = save(model, tmp_path / "src")
    (src / "tokenizer_config.json").write_text("{}")
    result = fxcondensa.thin_pretrained(src, tmp_path / "dst", hidden_size=32, calibration=IDS)
    assert (tmp_path / "dst" / "tokenizer_config.json").read_text() == "{}"
    assert (tmp_path / "dst" / "generation_config.json").is_file()
    small = check_equal(model, tmp_path / "dst", result)
    assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), inter=st.integers(1, 96), kv=st.integers(1, 4), per_group=st.integers(1, 2))
def test_any_uniform_sizes_equal_masked_dense(tmp_path_factory, data, inter, kv, per_group):
    heads = kv * per_group
    hidden = heads * data.draw(st.integers(1, 48 // heads), label="hidden / heads")  # LlamaConfig's rule
    tmp = tmp_path_factory.mktemp("h")
    model = build("llama", layers=1)
    src = save(model, tmp / "src")
    result = fxcondensa.thin_pretrained(src, tmp / "dst", hidden_size=hidden, intermediate_size=inter,
                                        num_attention_heads=heads, num_key_value_heads=kv)
    check_equal(model, tmp / "dst", result)


# ------------------------------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save(build("llama", layers=1), tmp_path_factory.mktemp("s") / "src", shard="20KB")


def test_directory_without_config(tmp_path):
    (tmp_path / "w").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        fxcondensa.thin_pretrained(tmp_path / "w", tmp_path / "dst", hidden_size=8)


def test_missing_shard_is_named(src, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in src.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (broken / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"names the shard {shard}, which is not in"):
        fxcondensa.thin_pretrained(broken, tmp_path / "dst", hidden_size=8)


def test_unsupported_model_type(tmp_path):
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        fxcondensa.thin_pretrained(tmp_path / "gpt2", tmp_path / "dst", hidden_size=8)


def test_heads_not_divisible_by_kept_groups(src, tmp_path):
    with pytest.raises(ValueError, match="num_attention_heads=5 is not a multiple of num_key_value_heads=2"):
        fxcondensa.thin_pretrained(src, tmp_path / "dst", num_attention_heads=5, num_key_value_heads=2)


def test_more_query_heads_per_group_than_there_are(src, tmp_path):
    with pytest.raises(ValueError, match="needs 4 query heads per key/value group"):
        fxcondensa.thin_pretrained(src, tmp_path / "dst", num_attention_heads=8, num_key_value_heads=2)


@pytest.mark.parametrize("field, value", [("hidden_size", 49), ("intermediate_size", 0), ("hidden_size", 8.0)])
def test_size_out_of_range(src, tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r}: .* give an int from 1 to"):
        fxcondensa.thin_pretrained(src, tmp_path / "dst", **{field: value})


def test_existing_dst_needs_overwrite_and_is_replaced_whole(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        fxcondensa.thin_pretrained(src, dst, hidden_size=16)
    assert (dst / "old.txt").is_file()
    fxcondensa.thin_pretrained(src, dst, hidden_size=16, overwrite=True)
    assert not (dst / "old.txt").exists() and (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"], "a temporary directory was left behind"


def test_dst_inside_src_is_refused(src, tmp_path):
    with pytest.raises(ValueError, match="is inside src_dir"):
        fxcondensa.thin_pretrained(src, src / "small", hidden_size=16)


def test_sizes_the_config_class_refuses(src, tmp_path):
    with pytest.raises(ValueError, match=r"hidden_size=30, .*num_attention_heads=8.*LlamaConfig refuses these sizes"):
        fxcondensa.thin_pretrained(src, tmp_path / "dst", hidden_size=30)


def test_bad_calibration(src, tmp_path):
    with pytest.raises(ValueError, match=r"calibration must be token ids.*\[0, 96\)"):
        fxcondensa.thin_pretrained(src, tmp_path / "dst", hidden_size=16, calibration=torch.full((1, 4), 96))


def test_a_wrong_cut_is_caught_naming_the_layer_and_nothing_is_written(src, tmp_path, monkeypatch):
    real = checkpoint_layout.cut

    def wrong(name, t, keep, dims=None):
        out = real(name, t, keep, dims)
        if name == "model.layers.0.mlp.down_proj.weight":
            out = out.flip(1)  # the right values in the wrong columns
        return out

    monkeypatch.setattr(checkpoint_layout, "cut", wrong)
    with pytest.raises(ThinningCheckError, match=r"thinned model\.layers\.0 differs from the masked dense"):
        fxcondensa.thin_pretrained(src, tmp_path / "dst", hidden_size=16, intermediate_size=32)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scoring_leaves_the_tensor_alone(dtype):
    # float32 tensors were squared in place once (their float() is themselves): the cut then wrote squares
    t = torch.randn(5, 7).to(dtype)
    before = t.clone()
    checkpoint_layout.channel_scores("w", t, ((0, "mlp"), (1, "stream")), head_dim=1)
    assert torch.equal(t, before)
