"""Typological distances between languages from URIEL, offline.

Two sources (``source`` of :func:`language_distances`):

* ``lang2vec`` — lang2vec's precomputed distances, the values of ``lang2vec.distance(type, ...)`` that Xu et al.
  (EMNLP 2024 Findings) correlate with (github.com/shaoyangxu/Multilingual-Human-Value-Concepts,
  ``lang2vec_try.ipynb`` → ``lang_sim.pt``): ``genetic``, ``geographic`` (rounded to 0.1), ``syntactic`` (rounded to
  0.01), ``phonological``, ``inventory``, ``featural`` (rounded to 0.1). Read from lang2vec's own table
  (``data/distances2.zip`` + ``distances_languages.txt`` of lang2vec ≥ 1.1.6, found in the installed package or in
  ``$RAYSAFE_LANG2VEC_DISTANCES``) exactly as its ``distance()`` reads it, else from the values bundled here
  (``lang2vec_distances.json``: the authors' ``lang_sim.pt`` for their 16 languages). The PyPI release of lang2vec
  (1.1.2) ships neither the table nor ``distance()``.
* ``uriel_features`` — re-derived from the URIEL feature files lang2vec 1.1.2 ships (below). These are not lang2vec's
  precomputed values (on the authors' 16 languages their Pearson correlation with them is 0.54 for geographic, 0.30
  for phonological, 0.90 for syntactic), but they cover every language URIEL has features for.
* ``auto`` (the concept flow's default) — ``lang2vec`` when it covers every language asked for, else
  ``uriel_features`` for all of them (never a mix); the table's ``source`` column says which was used.

The feature files are read directly with numpy (lang2vec's module imports ``pkg_resources``, gone from recent
setuptools), and the ``uriel_features`` distances are:

* ``syntactic``, ``phonological``, ``inventory``: cosine distance ``1 - cos(u, v)`` between the k-NN-predicted URIEL
  feature vectors (lang2vec feature sets ``syntax_knn``, ``phonology_knn``, ``inventory_knn``; complete, no gaps).
* ``genetic``: cosine distance between the Glottolog family-membership vectors (feature set ``fam``: one binary
  feature per family/sub-family node), i.e. ``1 - |shared nodes| / sqrt(|nodes_a| * |nodes_b|)``.
* ``geographic``: great-circle distance between the languages divided by the antipodal distance (URIEL's definition),
  with each language's position recovered from its ``geo`` vector (normalised great-circle distances to 299 fixed
  points): ``a_i . p = cos(pi * g_i)`` is linear in the unit position vector ``p`` and solved by least squares.

Our data carry ISO 639-1 codes where one exists; URIEL is keyed by ISO 639-3, so codes are mapped with
:func:`to_iso639_3` (the ISO 639-1 -> 639-3 correspondence, macrolanguage codes for macrolanguages, e.g. ``zh`` ->
``zho``, ``ar`` -> ``ara``, except Swahili: ``sw`` -> ``swh`` as the authors' ``lang.pt``; override per code, e.g.
``{"zh": "cmn"}``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl

from raysafe.errors import ConfigError, DataError

DISTANCE_TYPES: tuple[str, ...] = ("genetic", "geographic", "syntactic", "phonological", "inventory", "featural")
DEFAULT_DISTANCE_TYPES: tuple[str, ...] = ("genetic", "geographic", "syntactic", "phonological")
DISTANCE_SOURCES: tuple[str, ...] = ("auto", "lang2vec", "uriel_features")

#: Where a language tag maps to another ISO 639-3 code than the standard's table for URIEL: Swahili is ``swh``
#: (individual language) in Xu et al.'s lang.pt, not the macrolanguage ``swa``.
URIEL_CODE_DEFAULTS: dict[str, str] = {"sw": "swh"}

#: lang2vec's precomputed distance files inside ``distances2.zip`` (lang2vec.lang2vec.map_distance_to_filename).
LANG2VEC_DISTANCE_FILES: dict[str, str] = {
    "genetic": "genetic_upper_sparse.npz",
    "geographic": "geographic_upper_round1_sparse.npz",
    "syntactic": "syntactic_upper_round2_sparse.npz",
    "inventory": "inventory_upper_sparse.npz",
    "phonological": "phonological_upper_sparse.npz",
    "featural": "featural_upper_round1_sparse.npz",
}
BUNDLED_DISTANCES = Path(__file__).with_name("lang2vec_distances.json")
DISTANCES_ENV = "RAYSAFE_LANG2VEC_DISTANCES"

# distance type -> (lang2vec data file, feature-name prefix selecting its columns)
_FEATURE_SOURCES: dict[str, tuple[str, str]] = {
    "genetic": ("family_features.npz", "F_"),
    "geographic": ("geocoord_features.npz", "GC_"),
    "syntactic": ("feature_predictions.npz", "S_"),
    "phonological": ("feature_predictions.npz", "P_"),
    "inventory": ("feature_predictions.npz", "INV_"),
}

# ISO 639-1 -> ISO 639-3 (the standard's correspondence; macrolanguages map to the macrolanguage code).
ISO639_1_TO_3: dict[str, str] = {
    "aa": "aar",
    "ab": "abk",
    "ae": "ave",
    "af": "afr",
    "ak": "aka",
    "am": "amh",
    "an": "arg",
    "ar": "ara",
    "as": "asm",
    "av": "ava",
    "ay": "aym",
    "az": "aze",
    "ba": "bak",
    "be": "bel",
    "bg": "bul",
    "bi": "bis",
    "bm": "bam",
    "bn": "ben",
    "bo": "bod",
    "br": "bre",
    "bs": "bos",
    "ca": "cat",
    "ce": "che",
    "ch": "cha",
    "co": "cos",
    "cr": "cre",
    "cs": "ces",
    "cu": "chu",
    "cv": "chv",
    "cy": "cym",
    "da": "dan",
    "de": "deu",
    "dv": "div",
    "dz": "dzo",
    "ee": "ewe",
    "el": "ell",
    "en": "eng",
    "eo": "epo",
    "es": "spa",
    "et": "est",
    "eu": "eus",
    "fa": "fas",
    "ff": "ful",
    "fi": "fin",
    "fj": "fij",
    "fo": "fao",
    "fr": "fra",
    "fy": "fry",
    "ga": "gle",
    "gd": "gla",
    "gl": "glg",
    "gn": "grn",
    "gu": "guj",
    "gv": "glv",
    "ha": "hau",
    "he": "heb",
    "hi": "hin",
    "ho": "hmo",
    "hr": "hrv",
    "ht": "hat",
    "hu": "hun",
    "hy": "hye",
    "hz": "her",
    "ia": "ina",
    "id": "ind",
    "ie": "ile",
    "ig": "ibo",
    "ii": "iii",
    "ik": "ipk",
    "io": "ido",
    "is": "isl",
    "it": "ita",
    "iu": "iku",
    "ja": "jpn",
    "jv": "jav",
    "ka": "kat",
    "kg": "kon",
    "ki": "kik",
    "kj": "kua",
    "kk": "kaz",
    "kl": "kal",
    "km": "khm",
    "kn": "kan",
    "ko": "kor",
    "kr": "kau",
    "ks": "kas",
    "ku": "kur",
    "kv": "kom",
    "kw": "cor",
    "ky": "kir",
    "la": "lat",
    "lb": "ltz",
    "lg": "lug",
    "li": "lim",
    "ln": "lin",
    "lo": "lao",
    "lt": "lit",
    "lu": "lub",
    "lv": "lav",
    "mg": "mlg",
    "mh": "mah",
    "mi": "mri",
    "mk": "mkd",
    "ml": "mal",
    "mn": "mon",
    "mr": "mar",
    "ms": "msa",
    "mt": "mlt",
    "my": "mya",
    "na": "nau",
    "nb": "nob",
    "nd": "nde",
    "ne": "nep",
    "ng": "ndo",
    "nl": "nld",
    "nn": "nno",
    "no": "nor",
    "nr": "nbl",
    "nv": "nav",
    "ny": "nya",
    "oc": "oci",
    "oj": "oji",
    "om": "orm",
    "or": "ori",
    "os": "oss",
    "pa": "pan",
    "pi": "pli",
    "pl": "pol",
    "ps": "pus",
    "pt": "por",
    "qu": "que",
    "rm": "roh",
    "rn": "run",
    "ro": "ron",
    "ru": "rus",
    "rw": "kin",
    "sa": "san",
    "sc": "srd",
    "sd": "snd",
    "se": "sme",
    "sg": "sag",
    "sh": "hbs",
    "si": "sin",
    "sk": "slk",
    "sl": "slv",
    "sm": "smo",
    "sn": "sna",
    "so": "som",
    "sq": "sqi",
    "sr": "srp",
    "ss": "ssw",
    "st": "sot",
    "su": "sun",
    "sv": "swe",
    "sw": "swa",
    "ta": "tam",
    "te": "tel",
    "tg": "tgk",
    "th": "tha",
    "ti": "tir",
    "tk": "tuk",
    "tl": "tgl",
    "tn": "tsn",
    "to": "ton",
    "tr": "tur",
    "ts": "tso",
    "tt": "tat",
    "tw": "twi",
    "ty": "tah",
    "ug": "uig",
    "uk": "ukr",
    "ur": "urd",
    "uz": "uzb",
    "ve": "ven",
    "vi": "vie",
    "vo": "vol",
    "wa": "wln",
    "wo": "wol",
    "xh": "xho",
    "yi": "yid",
    "yo": "yor",
    "za": "zha",
    "zh": "zho",
    "zu": "zul",
}

# ISO 639-2/B (bibliographic) codes that differ from the 639-3 code.
ISO639_2B_TO_3: dict[str, str] = {
    "alb": "sqi",
    "arm": "hye",
    "baq": "eus",
    "bur": "mya",
    "chi": "zho",
    "cze": "ces",
    "dut": "nld",
    "fre": "fra",
    "geo": "kat",
    "ger": "deu",
    "gre": "ell",
    "ice": "isl",
    "mac": "mkd",
    "mao": "mri",
    "may": "msa",
    "per": "fas",
    "rum": "ron",
    "slo": "slk",
    "tib": "bod",
    "wel": "cym",
}


def to_iso639_3(code: str, overrides: dict[str, str] | None = None) -> str | None:
    """The ISO 639-3 code URIEL uses for a language tag, or ``None`` when the tag cannot be mapped.

    Accepts ISO 639-1 (``de``), ISO 639-2/B (``ger``), ISO 639-3 (``deu``) and BCP-47-style tags whose primary
    subtag is one of those (``zh-Hans``, ``pt_BR``). ``overrides`` (keyed by the tag as given or by its primary
    subtag) wins over the built-in table, e.g. ``{"zh": "cmn"}`` to use Mandarin instead of the macrolanguage.
    """
    overrides = overrides or {}
    if code in overrides:
        return overrides[code]
    primary = code.strip().replace("_", "-").split("-")[0].lower()
    if primary in overrides:
        return overrides[primary]
    if primary in URIEL_CODE_DEFAULTS:
        return URIEL_CODE_DEFAULTS[primary]
    if len(primary) == 2:
        return ISO639_1_TO_3.get(primary)
    if len(primary) == 3 and primary.isalpha():
        return ISO639_2B_TO_3.get(primary, primary)
    return None


@dataclass(frozen=True)
class _FeatureTable:
    """One URIEL feature set: language codes, feature names, and an [n_langs, n_feats] matrix (-1 = unknown;
    bool membership for the family set)."""

    langs: np.ndarray
    feats: np.ndarray
    data: np.ndarray
    index: dict[str, int]


DATA_ENV = "RAYSAFE_LANG2VEC_DATA"
_NEEDED_FILES = ("family_features.npz", "geocoord_features.npz", "feature_predictions.npz")


def lang2vec_data_dir() -> Path:
    """The directory holding lang2vec's bundled URIEL ``.npz`` files: ``$RAYSAFE_LANG2VEC_DATA`` if set, else the
    installed lang2vec distribution's ``lang2vec/data``. Raises DataError when lang2vec is missing or the files are.

    The package is located through its installed metadata, never imported: lang2vec also installs a script
    ``bin/lang2vec.py`` that shadows the package whenever a console script (such as ``raysafe``) runs, and it imports
    ``pkg_resources``, which recent setuptools no longer ship.
    """
    import importlib.metadata
    import os

    override = os.environ.get(DATA_ENV)
    if override:
        path, where = Path(override).expanduser(), f"${DATA_ENV}={override}"
    else:
        try:
            dist = importlib.metadata.distribution("lang2vec")
        except importlib.metadata.PackageNotFoundError:
            raise DataError(
                "lang2vec is not installed, so URIEL distances cannot be computed",
                fix="pip install lang2vec (it ships the URIEL data; no network is needed at run time)",
            ) from None
        path = Path(str(dist.locate_file("lang2vec/data")))
        where = str(path)
    missing = [f for f in _NEEDED_FILES if not (path / f).is_file()]
    if missing:
        raise DataError(
            f"the URIEL data files {missing} are missing",
            where=where,
            fix=f"reinstall lang2vec, or point {DATA_ENV} at a directory with lang2vec's data files",
        )
    return path


@lru_cache(maxsize=8)
def _load_feature_table(distance_type: str) -> _FeatureTable:
    """Load (once per process) the URIEL feature columns behind ``distance_type`` from lang2vec's files."""
    filename, prefix = _FEATURE_SOURCES[distance_type]
    with np.load(lang2vec_data_dir() / filename, allow_pickle=False) as archive:
        feats = archive["feats"].astype(str)
        keep = np.flatnonzero(np.char.startswith(feats, prefix))
        data = archive["data"][:, keep, 0]
        # family membership is binary and wide (3,718 nodes): keep it as bool, the dense sets as float64
        data = data > 0 if distance_type == "genetic" else np.asarray(data, dtype=np.float64)
        langs = archive["langs"].astype(str)
    return _FeatureTable(langs=langs, feats=feats[keep], data=data, index={c: i for i, c in enumerate(langs)})


