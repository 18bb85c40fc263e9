"""A synthetic captioned dataset with ground-truth masks, for the embedded demo.

Every category has a local appearance (a texture in its own colours, like a zebra's stripes or a
ladybird's spots) painted inside a random silhouette (ellipse, rounded box or blob), so a category
is recognisable from any 8x8 patch of it, not from its outline. Backgrounds are cluttered, muted
materials (wood, sand, bricks, concrete, carpet) with small distractor shapes. Captions name every
object (synonyms, size words, varied templates) and often the background.

Each example is a pure function of (seed, split, index), so any subset can be regenerated alone.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

Texture = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _rgb(*values: int) -> np.ndarray:
    return np.asarray(values, np.float32) / 255.0


def _mix(mask: np.ndarray, on: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Per-pixel choice between two colours: mask [H, W] in [0, 1] -> [H, W, 3]."""
    return mask[..., None] * on + (1.0 - mask[..., None]) * off


def _frame(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, angle: float, scale: float):
    """Coordinates (u, v) rotated by `angle`, divided by `scale` and randomly shifted."""
    u = (np.cos(angle) * x + np.sin(angle) * y) / scale + rng.uniform()
    v = (np.cos(angle) * y - np.sin(angle) * x) / scale + rng.uniform()
    return u, v


def _stripes(rng, y, x, period: tuple[float, float], duty: float = 0.5, angle: float = 0.0) -> np.ndarray:
    u, _ = _frame(rng, y, x, angle + rng.uniform(-np.pi / 6, np.pi / 6), rng.uniform(*period))
    return ((u % 1.0) < duty).astype(np.float32)


def _dots(rng, y, x, spacing: tuple[float, float], radius: float) -> np.ndarray:
    u, v = _frame(rng, y, x, rng.uniform(0, np.pi), rng.uniform(*spacing))
    return (((u % 1.0) - 0.5) ** 2 + ((v % 1.0) - 0.5) ** 2 < radius**2).astype(np.float32)


def _cells(rng, y, x, spacing: float) -> np.ndarray:
    """Voronoi-like patches with thin borders (a giraffe's coat): 1 inside patches, 0 on borders."""
    n = max(4, int(y.size / spacing**2))
    centres = np.stack([rng.uniform(y.min() - 4, y.max() + 4, n), rng.uniform(x.min() - 4, x.max() + 4, n)], -1)
    d = np.sqrt((y[..., None] - centres[:, 0]) ** 2 + (x[..., None] - centres[:, 1]) ** 2)
    d.sort(axis=-1)
    return (d[..., 1] - d[..., 0] > 1.2).astype(np.float32)


def zebra(rng, y, x):
    return _mix(_stripes(rng, y, x, (3.5, 5.0)), _rgb(245, 245, 245), _rgb(15, 15, 15))


def tiger(rng, y, x):
    return _mix(_stripes(rng, y, x, (5.0, 7.0), duty=0.3), _rgb(20, 10, 5), _rgb(235, 120, 25))


def giraffe(rng, y, x):
    return _mix(_cells(rng, y, x, 5.0), _rgb(150, 80, 30), _rgb(240, 215, 160))


def ladybird(rng, y, x):
    return _mix(_dots(rng, y, x, (5.0, 7.0), 0.25), _rgb(10, 10, 10), _rgb(215, 25, 30))


def frog(rng, y, x):
    spots = _dots(rng, y, x, (6.0, 8.0), 0.3)
    return _mix(spots, _rgb(30, 90, 25), _rgb(110, 200, 50))


def fish(rng, y, x):
    u, v = _frame(rng, y, x, rng.uniform(0, np.pi), rng.uniform(3.5, 5.0))
    scales = (((u % 1.0) - 0.5) ** 2 + ((v + 0.5 * np.floor(u)) % 1.0 - 0.5) ** 2 > 0.12).astype(np.float32)
    return _mix(scales, _rgb(40, 110, 230), _rgb(170, 220, 255))


