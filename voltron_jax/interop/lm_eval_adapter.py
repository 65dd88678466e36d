"""lm-evaluation-harness model `voltron`: any harness task, k-shot, over a voltron_jax checkpoint.

    import lm_eval, voltron_jax.interop.lm_eval_adapter      # importing registers the model 'voltron'
    lm_eval.simple_evaluate(model="voltron", model_args="workdir=runs/demo,batch_size=16",
                            tasks=["hellaswag"], num_fewshot=5)
    python -m voltron_jax.experiments.evaluate --workdir=runs/demo --tasks=hellaswag --num_fewshot=5
    voltron-lm-eval --model voltron --model_args workdir=runs/demo --tasks hellaswag --num_fewshot 5
        # lm_eval's own command line with 'voltron' registered (console script; `main` says why plain
        # `lm_eval` cannot find it); the same: python -m voltron_jax.interop.lm_eval_adapter run ...

`workdir` is anything `voltron_jax.load` accepts (model_args also: step, batch_size, max_length). The three
request kinds, each in batches of `batch_size` rows sorted by length (one compile per padded width: rows
are padded to a multiple of the run's data.seq_len, as `Model.score` does):
  loglikelihood(context, continuation): sum of the continuation tokens' log-probabilities and whether
    each is the argmax, every row starting with the vocabulary's document boundary id (`eos_id`: what
    the model saw before every document in training, BOS for an imported HF checkpoint) as `score` does,
    so the numbers equal `Model.score`'s; the pair is encoded as lm-eval's HF model does (context +
    continuation encoded whole, the continuation = the tokens past the context's; trailing spaces of
    the context move to the continuation); rows longer than max_length + 1 lose their oldest context.
  loglikelihood_rolling(text): the text's total log-likelihood over disjoint windows of max_length
    tokens (lm_eval.utils.get_rolling_token_windows, the boundary id as the prefix token).
  generate_until(context, gen_kwargs): KV-cache decoding (voltron_jax/inference/generate.py) of up to
    max_gen_toks tokens (temperature from gen_kwargs, 0 = greedy; do_sample=False forces greedy), the
    text cut at the first `until` string, generation ending at the boundary id or the tokenizer's EOS.
max_length defaults to the run's data.seq_len (the context the model was trained on).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from voltron_jax.inference import api, generate


@functools.partial(jax.jit, static_argnums=(0,))
def _token_logprobs(model, params, ids, valid):
    """(log p of ids[:,1:] given the prefix, whether each is the argmax) [B,T-1] in fp32."""
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits = model.apply({"params": params}, ids, positions, None, valid)[:, :-1].astype(jnp.float32)
    target = ids[:, 1:]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[..., None], axis=-1)[..., 0]
    return logp, jnp.argmax(logits, -1) == target


@register_model("voltron")
class VoltronLM(LM):
    """lm_eval model over `voltron_jax.load(workdir, step)` (or a loaded `model=`)."""

    def __init__(
        self,
        workdir: str | None = None,
        step: int | None = None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        model=None,
        **unused,  # lm_eval passes max_batch_size / device; JAX places the model itself
    ):
        super().__init__()
        if model is None:
            if not workdir:
                raise ValueError("model 'voltron' needs model_args workdir=<run folder>.")

            model = api.load(workdir, step=None if step in (None, "") else int(step))
        self.model = model
        self.batch_size = 8 if batch_size in (None, "auto") else int(batch_size)
        self.max_length = int(max_length or model.config.data.seq_len)
        self.pad_multiple = model.config.data.seq_len
        self.boundary = int(model.vocab.eos_id)
        hf_eos = getattr(model.vocab, "hf_eos_id", None)
        self.stop_ids = {self.boundary} | ({int(hf_eos)} if hf_eos is not None else set())

    # ------------------------------------------------------------------ scoring

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.model.encode(context + continuation)
        ctx = self.model.encode(context)
        return ctx, whole[len(ctx) :]

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p of the continuation ids, all greedy) per (context ids, continuation ids); each row
        is [boundary, *context, *continuation] cut to its last max_length + 1 tokens."""
        rows = [[self.boundary, *c, *x][-(self.max_length + 1) :] for c, x in pairs]
        return self.score_rows(rows, [len(x) for _, x in pairs])

    def score_rows(self, rows: list[list[int]], n_cont: list[int]) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) of the last n_cont[i] ids of rows[i] given the ids before them."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            width = -(-max(len(rows[i]) for i in idx) // self.pad_multiple) * self.pad_multiple
            ids, valid = generate.pad_rows([rows[i] for i in idx], width)
            logp, greedy = jax.device_get(
                _token_logprobs(
                    self.model.train_model, self.model.params, jnp.asarray(ids), jnp.asarray(valid)
                )
            )
            for j, i in enumerate(idx):
                end = len(rows[i]) - 1  # the target at row position p + 1 is scored at p
                lo = end - n_cont[i]
                out[i] = (float(np.sum(logp[j, lo:end], dtype=np.float64)), bool(np.all(greedy[j, lo:end])))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score_pairs([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Disjoint windows as lm-eval's HF model scores them: the first starts with the boundary id (the
        prefix token), later ones with the preceding tokens as context, each row at most max_length + 1."""
        from lm_eval.utils import (  # lazy: optional [interop] package
            get_rolling_token_windows,
            make_disjoint_window,
        )

        rows, n_cont, owner = [], [], []
        for n, r in enumerate(requests):
            windows = get_rolling_token_windows(
                token_list=self.model.encode(r.args[0]),
                prefix_token=self.boundary,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, windows):
                rows.append([*ctx, *cont])
                n_cont.append(len(cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self.score_rows(rows, n_cont), strict=True):
            totals[n] += ll
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for members in groups.values():
            kw = dict(requests[members[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", 256))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            keep = max(1, self.max_length - max_new)
            for s in range(0, len(members), self.batch_size):
                idx = members[s : s + self.batch_size]
                prompts = [self.model.encode(requests[i].args[0])[-keep:] for i in idx]
                gen = generate.generate_ids(
                    self.model.decode_model,
                    self.model.train_model,
                    self.model.params,
                    prompts,
                    max_new,
                    temperature=temperature,
                    eos_id=self.boundary,
                    pad_multiple=self.pad_multiple,
                    stop_ids=sorted(self.stop_ids),
                )
                for i, ids in zip(idx, gen, strict=True):
                    text = self.model.decode(ids)
                    for u in until:
                        text = text.split(u)[0] if u else text
                    out[i] = text
        return out


def run_tasks(
    model,
    tasks: list[str],
    num_fewshot: int | None = None,
    include_path: str | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm_eval.simple_evaluate over `model` (a loaded voltron_jax Model or
    anything voltron_jax.load accepts); `include_path`: a folder of local task YAMLs."""
    import lm_eval  # lazy: optional [interop] package
    from lm_eval.tasks import TaskManager  # lazy: optional [interop] package

    lm = VoltronLM(
        model=model if not isinstance(model, str) else None,
        workdir=model if isinstance(model, str) else None,
        batch_size=batch_size,
        max_length=max_length,
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        task_manager=TaskManager(include_path=include_path) if include_path else TaskManager(),
        limit=limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != "alias"}
        for task, metrics in out["results"].items()
    }


def main() -> None:
    """`voltron-lm-eval` (console script): lm_eval's own command line, the same arguments as `lm_eval`,
    with the model 'voltron' registered. Plain `lm_eval --model voltron` cannot find it: lm-eval 0.4.13
    resolves a model name only through its registry, which holds its own table (lm_eval/models/__init__.py
    MODEL_MAPPING) and the classes of modules already imported; it reads no entry-point group, takes no
    module path as a model name and imports no plugin modules, so only a process that imported this
    module first (this command, or `python -m voltron_jax.interop.lm_eval_adapter`) knows 'voltron'."""
    from lm_eval.__main__ import cli_evaluate  # lazy: optional [interop] package

    cli_evaluate()


if __name__ == "__main__":
    main()
