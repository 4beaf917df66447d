"""A Hugging Face model directory on disk: reading it, writing one, and putting one in place whole.

    MODEL/
      config.json                         read_config: checked before any weight is read
      model.safetensors                   checkpoint_files: the one file, or the shards an index lists;
      | model-0000i-of-0000N.safetensors  open_checkpoint / read_tensor: one-line errors on damage
      | + model.safetensors.index.json    ShardWriter: what writes them
      tokenizer.json, tokenizer_config.json, ...     TOKENIZER_FILES, load_tokenizer, copy_tokenizer

A directory or file written through `staged_dir`, `swap_in` or `write_text_atomic` appears whole
or not at all: it is written under a hidden name beside its destination (starting with
TMP_PREFIX, so what a killed run leaves behind is recognisably temporary), flushed to disk, and
renamed into place. A rename within one filesystem is atomic, so a kill at any moment leaves
the old version or the new one, never a mix.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rawqlora.errors import BadInput

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the --dtype names
INDEX = "model.safetensors.index.json"
# 5GB, merge.py's --max-shard-size default and transformers 4's (5's is 50GB): files that
# upload, download and resume one at a time.
MAX_SHARD_BYTES = 5 * 10**9
TMP_PREFIX = ".tmp-"  # every temporary file or directory we create starts with this
# Files that travel with the weights: the tokenizer's (fast and slow formats, chat template),
# and generation_config.json: not the tokenizer's, but generation defaults belong with it.
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "generation_config.json",
)


# ---------------------------------------------------------------- reading a model directory


def check_model_dir(path):
    """`path` as a Path, after checking it is a directory holding config.json."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"model path {path} does not exist: give a local Hugging Face model directory")
    if not path.is_dir():
        raise BadInput(f"model path {path} is not a directory: give the directory holding config.json")
    if not (path / "config.json").is_file():
        raise BadInput(f"{path} has no config.json: it is not a Hugging Face model directory")
    return path


def read_config(path, trust_remote_code=False):
    """The transformers config of the model directory `path`, checked to be a causal LM we can build."""
    path = check_model_dir(path)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise BadInput(f"{path / 'config.json'} is not a valid JSON object ({e})") from e
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        if "auto_map" in (path / "config.json").read_text() and not trust_remote_code:
            raise BadInput(
                f"{path}: model_type {model_type!r} needs the model's own code (auto_map in config.json), "
                "which runs only with --trust-remote-code: pass it if you trust where the model came from"
            ) from e
        raise BadInput(
            f"{path}: model_type {model_type!r} is not an architecture transformers knows: "
            "upgrade transformers or pick a supported model"
        ) from e
    if type(config) not in AutoModelForCausalLM._model_mapping and not trust_remote_code:
        raise BadInput(
            f"{path}: model_type {model_type!r} has no causal-LM class in transformers: "
            "rawqlora fine-tunes decoder-only language models"
        )
    return config


def checkpoint_files(path):
    """The safetensors files of the model directory `path`, after checking they are all there."""
    path = Path(path)
    index = path / INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise BadInput(f"{index} is not a valid safetensors index ({e}): re-download the model") from e
        for shard in shards:
            if not (path / shard).is_file():
                raise BadInput(f"{path} lacks shard {shard} listed in {INDEX}: re-download the model")
        return [path / shard for shard in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("*.safetensors")):  # e.g. Mistral's consolidated.safetensors: other names, not transformers'
        raise BadInput(f"{path} has *.safetensors files but neither model.safetensors nor {INDEX}, "
                       "which transformers' layout has: give a Hugging Face model directory")
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise BadInput(
            f"{path} has only PyTorch pickle weights (.bin/.pt), which rawqlora never reads because "
            "unpickling can run code: convert them to safetensors with save_pretrained"
        )
    raise BadInput(f"{path} has no *.safetensors weights: give a directory with the model's weights")


def open_checkpoint(file):
    """safe_open(file), memory-mapped; use as a context manager."""
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise BadInput(f"{file} is truncated or corrupted ({e}): re-download it") from e


def checkpoint_shapes(file):
    """Tensor name -> shape in `file`. Opening parses the header, which must cover the file exactly."""
    with open_checkpoint(file) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def read_tensor(f, file, key):
    """Tensor `key` of the open checkpoint `f` (read from `file`): a view of the memory map."""
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise BadInput(f"{file} is truncated or corrupted (reading {key}: {e}): re-download it") from e


# ---------------------------------------------------------------- writing weights


