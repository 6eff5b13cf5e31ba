"""seqmix language models as Hugging Face transformers models (``pip install seqmix[hf]``).

Importing this module registers ``model_type="seqmix"`` with ``AutoConfig``, ``AutoModelForCausalLM`` and
``AutoTokenizer``. A seqmix model directory (``runs/<run>/model``: ``config.json`` + ``model.safetensors``,
written by :meth:`LanguageModel.save_pretrained`) is then a transformers checkpoint as it stands::

    import seqmix.hf  # noqa: F401  (the registration)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained("runs/tiny/model")
    tokenizer = AutoTokenizer.from_pretrained("runs/tiny/model")
    pipeline("text-generation", model=model, tokenizer=tokenizer)("def main(", max_new_tokens=40)

:func:`export` writes a directory that also loads without importing seqmix first
(``trust_remote_code=True``, e.g. lm-evaluation-harness's ``hf`` model from the command line).

The model's parameters are those of :class:`~seqmix.archs.lm.LanguageModel` under the same names, so the
weights file is the same for both; its generation cache is the mixers' states (:class:`SeqmixCache`):
the prompt is prefilled once and each new token is one step, as in :meth:`LanguageModel.generate`.
docs/design.md, "Generation and Hugging Face models", gives the reasons.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizer,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import ModelOutput

from seqmix.archs.lm import CONFIG_FILE, MODEL_TYPE, WEIGHTS_FILE, LanguageModel, LMConfig, read_config
from seqmix.archs.mixer import State
from seqmix.data import BOS, EOS, PAD, decode
from seqmix.generate import resolve_model_dir

_LM_DEFAULTS = LMConfig()
_LM_FIELDS = tuple(f.name for f in dataclasses.fields(LMConfig))


class SeqmixConfig(PretrainedConfig):
    """The fields of :class:`~seqmix.archs.lm.LMConfig` (same names, same defaults) and the byte tokenizer's
    special tokens; ``num_steps`` / ``exit_threshold``: the default depth of recurrent-depth layers in
    :class:`SeqmixForCausalLM` calls (None: the layer's own)."""

    model_type = MODEL_TYPE
    vocab_size: int = _LM_DEFAULTS.vocab_size
    hidden_size: int = _LM_DEFAULTS.hidden_size
    layers: list | None = None
    num_heads: int = _LM_DEFAULTS.num_heads
    intermediate_size: int | None = None
    norm_eps: float = _LM_DEFAULTS.norm_eps
    init_std: float = _LM_DEFAULTS.init_std
    mixer_options: dict | None = None
    num_steps: int | None = None
    exit_threshold: float | None = None
    bos_token_id: int | None = BOS
    eos_token_id: int | None = EOS
    pad_token_id: int | None = PAD
    use_cache: bool = True
    # The head reads the embedding matrix directly (there is no separate head weight to tie).
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # LMConfig expands "name*n" and fills the SwiGLU width, so both configs hold the same values.
        lm = self.lm_config()
        self.layers, self.intermediate_size, self.mixer_options = lm.layers, lm.intermediate_size, lm.mixer_options
        super().__post_init__(**kwargs)

    def lm_config(self) -> LMConfig:
        values = {name: getattr(self, name) for name in _LM_FIELDS}
        return LMConfig(**{name: value for name, value in values.items() if value is not None})

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)


# The name generate carries, reorders (beam search) and returns the cache under: "cache" in the newer
# transformers 5 releases (5.25 here), "past_key_values" in the older (5.17 on the GPU machine).
_GENERATE_CACHE_NAME = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


class SeqmixCache:
    """The mixers' states during ``generate`` (one :data:`State` per layer) and the tokens they have seen.

    Not a transformers ``Cache``: the states of recurrent mixers cannot be cropped or rolled back, so assisted
    (speculative) generation is not available; beam search reorders the rows (:meth:`reorder_cache`)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, states: list[State], seen_tokens: int = 0):
        self.states = states
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues row ``beam_idx[i]``. Every mixer keeps its state batch-first."""
        self.states = [{name: value.index_select(0, beam_idx.to(value.device)) for name, value in state.items()}
                       for state in self.states]


