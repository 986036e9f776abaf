"""`peftlab chat`: try a model of a run, with one prompt or a conversation on stdin.

The model is loaded as the evaluator loads it (`evaluate.runner.load_eval_model`: base, base + adapters
on the 4-bit base for qlora, or full weights), the conversation is rendered with the tokenizer's chat
template, and decoding is the evaluator's: greedy, stopping at the turn end or EOS, at most
`evaluate.max_new_tokens` new tokens (from the run's config unless overridden). Answers go to stdout;
prompts and notes to stderr, so `peftlab chat ... --prompt TEXT > answer.txt` keeps only the answer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from peftlab.config import StudyConfig
from peftlab.console import say
from peftlab.errors import UserError
from peftlab.rundir import read_run_config

EXIT_WORDS = ("exit", "quit")


class ChatSession:
    """A loaded model and its conversation so far; `reply(text)` answers one user turn."""

    def __init__(self, config: StudyConfig, run_dir: Path, name: str, max_new_tokens: int | None = None) -> None:
        from peftlab.evaluate.generate import hf_greedy
        from peftlab.evaluate.runner import load_eval_model
        from peftlab.models import device_name, load_tokenizer

        if name == "ensemble":
            raise UserError("--model ensemble: the ensemble mixes two models at every step; chat with one of its"
                            f" members ({', '.join(config.evaluate.ensemble.members)})")
        if name != "base":
            config.method(name)  # an unknown method or seed repeat: one line naming the known ones
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else config.evaluate.max_new_tokens
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        self.device = device_name()
        self.tokenizer = load_tokenizer(config.model)
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"tokenizer {config.model.tokenizer or config.model.name_or_path}: no chat template")
        self.model = load_eval_model(config, run_dir, name, self.device)
        self.decode = hf_greedy(self.model, self.tokenizer, self.max_new_tokens)
        self.messages: list[dict[str, str]] = []

    def prompt_text(self) -> str:
        return self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)

    def reply(self, text: str) -> str:
        """Add the user's turn, answer it greedily, keep the answer in the conversation."""
        from peftlab.evaluate.generate import generate_all

        self.messages.append({"role": "user", "content": text})
        (answer, _count), = generate_all(self.decode, self.tokenizer, [self.prompt_text()], 1, self.device,
                                         show_progress=False)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run_chat(run_dir: Path, name: str, *, prompt: str | None = None, max_new_tokens: int | None = None,
             lines: Iterable[str] | None = None, write: Callable[[str], None] | None = None) -> int:
    """One prompt (`prompt`), else a conversation over `lines` (stdin) until EOF, an empty line or
    `exit`; each answer is passed to `write` (stdout). Returns the number of answers."""
    write = write or (lambda text: print(text, flush=True))
    config = read_run_config(run_dir)
    session = ChatSession(config, run_dir, name, max_new_tokens)
    if prompt is not None:
        if not prompt.strip():
            raise UserError("--prompt is empty")
        write(session.reply(prompt))
        return 1
    interactive = sys.stdin.isatty() if lines is None else False
    if interactive:
        say(f"chat with {name} (greedy, at most {session.max_new_tokens} new tokens); an empty line or"
            " 'exit' ends")
    answers = 0
    for line in _user_lines(lines, interactive):
        text = line.rstrip("\n")
        if not text.strip() or text.strip().lower() in EXIT_WORDS:
            break
        write(session.reply(text))
        answers += 1
    return answers


def _user_lines(lines: Iterable[str] | None, interactive: bool) -> Iterable[str]:
    if lines is not None:
        yield from lines
        return
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            return
        yield line
