"""The general.* metadata of a converted model, derived the way llama.cpp's converter derives
it (gguf-py's `Metadata.load`), so that our file and llama.cpp's are the same bytes.

Sources, the first one to give a field wins:
1. the model card: README.md's YAML front matter (name, author, license, base_model,
   datasets, tags, language ...);
2. config.json's `_name_or_path` when it is a Hugging Face id ("org/Model-7B-Instruct");
3. the folder's name, split into basename, size label, finetune and version;
4. the parameter count, for a size label still missing (4.5M, 1.5B).
generation_config.json adds the recommended sampler settings (general.sampling.*).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from ..errors import UserError
from ..gguf import Keys, Value, ValueType

log = logging.getLogger(__name__)

__all__ = ["ModelId", "ModelMetadata", "general_keys", "load_metadata", "read_model_card",
           "size_label", "split_model_id", "title_case"]


# ---------------------------------------------------------------------------------------------
# names: "Qwen/Qwen2.5-0.5B-Instruct" -> organization, basename, size label, finetune, version


class ModelId(NamedTuple):
    full_name: str | None  # the part after "org/", as written
    organization: str | None
    basename: str | None
    finetune: str | None
    version: str | None
    size_label: str | None


_VERSION = re.compile(r"(?:v|iter)?\d+(?:\.\d+)*", re.IGNORECASE)
_QUANT_TYPE = re.compile(r"i?q\d(?:_\w)*|b?fp?(?:16|32)", re.IGNORECASE)
_SIZE = re.compile(r"(?:A|\d+x)?\d+(?:[._]\d+)?[KMBT]\d?|small|mini|medium|large|x?xl",
                   re.IGNORECASE)
_FINETUNE_WORD = re.compile(r"chat|instruct|vision|lora", re.IGNORECASE)
_KEEPS_CASE = re.compile(r"v\d+(?:\.\d+)*|\d.*")  # versions and numbers are not title-cased


def title_case(text: str) -> str:
    """A name as a title, as llama.cpp writes it: "meta-llama" -> "Meta Llama"; words with
    a capital letter, versions and numbers stay as they are."""
    words = text.strip().replace("-", " ").split()
    return " ".join(w.title() if w.islower() and not _KEEPS_CASE.fullmatch(w) else w
                    for w in words)


def _size_part(part: str, n_params: int, roles: set[str]) -> str:
    """A size-like name part normalised ("7b1" -> "7.1B"); one far from the real parameter
    count is a context length ("32k") and counts as finetune."""
    part = part.replace("_", ".")
    if part[-1].isdecimal():  # bloom-7b1 means 7.1B
        part = f"{part[:-2]}.{part[-1]}{part[-2]}"
    if len(part) > 1 and part[-2].isdecimal() and part[-1] in "kmbt":
        part = part[:-1] + part[-1].upper()
    if n_params:
        try:
            label = float(part[:-1]) * 1000 ** " KMBT".find(part[-1])
        except ValueError:  # 8x7B, A3B, "small": kept as they are
            label = None
        if label is not None and (n_params < 0 and label < -n_params // 8 or
                                  n_params > 0 and abs(label - n_params) > 7 * n_params // 8):
            roles.add("finetune")
            part = part[:-1] + part[-1].lower()
    if not roles:
        roles.add("size_label")
    return part


def split_model_id(model_id: str | None, n_params: int = 0) -> ModelId:
    """Split a Hugging Face id or folder name into its parts, as llama.cpp's heuristics do.
    `n_params` (negative: not exact, a LoRA) tells a size label from a context length."""
    if model_id is None:
        return ModelId(None, None, None, None, None, None)
    if " " in model_id:  # a sentence, not an id: it is only a name
        return ModelId(model_id, None, None, None, None, None)
    org, slash, name = model_id.partition("/")
    if not slash:
        org, name = None, model_id
    elif org.startswith("."):  # "./model", "../model": a path, not an organization
        org = None

    parts = [p for p in name.split("-") if p]
    roles: list[set[str]] = [set() for _ in parts]
    for i, part in enumerate(parts):
        if _VERSION.fullmatch(part):
            roles[i].add("version")
        elif _QUANT_TYPE.fullmatch(part):
            roles[i].add("type")
            parts[i] = part.upper()
        elif i > 0 and _SIZE.fullmatch(part):
            parts[i] = _size_part(part, n_params, roles[i])
        elif i > 0 and _FINETUNE_WORD.fullmatch(part):
            lora_of_lora = n_params < 0 and part.lower() == "lora"
            roles[i].add("type" if lora_of_lora else "finetune")

    # a word size ("small") is dropped when a number size ("7B") is there too
    if any(c.isdecimal() for p, r in zip(parts, roles) if "size_label" in r for c in p):
        for p, r in zip(parts, roles):
            if "size_label" in r and all(c.isalpha() for c in p):
                r.discard("size_label")
    # the leading words and versions are the basename; later unknown words are finetune
    leading = True
    for p, r in zip(parts, roles):
        if leading and ((not r and p[0].isalpha()) or "version" in r):
            r.add("basename")
        else:
            leading = False
            if not r:
                r.add("finetune")
    for r in reversed(roles):  # a trailing version is a version, not basename
        if "basename" in r and len(r) > 1:
            r.discard("basename")
        else:
            break

    def joined(role: str, unless: str | None = None) -> str | None:
        picked = [p for p, r in zip(parts, roles) if role in r and unless not in r]
        return "-".join(dict.fromkeys(picked) if role == "size_label" else picked) or None

    basename, size = joined("basename"), joined("size_label")
    finetune, version = joined("finetune"), joined("version", unless="basename")
    if size is None and finetune is None and version is None:
        basename = None  # too ambiguous to call anything the basename
    return ModelId(name, org, basename, finetune, version, size)


def size_label(n_params: int) -> str:
    """llama.cpp's size class of a parameter count, two significant digits at least:
    4.5M, 135M, 0.50K."""
    n = abs(n_params)
    # scaled by multiplying (not dividing), as llama.cpp: the last digit can differ
    scale, unit = next(((s, u) for limit, s, u in ((1e12, 1e-12, "T"), (1e9, 1e-9, "B"),
                                                   (1e6, 1e-6, "M")) if n > limit),
                       (1e-3, "K"))
    x = n * scale
    decimals = max(2 - len(str(round(x)).lstrip("0")), 0)
    return f"{x:.{decimals}f}{unit}"


# ---------------------------------------------------------------------------------------------
# the sources


def read_model_card(folder: str | os.PathLike) -> dict[str, Any]:
    """README.md's YAML front matter (between two `---` lines at its top), or {}."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the model card: {e}") from None
    if not lines or lines[0] != "---":
        return {}
    front = []
    for line in lines[1:]:
        if line == "---":
            break
        front.append(line)
    text = "\n".join(front) + "\n"
    # as llama.cpp: a list item `- no` (Norwegian) is not YAML 1.1's false; tabs are indents
    text = text.replace("- no\n", '- "no"\n').replace("\t", "  ")
    try:
        card = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: the front matter is not valid YAML: "
                        f"{str(e).splitlines()[0]}") from None
    if not isinstance(card, dict):
        log.warning("%s: front matter is a %s, not a mapping: ignored", path, type(card).__name__)
        return {}
    return card


