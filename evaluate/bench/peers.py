"""Reference implementations of the same network, timed in the same run (bench.peers=true).

Our Transformer against Hugging Face `LlamaForCausalLM` of the same config; our Mamba / Mamba-2
against `mamba_ssm`'s `MambaLMHeadModel` on CUDA when it is installed, else Hugging Face's
`MambaForCausalLM` / `Mamba2ForCausalLM`; our RWKV-7 against flash-linear-attention's
`RWKV7ForCausalLM` (its kernels are Triton: CUDA only). Hybrids and other backbones have no peer.
A peer that cannot be had (package missing, no mapping, construction failed) is skipped with a
note in the record, never an error.

A peer is built from our model's resolved config (our model itself may live on the meta
device): same width, depth, heads, MLP width, norm epsilon, RoPE theta, tied or untied
embeddings and vocabulary. Each peer exposes the three timed operations of the benchmark:
training logits, a prefill that keeps the last logits only (as generation does), and decoding
with the library's own cache.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PeerBuilder = Callable[[torch.device, torch.dtype], "Peer"]


@dataclass
class PeerChoice:
    name: str | None
    build: PeerBuilder | None
    note: str | None  # why there is no peer (or a caveat about the one chosen)


def _mixer_kinds(model: Any) -> set[str]:
    return {block.mixer_kind for block in model.blocks}


# ---- Transformer -> LlamaForCausalLM (the layout lives with the attention mixer) --------------


def llama_mismatch(model: Any) -> str | None:
    """Why our model has no LlamaForCausalLM equivalent, or None when it has one."""
    from archbench.archs.attention import llama_mismatch as mismatch

    return mismatch(model)


def llama_config(model: Any, max_positions: int = 2048) -> Any:
    """The `transformers.LlamaConfig` of the same network as our Transformer."""
    import transformers

    from archbench.archs.attention import llama_config as fields

    mismatch = llama_mismatch(model)
    if mismatch:
        raise ValueError(f"no LlamaForCausalLM equivalent: {mismatch}")
    kwargs = {**fields(model), "max_position_embeddings": max_positions}
    if "rope_parameters" not in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        kwargs.pop("rope_parameters")  # transformers < 5 reads rope_theta only
    cfg = transformers.LlamaConfig(**kwargs)
    cfg._attn_implementation = "sdpa"  # the same SDPA kernels as ours
    return cfg


def to_llama_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Our Transformer's weights under LlamaForCausalLM names (the tied head listed too, as
    LlamaForCausalLM's own state dict does)."""
    from archbench.archs.hf_layout import families, to_hf_state_dict

    out = to_hf_state_dict(model, families()["llama"])
    if model.arch.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


# ---- the peers' timed operations --------------------------------------------------------------


class Peer:
    """A library model behind the three timed operations of the benchmark."""

    name: str
    module: nn.Module

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, tokens: torch.Tensor) -> Any:
        raise NotImplementedError

    def decode(self, prompt: torch.Tensor, steps: torch.Tensor) -> tuple[Callable[[], Any],
                                                                          Callable[[], Any]]:
        """(setup, step): setup prefills `prompt` (untimed); step decodes every token of `steps`."""
        raise NotImplementedError


