"""What lorakit does with each kohya sd-scripts training key: implemented, no_effect or refused.

The table is data, `lorakit/data/kohya_keys.toml`: every argument of sd-scripts' `train_network.py` and
`sdxl_train_network.py` at one recorded commit (where argparse defines it, its type, default and choices),
plus the keys that exist only in kohya's dataset TOML. This module loads it once and renders the page
kohya users look for, docs/kohya-compatibility.md:

    python -m lorakit.training.kohya_table --write-docs   # regenerate the page
    python -m lorakit.training.kohya_table --check        # exit 1 when the page is stale

It imports nothing from lorakit.training.config, so the config loader can build on it.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

STATUSES = ("implemented", "no_effect", "refused")
SCRIPTS = ("train_network", "sdxl_train_network")
LEVELS = ("general", "dataset", "subset")
DOC_PATH = Path(__file__).resolve().parents[3] / "docs" / "kohya-compatibility.md"  # in a source checkout


@dataclass(frozen=True)
class KohyaKey:
    name: str
    status: str  # one of STATUSES
    note: str  # why (no_effect), or why and what to use instead (refused); may be empty when implemented
    defined_in: str  # "library/train_util.py:add_training_arguments"
    scripts: tuple[str, ...]  # which of SCRIPTS accept it
    type: str  # as argparse declares it: str, int, float, bool-flag, list[str], ...
    default: str | None = None  # argparse's default as a string; None when argparse's is None
    values_ok: tuple[str, ...] = ()  # when set, the only accepted values
    values_refused_note: str = ""  # why any other value is refused
    choices: tuple[str, ...] = ()  # argparse's choices, as strings
    dataset_levels: tuple[str, ...] = ()  # where kohya's dataset TOML accepts it too (subset of LEVELS)

    def value_ok(self, value) -> bool:
        """False for a value the table refuses (the key's own status is checked separately)."""
        return not self.values_ok or str(value) in self.values_ok


def parse_entry(name: str, raw: dict, section: str = "keys") -> KohyaKey:
    """One `[keys.<name>]` table -> KohyaKey; a malformed entry raises ValueError naming it."""
    where = f"kohya_keys.toml [{section}.{name}]"
    key = KohyaKey(name=name, status=raw.get("status", ""), note=raw.get("note", ""),
                   defined_in=raw.get("defined_in", ""), scripts=tuple(raw.get("scripts", ())),
                   type=raw.get("type", ""), default=raw.get("default"),
                   values_ok=tuple(raw.get("values_ok", ())),
                   values_refused_note=raw.get("values_refused_note", ""), choices=tuple(raw.get("choices", ())),
                   dataset_levels=tuple(raw.get("dataset_levels", ())))
    if key.status not in STATUSES:
        raise ValueError(f"{where}: status {key.status!r} is not one of {list(STATUSES)}")
    if key.status != "implemented" and not key.note.strip():
        raise ValueError(f"{where}: a {key.status} key needs a note saying why")
    if key.values_ok and not key.values_refused_note.strip():
        raise ValueError(f"{where}: values_ok needs values_refused_note (why other values are refused)")
    if not key.scripts or not set(key.scripts) <= set(SCRIPTS):
        raise ValueError(f"{where}: scripts {list(key.scripts)} must be a non-empty subset of {list(SCRIPTS)}")
    if not set(key.dataset_levels) <= set(LEVELS):
        raise ValueError(f"{where}: dataset_levels {list(key.dataset_levels)} must be among {list(LEVELS)}")
    if not key.defined_in or not key.type:
        raise ValueError(f"{where}: defined_in and type are required")
    return key


def _load() -> tuple[str, dict[str, KohyaKey], dict[str, KohyaKey]]:
    text = resources.files("lorakit.data").joinpath("kohya_keys.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    keys = {name: parse_entry(name, raw) for name, raw in data["keys"].items()}
    dataset = {name: parse_entry(name, raw, "dataset_keys") for name, raw in data["dataset_keys"].items()}
    return data["source"], keys, dataset


SOURCE, KOHYA_KEYS, _DATASET_KEYS = _load()  # SOURCE = "kohya-ss/sd-scripts@<40-hex commit>"
SOURCE_REPO, _, SOURCE_COMMIT = SOURCE.partition("@")


def dataset_keys() -> dict[str, KohyaKey]:
    """Keys of kohya's dataset TOML that are not training arguments (or mean something else there)."""
    return dict(_DATASET_KEYS)


def counts(keys: dict[str, KohyaKey] | None = None) -> dict[str, int]:
    keys = KOHYA_KEYS if keys is None else keys
    return {status: sum(1 for k in keys.values() if k.status == status) for status in STATUSES}


# ---- docs/kohya-compatibility.md ---------------------------------------------------------------------
TITLES = {"implemented": "Implemented", "no_effect": "No effect", "refused": "Refused"}
MEANING = {
    "implemented": "Implemented by lorakit with the same meaning as in sd-scripts.",
    "no_effect": "Accepted, and changes nothing in lorakit; the note says why (speed, memory, hardware, "
                 "where logs go, housekeeping: never what is trained).",
    "refused": "An error: the key would change what is trained, or needs something lorakit does not do. "
               "The note says why and what to use instead.",
}
NOTE_HEADER = {"implemented": "Note", "no_effect": "Why nothing changes", "refused": "Why, and what to use instead"}
LEVEL_NAMES = {"general": "`[general]`", "dataset": "`[[datasets]]`", "subset": "`[[datasets.subsets]]`"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: str | None) -> str:
    if value is None:
        return ""
    return '`""`' if value == "" else f"`{_cell(value)}`"


def _note(key: KohyaKey) -> str:
    parts = [key.note] if key.note else []
    if key.values_ok:
        accepted = ", ".join(f"`{v}`" for v in key.values_ok)
        parts.append(f"Accepted values: {accepted}; any other value is refused: {key.values_refused_note}")
    return _cell(". ".join(p.rstrip(".") for p in parts))


def _levels(key: KohyaKey) -> str:
    return ", ".join(LEVEL_NAMES[level] for level in key.dataset_levels)


def _key_cell(key: KohyaKey) -> str:
    only = "" if set(key.scripts) == set(SCRIPTS) else " (" + ", ".join(key.scripts) + " only)"
    return f"`{key.name}`{only}"


def _status_table(status: str) -> list[str]:
    keys = sorted((k for k in KOHYA_KEYS.values() if k.status == status), key=lambda k: k.name)
    lines = [f"## {TITLES[status]} ({len(keys)})", "", MEANING[status], "",
             f"| Key | Type | kohya default | Also in the dataset TOML | {NOTE_HEADER[status]} | Defined in |",
             "|---|---|---|---|---|---|"]
    for k in keys:
        lines.append(f"| {_key_cell(k)} | {_cell(k.type)} | {_code(k.default)} | {_levels(k)} | {_note(k)} | "
                     f"`{k.defined_in}` |")
    return lines + [""]


def _intro() -> list[str]:
    n = counts()
    url = f"https://github.com/{SOURCE_REPO}/tree/{SOURCE_COMMIT}"
    sdxl_only = sum(1 for k in KOHYA_KEYS.values() if k.scripts == ("sdxl_train_network",))
    lines = [
        "# kohya sd-scripts compatibility", "",
        "<!-- Generated from src/lorakit/data/kohya_keys.toml by "
        "`python -m lorakit.training.kohya_table --write-docs`; edit the TOML, not this page. -->", "",
        "lorakit reads kohya-style training configs. This page lists **every argument** of sd-scripts' "
        f"`train_network.py` and `sdxl_train_network.py` (the same keys, plus {sdxl_only} for SDXL only), "
        "the dataset arguments included, and the keys that exist only in kohya's dataset TOML, with what "
        "lorakit does with each.", "",
        f"Source: [`{SOURCE}`]({url}): every `parser.add_argument` reachable from both scripts' "
        "`setup_parser()`, and the `ConfigSanitizer` schemas of `library/config_util.py`. Types, defaults and "
        "choices are as argparse declares them there.", "",
        "| Status | Keys | Meaning |", "|---|---|---|",
    ]
    lines += [f"| {TITLES[s]} | {n[s]} | {MEANING[s]} |" for s in STATUSES]
    lines += [f"| All | {sum(n.values())} | |", "",
              "Some keys are accepted only with certain values (for example `save_model_as = \"safetensors\"`); "
              "the note lists them, and any other value is refused with the reason given. Keys that exist "
              "only in lorakit (such as `algo`, `conv_dim` or `preset`) are not in this table.", ""]
    return lines


def _dataset_section() -> list[str]:
    keys = sorted(_DATASET_KEYS.values(), key=lambda k: k.name)
    n = counts(_DATASET_KEYS)
    summary = ", ".join(f"{n[s]} {TITLES[s].lower()}" for s in STATUSES)
    lines = [
        f"## Dataset TOML keys ({len(keys)}: {summary})", "",
        "A `dataset_config` TOML has `[general]`, `[[datasets]]` and `[[datasets.subsets]]` tables; a "
        "lower level overrides a higher one, and the command-line value is the fallback. Training arguments "
        "that the dataset TOML also accepts are marked in the tables above (column *Also in the dataset "
        "TOML*) and have the same status there. These keys exist only in the dataset TOML:", "",
        "| Key | Status | Type | kohya default | Levels | Note | Defined in |", "|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        lines.append(f"| `{k.name}` | {TITLES[k.status]} | {_cell(k.type)} | {_code(k.default)} | {_levels(k)} | "
                     f"{_note(k)} | `{k.defined_in}` |")
    return lines + [""]


def render_markdown() -> str:
    lines = _intro()
    for status in STATUSES:
        lines += _status_table(status)
    lines += _dataset_section()
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.training.kohya_table",
                                     description="Render or check docs/kohya-compatibility.md.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write-docs", action="store_true", help="write the page")
    action.add_argument("--check", action="store_true", help="exit 1 when the page differs from the table")
    parser.add_argument("--path", type=Path, default=DOC_PATH, help=f"the page (default: {DOC_PATH})")
    args = parser.parse_args(argv)
    text = render_markdown()
    if args.write_docs:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(text, encoding="utf-8")
        print(f"wrote {args.path} ({sum(counts().values())} keys + {len(_DATASET_KEYS)} dataset-TOML keys)")
        return 0
    current = args.path.read_text(encoding="utf-8") if args.path.is_file() else None
    if current != text:
        print(f"{args.path} is stale or missing; run: python -m lorakit.training.kohya_table --write-docs",
              file=sys.stderr)
        return 1
    print(f"{args.path} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