def parse_size(text):
    """"5GB" -> 5·10⁹ bytes, "2GiB" -> 2·2³⁰, as transformers' save_pretrained reads max_shard_size."""
    units = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b)?\s*", text, re.IGNORECASE)
    if not m or float(m[1]) <= 0:
        raise BadInput(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB or 2GiB")
    return int(float(m[1]) * units[(m[2] or "").lower()])


class ShardWriter:
    """Tensors in, safetensors files of at most `max_bytes` out, in the layout transformers reads.

    A file is written as soon as the next tensor would overflow it (a tensor larger than
    `max_bytes` gets a file of its own), so host memory holds one file's tensors, not the model.
    Files are written as model-00001.safetensors, ... and renamed by `close()`, once their
    number N is known, to model-0000i-of-0000N.safetensors beside model.safetensors.index.json,
    or to model.safetensors without an index when one file holds everything.
    """

    def __init__(self, out, max_bytes=MAX_SHARD_BYTES):
        self.out, self.max_bytes = Path(out), max_bytes
        self.tensors, self.size, self.files, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, key, tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self.tensors and self.size + nbytes > self.max_bytes:
            self._flush()
        # A plain (not Params4bit) contiguous CPU tensor with storage of its own: safetensors
        # refuses tensors that share storage (tied weights, bitsandbytes' shared 4-bit code tables).
        self.tensors[key] = tensor.detach().as_subclass(torch.Tensor).to("cpu").clone(
            memory_format=torch.contiguous_format)
        self.size += nbytes
        self.total += nbytes

    def _flush(self):
        file = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.tensors, self.out / file, metadata={"format": "pt"})  # transformers' metadata
        self.weight_map.update(dict.fromkeys(self.tensors, len(self.files)))
        self.files.append(file)
        self.tensors, self.size = {}, 0

    def close(self):
        """Write what is left, name the files, write the index; returns the number of files."""
        if self.tensors:
            self._flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for old, new in zip(self.files, names):
            os.replace(self.out / old, self.out / new)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
            (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return n


# ---------------------------------------------------------------- tokenizer


def tokenizer_source(model, adapter=None):
    """Where a model's tokenizer is: the adapter directory when it holds one (train.py saves the
    tokenizer there when training added tokens), else the model directory."""
    if adapter is not None and any(f.name.startswith("tokenizer") for f in tokenizer_files(adapter)):
        return Path(adapter)
    return Path(model)


def tokenizer_files(path):
    return [f for pattern in TOKENIZER_FILES for f in Path(path).glob(pattern) if f.is_file()]


def copy_tokenizer(source, out):
    """Copy the TOKENIZER_FILES of the directory `source` into `out`."""
    files = tokenizer_files(source)
    if not any(f.name.startswith("tokenizer") for f in files):
        raise BadInput(f"tokenizer source {source} has no tokenizer files: give the base model's directory")
    for f in files:
        shutil.copy2(f, Path(out) / f.name)


def load_tokenizer(path, trust_remote_code=False):
    """The tokenizer in the directory `path`, with a pad token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load a tokenizer from {path} ({str(e).strip().splitlines()[0]}): it needs the "
                       "model's tokenizer files (tokenizer.json or tokenizer.model) beside config.json") from None
    if tokenizer.pad_token is None:
        # Llama and Mistral ship none. Any id would do: every pad position is masked out of
        # attention and loss, and dropped from generated outputs; EOS is one the vocabulary has.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- writing whole or not at all


def write_text_atomic(path, text):
    """Replace the file `path` with `text` whole: a kill leaves the old file or the new, never half of one."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write; after the rename it is gone already
    _fsync(path.parent)


@contextlib.contextmanager
def staged_dir(path, overwrite=False):
    """`with staged_dir(path) as tmp:` write the files into `tmp`; on leaving, `tmp` becomes `path`.

    `tmp` is a new hidden directory beside `path`. If the block raises, it is deleted and `path`
    is untouched. An existing non-empty `path` is refused up front unless `overwrite`.
    """
    path = Path(path)
    _check_replaceable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); ours are ordinary output directories
    try:
        yield tmp
        swap_in(tmp, path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp, path, overwrite=False):
    """Rename the finished directory `tmp` to `path`, after flushing its files to disk.

    An existing `path` is renamed aside first (rename cannot replace a non-empty directory),
    then deleted, so at every moment `path` is the old directory, absent, or the new one.
    """
    tmp, path = Path(tmp), Path(path)
    _check_replaceable(path, overwrite)
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(tmp)
    old = _move_aside(path) if path.exists() and any(path.iterdir()) else None
    os.replace(tmp, path)  # onto an absent or empty `path`: rename may replace an empty directory
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old)


def remove_dir(path):
    """Delete the directory `path` so that no reader ever sees it half deleted: rename it, then delete it."""
    shutil.rmtree(_move_aside(Path(path)))


def _move_aside(path):
    """Rename `path` to a temporary name beside it; returns that name."""
    old = path.with_name(f"{TMP_PREFIX}old-{path.name}")
    shutil.rmtree(old, ignore_errors=True)  # left by a run killed between this rename and the delete
    os.replace(path, old)
    return old


def _check_replaceable(path, overwrite):
    if path.exists() and not path.is_dir():
        raise BadInput(f"{path} exists and is not a directory: choose another output path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise BadInput(f"{path} already exists and is not empty: choose a new directory or pass overwrite=True")


def _fsync(path):
    """Flush a file, or a directory's entries (what makes a rename inside it durable, on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
