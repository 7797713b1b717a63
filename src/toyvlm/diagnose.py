"""Where does a trained toy LLaVA look? Attention mass of the pointing heads on the objects a question names.

    python -m toyvlm.diagnose --model assets/toy-llava [--scenes 60]

For one sampled question per kind and validation scene (exists: present objects only; count is not pointed),
runs the stock forward with eager attention and reports, per question kind, the mean attention mass that the
heads trained to point (see ``toyvlm.train.pointing_loss``) put on the patches of the object named first / last
at the answer position, and the accuracy of the first answer token. A kind with high mass but low accuracy
retrieves the right tokens and fails afterwards (e.g. comparing two positions, or reading the letter).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from . import data as D
from . import train as T

DEFAULT_SCENES = 60
POINTED_KINDS = ("colour", "position", "detail", "exists")


def pointing_report(model, tokenizer, config: T.TrainConfig, scenes: int = DEFAULT_SCENES, seed: int = 0) -> dict:
    """{kind: {"questions", "mass_first", "mass_last", "first_token_accuracy"}} on ``scenes`` validation scenes."""
    examples = D.make_split("val", seed, scenes, config.image_size, per_kind=0)
    pixels, _, objects = T.render_split(examples, config.image_size, config.patch_size)
    encoder = T.ConversationEncoder(tokenizer, model.config.image_seq_length)
    layer = model.model.language_model.layers[config.point_layer].self_attn
    heads = config.point_heads
    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[float, float, bool]]] = {kind: [] for kind in POINTED_KINDS}
    for i, example in enumerate(examples):
        candidates = D.candidate_questions(example.scene)
        for kind in POINTED_KINDS:
            pool = [qa for qa in candidates[kind] if not (kind == "exists" and qa.answer == "no")]
            if not pool:
                continue
            qa = pool[int(rng.integers(len(pool)))]
            input_ids, mask, labels = T.pad_batch([encoder([qa])], tokenizer.pad_token_id)
            _, (position,), masks = T.pointing_targets([[qa]], [example.scene], labels, objects[[i]])
            with torch.no_grad(), T.captured_attention(layer) as captured:
                output = model(input_ids=input_ids, attention_mask=mask, pixel_values=T.normalize(pixels[[i]]))
            image_mask = input_ids == model.config.image_token_id
            mass = T.pointed_mass(captured[0], image_mask, torch.tensor([0]), torch.tensor([position]), masks, heads)[0]
            first, last = mass[:heads].mean().item(), mass[heads:].mean().item()
            correct = output.logits[0, position].argmax().item() == labels[0, position + 1].item()
            rows[kind].append((first, last, correct))
    report = {}
    for kind, values in rows.items():
        if values:
            first, last, correct = np.asarray(values, dtype=float).mean(0)
            report[kind] = {"questions": len(values), "mass_first": first, "mass_last": last,
                            "first_token_accuracy": correct}
    return report


def main(argv=None) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder with training_log.json")
    parser.add_argument("--scenes", type=int, default=DEFAULT_SCENES)
    args = parser.parse_args(argv)
    log = Path(args.model) / "training_log.json"
    if not log.is_file():
        raise SystemExit(f"{log}: missing (the pointing layer and heads are read from the training config)")
    config = T.TrainConfig(**json.loads(log.read_text())["config"])
    model = LlavaForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager").eval()
    tokenizer = AutoProcessor.from_pretrained(args.model).tokenizer
    for kind, row in pointing_report(model, tokenizer, config, args.scenes).items():
        print(f"{kind:9s} {row['questions']:4d} questions  attention mass on the object named first "
              f"{row['mass_first']:.2f}, last {row['mass_last']:.2f}  first-token accuracy "
              f"{100 * row['first_token_accuracy']:.1f}%")


if __name__ == "__main__":
    main()
