"""Language codes: ISO 639-1 where it exists (the data contract), with the ISO 639-3 codes some datasets use.

``check_language`` accepts the ISO 639-1 codes, the ISO 639-3 codes in ``EXTRA_CODES`` (languages without a
two-letter code, or dataset conventions such as ``ckb``), and anything in ``RAYSAFE_EXTRA_LANGS`` (comma-separated).
"""

from __future__ import annotations

import os

ISO_639_1 = frozenset(
    """aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz ee el
    en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is it iu ja
    jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd
    ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss
    st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu""".split()
)

# ISO 639-3 codes used by multilingual safety sets for languages (or varieties) without a fitting 639-1 code.
EXTRA_CODES = frozenset(
    {"ckb", "kmr", "yue", "fil", "ceb", "hmn", "haw", "nso", "zgh", "sat", "mai", "bho", "mni", "doi"}
)

# High-resource languages by default (used to split analyses into high vs low resource; configurable per model).
HIGH_RESOURCE_DEFAULT = ("en", "zh", "ru", "ja", "de", "fr", "es", "it", "pt", "ar", "ko", "nl", "pl", "vi", "tr")


def known_languages() -> frozenset[str]:
    extra = {c.strip() for c in os.environ.get("RAYSAFE_EXTRA_LANGS", "").split(",") if c.strip()}
    return ISO_639_1 | EXTRA_CODES | extra


def is_known(code: str) -> bool:
    return isinstance(code, str) and code in known_languages()
