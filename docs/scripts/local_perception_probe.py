"""Does a demo model read objects' appearance from the pictures? A one-off measurement behind docs/demo.md.

On a fresh describe split (seed 77, never used elsewhere) it takes the `list_objects` answers, and compares the
teacher-forced next-token accuracy on the tokens that name an object's colour, category, lane side or motion with
the real images and with every image flat grey. Equal accuracies mean the model answers those words from the
wording alone. Run from the repository root:

    python docs/scripts/local_perception_probe.py src/drivekd/demo/assets/student-base --scenes 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

from drivekd.data.collate import VLMCollator
from drivekd.data.schema import read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.losses.supervised import answer_logits
from drivekd.models.families import family_of
from drivekd.models.pair import load_spec

WORDS = {
    *("white", "black", "red", "blue", "green", "yellow", "purple"),
    *("sedan", "van", "truck", "bus", "pedestrian", "cyclist", "stop", "light"),
    *("oncoming", "left", "right", "ego", "ahead", "stopped", "crossing"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--scenes", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = load_spec(args.model)
    model = model.float().eval()
    root = Path(tempfile.mkdtemp())
    split = generate_split(root, n_scenes=args.scenes, seed=77, domain="describe", split="probe")
    samples = [s for s in read_jsonl(split.path) if s.meta.get("question_type") == "list_objects"]
    grey = root / "grey"
    for path in {im.path for s in samples for im in s.images}:
        (grey / path).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(root / path) as image:
            Image.new("RGB", image.size, (128, 128, 128)).save(grey / path)
    decode = processor.tokenizer.decode
    for name, images in (("real images", root), ("flat grey", grey)):
        collate = VLMCollator(processor, family_of(model).image_token_id(model), image_root=images)
        hits = total = named_hits = named = 0
        with torch.no_grad():
            for start in range(0, len(samples), 4):
                batch = collate(samples[start : start + 4])
                picked, targets = answer_logits(model(**batch.inputs).logits, batch.labels)
                for guess, target in zip(picked.argmax(-1).tolist(), targets.tolist(), strict=True):
                    hits, total = hits + (guess == target), total + 1
                    if decode([target]).strip().lower().strip(",.;()") in WORDS:
                        named_hits, named = named_hits + (guess == target), named + 1
        print(
            f"{name}: attribute tokens {named_hits}/{named} = {100 * named_hits / max(named, 1):.1f}%, "
            f"all answer tokens {100 * hits / total:.1f}% ({len(samples)} answers)"
        )


if __name__ == "__main__":
    main()