class HFPeer(Peer):
    """A transformers-style causal LM (Hugging Face models and flash-linear-attention's)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        params = inspect.signature(module.forward).parameters
        found = [k for k in ("cache", "past_key_values", "cache_params") if k in params]
        if not found:
            raise TypeError(f"{name}: forward takes no cache argument this adapter knows")
        self.cache_kw = found[0]
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.decoding: dict[str, Any] = {}

    @staticmethod
    def _cache_of(out: Any) -> Any:
        for key in ("cache", "past_key_values", "cache_params"):
            value = getattr(out, key, None)
            if value is not None:
                return value
        raise RuntimeError("the peer returned no cache with use_cache=True")

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids=tokens, use_cache=False).logits

    def prefill(self, tokens: torch.Tensor) -> Any:
        return self._cache_of(self.module(input_ids=tokens, use_cache=True, **self.keep_last))

    def decode(self, prompt: torch.Tensor, steps: torch.Tensor) -> tuple[Callable[[], Any],
                                                                          Callable[[], Any]]:
        held: dict[str, Any] = {}
        self.decoding = held  # the live cache and the last logits, for inspection

        def setup() -> None:
            held["cache"] = self.prefill(prompt)

        def step() -> None:
            for i in range(steps.shape[1]):
                out = self.module(input_ids=steps[:, i : i + 1], use_cache=True,
                                  **{self.cache_kw: held["cache"]}, **self.keep_last)
                held["cache"] = self._cache_of(out)
                held["logits"] = out.logits

        return setup, step


class MambaSSMPeer(Peer):
    """mamba_ssm's MambaLMHeadModel with its InferenceParams cache (CUDA kernels)."""

    def __init__(self, module: nn.Module) -> None:
        self.name, self.module = "mamba_ssm:MambaLMHeadModel", module

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module(tokens).logits

    def _params(self, max_len: int, batch: int) -> Any:
        from mamba_ssm.utils.generation import InferenceParams

        return InferenceParams(max_seqlen=max_len, max_batch_size=batch)

    def prefill(self, tokens: torch.Tensor) -> Any:
        params = self._params(tokens.shape[1], tokens.shape[0])
        self.module(tokens, inference_params=params, num_last_tokens=1)
        params.seqlen_offset += tokens.shape[1]
        return params

    def decode(self, prompt: torch.Tensor, steps: torch.Tensor) -> tuple[Callable[[], Any],
                                                                          Callable[[], Any]]:
        held: dict[str, Any] = {}

        def setup() -> None:
            params = self._params(prompt.shape[1] + steps.shape[1], prompt.shape[0])
            self.module(prompt, inference_params=params, num_last_tokens=1)
            params.seqlen_offset += prompt.shape[1]
            held["params"] = params

        def step() -> None:
            params = held["params"]
            for i in range(steps.shape[1]):
                self.module(steps[:, i : i + 1], inference_params=params, num_last_tokens=1)
                params.seqlen_offset += 1

        return setup, step


# ---- choosing and building a peer -------------------------------------------------------------


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _llama_peer(model: Any, max_positions: int) -> PeerBuilder:
    def build(device: torch.device, dtype: torch.dtype) -> Peer:
        import transformers

        module = transformers.LlamaForCausalLM(llama_config(model, max_positions))
        return HFPeer("hf:LlamaForCausalLM", module.to(device=device, dtype=dtype))

    return build


def _hf_mamba_peer(model: Any, kind: str) -> PeerBuilder:
    def build(device: torch.device, dtype: torch.dtype) -> Peer:
        import transformers

        from archbench.archs.mamba import hf_mamba_config

        cls = transformers.MambaForCausalLM if kind == "mamba" else transformers.Mamba2ForCausalLM
        module = cls(hf_mamba_config(model))
        return HFPeer(f"hf:{cls.__name__}", module.to(device=device, dtype=dtype))

    return build


def _mamba_ssm_peer(model: Any, kind: str) -> PeerBuilder:
    def build(device: torch.device, dtype: torch.dtype) -> Peer:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        arch, mixer = model.arch, model.blocks[0].mixer
        if kind == "mamba":
            c = arch.mamba
            ssm = {"layer": "Mamba1", "d_state": c.d_state, "d_conv": c.d_conv,
                   "expand": c.expand, "dt_rank": mixer.dt_rank, "conv_bias": c.conv_bias}
        else:
            c = arch.mamba2
            ssm = {"layer": "Mamba2", "d_state": c.d_state, "d_conv": c.d_conv,
                   "expand": c.expand, "headdim": c.head_dim, "ngroups": c.ngroups,
                   "chunk_size": c.chunk_size, "conv_bias": c.conv_bias}
        cfg = MambaConfig(d_model=arch.d_model, d_intermediate=0, n_layer=arch.n_layers,
                          vocab_size=model.vocab_size, ssm_cfg=ssm, rms_norm=True,
                          residual_in_fp32=True, fused_add_norm=True,
                          pad_vocab_size_multiple=8, tie_embeddings=bool(arch.tie_embeddings))
        return MambaSSMPeer(MambaLMHeadModel(cfg, device=device, dtype=dtype))

    return build


