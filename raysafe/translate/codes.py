"""raysafe language codes → the codes MT models and language identifiers use, and the names an LLM prompt uses.

raysafe rows carry ISO 639-1 codes (plus the ISO 639-3 codes of ``raysafe.data.languages.EXTRA_CODES``). NLLB-200
writes FLORES-200 codes (language + script: ``zho_Hans``), M2M100 writes ``__zh__``, multi-target Marian models take a
``>>xxx<<`` target token. Where a raysafe code names a macrolanguage the studies use one variety of: ``ar`` → Modern
Standard Arabic (``arb_Arab``), ``ps`` → Southern Pashto (``pbt_Arab``), ``sw`` → Swahili (``swh_Latn``), ``ku`` →
Kurmanji in Latin script (``kmr_Latn``, as in the bundled fixtures), ``zh`` → Simplified Chinese (``zho_Hans``; set
``translator.lang_codes: {zh: zho_Hant}`` for Traditional), ``fa`` → Western Persian, ``ms`` → Standard Malay.
"""

from __future__ import annotations

NLLB = {
    "af": "afr_Latn", "am": "amh_Ethi", "ar": "arb_Arab", "as": "asm_Beng", "az": "azj_Latn", "be": "bel_Cyrl",
    "bg": "bul_Cyrl", "bn": "ben_Beng", "bo": "bod_Tibt", "bs": "bos_Latn", "ca": "cat_Latn", "cs": "ces_Latn",
    "cy": "cym_Latn", "da": "dan_Latn", "de": "deu_Latn", "el": "ell_Grek", "en": "eng_Latn", "eo": "epo_Latn",
    "es": "spa_Latn", "et": "est_Latn", "eu": "eus_Latn", "fa": "pes_Arab", "fi": "fin_Latn", "fr": "fra_Latn",
    "ga": "gle_Latn", "gl": "glg_Latn", "gu": "guj_Gujr", "ha": "hau_Latn", "he": "heb_Hebr", "hi": "hin_Deva",
    "hr": "hrv_Latn", "ht": "hat_Latn", "hu": "hun_Latn", "hy": "hye_Armn", "id": "ind_Latn", "ig": "ibo_Latn",
    "is": "isl_Latn", "it": "ita_Latn", "ja": "jpn_Jpan", "jv": "jav_Latn", "ka": "kat_Geor", "kk": "kaz_Cyrl",
    "km": "khm_Khmr", "kn": "kan_Knda", "ko": "kor_Hang", "ku": "kmr_Latn", "ky": "kir_Cyrl", "lo": "lao_Laoo",
    "lt": "lit_Latn", "lv": "lvs_Latn", "mk": "mkd_Cyrl", "ml": "mal_Mlym", "mn": "khk_Cyrl", "mr": "mar_Deva",
    "ms": "zsm_Latn", "mt": "mlt_Latn", "my": "mya_Mymr", "ne": "npi_Deva", "nl": "nld_Latn", "nb": "nob_Latn",
    "nn": "nno_Latn", "no": "nob_Latn", "or": "ory_Orya", "pa": "pan_Guru", "pl": "pol_Latn", "ps": "pbt_Arab",
    "pt": "por_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl", "si": "sin_Sinh", "sk": "slk_Latn", "sl": "slv_Latn",
    "so": "som_Latn", "sq": "als_Latn", "sr": "srp_Cyrl", "sv": "swe_Latn", "sw": "swh_Latn", "ta": "tam_Taml",
    "te": "tel_Telu", "tg": "tgk_Cyrl", "th": "tha_Thai", "tl": "tgl_Latn", "tr": "tur_Latn", "ug": "uig_Arab",
    "uk": "ukr_Cyrl", "ur": "urd_Arab", "uz": "uzn_Latn", "vi": "vie_Latn", "xh": "xho_Latn", "yo": "yor_Latn",
    "zh": "zho_Hans", "zu": "zul_Latn",
    # ISO 639-3 codes raysafe accepts
    "ckb": "ckb_Arab", "kmr": "kmr_Latn", "yue": "yue_Hant", "fil": "tgl_Latn", "ceb": "ceb_Latn", "mai": "mai_Deva",
    "bho": "bho_Deva", "mni": "mni_Beng", "sat": "sat_Olck", "nso": "nso_Latn", "zgh": "tzm_Tfng",
}  # fmt: skip

# M2M100 writes ISO 639-1 where it has one; these are its spellings of the others (it has no Kurdish).
M2M100 = {"fil": "tl", "ceb": "ceb", "nso": "ns", "nb": "no"}

# langid.py identifies ISO 639-1 codes; raysafe's 639-3 codes it knows under their macrolanguage.
LANGID = {"kmr": "ku", "ckb": "ku", "fil": "tl"}

NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian", "bg": "Bulgarian",
    "bn": "Bengali", "ca": "Catalan", "ckb": "Central Kurdish (Sorani)", "cs": "Czech", "cy": "Welsh", "da": "Danish",
    "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian",
    "fi": "Finnish", "fil": "Filipino", "fr": "French", "ga": "Irish", "gu": "Gujarati", "ha": "Hausa",
    "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian",
    "ig": "Igbo", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "jv": "Javanese", "ka": "Georgian",
    "kk": "Kazakh", "km": "Khmer", "kmr": "Kurdish (Kurmanji, Latin script)", "kn": "Kannada", "ko": "Korean",
    "ku": "Kurdish (Kurmanji, Latin script)", "ky": "Kyrgyz", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian",
    "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian", "mr": "Marathi", "ms": "Malay", "mt": "Maltese",
    "my": "Burmese", "ne": "Nepali", "nl": "Dutch", "no": "Norwegian", "pa": "Punjabi", "pl": "Polish",
    "ps": "Pashto", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "si": "Sinhala", "sk": "Slovak",
    "sl": "Slovenian", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "sv": "Swedish", "sw": "Swahili",
    "ta": "Tamil", "te": "Telugu", "th": "Thai", "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu",
    "uz": "Uzbek", "vi": "Vietnamese", "xh": "Xhosa", "yo": "Yoruba", "yue": "Cantonese",
    "zh": "Chinese (Simplified)", "zu": "Zulu",
}  # fmt: skip


def language_name(code: str) -> str:
    """The English name an LLM translation prompt uses (the code itself when the table has none)."""
    return NAMES.get(code, code)


def model_code_candidates(code: str, family: str, overrides: dict[str, str]) -> list[str]:
    """Vocabulary tokens that may stand for ``code`` in a model of ``family``, most specific first."""
    if code in overrides:
        own = overrides[code]
        if family == "m2m100" and not own.startswith("__"):
            return [f"__{own}__"]
        if family == "marian" and not own.startswith(">>"):
            return [f">>{own}<<"]
        return [own]
    if family == "nllb":
        return [NLLB[code]] if code in NLLB else []
    if family == "m2m100":
        return [f"__{M2M100.get(code, code)}__"]
    # Marian multi-target models: >>zho<< / >>zho_Hans<< / >>zh<< (the Tatoeba-Challenge models use 639-3 codes)
    flores = NLLB.get(code)
    out = [f">>{flores}<<", f">>{flores[:3]}<<"] if flores else []
    return out + [f">>{code}<<"]


def langid_code(code: str) -> str:
    """The code langid.py reports for text in raysafe language ``code``."""
    return LANGID.get(code, code)