@dataclass
class SeqmixCausalLMOutput(ModelOutput):
    """``loss`` (with ``labels``), ``logits`` [B, T, vocab_size] and the ``cache`` after the call (with
    ``use_cache=True`` or a ``cache`` given)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: SeqmixCache | None = None


class SeqmixForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`~seqmix.archs.lm.LanguageModel` behind transformers' causal-LM interface.

    ``model(input_ids [B, T], attention_mask=None, labels=None, cache=None, use_cache=None, num_steps=None,
    exit_threshold=None)``: ``labels`` [B, T] give the mean next-token cross-entropy (shifted inside, -100
    ignored); ``attention_mask`` [B, T] leaves padded tokens out of every mixer (left padding in batched
    generation); with ``use_cache=True`` or a ``cache`` the call runs with the mixers' states and returns them
    (a new cache's attention layers preallocate ``capacity`` positions, which ``generate`` sets to its length).
    """

    config_class = SeqmixConfig
    base_model_prefix = "seqmix"
    main_input_name = "input_ids"
    _is_stateful = True  # no assisted generation: the states cannot be rolled back
    _supports_default_dynamic_cache = classmethod(lambda cls: False)  # the cache is made by forward

    def __init__(self, config: SeqmixConfig):
        super().__init__(config)
        lm = LanguageModel(config.lm_config())
        # The LanguageModel's modules are this model's, under the same names (embed, blocks, norm), so a seqmix
        # model.safetensors is this model's weights file; the LanguageModel itself is kept out of the module
        # tree (no second copy of the names) and runs the forward.
        self.embed, self.blocks, self.norm = lm.embed, lm.blocks, lm.norm
        object.__setattr__(self, "lm", lm)
        self.post_init()

    def _init_weights(self, module):
        """Nothing: LanguageModel initialises its own weights (each mixer its way); loading replaces them."""

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = self.lm.embed = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: SeqmixCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, num_steps: int | None = None, exit_threshold: float | None = None,
                return_dict: bool | None = None, inputs_embeds: torch.Tensor | None = None, capacity: int = 0,
                **unused) -> SeqmixCausalLMOutput | tuple:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("SeqmixForCausalLM takes input_ids (token ids [B, T]); inputs_embeds is not supported")
        asked = sorted(name for name, value in unused.items() if value not in (None, False))
        if asked:
            raise ValueError(f"SeqmixForCausalLM does not support {asked}")
        num_steps = self.config.num_steps if num_steps is None else num_steps
        exit_threshold = self.config.exit_threshold if exit_threshold is None else exit_threshold
        depth = {"num_steps": num_steps, "exit_threshold": exit_threshold}
        depth = {k: v for k, v in depth.items() if v is not None}
        B, T = input_ids.shape
        if attention_mask is not None:
            # generate grows the mask over the whole sequence; a cached call sees only its own T tokens.
            attention_mask = attention_mask[:, -T:]
            if bool(attention_mask.all()):
                attention_mask = None
        if cache is None and use_cache:
            cache = SeqmixCache(self.lm.init_state(B, num_steps=num_steps, capacity=capacity))
        if cache is not None:
            logits, states = self.lm(input_ids, cache.states, attention_mask=attention_mask, **depth)
            cache = SeqmixCache(states, cache.seen_tokens + T)
        else:
            logits, _ = self.lm(input_ids, attention_mask=attention_mask, **depth)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        out = SeqmixCausalLMOutput(loss=loss, logits=logits, cache=cache)
        return out if return_dict is not False else out.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """No transformers cache (forward makes the states); the attention caches are sized for the whole
        generation, so each step writes in place as in :meth:`LanguageModel.generate`."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        model_kwargs["capacity"] = generation_config.max_length or 0

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, next_sequence_length=None,
                                      num_steps=None, exit_threshold=None, use_cache=None, capacity=0, **kwargs):
        """The tokens not yet in the cache (all of the prompt first, then the newest), the mask and the depth.
        Past the prompt the mask is left out: generated tokens are never padding (and checking it would cost
        a host sync per token)."""
        cache = kwargs.get("past_key_values") if cache is None else cache
        if cache is not None:
            input_ids = input_ids[:, cache.seen_tokens:]
            attention_mask = None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache,
                "num_steps": num_steps, "exit_threshold": exit_threshold, "capacity": capacity}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """transformers' update (the attention mask grows by the new token), and the cache carried under the name
        this transformers version gives caches."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if outputs.cache is not None:
            model_kwargs[_GENERATE_CACHE_NAME] = outputs.cache
        return model_kwargs


_REMOTE_MODULE = "seqmix_hf"  # the module export() writes for trust_remote_code loading
_UNUSED = "<unused"  # "<unused300>": an id of the padded model vocabulary past the tokenizer's


