"""Datasets of the Zephyr / Llama-3 recipes, normalised to three row schemas.

Every source is loaded with `datasets.load_dataset`: a hub dataset (name, split, config) where the hub is
reachable, or a local .json / .jsonl / .parquet file (or a folder of them). Rows come back as plain dicts in
one of three kinds:

  "chat"        {"messages": [{"role", "content"}, ...]}          SFT conversations (≥ 1 assistant turn)
  "prompt"      {"prompt": str}                                  seed prompts for pseudo-labels
  "preference"  {"prompt": [messages], "chosen": str, "rejected": str}   DPO triples

Accepted source formats: `messages` lists of {role, content} (UltraChat 200k, the MiL SFT sets,
InfinityInstruct re-uploads), `conversations` lists of {from, value} with from ∈ human/gpt/system
(OpenHermes-2.5, InfinityInstruct), GenQA's `text` message lists; a `prompt` string (UltraFeedback); and
`chosen`/`rejected` either as message lists ending in the answer (ultrafeedback_binarized, orca_dpo_pairs,
the ArmoRM set) or as strings beside a `prompt`/`question`. For a preference row the prompt is the message
list before the answer, so multi-turn prompts survive.

Presets name the recipe's hub datasets: `load_rows("ultrafeedback_binarized:train_prefs")`. The split's
suffix picks the kind for the H4 sets (`_gen` → prompt, `_sft` → chat, `_prefs` → preference).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

from l2m_jax.data.chat import DataError, validate_messages

KINDS = ("chat", "prompt", "preference")
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "bot": "assistant", "model": "assistant", "system": "system"}
_MESSAGE_FIELDS = ("messages", "conversations", "conversation", "text")


@dataclasses.dataclass(frozen=True)
class Preset:
    hub_id: str
    splits: tuple[str, ...]
    kind: str | None = None      # None: decided by the split suffix
    config: str | None = None


PRESETS: dict[str, Preset] = {
    # Stage-1 seed prompts (train_gen) and Stage-3 preferences (MIL_SPEC §2.2, §2.5)
    "ultrachat_200k": Preset("HuggingFaceH4/ultrachat_200k", ("train_sft", "test_sft", "train_gen", "test_gen")),
    "ultrafeedback_binarized": Preset("HuggingFaceH4/ultrafeedback_binarized",
                                      ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen",
                                       "test_gen")),
    "orca_dpo_pairs": Preset("HuggingFaceH4/orca_dpo_pairs", ("train_prefs", "test_prefs")),
    "llama3_ultrafeedback_armorm": Preset("JunxiongWang/llama3-ultrafeedback-armorm", ("train", "test"),
                                          kind="preference"),
    # Stage-2 SFT (MIL_SPEC §2.3, §2.4) and its sources
    "sftdataset": Preset("JunxiongWang/sftdataset", ("train", "test"), kind="chat"),
    "sftdatasetv3": Preset("JunxiongWang/sftdatasetv3", ("train", "test"), kind="chat"),
    "genqa": Preset("tomg-group-umd/GenQA", ("code", "dialog", "general", "math", "mmlu", "multiple_choice",
                                            "writing", "academic", "task"), kind="chat"),
    "openhermes_2_5": Preset("teknium/OpenHermes-2.5", ("train",), kind="chat"),
    "infinity_instruct": Preset("BAAI/Infinity-Instruct", ("train",), kind="chat", config="7M"),
}
_SPLIT_KINDS = {"_gen": "prompt", "_sft": "chat", "_prefs": "preference"}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where rows come from: a hub id or local path, a split, a config and the row kind wanted."""
    name: str
    split: str = "train"
    config: str | None = None
    kind: str | None = None       # None: from the preset / split, else detected from the columns

    @property
    def is_local(self) -> bool:
        return os.path.exists(self.name) or os.path.splitext(self.name)[1] in LOCAL_SUFFIXES

    def __str__(self) -> str:
        cfg = f", config {self.config}" if self.config else ""
        return f"dataset {self.name!r} (split {self.split}{cfg})"


