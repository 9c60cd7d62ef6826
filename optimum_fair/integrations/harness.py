"""lm-evaluation-harness backend for diffusion LMs, registered as ``optimum-fair`` when this module is imported.

    import optimum_fair.integrations.harness   # registers the model name "optimum-fair" with lm-eval
    python -m optimum_fair.integrations.harness --model optimum-fair --model_args pretrained=DIR,mc_num=128 \\
        --tasks arc_easy --batch_size 32 --output_path out/      # lm-eval's own CLI, every flag unchanged

`DiffusionLM` scores any model this package supports (LLaDA, Dream, the shipped teacher; full precision or
quantized by optimum-fair; a path, a Hub id or a model object):

* ``loglikelihood``: the Monte-Carlo masked-diffusion estimate (`eval.likelihood`; estimator, mask id and
  logit shift from the architecture adapter), seeded per request by (seed, context tokens, target length),
  so a request scores the same in any order or batch, and the choices of one question share their draws.
  ``is_greedy`` is LLaDA's greedy check with ``check_greedy=true``, else False.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows, each scored by the same estimate (a bound:
  perplexities from it are upper bounds).
* ``generate_until``: this package's LLaDA / Dream samplers, ``batch_size`` prompts at a time, stop
  sequences (and the EOS text) cut afterwards.

Requests longer than ``max_length`` lose context tokens from the left (as lm-eval's HF backend does), with
one warning per call; a continuation that does not fit beside one context token raises.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..arch import get_adapter
from ..devices import default_device, execution_device
from ..enums import CacheMode
from ..eval.likelihood import greedy_matches, mc_loglikelihood
from ..modeling.kv_cache import check_cache_mode
from .harness_args import DTYPES, HarnessSettings, LoadArgs, merge_model_args, parse_model_args
from .harness_generate import generate_batch, generation_plan

logger = logging.getLogger(__name__)
MODEL_NAME = "optimum-fair"


def resolve_device(device: str | None) -> torch.device:
    """The device to load onto: ``device``, or cuda when a GPU is visible, else cpu. lm-eval's CLI passes
    ``cuda`` unless told otherwise; without a GPU that falls back to cpu with a warning (as its HF backend)."""
    if device is None:
        return default_device()
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s is not available: using cpu", device)
        return torch.device("cpu")
    return torch.device(device)


def load(args: LoadArgs) -> tuple[Any, Any, str]:
    """(model in eval mode, tokenizer, a name for the results) from `LoadArgs`."""
    from transformers import AutoTokenizer

    from ..data import resolve_tokenizer
    from .loading import load_pretrained

    if isinstance(args.pretrained, str):
        dtype = DTYPES[args.dtype] if isinstance(args.dtype, str) else args.dtype
        model = load_pretrained(args.pretrained, dtype=dtype, revision=args.revision,
                                trust_remote_code=args.trust_remote_code)
        model = model.to(resolve_device(args.device))
        # a tokenizer path gets the model's revision and trust_remote_code, as lm-eval's HFLM gives them
        tokenizer = args.tokenizer if args.tokenizer is not None and not isinstance(args.tokenizer, str) else \
            AutoTokenizer.from_pretrained(args.tokenizer or args.pretrained, revision=args.revision,
                                          trust_remote_code=args.trust_remote_code)
        return model.eval(), tokenizer, args.pretrained
    model = args.pretrained
    if args.device is not None:
        model = model.to(resolve_device(args.device))
    tokenizer = resolve_tokenizer(args.tokenizer, model)
    return model.eval(), tokenizer, type(model).__name__


def check_source(args: LoadArgs, settings: HarnessSettings) -> None:
    """pretrained= (and a tokenizer= path) exist as a folder or look like a Hub id, and the model's config gives
    a mask id inside its vocabulary: checked from config.json alone, before weights or tasks load."""
    from transformers import AutoConfig

    from ..naming import is_repo_id

    for arg, name in (("pretrained", args.pretrained), ("tokenizer", args.tokenizer)):
        if isinstance(name, str) and not os.path.exists(name) and not is_repo_id(name):
            raise ValueError(f"model_args {arg}={name}: no such folder, and not a Hub repo id ('namespace/name')")
    if os.path.isdir(args.pretrained) and not os.path.isfile(os.path.join(args.pretrained, "config.json")):
        raise ValueError(f"model_args pretrained={args.pretrained}: the folder has no config.json")
    config = AutoConfig.from_pretrained(args.pretrained, revision=args.revision,
                                        trust_remote_code=args.trust_remote_code)
    vocab = getattr(config, "vocab_size", None)
    resolve_mask_id(config, settings, args.pretrained, vocab if isinstance(vocab, int) else None)


def resolve_mask_id(config: Any, settings: HarnessSettings, name: str, vocab: int | None) -> int:
    """model_args mask_id, else the adapter's (config.mask_token_id or the release's), inside [0, vocab)."""
    try:
        mask_id = settings.mask_id if settings.mask_id is not None else get_adapter(config).mask_id(config)
    except ValueError as err:
        raise ValueError(f"pretrained={name} cannot be scored as a masked diffusion LM: {err} "
                         "(or pass model_args mask_id=...)") from None
    if vocab is not None and not 0 <= mask_id < vocab:
        raise ValueError(f"model_args mask_id={mask_id} is outside the vocabulary of pretrained={name} "
                         f"({vocab} token ids): give the id of its mask token")
    return mask_id


def max_length(config: Any, settings: HarnessSettings, name: str) -> int:
    """model_args max_length, else the model's maximum length, else 2048; warns beyond the model's maximum."""
    model_max = get_adapter(config).max_length(config)
    if settings.max_length is not None and model_max is not None and settings.max_length > model_max:
        logger.warning("model_args max_length=%d exceeds the maximum length of pretrained=%s (%d): windows longer "
                       "than the model was trained on are scored", settings.max_length, name, model_max)
    return settings.max_length or model_max or 2048


def request_seed(seed: int, context: list[int], target_len: int) -> int:
    """A 63-bit seed from the base seed, the context tokens and the target length (stable across runs)."""
    digest = hashlib.blake2b(repr((seed, context, target_len)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DiffusionLM(LM):
    """lm-eval model class for masked diffusion LMs (see the module docstring); model_args in
    `harness_args.LoadArgs` and `harness_args.HarnessSettings`."""

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        load_args, self.settings = parse_model_args(model_args)
        if isinstance(load_args.pretrained, str):  # what the config.json tells, before any weights load
            check_source(load_args, self.settings)
        self.model, self.tokenizer, self.name = load(load_args)
        if self.settings.cache is not CacheMode.NONE:  # a family without the cache: refused before any request
            check_cache_mode(self.model, self.settings.cache.value)
        adapter = get_adapter(self.model)
        vocab = self.model.get_input_embeddings().num_embeddings
        self.mask_id = resolve_mask_id(self.model.config, self.settings, self.name, vocab)
        self.adapter = adapter
        self.estimator = self.settings.estimator or adapter.likelihood
        self.max_length = max_length(self.model.config, self.settings, self.name)
        self._device = execution_device(self.model)
        self._truncated = 0

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> DiffusionLM:
        return cls(**merge_model_args(arg_dict, additional_config))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DiffusionLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- tokens --------------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self.tokenizer, name, None)
            if isinstance(value, int):
                return value
        raise ValueError("the tokenizer has no bos, eos or pad token to stand for an empty context")

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.name)).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, text: str) -> list[int]:
        # verbose=False: no "sequence length is longer than the specified maximum" warning, the requests are
        # cut to max_length (`fit`) or into windows (`loglikelihood_rolling`) before any forward
        return list(self.tokenizer(text, verbose=False)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context move to the continuation; the continuation's
        tokens are those of context + continuation after the context's; an empty context is one prefix token."""
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        return ctx, whole[len(ctx):]

    def fit(self, context: list[int], target: list[int]) -> tuple[torch.Tensor, int]:
        """(ids (seq,) on the model's device, prompt_len): context, target, optional EOS suffix, with the
        context cut from the left to fit ``max_length``."""
        suffix = [self.tokenizer.eos_token_id] if self.settings.eos_suffix else []
        if not target:
            raise ValueError("a loglikelihood request has an empty continuation: nothing to score")
        room = self.max_length - len(target) - len(suffix)
        if room < 1:
            raise ValueError(f"a continuation of {len(target)} tokens does not fit in max_length={self.max_length} "
                             "beside one context token; raise model_args max_length if the model allows it")
        if len(context) > room:
            context = context[-room:]
            self._truncated += 1
        return torch.tensor(context + target + suffix, dtype=torch.long, device=self.device), len(context)

    def _warn_truncated(self) -> None:
        if self._truncated:
            logger.warning("%d request(s) longer than max_length=%d: context cut from the left", self._truncated,
                           self.max_length)
            self._truncated = 0

    # -- scoring -------------------------------------------------------------------------------------
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits

    def score(self, context: list[int], target: list[int]) -> tuple[float, bool]:
        """(Monte-Carlo log-likelihood of target given context, is_greedy)."""
        ids, prompt_len = self.fit(context, target)
        s = self.settings
        generator = torch.Generator().manual_seed(request_seed(s.seed, ids[:prompt_len].tolist(), len(target)))
        common = dict(mask_id=self.mask_id, logit_shift=self.adapter.logit_shift, cfg=s.cfg)
        value = mc_loglikelihood(self._logits, ids, prompt_len, len(target), mc_num=s.mc_num, batch_size=s.batch_size,
                                 estimator=self.estimator, eps=s.sampling_eps, generator=generator, **common)
        greedy = s.check_greedy and greedy_matches(self._logits, ids, prompt_len, len(target), **common)
        return value, bool(greedy)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for request in tqdm(requests, desc="optimum-fair loglikelihood", disable=disable_tqdm):
            result = self.score(*self.encode_pair(*request.args))
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            out.append(result)
        self._warn_truncated()
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        window = self.max_length - 1 - int(self.settings.eos_suffix)
        out = []
        for request in tqdm(requests, desc="optimum-fair loglikelihood_rolling", disable=disable_tqdm):
            tokens = self.tok_encode(request.args[0])
            pairs = map(make_disjoint_window, get_rolling_token_windows(tokens, self.prefix_token_id, window, 1))
            total = sum(self.score(list(ctx), list(pred))[0] for ctx, pred in pairs)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            out.append(total)
        self._warn_truncated()
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        plans = [generation_plan(self, r.args[1]) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (repr(plans[i]), -len(requests[i].args[0])))
        bar = tqdm(total=len(requests), desc="optimum-fair generate_until", disable=disable_tqdm)
        start = 0
        while start < len(order):
            chunk = [order[start]]
            while (len(chunk) < self.settings.batch_size and start + len(chunk) < len(order)
                   and plans[order[start + len(chunk)]] == plans[chunk[0]]):
                chunk.append(order[start + len(chunk)])
            texts = generate_batch(self, [requests[i].args[0] for i in chunk], plans[chunk[0]])
            for i, text in zip(chunk, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            start += len(chunk)
            bar.update(len(chunk))
        bar.close()
        self._warn_truncated()
        return [text or "" for text in out]

    def get_model_info(self) -> dict[str, Any]:
        s = self.settings
        return {"optimum_fair_estimator": self.estimator.value, "mc_num": s.mc_num, "cfg": s.cfg,
                "seed": s.seed, "max_length": self.max_length}


def register() -> None:
    """Register `DiffusionLM` with lm-eval as ``optimum-fair`` (again: harmless)."""
    import lm_eval.models  # noqa: F401  lm-eval lists its own backends only into an empty registry
    from lm_eval.api.registry import model_registry, register_model

    current = model_registry.get(MODEL_NAME, None)
    if current is None:
        register_model(MODEL_NAME)(DiffusionLM)
    elif getattr(current, "__qualname__", None) != DiffusionLM.__qualname__:
        raise ValueError(f"lm-eval model name {MODEL_NAME!r} is already taken by {current!r}")


register()


def evaluate_tasks(pretrained: Any, tasks: list[str], *, include_path: str | None = None, limit: float | None = None,
                   output_path: str | None = None, **model_args: Any) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on one model through the registered backend; lm-eval's results dict.

    The offline ``fair_lee_*`` tasks are written to a temporary folder and always on the include path, beside
    ``include_path``; ``output_path`` gets lm-eval's usual results JSON (its EvaluationTracker).
    """
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from ..eval.tasks import write_tasks

    check_limit(limit)
    args = {"pretrained": pretrained, **{k: v for k, v in model_args.items() if v is not None}}
    load_args, settings = parse_model_args(args)  # every model_arg, before lm-eval indexes its tasks
    if isinstance(pretrained, str):
        check_source(load_args, settings)
    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    with tempfile.TemporaryDirectory(prefix="optimum-fair-tasks-") as tmp:
        paths = [str(write_tasks(tmp))] + ([include_path] if include_path else [])
        results = simple_evaluate(model=MODEL_NAME, model_args=args, tasks=tasks, limit=limit,
                                  task_manager=TaskManager(include_path=paths), evaluation_tracker=tracker)
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=None)
    return results


def check_limit(limit: float | None) -> None:
    """lm-eval's --limit: None, a fraction in (0, 1) or a whole number of items >= 1."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not (
            0 < limit < 1 or (limit >= 1 and float(limit).is_integer())):
        raise ValueError(f"limit must be a fraction in (0, 1) or a whole number of items >= 1, got {limit!r}")


_BATCH_FLAGS = ("--batch_size", "-b", "--config", "-C")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own CLI with the ``optimum-fair`` model registered: ``python -m optimum_fair.integrations.harness
    --model optimum-fair --model_args pretrained=... --tasks ...``.

    Without --batch_size (nor a --config file), lm-eval's CLI would pass its own default, 1, as the Monte-Carlo
    batch; this backend's default (`HarnessSettings.batch_size`, 32) is passed instead, as from Python."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    ours = any(a == MODEL_NAME and i and argv[i - 1] == "--model" for i, a in enumerate(argv)) or \
        f"--model={MODEL_NAME}" in argv
    if ours and not any(a.split("=", 1)[0] in _BATCH_FLAGS for a in argv):
        argv += ["--batch_size", str(HarnessSettings.batch_size)]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
