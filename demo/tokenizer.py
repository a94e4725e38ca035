"""The demo model's tokenizer: byte-level BPE trained on the spot, with Qwen2's pipeline.

`AutoTokenizer` loads a qwen2 model's tokenizer as `Qwen2Tokenizer`, which rebuilds the
normalizer and pre-tokenizer (NFC plus Qwen's split regex); training with that same pipeline
keeps token ids stable across a save and reload.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2Tokenizer's split regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
# Copied so this module imports without transformers; a test checks they still agree.
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2-Instruct ChatML template (Qwen2.5's adds tool calls, which the demo does not need).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_WORDS = (
    "the of and to in is was for on that with as by at from it be this are have not or "
    "an which but had they his her she he we you all their there been one has were more "
    "will would can if about when so what time year people way day man woman child world "
    "life hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye "
    "job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information "
    "back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education model adapter "
    "batch token prompt answer request queue worker server data table file result summary "
    "good new first last long great little own other old right big high different small large "
    "next early young important few public bad same able quickly slowly always never often "
    "say make go know take see come think look want give use find tell ask seem feel try leave "
    "call write read run keep begin help show hear play move live believe bring happen provide"
).split()
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zen", "qua", "bri", "dor", "fel", "gar", "hin", "jus")
_EXTRA_LINES = (
    "Café au lait, naïve façade, Zürich and São Paulo.",
    "Größe, Straße, Ærø, Øresund, Ångström, résumé, piñata.",
    "東京 大阪 北京 上海 你好 世界 こんにちは 안녕하세요",
    "Привет мир, γειά σου κόσμε, مرحبا بالعالم, שלום עולם",
    "Emoji: 😀 🚀 ✨ 👍 ❤️ and symbols © ® ™ € £ ¥ ° ± × ÷",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i * 2)\n",
    '{"id": 42, "name": "demo", "tags": ["a", "b"], "ok": true}',
    "SELECT id, status FROM jobs WHERE status = 'queued' ORDER BY id;",
    "Prices: $3.50, 12.5%, 1,000,000 and 2024-05-17 at 09:30.",
)


def _demo_corpus() -> list[str]:
    """English-ish lines from a fixed seed, plus digits, code and non-Latin scripts."""
    rng = random.Random(1234)  # fixed: the tokenizer must not depend on the model seed
    syllable_words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(4000)]
    vocabulary = list(_WORDS) + syllable_words
    lines = list(_EXTRA_LINES) * 20
    for _ in range(6000):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice((".", ".", "?", "!", ",", ":", ";"))
        lines.append(sentence + rng.choice(("", "", "\n", "\n\n", "  ")))
    return lines


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train byte-level BPE with the exact pipeline Qwen2Tokenizer rebuilds on load.

    Qwen2Tokenizer replaces whatever normalizer and pre-tokenizer tokenizer.json holds
    with NFC + Qwen's split regex + ByteLevel(use_regex=False). A tokenizer trained with
    anything else gets different ids after a save/reload, so train with exactly that.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unk
        show_progress=False,
    )
    tokenizer.train_from_iterator(_demo_corpus(), trainer=trainer)
    return tokenizer


def wrap_tokenizer(trained: Tokenizer) -> PreTrainedTokenizerBase:
    """A Qwen2Tokenizer over the trained vocab and merges, with Qwen's special tokens."""
    from transformers import Qwen2Tokenizer

    model = json.loads(trained.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


# --- base model ------------------------------------------------------------------------
