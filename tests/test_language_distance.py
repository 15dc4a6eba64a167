"""URIEL distances read offline from lang2vec's data: code mapping, coverage, agreement with lang2vec itself."""

from __future__ import annotations

import importlib
import json
import os
import sys
import types
from itertools import combinations

import numpy as np
import pytest

from raysafe.concepts import language_distance as ld
from raysafe.errors import ConfigError, DataError

# The language codes our data use, with the ISO 639-3 code URIEL keys them by.
EXPECTED_ISO3 = {
    "en": "eng",
    "zh": "zho",
    "ru": "rus",
    "de": "deu",
    "ar": "ara",
    "bn": "ben",
    "sw": "swh",  # as Xu et al.'s lang.pt (the standard table: swa, the macrolanguage)
    "ja": "jpn",
    "ur": "urd",
    "ps": "pus",
    "ku": "kur",
    "es": "spa",
    "fr": "fra",
    "hi": "hin",
    "uk": "ukr",
    "am": "amh",
    "ko": "kor",
    "it": "ita",
    "pt": "por",
    "tr": "tur",
    "vi": "vie",
    "th": "tha",
    "id": "ind",
    "fa": "fas",
    "he": "heb",
}
ALL_TYPES = ("genetic", "geographic", "syntactic", "phonological", "inventory")
FEATURE_SET = {"syntactic": "syntax_knn", "phonological": "phonology_knn", "inventory": "inventory_knn"}


@pytest.fixture(scope="module")
def l2v():
    """lang2vec's own module. lang2vec 1.1.2 imports ``pkg_resources`` (removed from recent setuptools) only to
    locate its data files; when it is absent a one-function stand-in resolving paths inside the package is
    installed so the library's real lookup code runs. Importing lang2vec takes ~10 s (it scans its family
    matrix), hence the ``slow`` mark on the tests that use it."""
    added = False
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        def resource_filename(package: str, relative: str) -> str:
            module = sys.modules.get(package) or importlib.import_module(package)
            return os.path.join(os.path.dirname(module.__file__), relative)

        shim.resource_filename = resource_filename
        sys.modules["pkg_resources"] = shim
        added = True
    try:
        module = importlib.import_module("lang2vec.lang2vec")
        yield module
    finally:
        if added:
            sys.modules.pop("pkg_resources", None)


def test_iso639_1_mapping_of_study_languages():
    for code, iso3 in EXPECTED_ISO3.items():
        assert ld.to_iso639_3(code) == iso3, code


def test_mapping_agrees_with_lang2vec_letter_codes():
    with open(ld.lang2vec_data_dir() / "letter_codes.json") as fh:
        letter_codes = json.load(fh)
    for code in EXPECTED_ISO3:
        assert ld.to_iso639_3(code) == ld.URIEL_CODE_DEFAULTS.get(code, letter_codes[code])
    two_letter = {k: v for k, v in letter_codes.items() if len(k) == 2}
    expected = {k: ld.URIEL_CODE_DEFAULTS.get(k, v) for k, v in two_letter.items()}
    assert {k: ld.to_iso639_3(k) for k in two_letter} == expected
    assert ld.to_iso639_3("sw", {"sw": "swa"}) == "swa"  # the macrolanguage on request


def test_mapping_variants_and_overrides():
    assert ld.to_iso639_3("zh-Hans") == "zho"
    assert ld.to_iso639_3("pt_BR") == "por"
    assert ld.to_iso639_3("ger") == "deu"
    assert ld.to_iso639_3("deu") == "deu"
    assert ld.to_iso639_3("zh", {"zh": "cmn"}) == "cmn"
    assert ld.to_iso639_3("zh-Hant", {"zh": "cmn"}) == "cmn"
    assert ld.to_iso639_3("xx") is None
    assert ld.to_iso639_3("") is None