def pineapple(rng, y, x):
    hatch = np.maximum(
        _stripes(rng, y, x, (4.0, 5.0), 0.25, np.pi / 4), _stripes(rng, y, x, (4.0, 5.0), 0.25, -np.pi / 4)
    )
    return _mix(hatch, _rgb(120, 70, 10), _rgb(250, 210, 40))


def grapes(rng, y, x):
    berries = _dots(rng, y, x, (4.0, 5.0), 0.42)
    return _mix(berries, _rgb(120, 40, 160), _rgb(45, 10, 60))


@dataclasses.dataclass(frozen=True)
class Category:
    name: str
    synonyms: tuple[str, ...]
    texture: Texture
    plural: tuple[str, ...] = ()  # synonyms that take "some" instead of "a"


CATEGORIES: tuple[Category, ...] = (
    Category("zebra", ("zebra", "striped zebra", "black and white zebra"), zebra),
    Category("tiger", ("tiger", "orange tiger", "striped tiger"), tiger),
    Category("giraffe", ("giraffe", "spotted giraffe"), giraffe),
    Category("ladybird", ("ladybird", "ladybug", "red beetle"), ladybird),
    Category("frog", ("frog", "green frog", "toad"), frog),
    Category("fish", ("fish", "blue fish", "goldfish"), fish),
    Category("pineapple", ("pineapple", "yellow pineapple"), pineapple),
    Category("grapes", ("bunch of grapes", "grapes", "purple grapes"), grapes, plural=("grapes", "purple grapes")),
)
BACKGROUND_NAMES: tuple[str, ...] = ("background", "floor", "ground", "wall", "wooden floor", "sand", "brick wall",
                                     "concrete", "carpet")
BACKGROUND_LABEL = 0  # category i is label i + 1


def _wood(rng, y, x):
    grain = np.sin(y / rng.uniform(1.5, 3.0) + 2.0 * np.sin(x / rng.uniform(6, 12))) * 0.5 + 0.5
    planks = (np.floor(x / rng.uniform(10, 16)) % 2)[..., None] * 0.06
    return _mix(grain, _rgb(150, 110, 75), _rgb(115, 85, 60)) + planks


def _sand(rng, y, x):
    return _rgb(200, 185, 150) + rng.normal(0, 0.05, (*y.shape, 1)).astype(np.float32)


def _bricks(rng, y, x):
    h = rng.uniform(5, 7)
    row = np.floor(y / h)
    mortar = ((y % h) < 1) | (((x + 6 * (row % 2)) % 12) < 1)
    return _mix(mortar.astype(np.float32), _rgb(190, 190, 185), _rgb(140, 95, 85))


def _concrete(rng, y, x):
    blotches = np.sin(y / 7 + rng.uniform(0, 6)) * np.sin(x / 9 + rng.uniform(0, 6)) * 0.08
    return _rgb(135, 135, 135) + blotches[..., None] + rng.normal(0, 0.04, (*y.shape, 1)).astype(np.float32)


def _carpet(rng, y, x):
    return _rgb(95, 80, 95) + rng.normal(0, 0.07, (*y.shape, 3)).astype(np.float32)


# material: (texture, caption phrases)
BACKGROUNDS: dict[str, tuple[Texture, tuple[str, ...]]] = {
    "wood": (_wood, ("on a wooden floor", "on wooden planks", "on a wood floor")),
    "sand": (_sand, ("on the sand", "on a sandy beach", "on sand")),
    "bricks": (_bricks, ("in front of a brick wall", "against a brick wall")),
    "concrete": (_concrete, ("on concrete", "on a grey concrete floor")),
    "carpet": (_carpet, ("on a carpet", "on a dark rug")),
}
TEMPLATES: tuple[str, ...] = (
    "{objects}", "{objects} {background}", "a photo of {objects}", "a photo of {objects} {background}",
    "there is {objects} {background}", "an image with {objects}", "{objects}, seen from above",
    "a picture of {objects} {background}", "look at {objects}!",
)


