"""Hugging Face layouts beyond the parity tests: RWKV-7 in flash-linear-attention's layout (fla is
not installed: checked against its published names and against our own model), every shipped
backbone exported and loaded back by transformers, settings archbench cannot express refused
with the field named, tokenizers kept exactly, Mamba inner norms in every kernel path."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from archbench.archs import hf_layout
from archbench.archs.model import LanguageModel, arch_config
from archbench.archs.rwkv import rwkv7_config
from archbench.config import ConfigError
from archbench.hf import byte_tokenizer_json, export_model, import_model
from archbench.train.checkpoint import load_model, save_checkpoint
from archbench.train.tokenizer import ByteTokenizer, PublishedTokenizer

CONF = Path(__file__).resolve().parents[1] / "conf" / "arch"
VOCAB = 300


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its (often constant) initial value."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@torch.no_grad()
def decode_logits(model: torch.nn.Module, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    out = [model(tokens[:, :prompt], cache)[:, -1]]
    for t in range(prompt, tokens.shape[1]):
        out.append(model(tokens[:, t:t + 1], cache)[:, -1])
    return torch.stack(out, 1)


# ---- RWKV-7: flash-linear-attention's RWKV7ForCausalLM layout --------------------------------

RWKV_ARCH = {"name": "rwkv7", "pattern": {"mixers": ["rwkv7"], "mlps": ["rwkv_cmix"]},
             "d_model": 128, "n_layers": 2, "norm": "layernorm", "embed_norm": True,
             "tie_embeddings": False, "embed_init": "rwkv",
             "rwkv7": {"head_size": 64, "decay_lora": 8, "iclr_lora": 8, "value_lora": 4,
                       "gate_lora": 16}}

# (name, shape) as fla's RWKV7ForCausalLM names them (fla/models/rwkv7, fla/layers/rwkv7.py):
# LoRA = Sequential(Linear(d, r, bias=False), act, Linear(r, d)), the gate LoRA without bias,
# no value LoRA in layer 0, ln0 as layer 0's pre_norm, flat k_k / k_a / ffn.x_k.
FLA_NAMES = {
    "model.embeddings.weight": (VOCAB, 128), "model.layers.0.pre_norm.weight": (128,),
    "model.layers.0.attn_norm.bias": (128,), "model.layers.1.ffn_norm.weight": (128,),
    "model.layers.0.attn.x_r": (1, 1, 128), "model.layers.0.attn.x_g": (1, 1, 128),
    "model.layers.0.attn.k_k": (128,), "model.layers.0.attn.k_a": (128,),
    "model.layers.0.attn.r_k": (2, 64), "model.layers.0.attn.r_proj.weight": (128, 128),
    "model.layers.0.attn.o_proj.weight": (128, 128),
    "model.layers.0.attn.w_lora.lora.0.weight": (8, 128),
    "model.layers.0.attn.w_lora.lora.2.weight": (128, 8),
    "model.layers.0.attn.w_lora.lora.2.bias": (128,),
    "model.layers.0.attn.a_lora.lora.2.bias": (128,),
    "model.layers.1.attn.v_lora.lora.0.weight": (4, 128),
    "model.layers.1.attn.v_lora.lora.2.bias": (128,),
    "model.layers.0.attn.g_lora.lora.0.weight": (16, 128),
    "model.layers.0.attn.g_lora.lora.2.weight": (128, 16),
    "model.layers.0.attn.g_norm.weight": (128,), "model.layers.0.attn.g_norm.bias": (128,),
    "model.layers.0.ffn.x_k": (128,), "model.layers.0.ffn.key.weight": (512, 128),
    "model.layers.0.ffn.value.weight": (128, 512), "model.norm.weight": (128,),
    "lm_head.weight": (VOCAB, 128),
}
FLA_ABSENT = ("model.layers.0.attn.v_lora.lora.0.weight", "model.layers.0.attn.g_lora.lora.2.bias",
              "model.layers.1.pre_norm.weight")


def rwkv_fla_folder(root: Path, stacked_shifts: bool = False) -> tuple[Path, LanguageModel]:
    """Our RWKV-7, written as an fla-layout folder (config.json + model.safetensors)."""
    model = perturbed(LanguageModel(RWKV_ARCH, VOCAB))
    tensors = hf_layout.to_hf_state_dict(model, hf_layout.families()["rwkv7"])
    if stacked_shifts:  # fla's first layout: x_x (6, d)
        for i in range(2):
            names = [f"model.layers.{i}.attn.x_{c}" for c in "rwkvag"]
            tensors[f"model.layers.{i}.attn.x_x"] = torch.cat([tensors.pop(n).reshape(1, -1)
                                                               for n in names])
    folder = root / "fla_rwkv7"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7",
              **rwkv7_config(model)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, model


def test_rwkv7_export_uses_fla_names_and_shapes(tmp_path: Path) -> None:
    folder, _ = rwkv_fla_folder(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    for name, shape in FLA_NAMES.items():
        assert name in tensors, name
        assert tuple(tensors[name].shape) == shape, name
    assert not any(name in tensors for name in FLA_ABSENT)
    config = json.loads((folder / "config.json").read_text())
    assert (config["decay_low_rank_dim"], config["a_low_rank_dim"], config["v_low_rank_dim"],
            config["gate_low_rank_dim"], config["head_dim"]) == (8, 8, 4, 16, 64)


@pytest.mark.parametrize("stacked_shifts", [False, True])
def test_rwkv7_import_from_fla_layout_is_the_same_model(tmp_path: Path,
                                                         stacked_shifts: bool) -> None:
    folder, direct = rwkv_fla_folder(tmp_path, stacked_shifts)
    import_model(str(folder), tmp_path / "run")
    imported, _, _ = load_model(tmp_path / "run", "cpu")
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (imported(tokens) - direct(tokens)).abs().max().item() < 1e-5
    diff = (decode_logits(imported, tokens, 4) - decode_logits(direct, tokens, 4)).abs().max()
    assert diff.item() < 1e-5


# ---- every shipped backbone out, and back in through transformers -----------------------------


def conf_arch(name: str, **over: object) -> dict:
    arch = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    arch.update(over)
    return arch


def saved_run(root: Path, arch: dict, tokenizer: object = None) -> tuple[Path, LanguageModel]:
    model = perturbed(LanguageModel(arch, VOCAB))
    run = root / f"run_{arch['name']}"
    save_checkpoint(run, 1, model, None, tokenizer or ByteTokenizer(),
                    {"arch": OmegaConf.to_container(model.arch, resolve=True),
                     "vocab_size": VOCAB})
    return run, model


SHIPPED = {
    "transformer": ("LlamaForCausalLM", {"d_model": 64, "n_layers": 2}),
    "gpt2": ("GPT2LMHeadModel", {"d_model": 64, "n_layers": 2}),
    "mamba": ("MambaForCausalLM", {"d_model": 32, "n_layers": 2}),
    "mamba2": ("Mamba2ForCausalLM", {"d_model": 32, "n_layers": 2,
                                     "mamba2": {"d_state": 16, "head_dim": 16, "chunk_size": 8}}),
    "jamba": ("JambaForCausalLM", {"d_model": 32, "n_layers": 8,
                                   "attention": {"head_dim": 16, "position": "none"},
                                   "moe": {"n_experts": 4, "renormalize": False}}),
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_every_backbone_with_an_hf_class_exports_and_loads(name: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cls_name, over = SHIPPED[name]
    run, ours = saved_run(tmp_path, conf_arch(name, **over))
    export_model(run, tmp_path / "hf")
    theirs = getattr(transformers, cls_name).from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(input_ids=tokens).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_backbones_without_an_hf_class_are_refused_with_the_reason(tmp_path: Path) -> None:
    for mixer in ("s4d", "hyena", "h3"):
        arch = {"name": f"custom_{mixer}", "pattern": {"mixers": [mixer], "mlps": ["dense"]},
                "d_model": 32, "n_layers": 2}
        run, _ = saved_run(tmp_path, arch)
        with pytest.raises(ConfigError, match=f"custom_{mixer}.*no Hugging Face class"):
            export_model(run, tmp_path / f"hf_{mixer}")
    plain = conf_arch("jamba", d_model=32, n_layers=8, attention={"head_dim": 16},
                      moe={"n_experts": 4}, mamba={"inner_norms": False})
    run, _ = saved_run(tmp_path, plain)
    with pytest.raises(ConfigError, match="inner_norms=true"):
        export_model(run, tmp_path / "hf_jamba")


# ---- what archbench cannot express: a ConfigError naming the field ----------------------------


def _config(cls_name: str, **kwargs: object) -> dict:
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, cls_name.replace("ForCausalLM", "Config").replace(
        "LMHeadModel", "Config"))(**kwargs).to_dict()
    cfg["architectures"] = [cls_name]
    return cfg


REFUSED = [
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "rope"),
    ("LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("GPT2LMHeadModel", {"scale_attn_by_inverse_layer_idx": True},
     "scale_attn_by_inverse_layer_idx=True"),
    ("GPT2LMHeadModel", {"activation_function": "relu"}, "activation_function='relu'"),
    ("MambaForCausalLM", {"use_bias": True}, "use_bias=True"),
    ("Mamba2ForCausalLM", {"time_step_limit": (0.0, 0.1)}, "time_step_limit"),
    ("JambaForCausalLM", {"mamba_proj_bias": True}, "mamba_proj_bias=True"),
]


@pytest.mark.parametrize(("cls_name", "change", "named"), REFUSED)
def test_inexpressible_settings_are_refused_naming_the_field(tmp_path: Path, cls_name: str,
                                                             change: dict, named: str) -> None:
    cfg = _config(cls_name, vocab_size=VOCAB, **change)
    (tmp_path / "config.json").write_text(json.dumps(cfg, default=str))
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
        import_model(str(tmp_path), tmp_path / "run")


def test_rwkv7_hybrid_attention_and_other_eps_are_refused(tmp_path: Path) -> None:
    base = {"architectures": ["RWKV7ForCausalLM"],
            **rwkv7_config(LanguageModel(RWKV_ARCH, VOCAB))}
    for change, named in (({"attn": {"layers": [1], "num_heads": 2}}, "attn="),
                          ({"norm_eps": 1e-6}, "norm_eps=1e-06")):
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=named):
            import_model(str(tmp_path), tmp_path / "run")


def test_unknown_class_pickled_weights_and_small_vocab_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"],
                                                      "model_type": "bert"}))
    with pytest.raises(ConfigError, match="BertForMaskedLM.*supported"):
        import_model(str(tmp_path), tmp_path / "run")
    cfg = _config("MambaForCausalLM", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickle"):
        import_model(str(tmp_path), tmp_path / "run")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 64}))
    with pytest.raises(ConfigError, match="no tokenizer.json.*258"):
        import_model(str(tmp_path), tmp_path / "run")


# ---- tokenizers -------------------------------------------------------------------------------


def _bpe_folder(folder: Path) -> str:
    """A small byte-level BPE tokenizer.json with its own <|endoftext|>, as published ones."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    raw.train_from_iterator(["def main(): return 0\n", "the cat sat on the mat"] * 50, trainer)
    text = raw.to_str()
    (folder / "tokenizer.json").write_text(text)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>"}}))
    return text


