"""``dymu``: the lmms-eval model (``lmms-eval --model dymu --model_args pretrained=DIR,method=SPEC``).

A LLaVA-1.5 or LLaVA-OneVision checkpoint (``dymu.models.load_model``) with a method of :mod:`dymu.evaluation.settings`
applied through ``dymu.apply``, answering lmms-eval's ``generate_until`` requests in left-padded batches of ``batch_size`` with stock
``generate`` (greedy unless the task asks to sample). Prompts are built as lmms-eval's own ``llava_hf`` builds them
(``<image>`` lines before the task's text, the tokenizer's chat template), so ``method=full`` answers as it does.

Per sample it records, in the journal ``responses`` (JSON lines, one per answered request, flushed as written):
the answer, the visual tokens the language model got, prefill FLOPs of the method and unmerged (:mod:`.costs`) and
the batch's seconds per sample. A request already in the journal is not generated again (a killed run resumes);
the journal's header ties it to the model and method, and another one is refused in one line.
Under ``accelerate launch`` / ``torchrun`` each process writes its own journal (``responses.rank{N}``); all are read
on resume.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from ..errors import DymuError
from .settings import parse_method
from .vlm import load_vlm

IMAGE_TOKEN = "<image>"
#: lmms-eval's llava_hf defaults, kept so that ``method=full`` answers as it does
DEFAULT_MAX_NEW_TOKENS = 1024
#: llava_hf's prompt for a tokenizer without a chat template (Vicuna, LLaVA-1.5's own)
VICUNA_CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an "
                        "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers "
                        "to the user's questions. USER: {{ message['content'] }} {% elif message['role'] == 'user' %}"
                        "USER: {{ message['content'] }} {% else %} ASSISTANT: {{ message['content'] }}{{ eos_token }}"
                        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
JOURNAL_FORMAT = "dymu-eval-responses"
JOURNAL_VERSION = 1


def request_key(task: str, split: str, doc_id: int, context: str, gen_kwargs: dict) -> str:
    """The identity of one request in a journal: its task, document and exact prompt and generation settings."""
    text = json.dumps([task, split, int(doc_id), context, gen_kwargs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class DymuLMM(lmms):
    """lmms-eval model: ``pretrained`` (checkpoint folder or hub id), ``method`` (``full``, ``dymu-mid``,
    ``fastv:k=2,r=0.5``, ...; quote a spec with commas inside ``--model_args``: ``method='fastv:k=2,r=0.5'``), ``vtu``,
    ``batch_size``, ``device`` (cpu), ``dtype`` (checkpoint's), ``chat_template``, ``responses`` (journal path)."""

    is_simple = True

    def __init__(self, pretrained: str, method: str = "full", vtu: str = "fast", batch_size: int = 1,
                 device: str = "cpu", dtype: str | None = None, chat_template: str | None = None,
                 responses: str | None = None, progress: bool = True, model=None, processor=None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise DymuError(f"--model_args: unknown option(s) {', '.join(sorted(unknown))} for the dymu model (known: "
                            "pretrained, method, vtu, batch_size, device, dtype, chat_template, responses)")
        self.setting = parse_method(str(method).strip("'\""), pretrained, vtu)
        if model is None:
            model, processor = load_vlm(pretrained, getattr(torch, dtype) if dtype else None)
        self._model, self.processor = model.to(device).eval(), processor
        self.tokenizer = processor.tokenizer
        self.chat_template = chat_template
        self.pretrained = str(pretrained)
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise DymuError(f"batch_size must be >= 1, got {batch_size}")
        self._device = torch.device(device)
        self.progress = progress
        self.description = self.setting.spec  # the progress bar's label (the runner adds the task)
        self._setup_processes()
        self.samples: dict[str, dict] = {}
        self.journal = None
        if responses:
            self._open_journal(Path(responses))
        self._apply()

    # ------------------------------------------------------------------ lmms-eval's interface
    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def loglikelihood(self, requests):
        raise DymuError("the dymu model answers generate_until tasks (loglikelihood tasks are not supported yet)")

    def generate_until_multi_round(self, requests):
        raise DymuError("the dymu model answers single-round generate_until tasks")

    def generate_until(self, requests) -> list[str]:
        """Answers in request order; requests already in the journal are taken from it."""
        args = [request.args for request in requests]
        keys = [request_key(a[4], a[5], a[3], a[0], a[1]) for a in args]
        pending = [i for i, key in enumerate(keys) if key not in self.samples]
        groups: dict[str, list[int]] = {}
        for i in pending:  # one batch holds one task and one set of generation settings
            groups.setdefault(json.dumps([args[i][4], args[i][1]], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), initial=len(requests) - len(pending), desc=self.description,
                   unit="sample", disable=not self.progress or self.rank != 0, leave=False)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                for i, record in zip(batch, self._answer([args[i] for i in batch])):
                    record.update(key=keys[i], task=args[i][4], doc_id=int(args[i][3]))
                    self.samples[keys[i]] = record
                    if self.journal is not None:
                        self.journal.write(record)
                bar.update(len(batch))
        bar.close()
        return [self.samples[key]["response"] for key in keys]

    # ------------------------------------------------------------------ generation
    def _answer(self, batch: list[tuple]) -> list[dict]:
        """Records (response, visual_tokens, flops, stock_flops, seconds) for one batch of request args."""
        from ..llava import model_inputs
        from .costs import batch_costs

        contexts, gen_kwargs, to_visual, doc_ids, task, split = zip(*batch)
        visuals = [list(to_visual[0](self.task_dict[task[0]][split[0]][doc_id])) for doc_id in doc_ids]
        prompts = [self.prompt(context, len(images)) for context, images in zip(contexts, visuals)]
        started = time.perf_counter()
        inputs = model_inputs(self.model, self.processor, [image for images in visuals for image in images] or None,
                              prompts)
        kwargs, until = self.generation_settings(dict(gen_kwargs[0]))
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        seconds = (time.perf_counter() - started) / len(batch)
        costs = batch_costs(self.model, inputs["input_ids"], inputs["attention_mask"], [len(v) for v in visuals],
                            self.setting.vtu, inputs.get("image_sizes"), inputs.get("batch_num_images"))
        return [{"response": cut_at(text, until), "seconds": seconds, **cost} for text, cost in zip(texts, costs)]

    def prompt(self, context: str, images: int) -> str:
        """The prompt as lmms-eval's llava_hf builds it: ``<image>`` lines before the text unless it has them, then
        the chat template (``chat_template``, the tokenizer's, else Vicuna's)."""
        if IMAGE_TOKEN not in context and images:
            context = " ".join([IMAGE_TOKEN] * images) + "\n" + context
        messages = [{"role": "user", "content": context}]
        template = self.chat_template or self.tokenizer.chat_template or VICUNA_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)

    def generation_settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """(``generate`` keywords, stop strings) from a task's generation_kwargs, with llava_hf's defaults."""
        until = gen_kwargs.pop("until", [])
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        sample = temperature > 0
        eos = self.tokenizer.eos_token_id
        kwargs = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), "do_sample": sample,
                  "num_beams": int(gen_kwargs.get("num_beams", 1) or 1), "pad_token_id": eos, "eos_token_id": eos}
        if sample:
            kwargs.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
        return kwargs, until

    # ------------------------------------------------------------------ set-up
    def _apply(self) -> None:
        import dymu

        dymu.remove(self.model)
        if not self.setting.is_full:
            dymu.apply(self.model, **self.setting.apply)

    def _setup_processes(self) -> None:
        """Rank and world size under ``accelerate launch --multi_gpu`` or ``torchrun`` (on CPU: gloo); one process
        otherwise. Taken from torch.distributed's process group: lmms-eval's CLI creates its ``Accelerator()`` first,
        and on a machine without GPUs accelerate's state then says one process (``DistributedType.NO``, index 0) in
        every process although the group spans all of them."""
        import torch.distributed as dist
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=self._device.type == "cpu")  # joins (or starts: gloo on CPU) the group
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        else:
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes

    def journal_header(self) -> dict:
        from ..files import model_fingerprint

        return {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "model": self.pretrained,
                "fingerprint": model_fingerprint(self.model), "method": self.setting.spec, "vtu": self.setting.vtu}

    def _open_journal(self, path: Path) -> None:
        """Read every process's journal of ``path`` into ``self.samples``; open this process's for appending."""
        from ..journal import Appender, read_journal

        header = self.journal_header()

        def check(found: dict) -> None:
            if found.get("format") != JOURNAL_FORMAT:
                raise DymuError(f"{path}: not a dymu eval responses file; it was left unchanged")
            for field in ("version", "fingerprint", "method", "vtu"):
                if found.get(field) != header[field]:
                    raise DymuError(f"{path}: its responses were made with another {field} ({found.get(field)!r}, "
                                    f"now {header[field]!r}); use another --out or delete the folder")

        own = path if self.rank == 0 else path.with_name(f"{path.name}.rank{self.rank}")
        for journal in sorted(path.parent.glob(f"{path.name}*")):
            if journal.name == path.name or journal.name.startswith(f"{path.name}.rank"):
                if journal.suffix == ".lock":
                    continue
                self.samples.update((row["key"], row) for row in read_journal(journal, "responses file", check)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        self.journal = Appender(own, None if own.is_file() else header)


def cut_at(text: str, until: list[str]) -> str:
    """``text`` up to the first of the stop strings (lmms-eval's ``until``)."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text