def _silhouette(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """A random ellipse, rounded box or blob of radius about r: bool [H, W]."""
    aspect = rng.uniform(0.6, 1.4)
    dy, dx = (y - cy) / (r * aspect), (x - cx) * aspect / r
    kind = rng.integers(3)
    if kind == 0:
        return dy**2 + dx**2 <= 1.0
    if kind == 1:
        return np.abs(dy) ** 4 + np.abs(dx) ** 4 <= 1.0
    angle = np.arctan2(dy, dx)
    radius = 1.0 + sum(rng.uniform(0, 0.18) * np.sin(k * angle + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    return np.sqrt(dy**2 + dx**2) <= radius


def _size_word(rng: np.random.Generator, fraction: float) -> str:
    if fraction < 0.08:
        return rng.choice(["small ", "little ", "tiny ", ""])
    if fraction > 0.2:
        return rng.choice(["large ", "big ", ""])
    return ""


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


@dataclasses.dataclass(frozen=True)
class Example:
    image: np.ndarray  # [H, W, 3] uint8
    caption: str
    segmentation: np.ndarray  # [H, W] uint8: 0 background, i + 1 for CATEGORIES[i]
    instances: np.ndarray  # [H, W] uint8: 0 background, k for the k-th object (painting order)
    labels: tuple[int, ...]  # category label of each instance


def make_example(seed: int, index: int, image_size: int = 64, max_objects: int = 3,
                 radius_range: tuple[float, float] = (0.14, 0.3)) -> Example:
    """Deterministic example `index` of the stream `seed`."""
    rng = np.random.default_rng([seed, index])
    y, x = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    material = rng.choice(sorted(BACKGROUNDS))
    texture, phrases = BACKGROUNDS[material]
    image = texture(rng, y, x)
    for _ in range(rng.integers(3, 9)):  # muted clutter
        mask = _silhouette(rng, y, x, *rng.uniform(0, image_size, 2), rng.uniform(1.5, 4.0))
        image[mask] = rng.uniform(0.25, 0.65) + rng.uniform(-0.05, 0.05, 3)

    segmentation = np.zeros((image_size, image_size), np.uint8)
    instances = np.zeros_like(segmentation)
    labels = []
    for _ in range(rng.integers(1, max_objects + 1)):
        label = int(rng.integers(len(CATEGORIES)))
        r = rng.uniform(*radius_range) * image_size
        cy, cx = rng.uniform(r * 0.6, image_size - r * 0.6, 2)
        mask = _silhouette(rng, y, x, cy, cx, r)
        if mask.sum() < 16:
            continue
        shade = rng.uniform(0.85, 1.15)
        image[mask] = (CATEGORIES[label].texture(rng, y, x) * shade)[mask]
        labels.append(label)
        segmentation[mask] = label + 1
        instances[mask] = len(labels)
    if not labels:  # every image holds at least one object
        return make_example(seed, index + 10**9, image_size, max_objects, radius_range)

    visible = [(instances == k).sum() for k in range(1, len(labels) + 1)]
    object_phrases = []
    for k in rng.permutation(len(labels)):
        fraction = (instances == k + 1).sum() / instances.size
        if visible[k] == 0:
            continue
        word = _size_word(rng, fraction)
        category = CATEGORIES[labels[k]]
        name = rng.choice(category.synonyms)
        article = "some" if name in category.plural else "an" if (word or name)[0] in "aeiou" else "a"
        object_phrases.append(f"{article} {word}{name}")
    caption = rng.choice(TEMPLATES).format(objects=_join(object_phrases), background=rng.choice(phrases))
    pixels = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    return Example((pixels * 255).round().astype(np.uint8), caption.strip(), segmentation, instances, tuple(labels))


def encode_example(seed: int, index: int, image_size: int) -> dict:
    """One example as encoded bytes and arrays, ready for a TFRecord (runs in worker processes)."""
    example = make_example(seed, index, image_size)
    return dict(
        key=f"{seed:04d}{index:09d}",
        jpg=_encode(example.image, "JPEG"),
        txt=example.caption,
        segmentation=_encode(example.segmentation, "PNG"),
        instances=_encode(example.instances, "PNG"),
        labels=list(example.labels),
        width=image_size,
        height=image_size,
    )


def _encode(array: np.ndarray, image_format: str) -> bytes:
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    return buffer.getvalue()