def reference_size(text: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text).get_vocab_size()


def test_a_published_tokenizer_is_kept_exactly_both_ways(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = _config("MambaForCausalLM", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                  state_size=4)
    folder = tmp_path / "hf"
    transformers.MambaForCausalLM(transformers.MambaConfig(**{
        k: v for k, v in cfg.items() if k != "architectures"})).save_pretrained(folder)
    original = _bpe_folder(folder)
    import_model(str(folder), tmp_path / "run")
    _, tokenizer, _ = load_model(tmp_path / "run", "cpu")
    assert isinstance(tokenizer, PublishedTokenizer)
    assert tokenizer.vocab_size == reference_size(original)  # no tokens added
    assert tokenizer.eos_id == 0  # the model's own <|endoftext|>
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    text = "def cat(): return the mat\n  é"
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)
    assert tokenizer.token_bytes().sum() > 0
    export_model(tmp_path / "run", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").read_text() == original
    settings = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert settings["eos_token"] == "<|endoftext|>"


def test_the_byte_tokenizer_exports_as_an_hf_tokenizer_with_the_same_ids(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    run, _ = saved_run(tmp_path, conf_arch("transformer", d_model=64, n_layers=2))
    export_model(run, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Grüße, 世界!\n\tdef main():  return 0 <eos>"
    ours = ByteTokenizer()
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf_tok.eos_token_id == ours.eos_id and hf_tok.decode(ours.encode(text)) == text
    import_model(str(tmp_path / "hf"), tmp_path / "again")  # and back: the byte tokenizer
    _, tokenizer, _ = load_model(tmp_path / "again", "cpu")
    assert isinstance(tokenizer, ByteTokenizer)
    assert json.loads(byte_tokenizer_json())["model"]["merges"] == []


# ---- Hub ids ----------------------------------------------------------------------------------


def test_a_hub_id_that_cannot_be_fetched_is_one_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError, match="not a local folder.*Hugging Face Hub failed"):
        import_model("state-spaces/mamba-130m-hf", tmp_path / "run")


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _hub_reachable(), reason="huggingface.co is not reachable from this "
                    "machine (offline): the Hub-id import path cannot be exercised here")
def test_import_a_released_checkpoint_from_the_hub(tmp_path: Path) -> None:
    import_model("state-spaces/mamba-130m-hf", tmp_path / "run")
    model, tokenizer, _ = load_model(tmp_path / "run", "cpu")
    assert model.param_counts()["total"] > 100e6 and tokenizer.eos_id is not None


# ---- Mamba inner norms in every kernel path ---------------------------------------------------


def test_inner_norms_run_in_the_kernel_path_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuda path cannot run here; route its kernels to the reference ones and check that it
    gets the normalised dt, B and C as the torch path does (full sequence and decoding)."""
    from archbench.archs.kernels import conv, selective_scan
    from archbench.archs.mamba import Mamba

    arch = {"name": "m", "pattern": {"mixers": ["mamba"], "mlps": ["none"]}, "d_model": 32,
            "n_layers": 2, "mamba": {"d_state": 8, "inner_norms": True}}
    model = perturbed(LanguageModel(arch, VOCAB))
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = model(tokens)
        plain = LanguageModel({**arch, "mamba": {"d_state": 8}}, VOCAB).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        assert (plain(tokens) - reference).abs().max() > 1e-3  # the norms matter
    chunk = model.blocks[0].mixer.chunk_size
    monkeypatch.setattr(selective_scan, "selective_scan_cuda",
                        lambda *a: selective_scan.selective_scan_chunked(*a, chunk))
    monkeypatch.setattr(selective_scan, "selective_state_step_cuda",
                        selective_scan.selective_state_step)
    monkeypatch.setattr(conv, "causal_conv1d_cuda", conv.causal_conv1d)
    monkeypatch.setattr(conv, "causal_conv1d_step_cuda", conv.causal_conv1d_step)
    monkeypatch.setattr(Mamba, "_use_cuda", lambda self, x: True)
    with torch.no_grad():
        kernel = model(tokens)
    torch.testing.assert_close(kernel, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(decode_logits(model, tokens, 4)[:, -1], reference[:, -1],
                               atol=1e-5, rtol=0)


def test_jamba_conf_has_inner_norms_so_it_exports() -> None:
    arch = arch_config(conf_arch("jamba", d_model=32, n_layers=8,
                                 attention={"head_dim": 16}, moe={"n_experts": 4}))
    assert arch.mamba.inner_norms is True


# ---- released checkpoints' config.json (fields as published; nothing downloaded) ---------------

RELEASED = {
    # state-spaces/mamba-130m-hf
    "mamba-130m-hf": ({"architectures": ["MambaForCausalLM"], "model_type": "mamba",
                       "hidden_size": 768, "num_hidden_layers": 24, "intermediate_size": 1536,
                       "state_size": 16, "conv_kernel": 4, "expand": 2, "time_step_rank": 48,
                       "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
                       "layer_norm_epsilon": 1e-5, "residual_in_fp32": True,
                       "vocab_size": 50280}, (128e6, 131e6)),
    # openai-community/gpt2
    "gpt2": ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768,
              "n_layer": 12, "n_head": 12, "n_positions": 1024, "n_ctx": 1024, "n_inner": None,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "scale_attn_weights": True, "vocab_size": 50257}, (124_439_808, 124_439_808)),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "tinyllama": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                   "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu",
                   "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
                   "tie_word_embeddings": False, "attention_bias": False,
                   "vocab_size": 32000}, (1.09e9, 1.11e9)),
    # ai21labs/Jamba-v0.1 (Jamba-tiny-dev uses the same fields at a smaller width)
    "jamba-v0.1": ({"architectures": ["JambaForCausalLM"], "model_type": "jamba",
                    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "num_experts": 16,
                    "num_experts_per_tok": 2, "attn_layer_period": 8, "attn_layer_offset": 4,
                    "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 16,
                    "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 256,
                    "mamba_conv_bias": True, "mamba_proj_bias": False, "rms_norm_eps": 1e-6,
                    "hidden_act": "silu", "vocab_size": 65536}, (51e9, 53e9)),
    # RWKV/RWKV7-Goose-Pile-168M-HF (fla's RWKV7ForCausalLM layout)
    "rwkv7-168m": ({"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7",
                    "hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072,
                    "head_dim": 64, "hidden_act": "sqrelu", "hidden_ratio": 4.0,
                    "a_low_rank_dim": 64, "decay_low_rank_dim": 64, "gate_low_rank_dim": 128,
                    "v_low_rank_dim": 32, "norm_first": True, "norm_bias": True,
                    "norm_eps": 1e-5, "tie_word_embeddings": False, "attn": None,
                    "vocab_size": 50304}, (160e6, 175e6)),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_map_to_the_published_sizes(name: str) -> None:
    config, (low, high) = RELEASED[name]
    family = hf_layout.family_for_config(config)
    arch, vocab = family.arch_from_config(config)
    with torch.device("meta"):
        model = LanguageModel(arch, vocab)
    total = model.param_counts()["total"]
    assert low <= total <= high, total
    assert family.mismatch(model) is None  # and it would export to the same class
    if name == "jamba-v0.1":  # 12B active of 52B (top-2 of 16 experts on every other layer)
        assert 11.5e9 <= model.param_counts()["active"] <= 12.5e9
        assert [m for m, _ in model.plan[:8]] == ["mamba"] * 4 + ["attention"] + ["mamba"] * 3


# ---- the command line ---------------------------------------------------------------------------


def _archbench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("archbench")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_import_then_bench_and_generate_from_the_command_line(tmp_path: Path) -> None:
    """`archbench import` writes what `generate` and `bench --config-dir` take unchanged; a bad
    source is one line on stderr and exit code 2."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                      state_size=8)
    torch.manual_seed(0)
    transformers.MambaForCausalLM(config).save_pretrained(tmp_path / "hf")
    _bpe_folder(tmp_path / "hf")
    done = _archbench("import", "hf", "out=runs/tiny-mamba", "seq_len=32", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs/tiny-mamba/conf/arch/tiny-mamba.yaml").is_file()
    gen = _archbench("generate", "ckpt=runs/tiny-mamba", "prompt='the cat'",
                     "generate.max_new_tokens=4", cwd=tmp_path)
    assert gen.returncode == 0 and "the cat" in gen.stdout, gen.stderr
    bench = _archbench("bench", "--config-dir", "runs/tiny-mamba/conf", "arch=tiny-mamba",
                       "tokenizer=file", "tokenizer.path=runs/tiny-mamba/tokenizer.json",
                       "bench.modes=[prefill]", "bench.contexts=[16]", "bench.isolate=false",
                       "bench.repeats=1", "bench.warmup=0", "bench.min_seconds=0",
                       "out_dir=bench", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    record = json.loads((tmp_path / "bench/records.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok" and (record["d_model"], record["n_layers"]) == (32, 2)
    bad = _archbench("import", "no/such-model-anywhere", "out=runs/x", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("archbench import: ")
    assert len(bad.stderr.strip().splitlines()) == 1