def resolve(spec: str | DatasetSpec, *, split: str | None = None, config: str | None = None,
            kind: str | None = None) -> DatasetSpec:
    """Turn a preset ("preset" or "preset:split"), hub id or local path into a DatasetSpec.

    Keyword arguments override what the spec string says.
    """
    if kind is not None and kind not in KINDS:
        raise DataError(f"kind={kind!r}; choose one of {KINDS}")
    if isinstance(spec, DatasetSpec):
        name, split, config, kind = spec.name, split or spec.split, config or spec.config, kind or spec.kind
    elif isinstance(spec, str) and spec:
        name, _, spec_split = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
        split = split or spec_split or None
    else:
        raise DataError(f"dataset spec must be a non-empty string or DatasetSpec, got {spec!r}")
    preset = PRESETS.get(name) or next((p for p in PRESETS.values() if p.hub_id == name), None)
    if preset is None:
        if os.path.splitext(name)[1] in LOCAL_SUFFIXES or os.path.exists(name):
            if split not in (None, "train"):
                raise DataError(f"{name}: a local file has a single split 'train', not {split!r}")
            return DatasetSpec(name, "train", config, kind)
        return DatasetSpec(name, split or "train", config, kind)
    split = split or preset.splits[0]
    if split not in preset.splits:
        raise DataError(f"{preset.hub_id} has no split {split!r}; its splits are {list(preset.splits)}")
    if kind is None:
        kind = preset.kind or next((k for suf, k in _SPLIT_KINDS.items() if split.endswith(suf)), None)
    return DatasetSpec(preset.hub_id, split, config or preset.config, kind)


def _empty_file(path: str, fmt: str | None) -> bool:
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return pq.read_metadata(path).num_rows == 0
    if fmt == "json":
        with open(path, "rb") as f:
            return not f.read(4096).strip()
    return False


def _load_dataset(spec: DatasetSpec, cache_dir: str | None):
    import datasets   # heavy import, only when a dataset is actually read

    if spec.is_local:
        if not os.path.exists(spec.name):
            raise DataError(f"{spec}: no such file or folder")
        fmt = LOCAL_SUFFIXES.get(os.path.splitext(spec.name)[1])
        if not os.path.isdir(spec.name) and fmt is None:
            raise DataError(f"{spec}: unsupported file type; use .json, .jsonl or .parquet")
        if _empty_file(spec.name, fmt):
            raise DataError(f"{spec} has no rows")
        try:
            if os.path.isdir(spec.name):
                return datasets.load_dataset(spec.name, split="train", cache_dir=cache_dir)
            return datasets.load_dataset(fmt, data_files=spec.name, split="train", cache_dir=cache_dir)
        except Exception as e:   # datasets wraps parser errors in its own exception types
            raise DataError(f"{spec}: datasets could not read it ({type(e).__name__}: {e})") from e
    try:
        return datasets.load_dataset(spec.name, spec.config, split=spec.split, cache_dir=cache_dir)
    except (OSError, ValueError) as e:   # not found, offline, bad split/config
        raise DataError(f"{spec}: could not load it with datasets.load_dataset ({e}); check the name, split "
                        "and config, and that the hub is reachable (or pass a local .jsonl/.parquet file)"
                        ) from e