def _fla_rwkv7_peer(model: Any) -> PeerBuilder:
    def build(device: torch.device, dtype: torch.dtype) -> Peer:
        from fla.models import RWKV7Config, RWKV7ForCausalLM

        arch = model.arch
        mixer, cmix = model.blocks[0].mixer, model.blocks[0].mlp
        ranks = getattr(mixer, "lora_ranks", {})
        kwargs: dict[str, Any] = {
            "hidden_size": arch.d_model, "num_hidden_layers": arch.n_layers,
            "head_dim": arch.rwkv7.head_size, "vocab_size": model.vocab_size,
            "norm_eps": arch.norm_eps, "tie_word_embeddings": bool(arch.tie_embeddings),
            "fuse_cross_entropy": False,
        }
        if cmix is not None and hasattr(cmix, "key"):
            kwargs["intermediate_size"] = cmix.key.out_features
        for ours, theirs in (("w", "decay_low_rank_dim"), ("a", "a_low_rank_dim"),
                             ("v", "v_low_rank_dim"), ("g", "gate_low_rank_dim")):
            if ours in ranks:
                kwargs[theirs] = ranks[ours]
        module = RWKV7ForCausalLM(RWKV7Config(**kwargs))
        return HFPeer("fla:RWKV7ForCausalLM", module.to(device=device, dtype=dtype))

    return build


def choose_peer(model: Any, device: torch.device, max_positions: int = 2048) -> PeerChoice:
    """The peer of our model on `device`, or why there is none."""
    kinds = _mixer_kinds(model)
    if kinds == {"attention"}:
        mismatch = llama_mismatch(model)
        if mismatch:
            return PeerChoice(None, None, f"no LlamaForCausalLM equivalent ({mismatch})")
        if not _installed("transformers"):
            return PeerChoice(None, None, "peer hf:LlamaForCausalLM skipped: transformers "
                                          "is not installed")
        return PeerChoice("hf:LlamaForCausalLM", _llama_peer(model, max_positions), None)
    if kinds in ({"mamba"}, {"mamba2"}):
        kind = kinds.pop()
        if device.type == "cuda" and _installed("mamba_ssm"):
            return PeerChoice("mamba_ssm:MambaLMHeadModel", _mamba_ssm_peer(model, kind), None)
        note = None if device.type != "cuda" else (
            "mamba_ssm is not installed: the peer is Hugging Face's (its CUDA fast path needs "
            "mamba_ssm too)")
        if not _installed("transformers"):
            return PeerChoice(None, None, "peer skipped: neither mamba_ssm nor transformers "
                                          "is installed")
        from archbench.archs.hf_layout import families

        mismatch = families()[kind].mismatch(model)
        if mismatch:
            return PeerChoice(None, None, f"peer skipped: no Hugging Face equivalent ({mismatch})")
        cls = "MambaForCausalLM" if kind == "mamba" else "Mamba2ForCausalLM"
        return PeerChoice(f"hf:{cls}", _hf_mamba_peer(model, kind), note)
    if kinds == {"rwkv7"}:
        if device.type != "cuda":
            return PeerChoice(None, None, "peer fla:RWKV7ForCausalLM skipped: "
                                          "flash-linear-attention runs on CUDA only")
        if not _installed("fla"):
            return PeerChoice(None, None, "peer fla:RWKV7ForCausalLM skipped: "
                                          "flash-linear-attention is not installed")
        return PeerChoice("fla:RWKV7ForCausalLM", _fla_rwkv7_peer(model), None)
    return PeerChoice(None, None, f"no peer for mixers {sorted(kinds)} (hybrids have none)")
