"""A prompt's token ids: plain text as is, chat messages through the model tokenizer's chat template."""

from __future__ import annotations

from tether.actor.tasks.base import Prompt
from tether.common.errors import ConfigError


def encode_prompt(prompt: Prompt, tokenizer) -> list[int]:
    """Token ids the engine is given for `prompt`.

    Chat prompts are rendered with the tokenizer's own chat template and the assistant turn opened
    (`add_generation_prompt=True`), as TRL does for conversational datasets; the template's special
    tokens are part of the text, so nothing is added around it.
    """
    if prompt.messages is None:
        return list(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"prompt {prompt.prompt_id!r} is a list of chat messages but the model's tokenizer has no "
                          "chat template (tokenizer_config.json 'chat_template'); use plain-text prompts or a "
                          "model with a template")
    text = tokenizer.apply_chat_template([dict(m) for m in prompt.messages], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