def _read_json(path: str) -> dict[str, Any]:
    """An optional JSON file as a dict; {} when missing or unreadable (as llama.cpp does)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------
# the metadata


@dataclass
class ModelMetadata:
    """What a model is and where it comes from: the general.* keys before the hparams."""

    name: str | None = None
    author: str | None = None
    version: str | None = None
    organization: str | None = None
    finetune: str | None = None
    basename: str | None = None
    description: str | None = None
    quantized_by: str | None = None
    size_label: str | None = None
    license: Any = None  # a string, or a list of them (written joined by commas)
    license_name: str | None = None
    license_link: str | None = None
    url: str | None = None
    doi: str | None = None
    uuid: str | None = None
    repo_url: str | None = None
    source_url: str | None = None
    source_doi: str | None = None
    source_uuid: str | None = None
    source_repo_url: str | None = None
    base_models: list[dict] | None = None
    datasets: list[dict] | None = None
    tags: list | None = None
    languages: list | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # general.sampling.* key -> value


_CARD_KEYS = ("name", "author", "version", "organization", "description", "finetune",
              "basename", "size_label")
_CARD_SOURCE_KEYS = (("source_url", "url"), ("source_doi", "doi"), ("source_uuid", "uuid"),
                     ("source_repo_url", "repo_url"))
# (field, model card key), in llama.cpp's order: its own keys, the same with "model_" in
# front, then keys seen on community cards; a field takes the first key the card has
_CARD_FIELDS = (
    *((k, k) for k in _CARD_KEYS), *((f, k) for f, k in _CARD_SOURCE_KEYS),
    *((k, "model_" + k) for k in _CARD_KEYS), *((f, "model_" + k) for f, k in _CARD_SOURCE_KEYS),
    ("author", "model_creator"), ("basename", "model_type"),
    ("license", "license"), ("license_name", "license_name"), ("license_link", "license_link"),
)
_CARD_LISTS = (("tags", "tags"), ("tags", "pipeline_tag"),
               ("languages", "languages"), ("languages", "language"))
_HF_URL = re.compile(r"https?://huggingface.co/([^/]+/[^/]+)$")


def _source_entry(ident: Any, n_params: int) -> dict:
    """A base model or data set named on the model card: a Hugging Face id, a URL or a
    mapping of its fields."""
    if isinstance(ident, dict):
        return ident
    entry: dict[str, Any] = {}
    if not isinstance(ident, str):
        log.warning("model card: source %r is neither an id, a URL nor a mapping", ident)
        return entry  # llama.cpp counts it all the same
    is_url = ident.startswith(("http://", "https://", "ssh://"))
    if is_url:
        entry["repo_url"] = ident
        m = _HF_URL.match(ident) if "huggingface.co" in ident else None
        if m is None:
            return entry
        ident = m.group(1)
    parts = split_model_id(ident, n_params)
    if parts.full_name is not None:
        entry["name"] = title_case(parts.full_name)
    if parts.organization is not None:
        entry["organization"] = title_case(parts.organization)
    if parts.version is not None:
        entry["version"] = parts.version
    if not is_url and parts.organization is not None and parts.full_name is not None:
        entry["repo_url"] = f"https://huggingface.co/{parts.organization}/{parts.full_name}"
    return entry


def _sources(card: dict, keys: tuple[str, ...], n_params: int) -> list[dict] | None:
    if not any(k in card for k in keys):
        return None
    value = next(card[k] for k in keys if k in card)
    idents = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [_source_entry(i, n_params) for i in idents]


def _apply_model_id(meta: ModelMetadata, parts: ModelId) -> None:
    """Fill the fields still empty from a split model id."""
    if meta.name is None and parts.full_name is not None:
        meta.name = title_case(parts.full_name)
    if meta.organization is None and parts.organization is not None:
        meta.organization = title_case(parts.organization)
    for name in ("basename", "finetune", "version", "size_label"):
        if getattr(meta, name) is None and getattr(parts, name) is not None:
            setattr(meta, name, getattr(parts, name))


# generation_config.json key(s) -> general.sampling key and its type
_SAMPLING = (
    (("sequence",), Keys.SAMPLING_SEQUENCE, ValueType.STRING),
    (("top_k",), Keys.SAMPLING_TOP_K, ValueType.INT32),
    (("top_p",), Keys.SAMPLING_TOP_P, ValueType.FLOAT32),
    (("min_p",), Keys.SAMPLING_MIN_P, ValueType.FLOAT32),
    (("xtc_probability",), Keys.SAMPLING_XTC_PROBABILITY, ValueType.FLOAT32),
    (("xtc_threshold",), Keys.SAMPLING_XTC_THRESHOLD, ValueType.FLOAT32),
    (("temperature",), Keys.SAMPLING_TEMP, ValueType.FLOAT32),
    (("penalty_last_n",), Keys.SAMPLING_PENALTY_LAST_N, ValueType.INT32),
    (("penalty_repeat", "repetition_penalty"), Keys.SAMPLING_PENALTY_REPEAT, ValueType.FLOAT32),
    (("mirostat",), Keys.SAMPLING_MIROSTAT, ValueType.INT32),
    (("mirostat_tau",), Keys.SAMPLING_MIROSTAT_TAU, ValueType.FLOAT32),
    (("mirostat_eta",), Keys.SAMPLING_MIROSTAT_ETA, ValueType.FLOAT32),
)


def load_metadata(folder: str | os.PathLike, config: dict[str, Any], n_params: int,
                  n_expert: int = 0, one_expert_params: int = 0) -> ModelMetadata:
    """The model's metadata from its folder (model card, generation_config.json, name) and
    config.json, for a model of `n_params` parameters (0: vocab only); a mixture of
    `n_expert` experts is labelled by the size of its one-expert model ("8x7.2B")."""
    meta = ModelMetadata()
    card = read_model_card(folder)
    for name, key in _CARD_FIELDS:
        if key in card and getattr(meta, name) is None:
            setattr(meta, name, card[key])
    meta.base_models = _sources(card, ("base_model", "base_models", "base_model_sources"),
                                n_params)
    meta.datasets = _sources(card, ("datasets", "dataset", "dataset_sources"), n_params)
    for name, key in _CARD_LISTS:
        value = card.get(key)
        if value is None:
            continue
        items = getattr(meta, name) or []
        items += [value] if isinstance(value, str) else value if isinstance(value, list) else []
        setattr(meta, name, items)

    name_or_path = config.get("_name_or_path")
    if isinstance(name_or_path, str) and name_or_path.count("/") <= 1:  # an id, not a path
        _apply_model_id(meta, split_model_id(name_or_path, n_params))
    folder_name = Path(folder).name  # pathlib's name, as llama.cpp: "" for "."
    _apply_model_id(meta, split_model_id(folder_name, n_params))
    if meta.name is None:
        meta.name = folder_name
    if meta.size_label is None and n_params > 0:
        meta.size_label = (f"{n_expert}x{size_label(one_expert_params)}" if n_expert > 0
                           else size_label(n_params))

    gen = _read_json(os.path.join(folder, "generation_config.json"))
    for keys, gguf_key, _ in _SAMPLING:
        value = next((gen[k] for k in keys if k in gen), None)
        if value is not None:
            meta.sampling[gguf_key] = value
    return meta


# ---------------------------------------------------------------------------------------------
# the keys, in llama.cpp's order


def _text(value: Any) -> Value | None:
    """A string key; empty values are not written (llama.cpp skips them too)."""
    if not value:
        return None
    if isinstance(value, list):  # a license list
        value = ",".join(map(str, value))
        if not value:
            return None
    return Value(ValueType.STRING, value if isinstance(value, str) else str(value))


def _array(items: list) -> Value | None:
    if not items:
        return None
    for kind, vt in ((str, ValueType.STRING), (bool, ValueType.BOOL),
                     (float, ValueType.FLOAT32)):
        if all(type(i) is kind for i in items):
            return Value(ValueType.ARRAY, list(items), vt)
    if all(type(i) is int for i in items):
        return Value(ValueType.ARRAY, list(items), ValueType.INT32)
    return Value(ValueType.ARRAY, [str(i) for i in items], ValueType.STRING)  # mixed: as text


_MODEL_KEYS = (("name", Keys.NAME), ("author", Keys.AUTHOR), ("version", Keys.VERSION),
               ("organization", Keys.ORGANIZATION), ("finetune", Keys.FINETUNE),
               ("basename", Keys.BASENAME), ("description", Keys.DESCRIPTION),
               ("quantized_by", Keys.QUANTIZED_BY), ("size_label", Keys.SIZE_LABEL),
               ("license", Keys.LICENSE), ("license_name", Keys.LICENSE_NAME),
               ("license_link", Keys.LICENSE_LINK), ("url", Keys.URL), ("doi", Keys.DOI),
               ("uuid", Keys.UUID), ("repo_url", Keys.REPO_URL),
               ("source_url", Keys.SOURCE_URL), ("source_doi", Keys.SOURCE_DOI),
               ("source_uuid", Keys.SOURCE_UUID), ("source_repo_url", Keys.SOURCE_REPO_URL))
_SOURCE_FIELDS = ("name", "author", "version", "organization", "description", "url", "doi",
                  "uuid", "repo_url")


def general_keys(meta: ModelMetadata) -> dict[str, Value]:
    """The general.* keys of `meta` (after general.architecture and general.type)."""
    out: dict[str, Value] = {}
    for _, key, vt in _SAMPLING:
        if key not in meta.sampling:
            continue
        v = meta.sampling[key]
        if vt == ValueType.STRING:
            if (s := _text(v)) is not None:
                out[key] = s
            continue
        try:
            out[key] = Value(vt, int(v) if vt == ValueType.INT32 else float(v))
        except (TypeError, ValueError):
            log.warning("generation_config.json: %s = %r is not a number: not written", key, v)
    for name, key in _MODEL_KEYS:
        if (v := _text(getattr(meta, name))) is not None:
            out[key] = v
    for entries, count_key, entry_key in ((meta.base_models, Keys.BASE_MODEL_COUNT,
                                           Keys.BASE_MODEL),
                                          (meta.datasets, Keys.DATASET_COUNT, Keys.DATASET)):
        if entries is None:
            continue
        out[count_key] = Value(ValueType.UINT32, len(entries))
        for i, entry in enumerate(entries):
            for f in _SOURCE_FIELDS:
                if f in entry and (v := _text(entry[f])) is not None:
                    out[entry_key.format(id=i, field=f)] = v
    for items, key in ((meta.tags, Keys.TAGS), (meta.languages, Keys.LANGUAGES)):
        if items is not None and (v := _array(items)) is not None:
            out[key] = v
    return out

