"""`archbench import` and `archbench export`: published Hugging Face models in, trained models out.

    archbench import PATH_OR_HUB_ID out=runs/mamba-130m [name=...] [seq_len=1024] [revision=...]
    archbench export ckpt=runs/X out=hf/X [dtype=fp32|bf16|fp16]

Import reads a folder as `save_pretrained` writes it (config.json, *.safetensors, tokenizer.json)
or, where the Hub can be reached, a Hub id through `huggingface_hub.snapshot_download`; weights
come from safetensors only (never unpickled). It writes an ordinary archbench run folder with one
checkpoint (weights, the resolved arch, the model's own tokenizer), so `archbench eval`,
`generate` and `report` take it like a trained run, and the written `conf/arch/<name>.yaml` lets
`archbench bench --config-dir <out>/conf arch=<name>` measure the same architecture.

Export writes config.json, model.safetensors and the tokenizer files of the HF class that
represents the checkpoint exactly (archs/hf_layout.py); a backbone without one is refused with the
reason. Which classes exist, and how each setting maps, is declared with the mixers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from archbench.config import ConfigError

HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BYTE_TOKENIZER_JSON = "byte-level BPE with no merges: ids 0-255 are the bytes"


def resolve_source(source: str, revision: str | None = None) -> Path:
    """A local folder as it is; otherwise a Hub id, downloaded (config, safetensors, tokenizer
    files only) when the Hub can be reached."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"import source {source!r} is a file; give the folder holding "
                          "config.json and the *.safetensors weights")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown id, gated repo: one line saying which
        raise ConfigError(f"import source {source!r} is not a local folder, and fetching it "
                          f"from the Hugging Face Hub failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json (a save_pretrained folder is expected)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's *.safetensors files; pickled weights are refused."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
        raise ConfigError(f"{folder} has no *.safetensors weights" + (
            f"; {pickled[:3]} are pickle files, which archbench never loads (convert them to "
            "safetensors with a tool you trust)" if pickled else ""))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            if name in tensors:
                raise ConfigError(f"tensor {name!r} appears in two files of {folder}")
            tensors[name] = tensor
    return tensors


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_token(folder: Path, config: dict[str, Any], raw: Any, kind: str) -> str | None:
    """The model's `kind` ("eos" / "pad") token: tokenizer_config.json, special_tokens_map.json,
    then config.json's <kind>_token_id."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            token = _token_text(json.loads(path.read_text(encoding="utf-8")).get(f"{kind}_token"))
            if token is not None:
                return token
    token_id = config.get(f"{kind}_token_id")
    if isinstance(token_id, list):
        token_id = token_id[0] if token_id else None
    return raw.id_to_token(int(token_id)) if token_id is not None else None


def import_tokenizer(folder: Path, config: dict[str, Any], vocab: int) -> Any:
    """The model's own tokenizer.json (kept exactly); without one, the byte tokenizer, and only
    when the model's vocabulary has rows for its 258 ids."""
    from archbench.train.tokenizer import ByteTokenizer, PublishedTokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        byte = ByteTokenizer()
        if vocab < byte.vocab_size:
            raise ConfigError(f"{folder} has no tokenizer.json, and the byte tokenizer needs "
                              f"{byte.vocab_size} vocabulary rows (the model has {vocab})")
        print(f"archbench: {folder} has no tokenizer.json; using the byte tokenizer (ids 0-255 "
              "are bytes): right only for a model trained with it", file=sys.stderr)
        return byte
    text = path.read_text(encoding="utf-8")
    if json.loads(text).get("model", {}).get("type") is None:
        raise ConfigError(f"{path} is not a Hugging Face tokenizers file")
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_str(text)
    if raw.get_vocab_size() > vocab:
        raise ConfigError(f"{path} has {raw.get_vocab_size()} tokens but the model only "
                          f"{vocab} embedding rows")
    if _is_byte_export(text):
        return ByteTokenizer()
    eos = _special_token(folder, config, raw, "eos")
    if eos is None:
        raise ConfigError(f"{folder}: no end-of-text token named (tokenizer_config.json "
                          "eos_token or config.json eos_token_id); generation and lm-eval need it")
    return PublishedTokenizer(text, eos, _special_token(folder, config, raw, "pad"))


def _default_config(arch: Any, name: str, seq_len: int, tokenizer: Any,
                    tokenizer_path: Path) -> dict[str, Any]:
    """The run config stored with an imported checkpoint: archbench's defaults (bits per byte on
    the embedded corpus, as for trained runs) with this arch, tokenizer and context."""
    from archbench.config import root_schema, to_container

    cfg = OmegaConf.structured(root_schema())
    cfg.arch = arch
    cfg.arch.name = name
    cfg.size.name = "published"
    cfg.train.seq_len = seq_len
    cfg.tokenizer.kind = "file"
    cfg.tokenizer.path = str(tokenizer_path.resolve())  # the model's own (fairness rule 1)
    out = to_container(cfg)
    out["tokenizer_identity"] = tokenizer.identity
    return out


def build_imported(folder: Path, name: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(our model with the HF weights, its tokenizer, provenance) from a save_pretrained folder."""
    from archbench.archs import hf_layout
    from archbench.archs.model import LanguageModel, arch_config

    config = read_config(folder)
    family = hf_layout.family_for_config(config)
    arch_dict, vocab = family.arch_from_config(config)
    arch_dict["name"] = name or family.name
    arch = arch_config(arch_dict)
    tokenizer = import_tokenizer(folder, config, vocab)
    with torch.device("meta"):
        model = LanguageModel(arch, vocab)
    ours = hf_layout.from_hf_state_dict(model, family, read_weights(folder))
    if arch.tie_embeddings:
        ours.pop("lm_head.weight", None)  # HF may list the tied head; ours follows the embedding
    missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    missing = [m for m in missing if not (arch.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"{family.hf_class} weights do not fill the archbench model (missing "
                          f"{missing[:4]}, unexpected {unexpected[:4]})")
    if arch.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    source = {"hf_class": family.hf_class, "folder": str(folder), "config": config}
    return model.float().eval(), tokenizer, source


def _write_summary(out: Path, model: Any, tokenizer: Any, meta: dict[str, Any]) -> None:
    """summary.json, so `archbench report` lists the imported model beside trained runs: no
    training here (no tokens, no validation curve), its evaluations come from `archbench eval`."""
    from archbench.io import write_json_atomic
    from archbench.provenance import provenance

    write_json_atomic(out / "summary.json", {
        "status": "finished", "run": out.name, "arch": model.arch.name, "size": "published",
        "seed": None, "tokens_seen": None, "final": {}, "dtype": str(torch.float32),
        "layer_plan": [list(p) for p in model.plan],
        "size_fit": {"d_model": int(model.arch.d_model), "n_layers": int(model.arch.n_layers)},
        "tokenizer": tokenizer.identity, "param_counts": meta["param_counts"],
        "kernel_paths": meta["kernel_paths"], "config": meta["config"],
        "arch_config": meta["arch"], "imported_from": {k: v for k, v in
                                                       meta["imported_from"].items()
                                                       if k != "config"},
        "provenance": provenance("cpu"),
    })


def import_model(source: str, out: str | Path, name: str | None = None, seq_len: int = 1024,
                 revision: str | None = None) -> Path:
    """Write an archbench run folder holding the published model as checkpoint step 0."""
    from archbench.archs.model import resolve_kernels
    from archbench.train.checkpoint import save_checkpoint

    out = Path(out)
    if (out / "checkpoints").exists():
        raise ConfigError(f"out={out} already holds checkpoints; choose an empty folder")
    folder = resolve_source(source, revision)
    model, tokenizer, provenance = build_imported(folder, name or out.resolve().name)
    provenance["source"] = source
    arch = OmegaConf.to_container(model.arch, resolve=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")  # for tokenizer=file (bench, train) beside the run
    meta = {"arch": arch, "vocab_size": model.vocab_size,
            "config": _default_config(model.arch, model.arch.name, seq_len, tokenizer,
                                      out / "tokenizer.json"),
            "tokenizer": tokenizer.identity, "param_counts": model.param_counts(),
            "kernel_paths": resolve_kernels(model, "cpu"), "imported_from": provenance}
    ckpt = save_checkpoint(out, 0, model, None, tokenizer, meta)
    _write_summary(out, model, tokenizer, meta)
    conf = out / "conf" / "arch" / f"{model.arch.name}.yaml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(OmegaConf.to_yaml(OmegaConf.create(arch)), encoding="utf-8")
    counts = model.param_counts()
    print(f"imported {provenance['hf_class']} from {source}: {counts['total']:,} parameters, "
          f"tokenizer {tokenizer.identity} -> {ckpt}")
    return ckpt


# ---- export ------------------------------------------------------------------------------------


def byte_tokenizer_json() -> str:
    """A tokenizers file that encodes exactly as archbench's byte tokenizer: byte-level BPE with
    no merges whose token i is byte i (in GPT-2's byte-to-character alphabet), then the two
    specials, so `transformers` tokenizes text for an exported model as archbench did. One
    difference remains: a text that spells a special token ("<|eos|>") becomes that token in
    `transformers`, where archbench's byte tokenizer keeps its bytes."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from archbench.train.tokenizer import SPECIAL_TOKENS

    alphabet = _bytes_to_chars()
    vocab = {alphabet[b]: b for b in range(256)}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(list(SPECIAL_TOKENS))
    return raw.to_str()


def _bytes_to_chars() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (ByteLevel's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _is_byte_export(text: str) -> bool:
    return json.loads(text).get("model") == json.loads(byte_tokenizer_json()).get("model")


def _tokenizer_files(tokenizer: Any, out: Path) -> dict[str, Any]:
    """tokenizer.json and tokenizer_config.json for `transformers`; returns the special ids."""
    from archbench.train.tokenizer import SPECIAL_TOKENS, ByteTokenizer, PublishedTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        text, eos, pad = byte_tokenizer_json(), SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
    elif isinstance(tokenizer, PublishedTokenizer):
        text, eos, pad = tokenizer.inner_json, tokenizer.eos_token, tokenizer.pad_token
    else:
        text, eos, pad = tokenizer.to_json(), SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                "pad_token": pad, "bos_token": None, "unk_token": None,
                "add_bos_token": False, "add_eos_token": False,
                "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
            "bos_token_id": None}


def export_model(ckpt: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the checkpoint as a Hugging Face folder of the class that represents it exactly."""
    from safetensors.torch import save_file

    from archbench.archs import hf_layout
    from archbench.train.checkpoint import load_model

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not allowed; choose one of {list(DTYPES)}")
    model, tokenizer, _ = load_model(ckpt, "cpu")
    family = hf_layout.family_for_model(model)
    config = family.config_from_model(model)
    tensors = hf_layout.to_hf_state_dict(model, family)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    specials = _tokenizer_files(tokenizer, out)
    full = {"architectures": [family.hf_class], "model_type": family.model_type, **config,
            **specials, "torch_dtype": {"fp32": "float32", "bf16": "bfloat16",
                                        "fp16": "float16"}[dtype]}
    (out / "config.json").write_text(json.dumps(full, indent=2), encoding="utf-8")
    print(f"exported {family.hf_class} to {out} (loads with {family.loads_with})")
    return out


# ---- command line ------------------------------------------------------------------------------


def _parse(args: list[str], allowed: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    positional, options = [], {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            positional.append(arg)
        elif key in allowed:
            options[key] = value
        else:
            raise ConfigError(f"{key}={value!r}: unknown option; allowed: {list(allowed)}")
    return positional, options


def import_main(args: list[str]) -> None:
    """`archbench import PATH out=DIR [name=...] [seq_len=N] [revision=...]`."""
    positional, opts = _parse(args, ("out", "name", "seq_len", "revision"))
    if len(positional) != 1 or "out" not in opts:
        raise ConfigError("usage: archbench import PATH_OR_HUB_ID out=DIR [name=NAME] "
                          "[seq_len=N] [revision=REV]")
    import_model(positional[0], opts["out"], opts.get("name"), int(opts.get("seq_len", 1024)),
                 opts.get("revision"))


def export_main(args: list[str]) -> None:
    """`archbench export ckpt=PATH out=DIR [dtype=fp32|bf16|fp16]`."""
    positional, opts = _parse(args, ("ckpt", "out", "dtype"))
    if positional or "ckpt" not in opts or "out" not in opts:
        raise ConfigError("usage: archbench export ckpt=RUN_OR_CHECKPOINT out=DIR "
                          "[dtype=fp32|bf16|fp16]")
    export_model(opts["ckpt"], opts["out"], opts.get("dtype", "fp32"))


def main(command: str, args: list[str]) -> None:
    """Run `command` (import / export); errors are one line and exit code 2."""
    from archbench.train.checkpoint import CheckpointError

    try:
        (import_main if command == "import" else export_main)(args)
    except (ConfigError, CheckpointError) as exc:
        print(f"archbench {command}: {exc}", file=sys.stderr)
        sys.exit(2)
