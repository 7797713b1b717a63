"""Where does a trained toy LLaVA look? Attention mass of the pointing heads on the objects a question names, and
the attention drift while it describes.

    python -m toyvlm.diagnose --model assets/toy-llava [--scenes 60]
    python -m toyvlm.diagnose --model assets/toy-llava --drift [--scenes 60] [--out DIR]

``--drift``: the model greedily describes test scenes (their describe prompt, at most ``MAX_DESCRIPTION_TOKENS``
tokens); at each generated step, the attention of the last query (the position that predicts the next token),
averaged over heads, is split per layer into the share on the text before the image ("system": ``<s>USER:``), on
the image tokens, on the instruction (from after the image to ``ASSISTANT:``) and on the response generated so far;
shares are averaged over the scenes still generating at that step. Writes ``drift.json`` and ``drift.png``
(default: ``MODEL/eval``). DyRate's premise is that the image share falls as the answer grows.

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
#: segments of the prompt + response that --drift splits the attention into, in sequence order
SEGMENTS = ("system", "image", "instruction", "response")
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


def segment_ids(input_ids: torch.Tensor, image_token_id: int, length: int) -> torch.Tensor:
    """(length,) segment index (into SEGMENTS) of each position of a sequence whose prompt is ``input_ids``
    (prompt tokens,) with one contiguous run of image tokens; positions past the prompt are the response."""
    image = (input_ids == image_token_id).nonzero().flatten()
    if image.numel() == 0:
        raise ValueError("drift: the prompt has no image tokens")
    out = torch.full((length,), SEGMENTS.index("response"))
    out[: image[0]] = SEGMENTS.index("system")
    out[image[0] : image[-1] + 1] = SEGMENTS.index("image")
    out[image[-1] + 1 : input_ids.numel()] = SEGMENTS.index("instruction")
    return out


def drift_report(model, processor, scenes: int = DEFAULT_SCENES, seed: int = 0,
                 max_new_tokens: int = T.MAX_DESCRIPTION_TOKENS) -> dict:
    """{"segments", "layers", "share": (steps, layers, segments) nested lists of mean attention shares, "scenes_at_step":
    scenes still generating at each step, "scenes", "ended"} over the first ``scenes`` test scenes (see the module
    docstring). The model must run eager attention (it returns the probabilities)."""
    from .evaluate import describe_records, image_size_of

    records, images = describe_records(scenes, seed, image_size_of(processor))
    eos = processor.tokenizer.eos_token_id
    layers = model.config.text_config.num_hidden_layers
    totals = torch.zeros(max_new_tokens, layers, len(SEGMENTS), dtype=torch.float64)
    counts = torch.zeros(max_new_tokens, dtype=torch.long)
    ended = 0
    for record in records:
        inputs = processor(images=images[record["image"]], text=T.PROMPT.format(question=record["question"]),
                           return_tensors="pt")
        prompt = inputs["input_ids"][0]
        segments = segment_ids(prompt, model.config.image_token_id, prompt.numel() + max_new_tokens)
        ids = prompt[None]  # (1, tokens so far); every step re-runs the whole sequence (no cache: any transformers)
        for step in range(max_new_tokens):
            with torch.no_grad():
                output = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                               use_cache=False, output_attentions=True)
            if output.attentions[0] is None:
                raise RuntimeError("drift needs attention probabilities: load the model with attn_implementation='eager'")
            keys = ids.shape[1]
            # per layer: (1, heads, queries, keys) -> last query, mean over heads -> (keys,)
            last = torch.stack([a[0, :, -1].mean(0) for a in output.attentions]).double()  # (layers, keys)
            share = torch.zeros(layers, len(SEGMENTS), dtype=torch.float64).index_add_(1, segments[:keys], last)
            totals[step] += share
            counts[step] += 1
            token = output.logits[0, -1].argmax()
            if token.item() == eos:
                ended += 1
                break
            ids = torch.cat([ids, token.view(1, 1)], 1)
    steps = int((counts > 0).sum())
    share = totals[:steps] / counts[:steps, None, None]
    return {"segments": list(SEGMENTS), "layers": layers, "share": share.tolist(), "scenes_at_step": counts[:steps].tolist(),
            "scenes": len(records), "ended": ended / len(records)}


def plot_drift(report: dict, path) -> None:
    """One panel per layer: each segment's attention share against the generated step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = np.asarray(report["share"])  # (steps, layers, segments)
    figure, axes = plt.subplots(1, report["layers"], figsize=(3.2 * report["layers"], 3.4), dpi=110, sharey=True)
    for layer, axis in enumerate(np.atleast_1d(axes)):
        for k, name in enumerate(report["segments"]):
            axis.plot(np.arange(share.shape[0]), share[:, layer, k], label=name)
        axis.set_title(f"layer {layer}")
        axis.set_xlabel("generated step")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("attention share of the last query")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    figure.suptitle(f"attention while describing ({report['scenes']} test scenes; mean over heads and scenes)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder with training_log.json")
    parser.add_argument("--scenes", type=int, default=DEFAULT_SCENES)
    parser.add_argument("--drift", action="store_true", help="attention shares while describing (see above)")
    parser.add_argument("--out", default=None, help="--drift: output folder (default: MODEL/eval)")
    args = parser.parse_args(argv)
    if args.drift:
        if not (Path(args.model) / "config.json").is_file():
            raise SystemExit(f"{args.model}: no config.json (train one with `make toy-model`)")
        model = LlavaForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager").eval()
        report = drift_report(model, AutoProcessor.from_pretrained(args.model), args.scenes)
        out = Path(args.out) if args.out else Path(args.model) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "drift.json").write_text(json.dumps(report, indent=1))
        plot_drift(report, out / "drift.png")
        image = SEGMENTS.index("image")
        for step in sorted({0, len(report["share"]) // 2, len(report["share"]) - 1}):
            shares = " ".join(f"{100 * layer[image]:.1f}" for layer in report["share"][step])
            print(f"step {step:3d} ({report['scenes_at_step'][step]} scenes): image share per layer {shares} %")
        print(f"wrote {out / 'drift.json'} and {out / 'drift.png'}")
        return
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