def _check_distance_type(distance_type: str) -> None:
    if distance_type not in DISTANCE_TYPES:
        raise ConfigError(
            f"unknown distance type {distance_type!r}",
            where="language distance",
            fix=f"use one of {', '.join(DISTANCE_TYPES)}",
        )


def uriel_vector(iso3: str, distance_type: str) -> np.ndarray | None:
    """The URIEL feature vector behind ``distance_type`` for an ISO 639-3 code, or ``None`` when URIEL has no
    value for any of its features (or does not know the language)."""
    _check_distance_type(distance_type)
    if distance_type not in _FEATURE_SOURCES:
        return None  # featural: only precomputed by lang2vec (source lang2vec)
    table = _load_feature_table(distance_type)
    row = table.index.get(iso3)
    if row is None:
        return None
    vec = np.asarray(table.data[row], dtype=np.float64)
    if distance_type == "genetic":
        return vec if vec.any() else None  # no family node: an isolate or an unknown language, cannot tell
    if np.all(vec == -1.0):
        return None
    return vec


@lru_cache(maxsize=1)
def _geo_anchors() -> np.ndarray:
    """Unit vectors of the 299 fixed points behind lang2vec's ``geo`` features (names ``GC_<lat>_<lon>``)."""
    table = _load_feature_table("geographic")
    latlon = np.array([[float(x) for x in name[3:].split("_")] for name in table.feats])
    return _unit_sphere(np.radians(latlon[:, 0]), np.radians(latlon[:, 1]))


