"""Script families: which class groups (a glyph's script, an Omniglot alphabet...) share letter shapes.

Stores record a group per class (``DatasetStore.groups``). Groups from different sources that name the
same script map to one family here, so that a Cyrillic glyph and an Omniglot Cyrillic or Old Church
Slavonic character count as one concept. A group not listed is a family of its own, under its own
name: every other Omniglot alphabet, every CIFAR-100 superclass, and every class of a source that
knows no groups (there the class is its group, so only classes of the same name meet).
"""

from __future__ import annotations

# Omniglot alphabets kept as families of their own although they relate to a listed script, because a
# learner sees shapes, not history or sound values: Glagolitic (the first Slavonic alphabet, letters
# named and ordered like Cyrillic, shapes unrelated), Futurama and Aurek-Besh (ciphers of the Latin
# alphabet with invented shapes), Braille (Latin letters as dot cells, no strokes), Anglo-Saxon_Futhorc
# (runes; a few such as thorn resemble Latin letters, the alphabet as a whole does not), Asomtavruli and
# Mkhedruli (two Georgian scripts with different shapes), Early_Aramaic and Hebrew (related, distinct).
GROUP_FAMILIES: dict[str, str] = {
    # glyphs (dfml.data.sources.glyphs.glyph_script)
    "latin": "latin",
    "ipa": "latin",  # IPA letters are Latin letters and their variants (esh, b with hook, ...)
    "greek": "greek",
    "cyrillic": "cyrillic",
    "digits": "digits",
    "symbols": "symbols",
    # Omniglot alphabets (dfml.data.sources.omniglot)
    "Latin": "latin",
    "Greek": "greek",
    "Cyrillic": "cyrillic",
    "Old_Church_Slavonic_(Cyrillic)": "cyrillic",  # early Cyrillic: а б в г д е ... as in modern Cyrillic
    "Syriac_(Estrangelo)": "syriac",  # Estrangelo and Serto are two hands of one script
    "Syriac_(Serto)": "syriac",
    "Blackfoot_(Canadian_Aboriginal_Syllabics)": "canadian_aboriginal_syllabics",  # one set of shapes
    "Inuktitut_(Canadian_Aboriginal_Syllabics)": "canadian_aboriginal_syllabics",  # (triangles, hooks,
    "Ojibwe_(Canadian_Aboriginal_Syllabics)": "canadian_aboriginal_syllabics",  # arcs) turned four ways
}


def family_of(group: str) -> str:
    """The script family of a class group; an unlisted group is its own family."""
    return GROUP_FAMILIES.get(group, group)