def test_table_covers_every_study_language_and_pair():
    langs = list(EXPECTED_ISO3)
    result = ld.language_distances(langs, ALL_TYPES)
    assert result.missing == {}
    t = result.table
    n_pairs = len(langs) * (len(langs) - 1) // 2
    for dt in ALL_TYPES:
        part = t.filter(t["distance_type"] == dt)
        assert part.height == n_pairs
        assert set(part["lang_a"]) | set(part["lang_b"]) == set(langs)
        d = part["distance"].to_numpy()
        assert np.all((d >= 0) & (d <= 1)), dt
    assert (t["lang_a"] < t["lang_b"]).all()
    assert dict(zip(t["lang_a"], t["iso3_a"])) == {k: EXPECTED_ISO3[k] for k in set(t["lang_a"])}


@pytest.mark.slow
def test_feature_distances_match_direct_lang2vec_lookups(l2v):
    langs = list(EXPECTED_ISO3)
    iso = [EXPECTED_ISO3[lang] for lang in langs]
    for distance_type, feature_set in FEATURE_SET.items():
        table = ld.language_distances(langs, (distance_type,)).table
        got = {(a, b): d for a, b, d in table.select("lang_a", "lang_b", "distance").iter_rows()}
        feats = l2v.get_features(iso, feature_set)
        for (i, a), (j, b) in combinations(enumerate(langs), 2):
            u = np.array(feats[iso[i]], dtype=float)
            v = np.array(feats[iso[j]], dtype=float)
            expected = 1.0 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
            key = (a, b) if a < b else (b, a)
            assert got[key] == pytest.approx(expected, abs=1e-9), (distance_type, key)


def test_genetic_distance_follows_the_family_tree():
    t = ld.language_distances(["en", "de", "fr", "es", "pt", "ja", "ko", "hi", "ur"], ("genetic",)).table
    d = {(a, b): x for a, b, x in t.select("lang_a", "lang_b", "distance").iter_rows()}
    assert d[("de", "en")] < d[("en", "fr")] < 1.0  # both Indo-European, Germanic pair closer
    assert d[("es", "pt")] < d[("es", "fr")] < d[("de", "es")]
    assert d[("hi", "ur")] < d[("en", "hi")]
    assert d[("en", "ja")] == 1.0 and d[("ja", "ko")] == 1.0  # different families share no node
    # 1 - |shared nodes| / sqrt(|nodes_a| |nodes_b|) on URIEL's family-membership vectors
    fam = ld._load_feature_table("genetic")
    a, b = fam.data[fam.index["eng"]] > 0, fam.data[fam.index["deu"]] > 0
    assert d[("de", "en")] == pytest.approx(1 - (a & b).sum() / np.sqrt(a.sum() * b.sum()))


@pytest.mark.slow
def test_geographic_distance_from_lang2vec_geo_vectors(l2v):
    codes = ["eng", "fra", "jpn", "deu", "swa"]
    feats = l2v.get_features(codes, "geo")
    positions = {}
    for code in codes:
        geo = np.array(feats[code], dtype=float)
        np.testing.assert_allclose(ld.uriel_vector(code, "geographic"), geo)
        lat, lon = ld.geo_position(geo)
        positions[code] = (lat, lon)
        # the recovered position reproduces lang2vec's distances to all 299 anchors
        anchors = ld._geo_anchors()
        p = ld._unit_sphere(np.radians(lat), np.radians(lon))
        assert np.max(np.abs(np.arccos(np.clip(anchors @ p, -1, 1)) / np.pi - geo)) < 0.005
    assert 50 < positions["eng"][0] < 56 and -4 < positions["eng"][1] < 2  # Great Britain
    assert 33 < positions["jpn"][0] < 38 and 130 < positions["jpn"][1] < 140  # Japan
    d = ld.language_distances(["en", "fr", "ja"], ("geographic",), source="uriel_features").table
    dist = {(a, b): x for a, b, x in d.select("lang_a", "lang_b", "distance").iter_rows()}
    assert dist[("en", "fr")] < 0.05 < dist[("en", "ja")]
    assert dist[("en", "ja")] == pytest.approx(ld.great_circle_fraction(positions["eng"], positions["jpn"]))


