"""One interface for image-text datasets: `load_records(spec, split)` -> standard `Record`s.

A spec is a string `kind[:key=value,...]`, the form `--dataset` takes on the command line:

    shapes                                     the synthetic shapes data (seed 0)
    shapes:seed=3,size=500                     another seed / split size
    coco:annotations=dataset_coco.json,images=/data/coco      Karpathy-split COCO captions
    flickr30k:annotations=dataset_flickr30k.json,images=/data/flickr30k-images
    flickr30k:annotations=results_20130124.token,images=...   (the original tab-separated file)
    vqav2:questions=q.json,annotations=a.json,images=/data/coco/val2014
    jsonl:path=data.jsonl,images=/data/pictures

Every loader reads local files only (see `download.py` to fetch them). Captioning datasets give one
record per image with all its captions; VQA datasets give one record per question.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from . import synthetic

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One example. `image` is a path or an in-memory PIL image; text fields may be empty."""

    image_id: str
    image: str | Image.Image
    captions: tuple[str, ...] = ()
    question: str | None = None
    answers: tuple[str, ...] = ()
    question_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def caption(self) -> str | None:
        return self.captions[0] if self.captions else None

    def load_image(self) -> Image.Image:
        if isinstance(self.image, Image.Image):
            return self.image
        with Image.open(self.image) as image:
            return image.convert("RGB")


@dataclass(frozen=True)
class DatasetSpec:
    kind: str
    options: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        kind, _, rest = text.strip().partition(":")
        if kind not in LOADERS:
            raise ValueError(f"Unknown dataset kind {kind!r}; choose from {', '.join(sorted(LOADERS))}.")
        options = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"Dataset option {part!r} must look like key=value.")
            options[key.strip()] = value.strip()
        return cls(kind, options)

    def require(self, key: str) -> str:
        if key not in self.options:
            raise ValueError(f"The {self.kind} dataset needs {key}=...")
        return self.options[key]

    def path(self, key: str) -> Path:
        path = Path(self.require(key)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{self.kind} dataset: {key}={path} does not exist.")
        return path


def load_records(spec: str | DatasetSpec, split: str = "test", limit: int | None = None) -> list[Record]:
    """Records of `split` from the dataset `spec`, at most `limit` of them (in file order)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}.")
    if isinstance(spec, str):
        spec = DatasetSpec.parse(spec)
    records: list[Record] = []
    for record in LOADERS[spec.kind](spec, split):
        if limit is not None and len(records) >= limit:
            break
        records.append(record)
    return records


# --------------------------------------------------------------------------- loaders


def _karpathy(spec: DatasetSpec, split: str) -> Iterable[Record]:
    """Karpathy's dataset_coco.json / dataset_flickr30k.json: {"images": [{"filepath"?, "filename",
    "split", "sentences": [{"raw"}], "cocoid" | "imgid"}]}. The "restval" split counts as train."""
    data = json.loads(spec.path("annotations").read_text())
    root = Path(spec.options.get("images", "."))
    wanted = {split, "restval"} if split == "train" else {split}
    for item in data["images"]:
        if item.get("split") not in wanted:
            continue
        image = root / item.get("filepath", "") / item["filename"]
        image_id = str(item.get("cocoid", item.get("imgid", item["filename"])))
        captions = tuple(s["raw"].strip() for s in item.get("sentences", []))
        yield Record(image_id=image_id, image=str(image), captions=captions)


def _flickr30k(spec: DatasetSpec, split: str) -> Iterable[Record]:
    """Karpathy JSON (as COCO), or the original `results_20130124.token` lines
    `1000092795.jpg#0<TAB>caption` (which has no splits: every image is in every split)."""
    path = spec.path("annotations")
    if path.suffix == ".json":
        yield from _karpathy(spec, split)
        return
    root = Path(spec.options.get("images", "."))
    captions: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        key, _, caption = line.partition("\t")
        captions.setdefault(key.split("#")[0], []).append(caption.strip())
    for filename, texts in captions.items():
        yield Record(image_id=Path(filename).stem, image=str(root / filename), captions=tuple(texts))


def _vqav2(spec: DatasetSpec, split: str) -> Iterable[Record]:
    """VQAv2 questions ({"questions": [{"image_id", "question", "question_id"}]}) joined with the
    annotations ({"annotations": [{"question_id", "answers": [{"answer"}]}]}) when given. Image
    files follow COCO's naming, `COCO_<data_subtype>_<image_id:012d>.jpg`."""
    questions = json.loads(spec.path("questions").read_text())
    answers: dict[Any, tuple[str, ...]] = {}
    if "annotations" in spec.options:
        for item in json.loads(spec.path("annotations").read_text())["annotations"]:
            answers[item["question_id"]] = tuple(a["answer"] for a in item["answers"])
    subtype = spec.options.get("subtype", questions.get("data_subtype", "val2014"))
    root = Path(spec.options.get("images", "."))
    for item in questions["questions"]:
        image = root / f"COCO_{subtype}_{int(item['image_id']):012d}.jpg"
        yield Record(
            image_id=str(item["image_id"]),
            image=str(image),
            question=item["question"],
            answers=answers.get(item["question_id"], ()),
            question_id=str(item["question_id"]),
        )