class SeqmixTokenizer(PreTrainedTokenizer):
    """The byte-level tokens of :mod:`seqmix.data`: ids 0-255 are the UTF-8 bytes, then BOS, EOS and PAD.

    Each token is a string of one character, the byte's latin-1 character (specials: ``<s>``, ``</s>``,
    ``<pad>``), so transformers' string handling sees one token per byte; decoding joins the bytes and reads
    them as UTF-8. No vocabulary file: every seqmix model has the same tokens. ``BOS`` starts every encoded
    text (``add_bos_token``, as every training document and ``python -m seqmix.generate``'s prompt)."""

    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]
    vocab_files_names: ClassVar[dict[str, str]] = {}  # no vocabulary file

    def __init__(self, **kwargs):
        self._specials = {"<s>": BOS, "</s>": EOS, "<pad>": PAD}
        kwargs = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True,
                  **kwargs}
        self.add_bos_token = kwargs.pop("add_bos_token")
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return 256 + len(self._specials)

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(256)}
        return {**vocab, **self._specials, **self.added_tokens_encoder}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if token in self._specials:
            return self._specials[token]
        if len(token) == 1 and ord(token) < 256:
            return ord(token)
        if token.startswith(_UNUSED) and token[len(_UNUSED):-1].isdigit():
            return int(token[len(_UNUSED):-1])
        raise ValueError(f"{token!r} is not a byte token")

    def _convert_id_to_token(self, index: int) -> str:
        for token, special in self._specials.items():
            if index == special:
                return token
        if not 0 <= index:
            raise ValueError(f"token id {index} is negative")
        # Models pad their vocabulary (320 by default); ids past the tokenizer's are never in the data.
        return chr(index) if index < 256 else f"{_UNUSED}{index}>"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """The bytes as UTF-8 (as :func:`seqmix.data.decode`), the special tokens as their names; ids past
        the tokenizer's vocabulary (a padded model vocabulary) are left out, as ``decode`` does."""
        text, pending = [], []
        for token in tokens:
            i = self._convert_token_to_id(token)
            if i < 256:
                pending.append(i)
            elif token in self._specials:
                text += [decode(pending), token]
                pending = []
        return "".join(text) + decode(pending)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """``BOS`` first when ``add_bos_token`` (seqmix's training documents start with it)."""
        ids = token_ids_0 + (token_ids_1 or [])
        return [BOS] + ids if self.add_bos_token else ids

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()


def export(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``model_dir`` (a seqmix model directory, or a run directory with ``model/``) as a transformers
    checkpoint in ``out_dir``: the weights, a full transformers ``config.json``, the tokenizer's files, and a
    module ``seqmix_hf.py`` named in ``auto_map`` so that ``trust_remote_code=True`` loads the directory
    without ``import seqmix.hf`` first (seqmix must be installed). Returns ``out_dir``."""
    source = resolve_model_dir(model_dir)
    out = Path(out_dir)
    config = SeqmixConfig(**dataclasses.asdict(read_config(source / CONFIG_FILE)))
    config.auto_map = {"AutoConfig": f"{_REMOTE_MODULE}.SeqmixConfig",
                       "AutoModelForCausalLM": f"{_REMOTE_MODULE}.SeqmixForCausalLM"}
    config.architectures = [SeqmixForCausalLM.__name__]
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    shutil.copyfile(source / WEIGHTS_FILE, out / WEIGHTS_FILE)
    tokenizer = SeqmixTokenizer()
    tokenizer.save_pretrained(out)
    tokenizer_config = out / "tokenizer_config.json"
    values = json.loads(tokenizer_config.read_text())
    values["auto_map"] = {"AutoTokenizer": [f"{_REMOTE_MODULE}.SeqmixTokenizer", None]}
    tokenizer_config.write_text(json.dumps(values, indent=2) + "\n")
    (out / f"{_REMOTE_MODULE}.py").write_text(
        '"""seqmix\'s transformers classes, for trust_remote_code loading (written by seqmix.hf.export)."""\n'
        "from seqmix.hf import SeqmixConfig, SeqmixForCausalLM, SeqmixTokenizer  # noqa: F401\n")
    return out


AutoConfig.register(MODEL_TYPE, SeqmixConfig)
AutoModelForCausalLM.register(SeqmixConfig, SeqmixForCausalLM)
AutoTokenizer.register(SeqmixConfig, slow_tokenizer_class=SeqmixTokenizer)
