"""Hugging Face checkpoint directories for Llama-family and Mamba models: load and save.

A checkpoint directory is ``config.json`` plus ``model.safetensors``, or shards listed in
``model.safetensors.index.json``, plus optional tokenizer files (``tokenizer.model`` or
``tokenizer.json``). Only JSON and safetensors are read: nothing in the directory is
unpickled or executed. Saving writes a complete directory next to the target and renames it
into place, so an interrupted save never leaves a half-written checkpoint where one was.

The per-family maps (config.json fields, tensor names, state dicts) are `models.hf_families`,
the tokenizers `models.tokenizers`; their public names are re-exported here.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import jax
import numpy as np

from models import hf_families, layers, mamba, transformer
from models.hf_families import (config_from_hf, from_hf_state_dict, llama_config, mamba_config,  # noqa: F401
                                mamba_config_from_hf, to_hf_state_dict)
from models.tokenizers import HFTokenizer, SentencePieceTokenizer, Tokenizer


def _read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file; ValueError naming the file when it is unreadable or not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    return value


def load_tokenizer(directory: str | os.PathLike, model_config: dict | None = None) -> Tokenizer | None:
    """A checkpoint directory's tokenizer: ``tokenizer.model`` (SentencePiece) first, else
    ``tokenizer.json`` (with ``tokenizer_config.json`` and ``model_config``, its config.json, naming
    the special tokens); None if neither file is there."""
    d = Path(directory)
    spm, tok_json = d / "tokenizer.model", d / "tokenizer.json"
    if spm.is_file():
        try:
            return SentencePieceTokenizer(spm)
        except ValueError:
            if not tok_json.is_file():  # e.g. a tiktoken file under the same name
                raise
    if tok_json.is_file():
        tok_cfg = d / "tokenizer_config.json"
        return HFTokenizer(tok_json, model_config, _read_json(tok_cfg) if tok_cfg.is_file() else None)
    return None


@contextlib.contextmanager
def _open_safetensors(path: Path):
    """``safe_open`` on ``path`` (NumPy); a truncated or damaged file raises ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="np")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it is truncated or damaged: copy or "
                         f"download it again.") from None
    with f:
        yield f