def test_missing_languages_are_named_and_the_rest_completes():
    result = ld.language_distances(["en", "de", "xx", "qqq", "eu"], ("genetic", "syntactic"))
    assert "xx" in result.missing and "ISO 639-3" in result.missing["xx"]
    assert "qqq" in result.missing and "URIEL has no" in result.missing["qqq"]
    # Basque has no family node in URIEL: left out of genetic distances only
    assert "genetic" in result.missing["eu"] and "syntactic" not in result.missing["eu"]
    t = result.table
    assert t.filter(t["distance_type"] == "genetic").select("lang_a", "lang_b").rows() == [("de", "en")]
    syn = set(t.filter(t["distance_type"] == "syntactic").select("lang_a", "lang_b").rows())
    assert syn == {("de", "en"), ("de", "eu"), ("en", "eu")}


def test_unknown_distance_type_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown distance type"):
        ld.language_distances(["en", "de"], ("lexical",))


def test_data_dir_is_found_when_a_lang2vec_script_shadows_the_package(monkeypatch, tmp_path):
    """lang2vec installs ``bin/lang2vec.py``; under a console script (``raysafe``) ``bin/`` is first on sys.path and
    that file, not the package, is what ``import lang2vec`` finds. The data directory must still be found."""
    shadow = tmp_path / "lang2vec.py"
    shadow.write_text("raise ImportError('the script, not the package')\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    for name in [m for m in sys.modules if m == "lang2vec" or m.startswith("lang2vec.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delenv(ld.DATA_ENV, raising=False)
    path = ld.lang2vec_data_dir()
    assert (path / "feature_predictions.npz").is_file() and path.name == "data" and path.parent.name == "lang2vec"


def test_data_dir_override_names_missing_files(monkeypatch, tmp_path):
    from raysafe.errors import DataError

    monkeypatch.setenv(ld.DATA_ENV, str(tmp_path))
    with pytest.raises(DataError, match="family_features.npz") as err:
        ld.lang2vec_data_dir()
    assert ld.DATA_ENV in str(err.value)


# ------------------------------------------------------------------------------- lang2vec's precomputed values
# Xu et al.'s 16 languages in the order of their lang.pt, and the upper triangles of four of the matrices their
# notebook printed from lang2vec.distance (github.com/shaoyangxu/Multilingual-Human-Value-Concepts, commit a39471d,
# lang2vec_try.ipynb, output of cell 11): row i lists the distances of language i to languages i+1 … 15.
XU_LANGS = ["ca", "ny", "en", "fr", "id", "pt", "zh", "es", "sw", "ta", "te", "vi", "ja", "ko", "fi", "hu"]
XU_PRINTED = {
    "genetic": (
        "1 0.9 0.4375 1 0.3333 1 0.2308 1 1 1 1 1 1 1 1",
        "1 1 1 1 1 1 0.4615 1 1 1 1 1 1 1",
        "0.9 1 0.9 1 0.9 1 1 1 1 1 1 1 1",
        "1 0.4375 1 0.4375 1 1 1 1 1 1 1 1",
        "1 1 1 1 1 1 1 1 1 1 1",
        "1 0.2667 1 1 1 1 1 1 1 1",
        "1 1 1 1 1 1 1 1 1",
        "1 1 1 1 1 1 1 1",
        "1 1 1 1 1 1 1",
        "0.75 1 1 1 1 1",
        "1 1 1 1 1",
        "1 1 1 1",
        "1 1 1",
        "1 1",
        "0.75",
    ),
    "geographic": (
        "0.3 0.1 0 0.6 0 1 0 0.3 0.4 0.4 0.5 0.5 0.5 0.1 0.1",
        "0.4 0.4 0.4 0.4 1 0.4 0 0.3 0.3 0.4 0.6 0.6 0.4 0.3",
        "0 0.6 0.1 1 0.1 0.4 0.4 0.4 0.5 0.5 0.4 0.1 0.1",
        "0.6 0 1 0 0.4 0.4 0.4 0.5 0.5 0.5 0.1 0.1",
        "0.6 1 0.6 0.4 0.2 0.2 0.1 0.3 0.3 0.5 0.5",
        "1 0 0.4 0.4 0.4 0.5 0.5 0.5 0.2 0.1",
        "1 1 1 1 1 1 1 1 1",
        "0.3 0.4 0.4 0.5 0.5 0.5 0.2 0.1",
        "0.3 0.3 0.4 0.6 0.5 0.4 0.3",
        "0 0.2 0.3 0.3 0.4 0.3",
        "0.1 0.3 0.3 0.3 0.3",
        "0.2 0.1 0.4 0.4",
        "0 0.4 0.4",
        "0.3 0.4",
        "0.1",
    ),
    "syntactic": (
        "0.58 0.53 0.58 0.61 0.43 0.66 0.54 0.66 0.82 0.8 0.66 0.8 0.75 0.6 0.63",
        "0.69 0.64 0.57 0.61 0.65 0.65 0.45 0.9 0.92 0.62 0.9 0.9 0.71 0.79",
        "0.46 0.52 0.47 0.57 0.4 0.71 0.71 0.74 0.57 0.66 0.62 0.53 0.6",
        "0.56 0.46 0.57 0.41 0.62 0.71 0.76 0.61 0.71 0.69 0.54 0.63",
        "0.48 0.62 0.57 0.63 0.82 0.82 0.36 0.76 0.7 0.58 0.6",
        "0.61 0.4 0.61 0.77 0.77 0.57 0.77 0.7 0.52 0.52",
        "0.56 0.6 0.66 0.7 0.66 0.59 0.57 0.57 0.55",
        "0.61 0.74 0.79 0.62 0.76 0.68 0.47 0.54",
        "0.8 0.88 0.69 0.81 0.84 0.69 0.7",
        "0.32 0.9 0.54 0.57 0.68 0.61",
        "0.92 0.52 0.55 0.66 0.6",
        "0.83 0.75 0.66 0.68",
        "0.4 0.67 0.57",
        "0.59 0.51",
        "0.41",
    ),
    "phonological": (
        "0.6162 0.2804 0.3333 0.2804 0.6162 0.6162 0.3613 0.4054 0.6162 0.2163 0.4407 0.4327 0.5 0.2804 0.2048",
        "0.5687 0.5456 0.5687 0.0002 0.0002 0.5922 0.5687 0.0002 0.641 0.5456 0.6162 0.641 0.5687 0.5922",
        "0.427 0.2736 0.5687 0.5687 0.3433 0.2736 0.5687 0.3498 0.427 0.5032 0.4638 0.2736 0.3433",
        "0.427 0.5456 0.5456 0.4788 0.5096 0.5456 0.3918 0.5354 0.4407 0.5804 0.3277 0.2677",
        "0.5687 0.5687 0.4477 0.2736 0.5687 0.3498 0.3277 0.5032 0.4638 0.2736 0.3433",
        "0.0002 0.5922 0.5687 0.0002 0.641 0.5456 0.6162 0.641 0.5687 0.5922",
        "0.5922 0.5687 0.0002 0.641 0.5456 0.6162 0.641 0.5687 0.5922",
        "0.4477 0.5922 0.4278 0.4788 0.5641 0.5319 0.4477 0.4097",
        "0.5687 0.4638 0.427 0.5879 0.5582 0.39 0.4477",
        "0.641 0.5456 0.6162 0.641 0.5687 0.5922",
        "0.4934 0.5 0.4601 0.3498 0.2952",
        "0.5295 0.4934 0.427 0.4788",
        "0.6875 0.5032 0.4717",
        "0.4638 0.5319",
        "0.195",
    ),
}


def _printed(distance_type: str) -> dict[tuple[str, str], float]:
    out = {}
    for i, row in enumerate(XU_PRINTED[distance_type]):
        for j, v in enumerate(row.split(), start=i + 1):
            out[tuple(sorted((XU_LANGS[i], XU_LANGS[j])))] = float(v)
    return out


@pytest.mark.parametrize("distance_type", list(XU_PRINTED))
def test_distances_equal_lang2vec_on_all_pairs_of_the_study_languages(distance_type, monkeypatch):
    """The default (auto → lang2vec when it covers the languages) gives lang2vec's distance() values, as the authors
    printed them, for every pair of the value-concepts study's 16 languages (Swahili as swh)."""
    monkeypatch.delenv(ld.DISTANCES_ENV, raising=False)
    result = ld.language_distances(XU_LANGS, (distance_type,))
    assert result.missing == {} and result.source == "lang2vec" and result.note == ""
    got = {(a, b): d for a, b, d in result.table.select("lang_a", "lang_b", "distance").iter_rows()}
    assert got == pytest.approx(_printed(distance_type), abs=1e-12)
    assert set(result.table["source"]) == {"lang2vec"}
    assert dict(zip(result.table["lang_a"], result.table["iso3_a"]))["sw"] == "swh"


def test_all_six_lang2vec_types_for_the_study_languages():
    result = ld.language_distances(XU_LANGS, ld.DISTANCE_TYPES, source="lang2vec")
    assert result.missing == {} and result.table.height == 6 * 120
    featural = {
        (a, b): d
        for a, b, t, d in result.table.select("lang_a", "lang_b", "distance_type", "distance").iter_rows()
        if t == "featural"
    }
    assert featural[("ca", "ny")] == 0.8 and featural[("en", "fr")] == 0.5


def test_auto_falls_back_to_features_for_all_when_lang2vec_does_not_cover_a_language():
    result = ld.language_distances(["en", "fr", "de"], ("syntactic",))
    assert (
        result.source == "uriel_features"
        and "'de'" in result.note
        and set(result.table["source"]) == {"uriel_features"}
    )
    strict = ld.language_distances(["en", "fr", "de"], ("syntactic",), source="lang2vec")
    assert strict.table.select("lang_a", "lang_b").rows() == [("en", "fr")]
    assert "do not cover 'de'" in strict.missing["de"] and "uriel_features" in strict.missing["de"]
    with pytest.raises(ConfigError, match="distance source"):
        ld.language_distances(["en", "fr"], ("syntactic",), source="wals")


def test_lang2vec_table_reader_indexes_the_upper_triangle_as_lang2vec(tmp_path, monkeypatch):
    """lang2vec's own table (distances2.zip + distances_languages.txt) is read as its distance() reads it: the value
    of languages i, j at [min(i, j), max(i, j)] of each type's sparse upper-triangular matrix."""
    import io
    import zipfile

    from scipy import sparse

    langs = ["aaa", "eng", "fra", "swh"]
    (tmp_path / "distances_languages.txt").write_text(",".join(langs) + "\n")
    upper = np.triu(np.arange(1, 17, dtype=float).reshape(4, 4) / 100, k=1)
    with zipfile.ZipFile(tmp_path / "distances2.zip", "w") as zp:
        for t, name in ld.LANG2VEC_DISTANCE_FILES.items():
            buf = io.BytesIO()
            sparse.save_npz(buf, sparse.csr_matrix(upper * (1 + ld.DISTANCE_TYPES.index(t))))
            zp.writestr(name, buf.getvalue())
    monkeypatch.setenv(ld.DISTANCES_ENV, str(tmp_path))
    result = ld.language_distances(["sw", "en", "fr"], ("genetic", "featural"))
    assert result.source == "lang2vec" and str(tmp_path) in ld.precomputed_distances().origin
    got = {
        (a, b, t): d for a, b, t, d in result.table.select("lang_a", "lang_b", "distance_type", "distance").iter_rows()
    }
    assert got[("en", "fr", "genetic")] == upper[1, 2] and got[("en", "sw", "genetic")] == upper[1, 3]
    assert got[("fr", "sw", "featural")] == pytest.approx(6 * upper[2, 3])
    monkeypatch.setenv(ld.DISTANCES_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="distances2.zip"):
        ld.precomputed_distances()
