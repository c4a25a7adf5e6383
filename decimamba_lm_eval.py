"""lm-evaluation-harness (lm-eval 0.4.x) model "decimamba": our Mamba / DeciMamba behind lm-eval's
HFLM, as lm-eval's own ``mamba_ssm`` wrapper (lm_eval/models/mamba_lm.py) puts mamba-ssm there.

    python decimamba_lm_eval.py --model decimamba \\
        --model_args pretrained=checkpoints/passkey_small_deci,tokenizer=data/gpt-neox-20b,decimating_layers=[3],decimation_beta=0.5,L_base=500 \\
        --device cpu --tasks niah_single_1 --metadata '{"max_seq_lengths":[2048]}' --limit 20 --output_path out/

This file takes lm-eval's own command line unchanged (``lm_eval --help``): lm-eval 0.4.x looks
models up only in its own registry (no plugin entry points), so the plain ``lm_eval`` command
cannot know "decimamba" until this module is imported; running it registers the model and then
calls lm-eval's CLI. From Python: ``import decimamba_lm_eval`` and then
``lm_eval.simple_evaluate(model="decimamba", model_args={...})``.

model_args (besides HFLM's: device, dtype, batch_size, max_length, ...):
    pretrained          checkpoint directory or hub id, mamba_ssm or transformers format
    tokenizer           tokenizer.json, a directory holding one, or a hub id; default: the
                        checkpoint's tokenizer.json, else the bundled GPT-NeoX-20B (data/)
    decimating_layers   e.g. [3] or [10,14]: DecimatingMambaModel with decimation on; empty or
                        absent: the vanilla model
    decimation_beta, L_base, decimation_min_seq_len   the decimation rule (README "Decimation rule")
    protect_tail        prompt tokens never decimated in generate_until (default 1: the last one,
                        as the passkey and SQuAD tasks generate)
    prefill_chunk_size  stream generate_until prompts through prefill (models/streaming.py)
    scan_backend        "auto" | "torch" | "kernel" (HFLM's own ``backend`` means causal/seq2seq)

loglikelihood protects the continuation: the scored tokens are the model's protected tail
(``num_last_tokens`` = continuation length), so decimation only drops context tokens, as the
perplexity tasks score; with decimation on each request runs alone (no padding in a batch).
"""
from __future__ import annotations

import ast
import os
import sys
from types import SimpleNamespace

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:          # lm-eval is an optional extra
    raise ImportError(f"decimamba_lm_eval needs lm-eval: pip install 'lm-eval[hf,ruler]==0.4.*' ({exc})") from exc

from custom_datasets.sources import BUNDLED_TOKENIZER, GPT_NEOX
from models import DecimatingMambaModel, MambaLMHeadModel
from models.generation import sample_next
from models.hub import resolve_file
from models.streaming import streaming_prefill

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_layers(value) -> list[int]:
    """[3, 5], 3, "[3,5]", "3;5" or "3 5" -> [3, 5]."""
    if value is None or value == "":
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        text = value.strip()
        try:
            value = ast.literal_eval(text) if text.startswith("[") else [int(v) for v in text.replace(";", " ").split()]
        except (ValueError, SyntaxError):
            raise ValueError(f"decimating_layers={value!r} is not valid; pass layer indices like [3] or [10,14]") from None
        if isinstance(value, int):
            value = [value]
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"decimating_layers={value!r} is not valid; pass layer indices like [3] or [10,14]")
    return list(value)


def tokenizer_file(tokenizer, pretrained: str) -> str:
    """The tokenizer.json to use (see the module docstring)."""
    if tokenizer in (None, ""):
        own = os.path.join(pretrained, "tokenizer.json")
        return own if os.path.isfile(own) else BUNDLED_TOKENIZER
    if os.path.isfile(tokenizer):
        return tokenizer
    if os.path.isdir(tokenizer) and os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
        return os.path.join(tokenizer, "tokenizer.json")
    if tokenizer == GPT_NEOX and os.path.isfile(BUNDLED_TOKENIZER):
        return BUNDLED_TOKENIZER
    hint = "a tokenizer.json or a directory holding one (model_args tokenizer=PATH)"
    path = resolve_file(tokenizer, "tokenizer.json", None, "tokenizer", hint)
    if path is None:
        raise FileNotFoundError(f"tokenizer {tokenizer!r} has no tokenizer.json; pass {hint}")
    return path


