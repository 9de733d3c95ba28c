"""Tabular data sets described by a YAML file: schema, typed rows, persisted splits, row <-> JSON text.

A data set YAML (see configs/tabular/) gives: name, csv, target, task (classification | regression), columns (ordered
name -> float | int | category), and optionally labels (raw target value -> the text a model writes), missing
(markers read as a missing value, besides the empty string, compared with the cell's text: a list for every column,
or a mapping column -> list, e.g. {chol: [0]}), derive (columns computed from another CSV column's text:
{name: {from: column, map: {text: value}, default: value}}; a text not in map takes default, or is an error without
one; the derived column is declared in columns like any other), site_column (the column that names each row's site:
one federated client per site), strip (strip spaces around values), float_precision (decimals written for floats,
default 4), split (seed, val and test fractions), task_prompt (the question a model answers to predict the target
from a row's features, with `{}` where the features go; a generic one is made from the target and its label texts
when absent). Columns of the CSV not listed are dropped. A user adds a data set by writing such a file: no code.

Serialisation is strict JSON: the keys in the YAML's column order, floats rounded to float_precision decimals, ints as
integers, categories as strings, missing values as null; the target written as its label text. The parser is tolerant
(unquoted keys or words, single quotes, key spelling) and returns a status with the typed values:
SUCCESS, REDUNDANT_KEY (extra keys, dropped), MISSING_KEY, CONVERSION_ERROR, INVALID_ANSWER (no object at all); when
several apply, the worst one (in the order CONVERSION_ERROR, MISSING_KEY, REDUNDANT_KEY) is reported.
"""

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from llama_mp.jsonl import atomic_write, read_yaml, write_json_atomic

TYPES = ("float", "int", "category")
SUCCESS, REDUNDANT_KEY, MISSING_KEY, CONVERSION_ERROR, INVALID_ANSWER = (
    "SUCCESS", "REDUNDANT_KEY", "MISSING_KEY", "CONVERSION_ERROR", "INVALID_ANSWER")
STATUS_SCORE = {SUCCESS: 5, REDUNDANT_KEY: 3, MISSING_KEY: 2, CONVERSION_ERROR: 1, INVALID_ANSWER: 0}  # reference


@dataclass
class Schema:
    name: str
    csv: str
    target: str
    task: str
    columns: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # markers of every column
    column_missing: dict[str, list[str]] = field(default_factory=dict)  # markers of one column
    derive: dict[str, dict] = field(default_factory=dict)  # name -> {"from", "map", "default"}
    site_column: str = ""
    strip: bool = False
    float_precision: int = 4
    split: dict = field(default_factory=lambda: {"seed": 0, "val": 0.1, "test": 0.2})
    task_prompt: str = ""
    path: str = ""
    categories: dict[str, list[str]] = field(default_factory=dict)  # filled from the data

    @property
    def features(self) -> list[str]:
        return [c for c in self.columns if c != self.target]