def detect_kind(columns: list[str] | set[str]) -> str | None:
    """The row kind a set of columns supports best (preference > chat > prompt), or None."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if cols & set(_MESSAGE_FIELDS[:3]):
        return "chat"
    if "prompt" in cols:
        return "prompt"
    if "text" in cols:
        return "chat"
    return None


def iter_rows(spec: str | DatasetSpec, *, split: str | None = None, config: str | None = None,
              kind: str | None = None, limit: int | None = None, cache_dir: str | None = None
              ) -> Iterator[dict[str, Any]]:
    """Normalised rows of a dataset, one at a time (see the module docstring for the schemas)."""
    spec = resolve(spec, split=split, config=config, kind=kind)
    if limit is not None and limit <= 0:
        raise DataError(f"limit={limit} must be positive (or None for every row)")
    ds = _load_dataset(spec, cache_dir)
    if len(ds) == 0:
        raise DataError(f"{spec} has no rows")
    kind = spec.kind or detect_kind(ds.column_names)
    if kind is None:
        raise DataError(f"{spec}: cannot tell the row kind from its columns {ds.column_names}; pass "
                        f"kind= one of {KINDS}")
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            return
        yield normalise_row(row, kind, where=f"{spec} row {i}")


def load_rows(spec: str | DatasetSpec, *, split: str | None = None, config: str | None = None,
              kind: str | None = None, limit: int | None = None, cache_dir: str | None = None
              ) -> list[dict[str, Any]]:
    """All (or the first `limit`) normalised rows of a dataset as a list."""
    return list(iter_rows(spec, split=split, config=config, kind=kind, limit=limit, cache_dir=cache_dir))


# ---------------------------------------------------------------------------------------------- rows
def normalise_row(row: dict[str, Any], kind: str, *, where: str = "row") -> dict[str, Any]:
    """One source row in the common schema of `kind`; DataError naming `where` and the field otherwise."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a dict, got {type(row).__name__}")
    if kind == "chat":
        msgs = _messages(row, where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: the conversation has no assistant turn to train on")
        return {"messages": msgs}
    if kind == "prompt":
        return {"prompt": _prompt_text(row, where)}
    if kind == "preference":
        return _preference(row, where)
    raise DataError(f"kind={kind!r}; choose one of {KINDS}")


def _missing(where: str, field: str, row: dict[str, Any]) -> DataError:
    # columnar files give every row every column: a null counts as missing
    present = sorted(k for k, v in row.items() if v is not None)
    return DataError(f"{where}: missing field {field}; the row has fields {present}")


def _to_messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, (list, tuple)):
        converted = []
        for j, m in enumerate(value):
            if isinstance(m, dict) and "role" not in m and "from" in m:   # ShareGPT style
                role = _ROLE_ALIASES.get(str(m["from"]).lower(), m["from"])
                m = {"role": role, "content": m.get("value")}
            elif isinstance(m, dict) and "role" in m:
                m = {**m, "role": _ROLE_ALIASES.get(str(m["role"]).lower(), m["role"])}
            converted.append(m)
        value = converted
    return validate_messages(value, where=where)


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    for field in _MESSAGE_FIELDS:
        value = row.get(field)
        if field == "text" and not isinstance(value, (list, tuple)):
            continue   # a plain-text column is not a conversation
        if value is not None:
            return _to_messages(value, f"{where} field {field!r}")
    raise _missing(where, "'messages' (or 'conversations' / 'text' message list)", row)


def _prompt_text(row: dict[str, Any], where: str) -> str:
    value = row.get("prompt")
    if value is None and any(row.get(f) is not None for f in _MESSAGE_FIELDS):
        users = [m for m in _messages(row, where) if m["role"] == "user"]
        if not users:
            raise DataError(f"{where}: the conversation has no user turn to use as a prompt")
        value = users[0]["content"]
    if value is None:
        raise _missing(where, "'prompt'", row)
    if not isinstance(value, str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field 'prompt' is empty")
    return value


def _split_answer(value: Any, field: str, where: str) -> tuple[list[dict[str, str]] | None, str]:
    """(prompt messages or None, answer text) of a `chosen` / `rejected` value."""
    if isinstance(value, str):
        return None, value
    msgs = _to_messages(value, f"{where} field {field!r}")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {field!r} must end with the assistant's answer, "
                        f"but its last message is a {msgs[-1]['role']} turn")
    return msgs[:-1], msgs[-1]["content"]


def _preference(row: dict[str, Any], where: str) -> dict[str, Any]:
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            raise _missing(where, repr(field), row)
    c_prompt, chosen = _split_answer(row["chosen"], "chosen", where)
    r_prompt, rejected = _split_answer(row["rejected"], "rejected", where)
    if c_prompt and r_prompt and c_prompt != r_prompt:
        raise DataError(f"{where}: 'chosen' and 'rejected' answer different conversations "
                        "(the messages before the answers differ)")
    prompt = c_prompt or r_prompt
    if not prompt:
        text = row.get("prompt", row.get("question"))
        if text is None:
            raise _missing(where, "'prompt' (the answers are plain strings, so the prompt must be given)", row)
        if isinstance(text, str):
            prompt = ([{"role": "system", "content": row["system"]}] if row.get("system") else [])
            prompt.append({"role": "user", "content": text})
        prompt = validate_messages(prompt if isinstance(text, str) else text, where=f"{where} field 'prompt'")
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(f"{where}: the preference prompt has no user turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