def _unit_sphere(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def geo_position(geo_vector: np.ndarray) -> tuple[float, float]:
    """(latitude, longitude) in degrees recovered from a ``geo`` vector: solves ``A p = cos(pi g)`` for the unit
    position vector ``p`` by least squares (A = anchor unit vectors, g = normalised great-circle distances)."""
    anchors = _geo_anchors()
    known = geo_vector >= 0
    p, *_ = np.linalg.lstsq(anchors[known], np.cos(np.pi * geo_vector[known]), rcond=None)
    p = p / np.linalg.norm(p)
    return float(np.degrees(np.arcsin(np.clip(p[2], -1, 1)))), float(np.degrees(np.arctan2(p[1], p[0])))


def great_circle_fraction(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (lat, lon) points in degrees, as a fraction of the antipodal distance."""
    pa = _unit_sphere(np.radians(a[0]), np.radians(a[1]))
    pb = _unit_sphere(np.radians(b[0]), np.radians(b[1]))
    return float(np.arccos(np.clip(pa @ pb, -1.0, 1.0)) / np.pi)


def cosine_distance(u: np.ndarray, v: np.ndarray) -> float:
    """``1 - u.v / (|u| |v|)``; 1.0 when either vector is all zeros."""
    nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if nu == 0.0 or nv == 0.0:
        return 1.0
    return float(1.0 - np.clip(u @ v / (nu * nv), -1.0, 1.0))


def pair_distance(iso3_a: str, iso3_b: str, distance_type: str) -> float | None:
    """URIEL distance of ``distance_type`` between two ISO 639-3 codes (see the module docstring), or ``None``
    when either language has no data of that type."""
    va, vb = uriel_vector(iso3_a, distance_type), uriel_vector(iso3_b, distance_type)
    if va is None or vb is None:
        return None
    if distance_type == "geographic":
        return great_circle_fraction(geo_position(va), geo_position(vb))
    if distance_type in ("syntactic", "phonological", "inventory"):
        shared = (va >= 0) & (vb >= 0)
        return cosine_distance(va[shared], vb[shared])
    return cosine_distance(np.clip(va, 0, None), np.clip(vb, 0, None))


# ------------------------------------------------------------------------------------ lang2vec's precomputed
@dataclass(frozen=True)
class PrecomputedDistances:
    """lang2vec's precomputed distances: where they come from, the ISO 639-3 codes they cover, and a lookup."""

    origin: str
    languages: frozenset[str]
    _values: Callable[[str, str, str], float]

    def value(self, iso3_a: str, iso3_b: str, distance_type: str) -> float:
        """The distance of ``distance_type`` between two covered languages (0 for a language with itself)."""
        return 0.0 if iso3_a == iso3_b else self._values(iso3_a, iso3_b, distance_type)


def _lang2vec_table_dir() -> Path | None:
    """The directory holding lang2vec's ``distances2.zip`` and ``distances_languages.txt``: ``$RAYSAFE_LANG2VEC_
    DISTANCES`` if set (an error if the files are not there), else the installed lang2vec's data directory when it
    ships them (lang2vec ≥ 1.1.6), else None."""
    import os

    override = os.environ.get(DISTANCES_ENV)
    if override:
        path = Path(override).expanduser()
        missing = [f for f in ("distances2.zip", "distances_languages.txt") if not (path / f).is_file()]
        if missing:
            raise DataError(
                f"lang2vec's precomputed distance files {missing} are missing",
                where=f"${DISTANCES_ENV}={override}",
                fix="point it at lang2vec's data directory (lang2vec >= 1.1.6 from its repository), or unset it",
            )
        return path
    try:
        path = lang2vec_data_dir()
    except DataError:
        return None
    return path if (path / "distances2.zip").is_file() and (path / "distances_languages.txt").is_file() else None


def read_lang2vec_table(directory: Path) -> PrecomputedDistances:
    """lang2vec's precomputed table as ``lang2vec.distance`` reads it: languages from the first line of
    ``distances_languages.txt``, one upper-triangular sparse matrix per type in ``distances2.zip``, the value of
    languages i, j at ``[min(i, j), max(i, j)]``."""
    import zipfile

    from scipy import sparse

    languages = (directory / "distances_languages.txt").read_text().splitlines()[0].strip().split(",")
    index = {c: i for i, c in enumerate(languages)}
    matrices: dict[str, object] = {}

    def values(a: str, b: str, distance_type: str) -> float:
        if distance_type not in matrices:
            with zipfile.ZipFile(directory / "distances2.zip") as zp:
                matrices[distance_type] = sparse.load_npz(zp.open(LANG2VEC_DISTANCE_FILES[distance_type])).tocsr()
        i, j = sorted((index[a], index[b]))
        return float(matrices[distance_type][i, j])

    return PrecomputedDistances(f"lang2vec {directory / 'distances2.zip'}", frozenset(languages), values)


def read_bundled_table(path: Path = BUNDLED_DISTANCES) -> PrecomputedDistances:
    """The lang2vec distances bundled with raysafe (Xu et al.'s ``lang_sim.pt``: 16 languages, 6 types)."""
    import json

    data = json.loads(path.read_text())
    table = {(t, *sorted((a, b))): float(v) for t, rows in data["pairs"].items() for a, b, v in rows}
    langs = frozenset(data["codes"].values())
    return PrecomputedDistances(
        f"lang2vec values bundled in {path.name} ({len(langs)} languages of Xu et al.)",
        langs,
        lambda a, b, t: table[(t, *sorted((a, b)))],
    )


@lru_cache(maxsize=4)
def _precomputed(env_value: str | None) -> PrecomputedDistances:
    directory = _lang2vec_table_dir()
    return read_lang2vec_table(directory) if directory is not None else read_bundled_table()


def precomputed_distances() -> PrecomputedDistances:
    """lang2vec's precomputed distances: its own table when installed or pointed at, else the bundled values."""
    import os

    return _precomputed(os.environ.get(DISTANCES_ENV))


@dataclass(frozen=True)
class LanguageDistances:
    """Pairwise distances (one row per unordered language pair and distance type) and, per language left out,
    the reason."""

    table: pl.DataFrame
    missing: dict[str, str]
    source: str = "uriel_features"
    note: str = ""


DISTANCE_SCHEMA = {
    "lang_a": pl.String,
    "lang_b": pl.String,
    "iso3_a": pl.String,
    "iso3_b": pl.String,
    "distance_type": pl.String,
    "distance": pl.Float64,
    "source": pl.String,
}


def language_distances(
    langs: list[str],
    distance_types: tuple[str, ...] | list[str] = DEFAULT_DISTANCE_TYPES,
    iso3_overrides: dict[str, str] | None = None,
    source: str = "auto",
) -> LanguageDistances:
    """Distances between every unordered pair of ``langs`` (codes as in our data) for each distance type, from
    ``source`` (module docstring: ``lang2vec``, ``uriel_features`` or ``auto``).

    A language that cannot be mapped to ISO 639-3, that the source does not cover, or that URIEL has no data for
    (for one distance type or all), is left out of that type's pairs and named in ``missing`` with the reason;
    nothing is raised for it. Rows have ``lang_a < lang_b`` in the order of ``sorted(langs)``.
    """
    for dt in distance_types:
        _check_distance_type(dt)
    if source not in DISTANCE_SOURCES:
        raise ConfigError(
            f"unknown distance source {source!r}",
            where="analysis.distance_source",
            fix=f"use one of {DISTANCE_SOURCES}",
        )
    ordered = sorted(dict.fromkeys(langs))
    iso = {lang: to_iso639_3(lang, iso3_overrides) for lang in ordered}
    missing: dict[str, str] = {}

    def leave_out(lang: str, reason: str) -> None:
        missing[lang] = f"{missing[lang]}; {reason}" if lang in missing else reason

    for lang, code in iso.items():
        if code is None:
            leave_out(lang, f"language {lang!r} has no ISO 639-3 equivalent known here; left out of URIEL distances")
    mapped = [lang for lang in ordered if iso[lang] is not None]
    note = ""
    pre = precomputed_distances() if source in ("auto", "lang2vec") else None
    if source == "auto":
        uncovered = [lang for lang in mapped if iso[lang] not in pre.languages]
        if uncovered:
            note = (
                f"lang2vec's precomputed distances ({pre.origin}) do not cover {uncovered}: all distances re-derived "
                f"from URIEL features instead (set {DISTANCES_ENV} to lang2vec's table for the authors' values)"
            )
            pre = None
    used = "lang2vec" if pre is not None else "uriel_features"
    rows: list[dict] = []
    for dt in distance_types:
        usable = _covered_languages(mapped, iso, dt, pre, leave_out)
        for a, b in combinations(usable, 2):
            d = pre.value(iso[a], iso[b], dt) if pre is not None else pair_distance(iso[a], iso[b], dt)
            rows.append(
                {
                    "lang_a": a,
                    "lang_b": b,
                    "iso3_a": iso[a],
                    "iso3_b": iso[b],
                    "distance_type": dt,
                    "distance": d,
                    "source": used,
                }
            )
    table = pl.DataFrame(rows, schema=DISTANCE_SCHEMA)
    return LanguageDistances(table=table, missing=missing, source=used, note=note)


def _covered_languages(
    mapped: list[str],
    iso: dict[str, str | None],
    dt: str,
    pre: PrecomputedDistances | None,
    leave_out: Callable[[str, str], None],
) -> list[str]:
    """The languages of ``mapped`` that the source (``pre``: lang2vec's precomputed distances, None: URIEL
    features) has ``dt`` data for; each other one is left out with its reason."""
    usable = []
    for lang in mapped:
        if pre is not None:
            if iso[lang] not in pre.languages:
                leave_out(
                    lang,
                    f"lang2vec's precomputed distances ({pre.origin}) do not cover {lang!r} (ISO 639-3 "
                    f"{iso[lang]!r}); left out of {dt} distances (source uriel_features covers more languages)",
                )
                continue
        elif uriel_vector(iso[lang], dt) is None:
            why = "is only precomputed by lang2vec (source lang2vec)" if dt == "featural" else "data"
            leave_out(
                lang,
                f"URIEL has no {dt} data for {lang!r} (ISO 639-3 {iso[lang]!r}); left out of {dt} distances"
                if why == "data"
                else f"{dt} distance {why}; {lang!r} left out of {dt} distances",
            )
            continue
        usable.append(lang)
    return usable