def _jsonl(spec: DatasetSpec, split: str) -> Iterable[Record]:
    """One JSON object a line: {"image", "image_id"?, "caption" | "captions"?, "question"?,
    "answers" | "answer"?, "question_id"?, "split"?}. Lines without a split belong to every split."""
    root = Path(spec.options.get("images", "."))
    for number, line in enumerate(spec.path("path").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"Line {number} of {spec.options['path']} is not JSON: {error}") from error
        if item.get("split", split) != split:
            continue
        if "image" not in item:
            raise ValueError(f"Line {number} of {spec.options['path']} has no 'image'.")
        captions = item.get("captions") or ([item["caption"]] if item.get("caption") else [])
        answers = item.get("answers") or ([item["answer"]] if item.get("answer") else [])
        yield Record(
            image_id=str(item.get("image_id", Path(item["image"]).stem)),
            image=str(root / item["image"]),
            captions=tuple(captions),
            question=item.get("question"),
            answers=tuple(answers),
            question_id=str(item["question_id"]) if "question_id" in item else None,
        )


def _shapes(spec: DatasetSpec, split: str) -> Iterable[Record]:
    """The synthetic data: per image one caption record (captions = canonical + paraphrases) and
    one record per question, all sharing the image id. Captions are unique within val and test,
    so the canonical caption works as a retrieval query. `task=captions|vqa` keeps one kind.
    `renderer=classic|random|paint` picks the style (synthetic.STYLES; default classic, the
    original test split): "random" is the training renderer's own test split, "paint" the
    independent renderer's held-out one."""
    seed = int(spec.options.get("seed", 0))
    style = spec.options.get("renderer", "classic")
    if style not in synthetic.STYLES:
        raise ValueError(f"shapes dataset: renderer must be one of {', '.join(synthetic.STYLES)}")
    size = int(spec.options.get("size", 300))
    task = spec.options.get("task", "all")
    if task not in {"all", "captions", "vqa"}:
        raise ValueError("shapes dataset: task must be all, captions or vqa")
    for scene in synthetic.generate_split(seed, split, size, unique_captions=split != "train", style=style):
        image = scene.render()
        objects = [(o.colour, o.shape) for o in scene.objects]
        if task in {"all", "captions"}:
            yield Record(scene.image_id, image, captions=scene.captions, extra={"objects": objects})
        if task in {"all", "vqa"}:
            for number, qa in enumerate(scene.qa):
                yield Record(
                    scene.image_id,
                    image,
                    question=qa.question,
                    # ten identical "human" answers, the VQAv2 layout
                    answers=(qa.answer,) * 10,
                    question_id=f"{scene.image_id}-q{number}",
                    extra={"kind": qa.kind},
                )


LOADERS: dict[str, Callable[[DatasetSpec, str], Iterable[Record]]] = {
    "coco": _karpathy,
    "flickr30k": _flickr30k,
    "vqav2": _vqav2,
    "jsonl": _jsonl,
    "shapes": _shapes,
}
