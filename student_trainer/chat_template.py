"""The built-in tokenizers' chat template, so chat data (`messages`, conversational
`prompt`) works with the committed models as it does with a real chat model's.

The tokenizers are small byte-level BPEs learned on the tasks' text: role words and
ChatML markers are not in their vocabulary (`user:` is four byte-level pieces in the
records tokenizer), and the models were trained on bare prompts. So the template writes
the turns' text itself, with no role markers: <bos>, each turn's content, a newline
between consecutive non-assistant turns (a system message before the user's), and <eos>
after each reply, as training ended every answer. A conversation of one user turn thus
renders exactly as its plain-text prompt encodes (`tokenizer(prompt)`), and the models
answer it as they answer that prompt; the generation prompt adds nothing (the reply
follows the prompt's text, as the tasks' answers follow their prompts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}"
    "{% elif not loop.last and loop.nextitem['role'] != 'assistant' %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
)


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> None:
    """save_pretrained with the chat template in tokenizer_config.json (as the committed
    models/ hold it), not in transformers 5's separate chat_template.jinja: a rebuilt
    model directory has the committed one's files."""
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