_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _shard_files(d: Path) -> dict[str, list[str]]:
    """File name -> tensor names to read from it (single file, or the index's weight_map)."""
    if (d / _SINGLE).is_file():
        with _open_safetensors(d / _SINGLE) as f:
            return {_SINGLE: list(f.keys())}
    if not (d / _INDEX).is_file():
        raise FileNotFoundError(f"{d} holds neither {_SINGLE} nor {_INDEX}.")
    weight_map = _read_json(d / _INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{d / _INDEX} has no weight_map.")
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
            raise ValueError(f"{d / _INDEX} maps {name!r} to {file!r}; shards must be plain file names in {d}.")
        files.setdefault(file, []).append(name)
    absent = sorted(f for f in files if not (d / f).is_file())
    if absent:
        raise FileNotFoundError(f"checkpoint {d} is missing shard(s) {absent} listed in {_INDEX}.")
    return files


def load_checkpoint(directory: str | os.PathLike, *, dtype: str = "float32", **config_overrides):
    """Load a Llama-family or Mamba checkpoint directory -> (params, cfg, tokenizer or None).

    params: host NumPy arrays in ``cfg.param_dtype`` (float32 unless overridden) with the
    structure of ``transformer.init`` (e.g. layers.wq [n_layers, d_model, n_heads * head_dim]),
    or of ``mamba.init`` with a ``mamba.Config`` for model_type 'mamba';
    bfloat16/float16 tensors in the files are widened exactly. ``dtype`` is the Config's
    compute dtype; ``config_overrides`` set other Config fields (``remat``, ``attention``, ...).
    Raises ValueError or FileNotFoundError naming the file and the missing shard, the tensor (with
    the expected and found shapes), a damaged file or the bad config.json field.
    """
    from safetensors import SafetensorError

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json; is it a Hugging Face checkpoint directory?")
    hf_config = _read_json(d / "config.json")
    try:
        cfg = config_from_hf(hf_config, dtype=dtype, **config_overrides)
    except ValueError as e:  # messages say "config.json <key> ...": name the file
        raise ValueError(str(e).replace("config.json", str(d / "config.json"), 1)) from None
    family, module = hf_families.family(cfg).name, hf_families.family(cfg).module
    names = hf_families.hf_names(cfg)
    needed = set(names)
    files = _shard_files(d)
    found = {n for file_names in files.values() for n in file_names}
    missing = sorted(needed - found, key=names.index)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint {d} has no tensor(s) {missing[:3]}{more} needed by a {cfg.n_layers}-layer "
                         f"{'tied' if cfg.tie_embeddings else 'untied'} {family}.")
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(n for n in found - needed - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ValueError(f"checkpoint {d} holds tensor {extra[0]!r} that a {family} layer does not use "
                         f"({len(extra)} such); refusing to drop weights silently.")
    shapes = hf_families.hf_shapes(cfg)
    state = {}
    for file, file_names in files.items():
        with _open_safetensors(d / file) as f:
            keys = set(f.keys())
            for name in file_names:
                if name in needed:
                    if name not in keys:
                        raise ValueError(f"shard {file} has no tensor {name!r} that {_INDEX} places there.")
                    try:
                        tensor = f.get_slice(name)  # get_slice reads bfloat16 too, as ml_dtypes arrays
                        found = tuple(tensor.get_shape())
                        if found != shapes[name]:
                            raise ValueError(f"tensor {name!r} in {d / file} has shape {found}, but "
                                             f"{d / 'config.json'} implies {shapes[name]}.")
                        state[name] = tensor[:]
                    except SafetensorError as e:
                        raise ValueError(f"tensor {name!r} in {d / file} cannot be read ({e}); the file is damaged: "
                                         f"copy or download it again.") from None
    params = from_hf_state_dict(state, cfg)  # every tensor has the shape its name implies
    expected = jax.eval_shape(lambda: module.init(cfg, jax.random.PRNGKey(0)))
    for path, want in jax.tree_util.tree_leaves_with_path(expected):
        got = params
        for key in path:
            got = got[key.key]
        if got.shape != want.shape:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} has shape {got.shape} in {d}, but config.json "
                             f"implies {want.shape}.")
    return params, cfg, load_tokenizer(d, hf_config)


def _is_checkpoint_file(name: str) -> bool:
    return name in ("config.json", _SINGLE, _INDEX) or bool(_SHARD.fullmatch(name))


def save_checkpoint(params: dict, cfg: transformer.Config | mamba.Config, directory: str | os.PathLike, *,
                    max_shard_bytes: int | None = None, dtype: str = "float32") -> None:
    """Write ``params`` as a Hugging Face Llama (or, for a ``mamba.Config``, Mamba) checkpoint directory,
    tensors in ``dtype``.

    One ``model.safetensors``, or with ``max_shard_bytes`` shards ``model-0000i-of-0000n.safetensors``
    of at most that size (a larger tensor gets a shard of its own) and
    ``model.safetensors.index.json``. The directory is built beside the target and renamed into
    place; other files already in the target (tokenizer files) are carried over.
    """
    from safetensors.numpy import save_file

    if dtype not in layers.DTYPES:
        raise ValueError(f"dtype is {dtype!r}; use one of {sorted(layers.DTYPES)}.")
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes is {max_shard_bytes!r}; use None (one file) or a positive byte count.")
    np_dtype = np.dtype(layers.DTYPES[dtype])
    state = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in to_hf_state_dict(params, cfg).items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in state.items():
        if max_shard_bytes and shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    target = Path(directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # not mkdtemp: the checkpoint keeps the usual umask permissions
    try:
        hf_config = hf_families.family(cfg).hf_config(cfg)
        config = {**hf_config, "torch_dtype": dtype, "dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if max_shard_bytes:
            n = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            index = {"metadata": {"total_size": sum(a.nbytes for a in state.values())}, "weight_map": weight_map}
            (tmp / _INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        else:
            save_file(state, str(tmp / _SINGLE), metadata={"format": "pt"})
        if target.exists():
            for p in target.iterdir():
                if not _is_checkpoint_file(p.name):
                    (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the complete ``tmp`` to ``target``; an existing target is moved aside first and removed after."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "ckpt")
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / "ckpt", target)
        raise
    shutil.rmtree(old, ignore_errors=True)
