"""The embedded default dataset: glyphs rendered from the fonts that ship inside matplotlib.

No network and no files besides matplotlib's own fonts: each class is one character, each image is
that character in one of 16 fonts (DejaVu Sans / Serif / Sans Mono and STIXGeneral, each regular,
bold, italic/oblique and bold italic) under a seeded augmentation (stroke width, rotation, shear,
scale, translation). White ink (255) on black (0), one channel.

Glyphs are fitted to the image by their longest side, so a letter that differs from another only in
size (c/C, o/O, lower-case Cyrillic in upright fonts) would be the same class; the class list below
keeps exactly one of every such group and of every cross-script homoglyph (Latin A / Greek Alpha /
Cyrillic A). Because that leaves fewer than 150 shapes from the three alphabets, the list adds
Latin-extended and IPA letters and typographic symbols that all 16 fonts cover.

Each class's group in the store is its script (``glyph_script``): latin, ipa, greek, cyrillic, digits
or symbols, read from the class-name prefix.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from dfml.data.sources import split_by_fractions
from dfml.data.store import StoreInfo, write_store

FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)

# Dropped Latin lower case: c l o s u v w x z (size pairs of C I O S U V W X Z; l also = I).
# Dropped digits: 0 (= O) and 1 (= I / l / |).
LATIN = [(f"latin_{c}", c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"] + [
    (f"latin_{c}_lower", c) for c in "abdefghijkmnpqrty"
]
DIGITS = [(f"digit_{c}", c) for c in "23456789"]

# Dropped Greek capitals: Alpha Beta Epsilon Zeta Eta Iota Kappa Mu Nu Omicron Rho Tau Upsilon Chi
# (Latin homoglyphs). Dropped lower case: alpha (= italic a), gamma (~ y), iota (~ I), kappa (small K),
# nu (= v), omicron (= O), rho (~ p), tau (small T), upsilon (~ U), chi (~ X), psi (~ Psi).
GREEK = [
    ("greek_Gamma", "Γ"),
    ("greek_Delta", "Δ"),
    ("greek_Theta", "Θ"),
    ("greek_Lambda", "Λ"),
    ("greek_Xi", "Ξ"),
    ("greek_Pi", "Π"),
    ("greek_Sigma", "Σ"),
    ("greek_Phi", "Φ"),
    ("greek_Psi", "Ψ"),
    ("greek_Omega", "Ω"),
    ("greek_beta_lower", "β"),
    ("greek_delta_lower", "δ"),
    ("greek_epsilon_lower", "ε"),
    ("greek_zeta_lower", "ζ"),
    ("greek_eta_lower", "η"),
    ("greek_theta_lower", "θ"),
    ("greek_lambda_lower", "λ"),
    ("greek_mu_lower", "μ"),
    ("greek_xi_lower", "ξ"),
    ("greek_pi_lower", "π"),
    ("greek_final_sigma_lower", "ς"),
    ("greek_sigma_lower", "σ"),
    ("greek_phi_lower", "φ"),
    ("greek_omega_lower", "ω"),
    ("greek_theta_symbol", "ϑ"),
    ("greek_pi_symbol", "ϖ"),
    ("greek_Koppa", "Ϟ"),
]

# Dropped Cyrillic capitals: A Ve Ghe Ie Ze (~ 3) Ka Em En O Pe (= Pi) Er Es Te U (~ y) Ef (= Phi)
# Ha and the soft sign (~ b); all lower case (small capitals in upright fonts, Latin look-alikes in
# italic ones: i -> u, te -> m, pe -> n); Tshe's lower case (= h with stroke).
CYRILLIC = [
    ("cyrillic_Be", "Б"),
    ("cyrillic_De", "Д"),
    ("cyrillic_Zhe", "Ж"),
    ("cyrillic_I", "И"),
    ("cyrillic_Short_I", "Й"),
    ("cyrillic_El", "Л"),
    ("cyrillic_Tse", "Ц"),
    ("cyrillic_Che", "Ч"),
    ("cyrillic_Sha", "Ш"),
    ("cyrillic_Shcha", "Щ"),
    ("cyrillic_Hard_Sign", "Ъ"),
    ("cyrillic_Yeru", "Ы"),
    ("cyrillic_E", "Э"),
    ("cyrillic_Yu", "Ю"),
    ("cyrillic_Ya", "Я"),
    ("cyrillic_Dje", "Ђ"),
    ("cyrillic_Tshe", "Ћ"),
    ("cyrillic_Lje", "Љ"),
    ("cyrillic_Nje", "Њ"),
    ("cyrillic_Dzhe", "Џ"),
    ("cyrillic_Ukrainian_Ie", "Є"),
    ("cyrillic_Yi", "Ї"),
    ("cyrillic_Yat", "Ѣ"),
]

# Dropped: o with stroke (size pair), thorn lower case (~ Thorn), D with stroke (= Eth), long s (~ esh),
# eng lower case (~ eta).
LATIN_EXTENDED = [
    ("latin_AE", "Æ"),
    ("latin_ae_lower", "æ"),
    ("latin_OE", "Œ"),
    ("latin_oe_lower", "œ"),
    ("latin_O_stroke", "Ø"),
    ("latin_Thorn", "Þ"),
    ("latin_Eth", "Ð"),
    ("latin_eth_lower", "ð"),
    ("latin_d_stroke_lower", "đ"),
    ("latin_Eng", "Ŋ"),
    ("latin_schwa_lower", "ə"),
    ("latin_H_stroke", "Ħ"),
    ("latin_h_stroke_lower", "ħ"),
    ("latin_L_stroke", "Ł"),
    ("latin_l_stroke_lower", "ł"),
    ("latin_IJ", "Ĳ"),
    ("latin_ij_lower", "ĳ"),
    ("latin_f_hook_lower", "ƒ"),
    ("latin_lambda_stroke_lower", "ƛ"),
    ("ipa_esh", "ʃ"),
    ("ipa_bilabial_click", "ʘ"),
    ("ipa_lezh", "ɮ"),
    ("ipa_dezh", "ʤ"),
    ("ipa_tesh", "ʧ"),
    ("ipa_ts", "ʦ"),
    ("ipa_m_hook", "ɱ"),
    ("ipa_b_hook", "ɓ"),
    ("ipa_d_hook", "ɗ"),
]

# Dropped: multiplication sign (= X), inverted exclamation mark (~ i), micro sign (= mu), degree (= O).
SYMBOLS = [
    ("symbol_ampersand", "&"),
    ("symbol_at", "@"),
    ("symbol_number", "#"),
    ("symbol_percent", "%"),
    ("symbol_per_mille", "‰"),
    ("symbol_dollar", "$"),
    ("symbol_cent", "¢"),
    ("symbol_euro", "€"),
    ("symbol_pound", "£"),
    ("symbol_yen", "¥"),
    ("symbol_currency", "¤"),
    ("symbol_section", "§"),
    ("symbol_pilcrow", "¶"),
    ("symbol_question", "?"),
    ("symbol_inverted_question", "¿"),
    ("symbol_exclamation", "!"),
    ("symbol_partial", "∂"),
    ("symbol_plus_minus", "±"),
    ("symbol_division", "÷"),
    ("symbol_not", "¬"),
    ("symbol_copyright", "©"),
    ("symbol_registered", "®"),
    ("symbol_trade_mark", "™"),
    ("symbol_numero", "№"),
    ("symbol_dagger", "†"),
    ("symbol_double_dagger", "‡"),
    ("symbol_one_quarter", "¼"),
    ("symbol_one_half", "½"),
    ("symbol_three_quarters", "¾"),
    ("symbol_ordinal_a", "ª"),
    ("symbol_ordinal_o", "º"),
    ("symbol_guillemet_left", "«"),
    ("symbol_guillemet_right", "»"),
    ("symbol_ellipsis", "…"),
    ("symbol_bullet", "•"),
]

GLYPH_CLASSES: dict[str, str] = dict(sorted(LATIN + DIGITS + GREEK + CYRILLIC + LATIN_EXTENDED + SYMBOLS))

# Class-name prefix -> script (the class's group in the store). Latin-extended letters are latin.
SCRIPT_OF_PREFIX = {"latin": "latin", "ipa": "ipa", "greek": "greek", "cyrillic": "cyrillic",
                    "digit": "digits", "symbol": "symbols"}


def glyph_script(class_name: str) -> str:
    """The script of a glyph class: ``greek_Delta`` -> greek, ``ipa_esh`` -> ipa, ``symbol_at`` -> symbols."""
    prefix = class_name.split("_", 1)[0]
    if prefix not in SCRIPT_OF_PREFIX:
        raise ValueError(f"glyph class {class_name!r} has no known script prefix ({', '.join(SCRIPT_OF_PREFIX)})")
    return SCRIPT_OF_PREFIX[prefix]

MASTER_FONT_PX = 160  # glyphs are rendered this large, then fitted to the canvas
GLYPH_EXTENT = 0.75  # longest side of an unaugmented glyph, as a fraction of the image side
SUPERSAMPLE = 3  # augmentation runs at 3x the image size, then area-downsamples (antialiasing)

# Stroke change per image: erode 3x3, unchanged, dilate 3x3, dilate 5x5 (at supersampled resolution).
STROKE_KERNELS = (-3, 0, 3, 5)
STROKE_PROBS = (0.25, 0.35, 0.25, 0.15)
MAX_ROTATION_DEG = 12.0
MAX_SHEAR = 0.2
SCALE_RANGE = (0.8, 1.05)
MAX_SHIFT = 0.1  # in normalised coordinates ([-1, 1] spans the image)


def font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=None)
def font_codepoints(font_file: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    return frozenset(TTFont(font_dir() / font_file, lazy=True).getBestCmap())


@functools.lru_cache(maxsize=None)
def load_font(font_file: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / font_file), MASTER_FONT_PX)


def glyph_plan(
    classes: Sequence[str] | None = None, fonts: Sequence[str] = FONT_FILES, min_fonts: int = 16
) -> dict[str, tuple[str, ...]]:
    """Class name -> the fonts whose character map covers it; classes with fewer than ``min_fonts`` are left out."""
    names = sorted(GLYPH_CLASSES) if classes is None else sorted(classes)
    unknown = [name for name in names if name not in GLYPH_CLASSES]
    if unknown:
        raise ValueError(f"unknown glyph classes {unknown[:5]}; see dfml.data.sources.glyphs.GLYPH_CLASSES")
    plan = {}
    for name in names:
        covering = tuple(f for f in fonts if ord(GLYPH_CLASSES[name]) in font_codepoints(f))
        if len(covering) >= min_fonts:
            plan[name] = covering
    return plan


def render_master(font_file: str, char: str, canvas: int) -> np.ndarray:
    """The glyph centred on a black ``canvas`` square, longest side GLYPH_EXTENT of it; float32 in [0, 1]."""
    font = load_font(font_file)
    left, top, right, bottom = font.getbbox(char)
    pad = 4
    image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(image).text((pad - left, pad - top), char, font=font, fill=255)
    ink_box = image.getbbox()
    if ink_box is None:
        raise ValueError(f"font {font_file} renders {char!r} (U+{ord(char):04X}) without ink")
    image = image.crop(ink_box)
    scale = GLYPH_EXTENT * canvas / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    master = Image.new("L", (canvas, canvas), 0)
    master.paste(image, ((canvas - size[0]) // 2, (canvas - size[1]) // 2))
    return np.asarray(master, dtype=np.float32) / 255.0


def class_rng(seed: int, class_name: str) -> np.random.Generator:
    """Per-class stream keyed by the name, so adding or removing classes leaves the others unchanged."""
    digest = int.from_bytes(hashlib.sha256(class_name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def stroke_variants(masters: torch.Tensor) -> torch.Tensor:
    """[len(STROKE_KERNELS), N, 1, S, S]: each master eroded (kernel < 0), unchanged (0) or dilated (> 0)."""
    variants = []
    for kernel in STROKE_KERNELS:
        size = abs(kernel)
        if kernel > 0:
            variants.append(F.max_pool2d(masters, size, stride=1, padding=size // 2))
        elif kernel < 0:
            variants.append(-F.max_pool2d(-masters, size, stride=1, padding=size // 2))
        else:
            variants.append(masters)
    return torch.stack(variants)


def affine_thetas(rng: np.random.Generator, n: int) -> torch.Tensor:
    """[n, 2, 3] sampling matrices (output -> input coordinates) of random rotation, shear, scale, shift."""
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n))
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR, n)
    scale = rng.uniform(*SCALE_RANGE, n)
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, (n, 2))
    thetas = np.zeros((n, 2, 3))
    for i in range(n):
        rotation = np.array([[np.cos(angle[i]), -np.sin(angle[i])], [np.sin(angle[i]), np.cos(angle[i])]])
        forward = scale[i] * rotation @ np.array([[1.0, shear[i]], [0.0, 1.0]])
        inverse = np.linalg.inv(forward)
        thetas[i, :, :2] = inverse
        thetas[i, :, 2] = -inverse @ shift[i]
    return torch.from_numpy(thetas).to(torch.float32)


def warp_and_downsample(images: torch.Tensor, thetas: torch.Tensor, image_size: int) -> torch.Tensor:
    """Affine-warp a [N, 1, S, S] float batch, area-downsample to ``image_size``, quantise to uint8."""
    grid = F.affine_grid(thetas, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    small = F.adaptive_avg_pool2d(warped, image_size)
    return (small * 255.0).round().clamp(0, 255).to(torch.uint8)


def render_class(name: str, fonts: Sequence[str], image_size: int, instances_per_font: int, seed: int) -> torch.Tensor:
    """uint8 [len(fonts) * instances_per_font, 1, image_size, image_size], font-major order."""
    canvas = image_size * SUPERSAMPLE
    masters = torch.from_numpy(np.stack([render_master(f, GLYPH_CLASSES[name], canvas) for f in fonts]))[:, None]
    rng = class_rng(seed, name)
    n_images = len(fonts) * instances_per_font
    font_index = np.repeat(np.arange(len(fonts)), instances_per_font)
    stroke_index = rng.choice(len(STROKE_KERNELS), size=n_images, p=STROKE_PROBS)
    stroked = stroke_variants(masters)[torch.from_numpy(stroke_index), torch.from_numpy(font_index)]
    return warp_and_downsample(stroked, affine_thetas(rng, n_images), image_size)


@contextlib.contextmanager
def single_torch_thread():
    """Per-class batches are small: intra-op threads cost more than they save (3x slower with 2 on 2 cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def render_glyph_images(
    plan: dict[str, Sequence[str]], image_size: int = 32, instances_per_font: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Class name -> uint8 images for every class of a ``glyph_plan``."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if instances_per_font < 1:
        raise ValueError(f"instances_per_font must be >= 1, got {instances_per_font}")
    with single_torch_thread():
        return {
            name: render_class(name, fonts, image_size, instances_per_font, seed)
            for name, fonts in tqdm(plan.items(), desc="rendering glyphs", unit="class")
        }


def prepare(
    out_dir: str | Path,
    *,
    dataset_name: str = "glyphs",
    image_size: int = 32,
    instances_per_font: int = 4,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    min_fonts: int = 16,
    classes: Sequence[str] | None = None,
) -> StoreInfo:
    """Render the glyph dataset into a canonical store (``classes`` picks a subset, e.g. for quick tests)."""
    plan = glyph_plan(classes, min_fonts=min_fonts)
    if len(plan) < 3:
        raise ValueError(f"only {len(plan)} glyph classes are covered by >= {min_fonts} fonts; need at least 3")
    images = render_glyph_images(plan, image_size, instances_per_font, seed)
    splits = split_by_fractions(list(plan), val_fraction, test_fraction, seed)
    extra = {
        "characters": {name: GLYPH_CLASSES[name] for name in plan},
        "fonts": sorted({f for fonts in plan.values() for f in fonts}),
        "instances_per_font": instances_per_font,
        "seed": seed,
    }
    groups = {name: glyph_script(name) for name in plan}
    return write_store(out_dir, dataset_name, images, splits, source="glyphs", extra=extra, groups=groups)