@register_model("decimamba")
class DeciMambaLM(HFLM):
    def __init__(self, pretrained: str, decimating_layers=None, decimation_beta: float = 0.5, L_base: float = 2000,
                 decimation_min_seq_len: int = 20, protect_tail: int = 1, prefill_chunk_size: int | None = None,
                 scan_backend: str = "auto", **kwargs) -> None:
        if kwargs.get("backend", "causal") != "causal":
            raise ValueError(f"backend={kwargs['backend']!r}: DeciMamba is a causal LM; use backend=causal")
        if not (isinstance(protect_tail, int) and protect_tail >= 1):
            raise ValueError(f"protect_tail={protect_tail!r} must be an integer >= 1")
        layers = parse_layers(decimating_layers)
        self._deci = dict(activate=bool(layers), decimating_layers=layers, beta=decimation_beta, L_base=L_base,
                          min_seq_len=decimation_min_seq_len, type="max_p", record_debug_params=False)
        self._protect_tail, self._prefill_chunk = protect_tail, prefill_chunk_size
        self._scan_backend = scan_backend
        self._resp_len = None               # continuation length protected by _model_call
        kwargs.pop("backend", None)
        if kwargs.get("device") is None:
            kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, backend="causal", max_length=kwargs.pop("max_length", 1 << 20),
                         **kwargs)

    @property
    def decimating(self) -> bool:
        return bool(self._deci["activate"])

    # ---------------------------------------------------------------- construction (HFLM hooks)
    def _get_config(self, pretrained: str, **kwargs) -> None:
        self._config = SimpleNamespace(model_type="decimamba", name_or_path=pretrained)

    def _create_tokenizer(self, pretrained, tokenizer, **kwargs) -> None:
        from transformers import PreTrainedTokenizerFast

        if not isinstance(tokenizer, (str, type(None))):
            return super()._create_tokenizer(pretrained, tokenizer, **kwargs)
        path = tokenizer_file(tokenizer, pretrained)
        tok = PreTrainedTokenizerFast(tokenizer_file=path)
        for special in ("<|endoftext|>", "</s>"):        # GPT-NeoX's end of text, else a common one
            if special in tok.get_vocab():
                tok.eos_token = special
                break
        tok.name_or_path = tokenizer or path
        self.tokenizer = tok

    def _create_model(self, pretrained: str, dtype="auto", **kwargs) -> None:
        if dtype in ("auto", None):
            torch_dtype = torch.float32
        elif isinstance(dtype, torch.dtype):
            torch_dtype = dtype
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise ValueError(f"dtype={dtype!r} is not valid; choose one of {sorted(DTYPES)} or auto")
        cls = DecimatingMambaModel if self.decimating else MambaLMHeadModel
        model = cls.from_pretrained(pretrained, device=self._device, dtype=torch_dtype,
                                    decimation_config=self._deci if self.decimating else None,
                                    backend=self._scan_backend)
        model.tie_weights = lambda *a, **k: None         # HFLM calls it; ours ties in __init__
        self._model = model

    def get_model_info(self) -> dict:
        if os.path.isdir(str(self.pretrained)):         # a local checkpoint: no hub look-up
            return {"model_num_parameters": self._model.num_parameters(),
                    "model_dtype": str(self._model.backbone.embedding.weight.dtype), "model_revision": "",
                    "model_sha": ""}
        return super().get_model_info()

    # ---------------------------------------------------------------- loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if not self.decimating:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests"):
            self._resp_len = len(req[2])                 # the continuation: the protected tail
            try:
                out += super()._loglikelihood_tokens([req], disable_tqdm=True, override_bs=1)
            finally:
                self._resp_len = None
        return out

    def _model_call(self, inps, attn_mask=None, labels=None):
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            if self._resp_len:
                return self.model(inps, num_last_tokens=min(self._resp_len, inps.shape[1])).logits
            return self.model(inps).logits

    # ---------------------------------------------------------------- generate_until
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """Each row alone (left padding stripped: a Mamba has no attention mask), the last
        ``protect_tail`` prompt tokens protected, stopping at EOS or a stop string."""
        mask = generation_kwargs.pop("attention_mask", None)
        sampling = dict(top_k=1, top_p=0.0, temperature=1.0)
        temperature = float(generation_kwargs.get("temperature", 1.0))
        if generation_kwargs.get("do_sample") and temperature > 0:
            sampling = dict(top_k=int(generation_kwargs.get("top_k") or 0),
                            top_p=float(generation_kwargs.get("top_p") or 0.0), temperature=temperature)
        n_new = max(1, max_length - context.shape[1])
        eos = self.eot_token_id
        rows = []
        for i in range(context.shape[0]):
            ids = context[i:i + 1] if mask is None else context[i:i + 1, mask[i].bool()]
            rows.append(self._generate_row(ids, n_new, stop, eos, sampling))
        width = max(len(r) for r in rows)
        pad = eos if eos is not None else 0
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=context.dtype, device=context.device)
        return torch.cat([context, new], dim=1)

    @torch.no_grad()
    def _generate_row(self, ids, n_new: int, stop: list[str], eos, sampling) -> list[int]:
        model = self.model
        caches = model.allocate_inference_cache()
        tail = min(self._protect_tail, ids.shape[1])
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            if self._prefill_chunk:
                logits = streaming_prefill(model, ids, self._prefill_chunk, tail, caches).logits[:, -1]
            else:
                logits = model(ids, num_last_tokens=tail, caches=caches).logits[:, -1]
            out: list[int] = []
            for step in range(n_new):
                tok = sample_next(logits, **sampling)
                out.append(int(tok))
                if int(tok) == eos or (stop and any(s in self.tok_decode(out) for s in stop)):
                    break
                if step < n_new - 1:
                    logits = model.step(tok[:, None], caches)[:, -1]
        return out


def main(argv=None) -> None:
    """lm-eval's own command line, with "decimamba" registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