def load_schema(path: str, root: Optional[str] = None) -> Schema:
    """A Schema from YAML, checked: every problem is a one-line error naming the file."""
    raw = read_yaml(path, "data set YAML")
    known = {"name", "csv", "target", "task", "columns", "labels", "missing", "derive", "site_column", "strip",
             "float_precision", "split", "task_prompt"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
    for key in ("name", "csv", "target", "task", "columns"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r}")
    if raw["task"] not in ("classification", "regression"):
        raise ValueError(f"{path}: task must be classification or regression, got {raw['task']!r}")
    columns = raw["columns"]
    if not isinstance(columns, dict) or not columns:
        raise ValueError(f"{path}: columns must map each column name to one of {TYPES}")
    bad = [c for c, t in columns.items() if t not in TYPES]
    if bad:
        raise ValueError(f"{path}: column {bad[0]!r} has type {columns[bad[0]]!r}, not one of {TYPES}")
    if raw["target"] not in columns:
        raise ValueError(f"{path}: target {raw['target']!r} is not among the columns")
    if raw["task"] == "regression" and columns[raw["target"]] == "category":
        raise ValueError(f"{path}: a regression target must be float or int")
    check_plain_keys(path, raw)
    task_prompt = raw.get("task_prompt") or ""
    if task_prompt and task_prompt.count("{}") != 1:
        raise ValueError(f"{path}: task_prompt must contain exactly one {{}} where the features go")
    derive = check_derive(path, raw.get("derive"), columns)
    sources = {d["from"] for d in derive.values()}
    missing, column_missing = check_missing(path, raw.get("missing"), set(columns) | sources)
    site_column = raw.get("site_column") or ""
    if site_column and (site_column not in columns or site_column == raw["target"]):
        raise ValueError(f"{path}: site_column {site_column!r} is not among the feature columns")
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    csv_path = raw["csv"] if os.path.isabs(raw["csv"]) else os.path.join(root, raw["csv"])
    schema = Schema(name=raw["name"], csv=csv_path, target=raw["target"], task=raw["task"],
                    columns={str(k): v for k, v in columns.items()},
                    labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
                    missing=missing, column_missing=column_missing, derive=derive, site_column=site_column,
                    strip=bool(raw.get("strip", False)),
                    float_precision=int(raw.get("float_precision", 4)),
                    split={"seed": 0, "val": 0.1, "test": 0.2, **(raw.get("split") or {})},
                    task_prompt=task_prompt, path=path)
    return schema


def check_plain_keys(path: str, raw: dict) -> None:
    """The keys with one plain value: each of its type, else a one-line error naming the file and the key."""
    for key in ("name", "csv"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ValueError(f"{path}: {key} must be a text, got {raw[key]!r}")
    if not isinstance(raw.get("task_prompt") or "", str):
        raise ValueError(f"{path}: task_prompt must be a text, got {raw['task_prompt']!r}")
    labels = raw.get("labels")
    if labels is not None and (not isinstance(labels, dict) or not all(is_scalar(v) for kv in labels.items()
                                                                       for v in kv)):
        raise ValueError(f"{path}: labels must map raw target values to the texts a model writes, got {labels!r}")
    if not isinstance(raw.get("strip", False), bool):
        raise ValueError(f"{path}: strip must be true or false, got {raw['strip']!r}")
    precision = raw.get("float_precision", 4)
    if not isinstance(precision, int) or isinstance(precision, bool) or precision < 0:
        raise ValueError(f"{path}: float_precision must be a non-negative integer, got {precision!r}")
    split = raw.get("split") or {}
    if not isinstance(split, dict) or sorted(set(split) - {"seed", "val", "test"}):
        raise ValueError(f"{path}: split must be a mapping of seed, val and test, got {split!r}")
    if not isinstance(split.get("seed", 0), int) or isinstance(split.get("seed", 0), bool):
        raise ValueError(f"{path}: split.seed must be an integer, got {split['seed']!r}")
    for key in ("val", "test"):
        value = split.get(key, 0.1)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"{path}: split.{key} must be a fraction of the rows in [0, 1), e.g. 0.1, got {value!r}")


def is_scalar(value) -> bool:
    """A plain YAML value that stands for a text; not a boolean (YAML reads bare no/yes/TRUE as one: quote them)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def check_missing(path: str, raw, names: set) -> tuple[list[str], dict[str, list[str]]]:
    """YAML `missing` -> (markers of every column, {column: its own markers}); markers as the CSV's text."""
    if raw is None:
        return [], {}
    if isinstance(raw, list):
        if not all(is_scalar(m) for m in raw):
            raise ValueError(f"{path}: missing must list plain values, quoted where YAML would read a boolean "
                             f"(or map columns to such lists)")
        return [str(m) for m in raw], {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: missing must be a list of markers or a mapping column -> list of markers")
    for column, markers in raw.items():
        if column not in names:
            raise ValueError(f"{path}: missing.{column}: not a declared column (nor a derive source)")
        if not isinstance(markers, list) or not all(is_scalar(m) for m in markers):
            raise ValueError(f"{path}: missing.{column}: expected a list of plain values, e.g. [0] or ['TRUE']")
    return [], {str(c): [str(m) for m in markers] for c, markers in raw.items()}


def check_derive(path: str, raw, columns: dict) -> dict[str, dict]:
    """YAML `derive` -> {name: {"from", "map", "default"}}, every entry checked (plain data, no code)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: derive must map each new column to {{from: column, map: {{...}}, default: value}}")
    out = {}
    for name, spec in raw.items():
        where = f"{path}: derive.{name}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected {{from: column, map: {{...}}, default: value}}")
        unknown = sorted(set(spec) - {"from", "map", "default"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} (from, map, default)")
        if not isinstance(spec.get("from"), str) or not spec["from"]:
            raise ValueError(f"{where}: 'from' must name the CSV column it is computed from")
        if spec["from"] in raw:
            raise ValueError(f"{where}: 'from' names another derived column ({spec['from']!r})")
        mapping = spec.get("map") or {}
        if not isinstance(mapping, dict) or not all(is_scalar(v) for kv in mapping.items() for v in kv):
            raise ValueError(f"{where}: 'map' must map source texts to plain values (quote no/yes/true/false)")
        default = spec.get("default")
        if default is not None and not is_scalar(default):
            raise ValueError(f"{where}: 'default' must be a plain value (quote no/yes/true/false)")
        if not mapping and default is None:
            raise ValueError(f"{where}: give 'map', 'default' or both")
        if name not in columns:
            raise ValueError(f"{where}: declare the derived column in columns (with its type)")
        out[str(name)] = {"from": spec["from"], "map": {str(k): str(v) for k, v in mapping.items()},
                          "default": None if default is None else str(default)}
    return out


def load_rows(schema: Schema) -> list[dict[str, Any]]:
    """Typed rows (None for missing values); the category lists of the schema are filled from the data."""
    if not os.path.isfile(schema.csv):
        raise FileNotFoundError(f"{schema.csv}: CSV of data set {schema.name!r} not found ({schema.path})")
    with open(schema.csv, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, skipinitialspace=schema.strip)
        header = [h.strip() for h in next(reader, [])]
        clash = [c for c in schema.derive if c in header]
        if clash:
            raise ValueError(f"{schema.csv}: already has a column {clash[0]!r}, which {schema.path} derives")
        read = [c for c in schema.columns if c not in schema.derive] + [d["from"] for d in schema.derive.values()]
        absent = [c for c in read if c not in header]
        if absent:
            raise ValueError(f"{schema.csv}: no column {absent[0]!r} (declared in {schema.path})")
        index = {c: header.index(c) for c in read}
        rows = []
        for line, values in enumerate(reader, start=2):
            if not values:
                continue
            if len(values) != len(header):
                raise ValueError(f"{schema.csv}:{line}: {len(values)} fields, the header has {len(header)}")
            row = {}
            for column, kind in schema.columns.items():
                derived = schema.derive.get(column)
                text = cell(values, index, derived["from"] if derived else column, schema)
                if text is not None and derived:
                    text = derived["map"].get(text, derived["default"])
                    if text is None:
                        raise ValueError(f"{schema.csv}:{line}: {derived['from']}={values[index[derived['from']]]!r}"
                                         f" is not in derive.{column}.map of {schema.path} (and it has no default)")
                if text is None:
                    row[column] = None
                    continue
                try:
                    row[column] = cast(text, kind)
                except ValueError:
                    raise ValueError(f"{schema.csv}:{line}: {column}={text!r} is not a {kind}") from None
            if row[schema.target] is None:
                continue  # a row without a target teaches nothing
            rows.append(row)
    if not rows:
        raise ValueError(f"{schema.csv}: no rows")
    schema.categories = known_categories(schema, rows)
    return rows


def known_categories(schema: Schema, rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each category column's values among rows, sorted."""
    return {c: sorted({str(r[c]) for r in rows if r[c] is not None})
            for c, kind in schema.columns.items() if kind == "category"}


def cell(values: list[str], index: dict[str, int], column: str, schema: Schema) -> Optional[str]:
    """A CSV cell's text, or None when it is empty or one of the missing markers (global or the column's own)."""
    text = values[index[column]]
    text = text.strip() if schema.strip else text
    if text == "" or text in schema.missing or text in schema.column_missing.get(column, ()):
        return None
    return text


def read_rows_csv(path: str, schema: Schema, what: str = "rows") -> list[dict]:
    """Rows of `schema` from a CSV with its columns (anchors, synthetic rows); empty cells are None."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} CSV not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = []
        for line, row in enumerate(csv.DictReader(f), start=2):
            if any(row.get(c) is None for c in schema.columns):  # a column the header lacks, or a short line
                raise ValueError(f"{path}:{line}: not a row of {schema.name} ({schema.path})")
            cells = {c: None if row[c] == "" else row[c] for c in schema.columns}
            rows.append(check_row(cells, schema, f"{path}:{line}", need_target=False))
    return rows


def check_row(row, schema: Schema, where: str, need_target: bool = True) -> dict:
    """A row object read from a file (anchor, contrast or synthetic row), typed; a ValueError naming `where` when it is
    not a row of the schema (a wrong type, or no target where one is needed)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: not a row object")
    try:
        typed = {c: None if row.get(c) is None else cast(row[c], k) for c, k in schema.columns.items()}
    except (ValueError, TypeError):
        raise ValueError(f"{where}: not a row of {schema.name} ({schema.path})") from None
    if need_target and typed[schema.target] is None:
        raise ValueError(f"{where}: the row has no {schema.target}")
    return typed


def write_rows_csv(path: str, schema: Schema, rows: list[dict]) -> None:
    """Atomically: the schema's columns, one row per line, None as an empty cell."""
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(list(schema.columns))
            for row in rows:
                writer.writerow(["" if row.get(c) is None else row[c] for c in schema.columns])

    atomic_write(path, write)


class Encoder:
    """Rows -> numeric matrices: numbers as floats (NaN when missing), categories as codes for the booster, and a
    standardised / one-hot version for distances."""

    def __init__(self, schema: Schema, rows: list[dict]):
        self.schema, self.features = schema, schema.features
        self.codes = {c: {v: i for i, v in enumerate(schema.categories[c])} for c in self.features
                      if schema.columns[c] == "category"}
        numeric = [c for c in self.features if c not in self.codes]
        values = {c: np.array([r[c] if r[c] is not None else np.nan for r in rows], dtype=float) for c in numeric}
        self.mean = {c: np.nanmean(v) for c, v in values.items()}
        self.std = {c: (np.nanstd(v) or 1.0) for c, v in values.items()}

    def booster_matrix(self, rows: list[dict]) -> np.ndarray:
        out = np.full((len(rows), len(self.features)), np.nan)
        for j, c in enumerate(self.features):
            for i, r in enumerate(rows):
                v = r.get(c)
                if v is not None:
                    out[i, j] = self.codes[c].get(str(v), np.nan) if c in self.codes else float(v)
        return out

    def categorical_mask(self) -> list[bool]:
        return [c in self.codes for c in self.features]

    def distance_matrix(self, rows: list[dict]) -> np.ndarray:
        parts = []
        for c in self.features:
            if c in self.codes:
                block = np.zeros((len(rows), len(self.codes[c])))
                for i, r in enumerate(rows):
                    if r.get(c) is not None and str(r[c]) in self.codes[c]:
                        block[i, self.codes[c][str(r[c])]] = 1.0
                parts.append(block)
            else:
                col = np.array([float(r[c]) if r.get(c) is not None else self.mean[c] for r in rows])
                parts.append(((col - self.mean[c]) / self.std[c])[:, None])
        return np.concatenate(parts, axis=1)


def target_bins(schema: Schema, rows: list[dict], num_bins: int = 4) -> list[str]:
    """A discrete label per row: the target itself for classification, its quantile bin (of these rows) for
    regression (used by the label-skewed federated split and to pick contrast rows)."""
    values = [r[schema.target] for r in rows]
    if schema.task == "classification":
        return [str(v) for v in values]
    edges = np.unique(np.quantile(np.array(values, dtype=float), np.linspace(0, 1, num_bins + 1)[1:-1]))
    return [f"bin{int(np.searchsorted(edges, float(v), side='right'))}" for v in values]


def cast(value: Any, kind: str):
    if kind == "float":
        number = float(value)
        if math.isnan(number) or math.isinf(number):
            raise ValueError("not finite")
        return number
    if kind == "int":
        number = float(value)
        if number != int(number):
            raise ValueError("not an integer")
        return int(number)
    return str(value)


def splits(schema: Schema, n_rows: int, directory: str) -> dict[str, list[int]]:
    """Train/val/test row indices: a seeded permutation, persisted in directory/<name>.split.json and reused."""
    path = os.path.join(directory, f"{schema.name}.split.json")
    settings = {"rows": n_rows, **schema.split}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("settings") != settings:
            raise ValueError(f"{path}: made for other rows or split settings ({saved.get('settings')}); "
                             f"remove it to split again")
        return saved["splits"]
    order = np.random.default_rng(int(schema.split["seed"])).permutation(n_rows).tolist()
    n_test, n_val = int(round(n_rows * schema.split["test"])), int(round(n_rows * schema.split["val"]))
    result = {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
              "train": sorted(order[n_test + n_val:])}
    write_json_atomic(path, {"settings": settings, "splits": result}, indent=None)
    return result


# ---- row <-> text --------------------------------------------------------------------------------------------------
def target_text(schema: Schema, value) -> Any:
    if schema.task == "classification":
        return schema.labels.get(str(value), str(value))
    return value


def features_text(row: dict, schema: Schema) -> str:
    """The features as the reference's task prompts show them: ' key: value, key: value ', missing as norecord."""
    parts = []
    for column in schema.features:
        value = row.get(column)
        if value is None:
            value = "norecord"
        elif schema.columns[column] == "float":
            value = round(float(value), schema.float_precision)
        parts.append(f"{column}: {value}")
    return " " + ", ".join(parts) + " "


def task_question(schema: Schema, row: dict) -> str:
    """The prediction question for a row (LLM_Q): the data set's task_prompt filled with its features."""
    template = schema.task_prompt
    if not template:
        if schema.task == "classification":
            choices = sorted(set(schema.labels.values()) or set(schema.categories.get(schema.target, [])))
            answer = "only one of " + ", ".join(f"'{c}'" for c in choices)
        else:
            answer = "only a number"
        template = (f"Predict {schema.target} from the attributes in the text below. Directly respond with "
                    f"{answer}. \nText: {{}}. \nAnswer: ")
    return template.replace("{}", features_text(row, schema))


def answer_text(schema: Schema, row: dict) -> str:
    """The target as a model should answer it: the label text, or the number at float_precision."""
    value = row[schema.target]
    if schema.task == "classification":
        return str(target_text(schema, value))
    return str(int(value)) if schema.columns[schema.target] == "int" else str(round(float(value), schema.float_precision))


# What the generator writes before a row: its SFT answers start so, and sampling and scoring continue from it.
ANSWER_LEAD = "Here's a new JSON format sample that approximates the key patterns of the samples above:\n"


def row_to_text(row: dict, schema: Schema) -> str:
    """Strict JSON in column order; floats rounded to float_precision; the target as its label text."""
    out = {}
    for column, kind in schema.columns.items():
        value = row.get(column)
        if value is None:
            out[column] = None
        elif column == schema.target:
            out[column] = target_text(schema, value)
            if kind == "float" and schema.task == "regression":
                out[column] = round(float(value), schema.float_precision)
        elif kind == "float":
            out[column] = round(float(value), schema.float_precision)
        else:
            out[column] = value
    return json.dumps(out, ensure_ascii=False)


def _key(name: str) -> str:
    return re.sub(r"[\s/_.\-()]", "", name).lower()


def _loads_tolerant(text: str) -> Optional[dict]:
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    quoted = text.replace("'", '"')
    quoted = re.sub(r'([{,]\s*)([^"{},:\s][^{},:]*?)\s*:', lambda m: f'{m.group(1)}"{m.group(2).strip()}":', quoted)
    quoted = re.sub(r':\s*([A-Za-z<>][^,{}"]*?)\s*([,}])', lambda m: f': "{m.group(1).strip()}"{m.group(2)}', quoted)
    try:
        value = json.loads(quoted)
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    pairs = re.findall(r'["\']?([^"\'{},:]+?)["\']?\s*:\s*("[^"]*"|\'[^\']*\'|[^,{}]+)', text)
    return {k.strip(): v.strip().strip("\"'") for k, v in pairs} if pairs else None


def parse_row(text: str, schema: Schema) -> tuple[str, dict]:
    """(status, {column: typed value or None}) from a model's output; only the schema's columns are kept."""
    empty = {c: None for c in schema.columns}
    match = re.search(r"\{.*?\}", text, flags=re.S)
    data = _loads_tolerant(match.group(0)) if match else None
    if not data:
        return INVALID_ANSWER, empty
    by_key = {_key(c): c for c in schema.columns}
    result, redundant, failed = dict(empty), False, False
    seen = set()
    for key, value in data.items():
        column = by_key.get(_key(str(key)))
        if column is None:
            redundant = True
            continue
        seen.add(column)
        try:
            result[column] = parse_value(value, column, schema)
        except ValueError:
            failed = True
    missing = len(seen) < len(schema.columns)
    status = CONVERSION_ERROR if failed else MISSING_KEY if missing else REDUNDANT_KEY if redundant else SUCCESS
    return status, result


def parse_value(value, column: str, schema: Schema):
    if value is None:
        return None
    kind = schema.columns[column]
    if column == schema.target and schema.task == "classification":
        inverse = {text.lower(): raw for raw, text in schema.labels.items()}
        text = str(value).strip().lower()
        if text in inverse:
            return inverse[text]
        known = {c.lower(): c for c in schema.categories.get(column, [])}
        if text in known:
            return known[text]
        raise ValueError(f"unknown label {value!r}")
    if kind == "category":
        known = {c.lower(): c for c in schema.categories.get(column, [])}
        text = str(value).strip()
        if known and text.lower() not in known:
            raise ValueError(f"unknown category {value!r}")
        return known.get(text.lower(), text)
    return cast(value, kind)
