"""The model "minigpt2" for EleutherAI's lm-evaluation-harness (0.4.x).

Importing this module registers it, then either of:

    minigpt2 lm-eval --model_args pretrained=out/run --tasks hellaswag
    lm_eval.simple_evaluate(model=MiniGPT2LM("out/run"), tasks=["hellaswag"])

`pretrained` is anything `sample.py --model` takes. Tokenizing follows the harness's own rules
(TemplateLM: trailing spaces of a context move to its continuation, an empty context becomes
end-of-text); scoring runs each distinct context once (evaluate.score_continuations), and
generation runs prompts of different lengths as one left-padded batch.
"""

from __future__ import annotations

import copy
import sys

import torch

from ..decode.generate import Generator, SamplingConfig
from ..decode.kernels import layout_for_inference
from ..device import resolve_device, resolve_dtype
from ..errors import MiniGPT2Error
from ..formats.loading import load_any, tokenizer_for
from ..model.gpt import GPT
from .scoring import score_continuations

try:
    from lm_eval import utils as lm_utils
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
except ImportError:  # the optional [eval] extra
    raise MiniGPT2Error(
        'lm-eval is not installed; pip install -e ".[eval]" (or pip install lm-eval)'
    ) from None

EOT_TEXT = "<|endoftext|>"  # the end-of-text as text: a stop sequence, as for the hf model


@register_model("minigpt2")
class MiniGPT2LM(TemplateLM):
    """A minigpt2 model (checkpoint, out_dir, released-layout directory or a GPT) for lm-eval."""

    def __init__(
        self,
        pretrained="out/quickstart",
        checkpoint: str = "best",
        tokenizer: str | None = None,
        batch_size: int | str = 8,
        device: str | None = "auto",
        dtype: str = "float32",
        max_gen_toks: int = 256,
        **_ignored,
    ) -> None:
        super().__init__()

        if isinstance(pretrained, GPT):  # a copy: the inference layout below is final
            model, header = copy.deepcopy(pretrained), None
        else:
            model, header = load_any(str(pretrained), checkpoint)
        source = None if isinstance(pretrained, GPT) else str(pretrained)
        self.tok = tokenizer_for(header, tokenizer, source, model.config.vocab_size)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # the harness asks for cuda:0 when no device is given; its hf model falls back too
            print(f"note: {device} is not available here; running on the CPU", file=sys.stderr)
            device = "cpu"
        self._device = resolve_device(device or "auto")
        model = model.to(self._device, resolve_dtype(dtype, self._device)).eval()
        self.model = layout_for_inference(model)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(log-probability, is greedy) of each ((context, continuation), ids, ids) request;
        requests with one context are scored together, the context run once."""
        order: dict[tuple, list[int]] = {}  # context ids -> request indices, first seen first
        for i, (_, ctx, _) in enumerate(requests):
            order.setdefault(tuple(ctx), []).append(i)
        groups = [(list(c), [requests[i][2] for i in idx]) for c, idx in order.items()]
        scores = score_continuations(self.model, groups, self.batch_size)
        out: list = [None] * len(requests)
        for idx, group in zip(order.values(), scores, strict=True):
            for i, s in zip(idx, group, strict=True):
                out[i] = (s.logprob, s.greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole string, in the harness's disjoint rolling windows."""
        spans, windows = [], []
        for (string,) in [r.args for r in requests]:
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            parts = [(None, *lm_utils.make_disjoint_window(w)) for w in rolling]
            spans.append((len(windows), len(windows) + len(parts)))
            windows += parts
        scores = self._loglikelihood_tokens(windows)
        out = [sum(s for s, _ in scores[a:b]) for a, b in spans]
        for r, value in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), value)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context up to a stop sequence, greedy unless asked to sample."""
        by_kwargs: dict[str, list[int]] = {}  # one batch setting per distinct gen_kwargs
        for i, r in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out: list = [None] * len(requests)
        for idx in by_kwargs.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            for start in range(0, len(idx), self.batch_size):
                part = idx[start : start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in part], dict(kwargs))
                for i, text in zip(part, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts: list[str], kwargs: dict) -> list[str]:
        until = handle_stop_sequences(kwargs.pop("until", None), eos=EOT_TEXT)
        new = kwargs.pop("max_gen_toks")
        if new >= self.max_length:
            raise MiniGPT2Error(f"max_gen_toks={new} leaves no room in the {self.max_length}")
        cfg = SamplingConfig(
            max_new_tokens=new,
            greedy=not kwargs.get("do_sample", False),
            temperature=float(kwargs.get("temperature", 1.0) or 1.0),
            top_k=int(kwargs.get("top_k", 0) or 0),
            top_p=float(kwargs.get("top_p", 1.0) or 1.0),
            stop_at_eot=True,
            eot_id=self.eot_token_id,
            seed=kwargs.get("seed"),
        )
        prompts = [
            (self.tok_encode(c) or [self.eot_token_id])[-(self.max_length - new) :]
            for c in contexts
        ]
        rows: list[list[int]] = [[] for _ in prompts]
        gen = Generator(self.model, vocab_limit=self.tok.vocab_size)
        for token in gen.stream(prompts, cfg):  # stop once every row has met a stop sequence
            for row, t in zip(rows, token.tolist(), strict=True):
                row.append(t)
            if all(self._stopped(row, until) for row in rows):
                break
        texts = [
            self.tok.decode(r[: r.index(self.eot_token_id)] if self.eot_token_id in r else r)
            for r in rows
        ]
        return [postprocess_generated_text(t, until, None) for t in texts]

    def _stopped(self, row: list[int], until: list[str]) -> bool:
        if self.eot_token_id in row:
            return True
        text = self.tok.decode(row)
        return any(s and s in text for s in until)


def _unreachable(error: BaseException | None) -> bool:
    """Whether error (or one it came from) is the Hub out of reach: offline, or blocked."""
    hub = ("huggingface_hub", "requests", "urllib3", "httpx", "httpcore")
    while error is not None:
        module = type(error).__module__.split(".")[0]
        if isinstance(error, (ConnectionError, TimeoutError)) or module in hub:
            return True
        if type(error).__name__ in ("DatasetNotFoundError", "OfflineModeIsEnabled"):
            return True
        error = error.__cause__ or error.__context__
    return False


def run_harness_cli(argv: list[str]) -> None:
    """lm-eval's own command line, with argv, and the minigpt2 model registered. A task whose
    data cannot be fetched is one line saying how to run a local task instead."""
    sys.argv = ["minigpt2 lm-eval", *argv]
    try:
        cli_evaluate()
    except Exception as e:
        if not _unreachable(e):
            raise
        raise MiniGPT2Error(
            f"lm-eval could not fetch the task's data from the Hugging Face Hub ({e}); without "
            "internet, run a local task: --include_path DIR --tasks NAME, with a task YAML in "
            "DIR whose dataset_path reads local files (e.g. dataset_path: json, dataset_kwargs: "
            "{data_files: ...})"
        ) from None
